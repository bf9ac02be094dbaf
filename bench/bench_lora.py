"""One RIEL step with LoRA against full fine-tuning, the same model and work (issue 22).

The step of bench/bench_riel_vs_trl.py (2 prompts x G = 8 rollouts of 32 tokens, clipped GRPO,
β = 0.04 with k3, AdamW, fp32) at the Qwen2.5-0.5B shape (random weights written by
transformers), once training every weight and once training rank-r adapters on every projection
(`meml/lora.py`; E4's reference is then the same model with the adapters off, where full
fine-tuning holds a second copy). Each in its own process, so its peak memory (VmHWM) is its own;
a step's time is the median of the steps after the first.

    python -m bench.bench_lora --rank 16 --steps 3 --threads 2
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_riel_vs_trl import REPO_ROOT, peak_memory_gb, run_meml, write_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", choices=["tiny", "tiny-qwen-vocab", "qwen2.5-0.5b"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per process, the first a warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("RANK", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        times = run_meml(Path(args.worker[1]), args.steps, lora_rank=int(args.worker[0]))
        print(json.dumps({"times": times, "peak_gb": peak_memory_gb()}))
        return
    print(f"{args.model}, {args.threads} threads: RIEL step time (median after warm-up) and peak memory")
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(args.model, Path(tmp))
        for rank in (0, args.rank):
            done = subprocess.run([sys.executable, "-m", "bench.bench_lora", "--worker", str(rank), tmp,
                                   "--steps", str(args.steps), "--threads", str(args.threads)],
                                  cwd=REPO_ROOT, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.splitlines()[-1])
            label = "full fine-tuning" if rank == 0 else f"LoRA r = {rank}"
            print(f"  {label:<18}{statistics.median(result['times'][1:]):>8.2f} s/step{result['peak_gb']:>8.2f} GB")


if __name__ == "__main__":
    main()
