"""One RIEL step of meml against one GRPOTrainer step of TRL, with matched work.

Both train the same random-weight Qwen2 checkpoint (written by transformers) on the same 2
plain-text prompts x G = 8 rollouts of exactly 32 new tokens, sampled at temperature 1 over the
model's whole vocabulary; clipped GRPO (ε = 0.2) with group-std advantages, token-mean
aggregation (TRL's default loss_type "dapo"), β = 0.04 with k3 against a frozen reference, AdamW
at lr 1e-5, fp32, no gradient checkpointing, one optimizer step per rollout batch. The reward is
the same arbitrary function of the completion's text for both (what it is does not change the
work). meml's step is the body of `meml.riel.riel_step` with one expert and plain prompts instead
of chat-formatted ones: `sampler.generate`, `group_advantages`, `riel.backward_e7`, AdamW.

Each framework runs its steps in its own process (so peak memory, VmHWM, is its own), the two
alternating `--rounds` times; a step's time is the median over the measured steps of all rounds
(the first step of each process is a warm-up). TRL is a benchmark-only dependency:

    pip install trl            # not in requirements*.txt
    python -m bench.bench_riel_vs_trl --models tiny tiny-qwen-vocab qwen2.5-0.5b --threads 2

The tiny model uses the synthetic world's tokenizer (vocabulary 512); tiny-qwen-vocab is the same
tiny decoder with Qwen2.5's real vocabulary (151,936 rows, hidden 64), where the LM head dominates
as it does in small real models; the Qwen2.5-0.5B shape and tiny-qwen-vocab use the real Qwen2.5
tokenizer from ../shared/data (MEML_SHARED_DATA).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEML_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
PROMPTS = ["Mia has 3 apples and buys 4 more bags of 5 apples each. How many apples does she have now?",
           "A train leaves at 9:40 and the trip takes 2 hours and 35 minutes. When does it arrive?"]
G, NEW_TOKENS, LR, BETA = 8, 32, 1e-5, 0.04


def reward_of(text: str) -> float:
    """An arbitrary deterministic 0/1 reward: the two frameworks get the same signal."""
    return float(sum(map(ord, text)) % 3 == 0)


def write_checkpoint(name: str, folder: Path) -> None:
    """A random-weight Qwen2 checkpoint in HF layout, with a tokenizer beside it."""
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from meml import synthetic_assets
    if name == "tiny":
        assets = synthetic_assets.write_synthetic_assets(folder / "assets")
        config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        tokenizer_dir = assets
    elif name == "tiny-qwen-vocab":  # small real models' regime: the LM head over 151,936 ids dominates
        config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        tokenizer_dir = SHARED / "tokenizers" / "qwen2.5"
    else:
        config = Qwen2Config(**json.loads((SHARED / "configs" / "Qwen2.5-0.5B-Instruct" / "config.json").read_text()))
        tokenizer_dir = SHARED / "tokenizers" / "qwen2.5"
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / file, folder / file)


def peak_memory_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def run_meml(folder: Path, steps: int, lora_rank: int = 0) -> list[float]:
    """meml's steps; lora_rank > 0: LoRA on every projection (α = 2r), E4 against the adapters off."""
    import torch

    from meml.advantage import group_advantages
    from meml.config import RielConfig
    from meml.inference import load
    from meml.model import Transformer
    from meml.e7 import Experts, Grid, Rollouts, backward_e7, e7_batch, micro_batches
    from meml.sampler import generate

    model, tok = load(folder)
    tok.vocab_size = model.config.vocab_size  # sample and score over the whole vocabulary, as TRL does
    if lora_rank:
        from meml import lora
        lora.add_lora(model, lora_rank, 2.0 * lora_rank)
        ref = lora.WithoutAdapters(model)
    else:
        ref = Transformer.from_pretrained(folder).eval().requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LR, fused=True)  # meml's trainer's and TRL's default
    cfg = RielConfig(group_size=G, max_new_tokens=NEW_TOKENS, loss="clipped", advantage_scale="group_std",
                     positive_only=False, aggregation="token_mean", beta=BETA, kl_estimator="k3", lambda1=0.0,
                     hard_example_buffer=False, micro_batch_size=len(PROMPTS) * G)
    experts = Experts(tok, [""], "synthetic")
    prompts = [tok.encode(p) for p in PROMPTS for _ in range(G)]
    rows = torch.arange(len(prompts)).view(len(PROMPTS), 1, G)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        gen = generate(model, prompts, max_new_tokens=NEW_TOKENS, stop_ids=[], pad_id=tok.pad_id,
                       vocab_limit=tok.vocab_size, temperature=1.0, generator=generator)
        completions = [ids[mask].tolist() for ids, mask in zip(gen.completion_ids, gen.completion_mask)]
        texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
        ro = Rollouts(rows, prompts, completions, [lp[m] for lp, m in zip(gen.logprobs, gen.completion_mask)],
                      gen.finished.tolist(), texts, [torch.zeros(len(c)) for c in completions])
        rewards = torch.tensor([reward_of(t) for t in texts]).view(len(PROMPTS), 1, G)
        advantages = group_advantages(rewards, scale="group_std")
        model.train()
        b = e7_batch(ro, Grid.of(ro, rewards, cfg), advantages, slice(None), ([], []), cfg)
        backward_e7(model, experts, b, micro_batches(b, cfg), cfg, ref)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def run_trl(folder: Path, steps: int) -> list[float]:
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    warnings.filterwarnings("ignore")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = Dataset.from_dict({"prompt": PROMPTS * steps})
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(PROMPTS) * G,
                      num_generations=G, max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0,
                      generation_kwargs={"min_new_tokens": NEW_TOKENS}, beta=BETA, epsilon=0.2,
                      loss_type="dapo", scale_rewards="group", learning_rate=LR, bf16=False,
                      gradient_checkpointing=False, use_cpu=True, max_steps=steps, logging_steps=1000,
                      report_to=[], save_strategy="no", seed=0, num_iterations=1, shuffle_dataset=False)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [reward_of(c) for c in completions],
                          args=args, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.times


