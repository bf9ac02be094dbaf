"""Generation throughput: meml's KV-cache sampler vs transformers' `generate`, same weights.

Rollouts are where GRPO spends its time, so this is the number that decides how long training
takes. Both samplers run greedy on the same random-weight Qwen2 checkpoint (built with
transformers, saved, and loaded by `Transformer.from_pretrained`), on the same prompts, forced
to exactly --new-tokens tokens (no stop ids), interleaved in one process so that machine load
hits both alike. Reports tokens/s (generated tokens only) and the ratio ours / transformers, and
whether the greedy outputs agree.

    python -m bench.bench_generate                  # tiny model + Qwen2.5-0.5B shape, CPU
    python -m bench.bench_generate --models tiny --repeats 3
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from meml.model import Transformer
from meml.sampler import generate

REPO_ROOT = Path(__file__).resolve().parents[1]
QWEN_CONFIG = Path(os.environ.get("MEML_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) \
    / "configs" / "Qwen2.5-0.5B-Instruct" / "config.json"
TINY_CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)


def build_pair(config_kwargs: dict, directory: Path, device: str):
    """(transformers model, our model) with the same random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**config_kwargs)).eval()
    hf.save_pretrained(directory)
    hf = hf.to(device)
    hf.generation_config.eos_token_id = None  # force exactly max_new_tokens
    hf.generation_config.pad_token_id = 0
    ours = Transformer.from_pretrained(directory, device=device).eval()
    return hf, ours


DEVICE = "cpu"


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run):
    """(wall seconds, CPU seconds of this process, result of run())."""
    sync(DEVICE)
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    sync(DEVICE)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def run_ours(model, prompts, new_tokens):
    out = generate(model, prompts, max_new_tokens=new_tokens, stop_ids=[], pad_id=0,
                   temperature=0.0)
    return out.completion_ids.cpu()


def run_transformers(model, prompts, new_tokens):
    ids = torch.tensor(prompts, device=DEVICE)  # equal lengths: no padding needed
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[:, ids.shape[1]:].cpu()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen2.5-0.5b"],
                        choices=["tiny", "qwen2.5-0.5b"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 24])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs (tiny)")
    parser.add_argument("--repeats-large", type=int, default=2,
                        help="best of this many runs (Qwen2.5-0.5B shape; each takes minutes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f} at start")
    rows = []
    for name in args.models:
        if name == "tiny":
            config = TINY_CONFIG
        elif not QWEN_CONFIG.exists():
            print(f"skipping qwen2.5-0.5b: needs {QWEN_CONFIG} (set MEML_SHARED_DATA): "
                  "not present")
            continue
        else:
            config = json.loads(QWEN_CONFIG.read_text())
            config = {k: v for k, v in config.items() if k not in ("architectures",
                                                                    "transformers_version")}
            config["torch_dtype"] = "float32"
        with tempfile.TemporaryDirectory() as directory:
            hf, ours = build_pair(config, Path(directory), DEVICE)
        vocab = config["vocab_size"]
        for batch in args.batch_sizes:
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(1, vocab, (batch, args.prompt_len), generator=gen).tolist()
            run_ours(ours, [p[:8] for p in prompts], 4)  # warm-up both
            run_transformers(hf, [p[:8] for p in prompts], 4)
            times = {"ours": [], "hf": []}  # (wall, cpu) per run
            outputs = {}
            repeats = args.repeats if name == "tiny" else args.repeats_large
            for repeat in range(repeats):  # interleaved, order alternating: drift hits both
                for which in (("ours", "hf") if repeat % 2 == 0 else ("hf", "ours")):
                    run, model = (run_ours, ours) if which == "ours" else (run_transformers, hf)
                    wall, cpu, outputs[which] = timed(lambda: run(model, prompts, args.new_tokens))
                    times[which].append((wall, cpu))
            best_ours, best_hf = min(w for w, _ in times["ours"]), min(w for w, _ in times["hf"])
            cpu_ours, cpu_hf = min(c for _, c in times["ours"]), min(c for _, c in times["hf"])
            ids_ours, ids_hf = outputs["ours"], outputs["hf"]
            tokens = batch * args.new_tokens
            agree = (ids_ours == ids_hf).float().mean().item()
            rows.append((name, batch, tokens / best_ours, tokens / best_hf, best_hf / best_ours,
                         cpu_hf / cpu_ours, agree, os.getloadavg()[0]))
            show = lambda runs: " ".join(f"{w:.2f}/{c:.2f}" for w, c in runs)
            print(f"  {name} batch {batch} (wall/cpu s): ours {show(times['ours'])}, "
                  f"transformers {show(times['hf'])}, load "
                  + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
        del hf, ours

    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens (forced), greedy, "
          f"best of {args.repeats} (tiny) / {args.repeats_large} (0.5B shape)")
    print("tok/s from wall time; 'cpu ratio' compares process CPU seconds (less sensitive to "
          "other jobs on a shared machine)")
    print(f"{'model':<14}{'batch':>6}{'ours tok/s':>12}{'hf tok/s':>10}{'ratio':>8}"
          f"{'cpu ratio':>11}{'same ids':>10}{'load1':>7}")
    for name, batch, ours_tps, hf_tps, ratio, cpu_ratio, agree, load in rows:
        print(f"{name:<14}{batch:>6}{ours_tps:>12.1f}{hf_tps:>10.1f}{ratio:>7.2f}x"
              f"{cpu_ratio:>10.2f}x{agree:>10.1%}{load:>7.2f}")


if __name__ == "__main__":
    main()
