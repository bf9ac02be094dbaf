"""How big a model and how many MEF steps does the synthetic world need on a 2-core CPU?

An experiment, not part of the method: it trains transformers' Qwen2ForCausalLM (the same
architecture as meml's decoder) with a plain SFT loop on the three teachers' answers (E1),
rendered with the synthetic tokenizer's ChatML format, then reports greedy accuracy per expert
and per difficulty, and how often G sampled rollouts of one expert are all wrong (zero-signal
GRPO groups). transformers is a test/bench-only dependency.

    python -m bench.synthetic_feasibility --seconds 200 --hidden 128 --layers 4
"""
import argparse
import math
import random
import re
import tempfile
import time

import torch
from tokenizers import Tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM

from meml.synthetic import EXPERT_PROMPTS, TEACHERS, generate_problems
from meml.synthetic_assets import write_synthetic_assets

MARKERS = [re.compile(r"####\s*(-?\d+)"), re.compile(r"The answer is (-?\d+)"), re.compile(r"\\boxed\{(-?\d+)\}")]


def final_answer(text: str):
    """Last integer after any accepted marker (a stand-in for meml.rewards' GSM8K verifier)."""
    hits = [(m.start(), m.group(1)) for pat in MARKERS for m in pat.finditer(text)]
    return max(hits)[1] if hits else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=200, help="MEF wall-clock budget")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=0, help="intermediate size (default 3 * hidden)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-eval", type=int, default=60, help="eval questions per difficulty level")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--n-sample", type=int, default=20, help="questions per level for the rollout test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-mix", default="1:1,2:1,3:1", help="difficulty level:weight of the train split")
    ap.add_argument("--eval-every", type=int, default=0, help="greedy accuracy on 20 eval questions per level every N steps (a multiple of 50)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    out = write_synthetic_assets(tempfile.mkdtemp(), seed=args.seed, hidden_size=args.hidden,
                                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 num_key_value_heads=max(1, args.heads // 2),
                                 intermediate_size=args.ffn or 3 * args.hidden)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = Qwen2Config.from_pretrained(out)
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    im_end, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")

    def prompt_ids(expert, question):
        text = (f"<|im_start|>system\n{EXPERT_PROMPTS[expert]}<|im_end|>\n"
                f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
        return tok.encode(text).ids

    mix = {int(k): float(v) for k, v in (kv.split(":") for kv in args.train_mix.split(","))}
    train = generate_problems(args.n_train, "train", args.seed, mix)
    seqs = []  # (ids, number of prompt tokens)
    for p in train:
        for i, teach in enumerate(TEACHERS):
            pr = prompt_ids(i, p.question())
            seqs.append((pr + tok.encode(teach(p)).ids + [im_end], len(pr)))
    lens = [len(s) for s, _ in seqs]
    comp = [len(s) - n for s, n in seqs]
    print(f"params {n_params/1e6:.2f}M  vocab {config.vocab_size}  train seqs {len(seqs)}  "
          f"tokens/seq mean {sum(lens)/len(lens):.1f} max {max(lens)}  completion mean {sum(comp)/len(comp):.1f} max {max(comp)}")

    evals = {lv: [p for p in generate_problems(3 * args.n_eval, "eval", args.seed) if p.difficulty == lv]
             for lv in (1, 2, 3)}

    def rollout(expert, problems, n, greedy):
        prompts = [prompt_ids(expert, p.question()) for p in problems for _ in range(n)]
        T = max(map(len, prompts))
        ids = torch.tensor([[pad] * (T - len(x)) + x for x in prompts])  # left padding
        mask = (torch.arange(T)[None] >= torch.tensor([T - len(x) for x in prompts])[:, None]).long()
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=72, do_sample=not greedy,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 eos_token_id=im_end, pad_token_id=pad)
        texts = [tok.decode(g[T:].tolist(), skip_special_tokens=True) for g in gen]
        right = [final_answer(t) == str(p.answer) for t, p in zip(texts, [p for p in problems for _ in range(n)])]
        return texts, right

    def greedy_table(n):
        model.eval()
        acc = {(i, lv): sum(rollout(i, evals[lv][:n], 1, True)[1]) / n for i in range(3) for lv in (1, 2, 3)}
        model.train()
        return " | ".join(f"e{i} " + " ".join(f"{acc[(i, lv)]:.2f}" for lv in (1, 2, 3)) for i in range(3))

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    t0, c0, step, tokens = time.time(), time.process_time(), 0, 0
    model.train()
    while step < args.max_steps and time.time() - t0 < args.seconds:
        # warmup 30 steps, then cosine to 10% over the step or time budget, whichever ends first
        progress = min(1.0, max((time.time() - t0) / args.seconds, step / args.max_steps))
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = rng.sample(seqs, args.batch)
        T = max(len(s) for s, _ in batch)
        ids = torch.full((args.batch, T), pad)
        labels = torch.full((args.batch, T), -100)
        mask = torch.zeros((args.batch, T), dtype=torch.long)
        for b, (s, n) in enumerate(batch):
            ids[b, : len(s)] = torch.tensor(s)
            labels[b, n: len(s)] = torch.tensor(s[n:])
            mask[b, : len(s)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int(mask.sum())
        if step % 50 == 0:
            el = time.time() - t0
            # ~ wall time on an idle machine; both clocks include the --eval-every evaluations (~2 s each)
            cpu = (time.process_time() - c0) / args.threads
            if args.eval_every and step % args.eval_every == 0:
                print(f"  step {step} greedy acc d1 d2 d3 per expert (20/level): {greedy_table(20)}", flush=True)
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {step/el:.2f} steps/s wall, "
                  f"{step/cpu:.2f} steps/s cpu, {tokens/el:.0f} tok/s wall", flush=True)
    el = time.time() - t0
    cpu = (time.process_time() - c0) / args.threads
    print(f"MEF: {step} steps in {el:.0f}s wall ({cpu:.0f}s cpu per thread) = {step/el:.2f} steps/s wall, "
          f"{step/cpu:.2f} steps/s cpu, {tokens/el:.0f} tok/s wall, final loss {loss.item():.3f}")

    t1 = time.time()
    wrong_sets = {}
    model.eval()
    print("greedy accuracy (eval): expert x difficulty")
    for i in range(3):
        row = []
        for lv in (1, 2, 3):
            texts, right = rollout(i, evals[lv], 1, True)
            row.append(sum(right) / len(right))
            wrong_sets[(i, lv)] = {p.id for p, r in zip(evals[lv], right) if not r}
        print(f"  expert {i}: " + "  ".join(f"d{lv} {a:.2f}" for lv, a in zip((1, 2, 3), row)) +
              f"   e.g. {texts[0]!r}")
    for lv in (1, 2, 3):
        w = [wrong_sets[(i, lv)] for i in range(3)]
        n = len(evals[lv])
        print(f"  d{lv}: oracle (any right) {1 - len(w[0] & w[1] & w[2]) / n:.2f}  "
              f"wrong by exactly one expert {sum(len(w[i] - w[(i+1)%3] - w[(i+2)%3]) for i in range(3))}  "
              f"pairwise overlap 01 {len(w[0]&w[1])} 02 {len(w[0]&w[2])} 12 {len(w[1]&w[2])}  of {n}")
    print(f"greedy eval took {time.time()-t1:.0f}s")

    t1 = time.time()
    print(f"sampled rollouts (T=1, G={args.G}): fraction of (question, expert) groups all wrong / all right")
    for lv in (1, 2, 3):
        qs = evals[lv][: args.n_sample]
        cells, all_experts_wrong = [], [True] * len(qs)
        for i in range(3):
            _, right = rollout(i, qs, args.G, False)
            groups = [right[k * args.G:(k + 1) * args.G] for k in range(len(qs))]
            cells.append(f"e{i} wrong {sum(not any(g) for g in groups)/len(qs):.2f} right {sum(all(g) for g in groups)/len(qs):.2f} mean r {sum(right)/len(right):.2f}")
            all_experts_wrong = [a and not any(g) for a, g in zip(all_experts_wrong, groups)]
        print(f"  d{lv}: " + " | ".join(cells) + f" | all {3*args.G} wrong {sum(all_experts_wrong)/len(qs):.2f}")
    print(f"sampling took {time.time()-t1:.0f}s")


if __name__ == "__main__":
    main()