def worker(framework: str, folder: Path, steps: int, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    times = (run_meml if framework == "meml" else run_trl)(folder, steps)
    print(json.dumps({"times": times, "peak_gb": peak_memory_gb()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-qwen-vocab", "qwen2.5-0.5b"],
                        choices=["tiny", "tiny-qwen-vocab", "qwen2.5-0.5b"])
    parser.add_argument("--steps", type=int, default=4, help="steps per process, the first a warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="processes per framework, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], Path(args.worker[1]), args.steps, args.threads)
    print(f"{'model':<16}{'meml s/step':>13}{'TRL s/step':>12}{'speed-up':>10}{'meml GB':>9}{'TRL GB':>8}")
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(name, Path(tmp))
            measured = {"meml": [], "trl": []}
            peak = {"meml": 0.0, "trl": 0.0}
            for _ in range(args.rounds):
                for framework in ("meml", "trl"):
                    done = subprocess.run([sys.executable, "-m", "bench.bench_riel_vs_trl", "--worker", framework, tmp,
                                           "--steps", str(args.steps), "--threads", str(args.threads)],
                                          cwd=REPO_ROOT, capture_output=True, text=True, check=True)
                    result = json.loads(next(line for line in reversed(done.stdout.splitlines())
                                             if line.startswith('{"times"')))
                    measured[framework] += result["times"][1:]
                    peak[framework] = max(peak[framework], result["peak_gb"])
            ours, theirs = statistics.median(measured["meml"]), statistics.median(measured["trl"])
            print(f"{name:<16}{ours:>13.3f}{theirs:>12.3f}{theirs / ours:>9.2f}x{peak['meml']:>9.2f}{peak['trl']:>8.2f}")


if __name__ == "__main__":
    main()
