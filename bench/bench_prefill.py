"""Shared prefill: generation time when the G rollouts of a group prefill their prompt once.

RIEL samples G completions of every (question, expert) prompt. The sampler prefills each
distinct prompt once and copies its KV cache to its G rows (`share_prefill=True`, the default);
this script times that against prefilling every row, on batches laid out as RIEL lays them
(`--groups` distinct prompts x `--group-size` copies, random ids, equal lengths), sampling at
temperature 1 with the same seed, both interleaved in one process. Equal outputs are checked.

    python -m bench.bench_prefill                                   # tiny + Qwen2.5-0.5B shape
    python -m bench.bench_prefill --models tiny --prompt-tokens 150 --new-tokens 32
"""
import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from meml.model import ModelConfig, Transformer
from meml.sampler import generate

REPO_ROOT = Path(__file__).resolve().parents[1]
QWEN_CONFIG = Path(os.environ.get("MEML_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) \
    / "configs" / "Qwen2.5-0.5B-Instruct" / "config.json"
TINY = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)


def model_of(name: str) -> Transformer:
    if name == "tiny":
        config = ModelConfig.from_hf_dict(TINY, source="tiny")
    else:
        config = ModelConfig.from_json(QWEN_CONFIG)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    return model.eval()


def layout_arguments(description: str) -> argparse.Namespace:
    """The command line of a benchmark on RIEL's batch layout (this one and bench_prompt_forward):
    which models, how many distinct prompts of how many rows, how long; sets the thread count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen2.5-0.5b"], choices=["tiny", "qwen2.5-0.5b"])
    parser.add_argument("--groups", type=int, default=3, help="distinct prompts (experts x questions)")
    parser.add_argument("--group-size", type=int, default=8, help="G: rows per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=150)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main():
    args = layout_arguments(__doc__.split("\n")[0])
    print(f"{'model':<14}{'rows':>6}{'prompt':>8}{'new':>6}{'shared s':>11}{'per-row s':>11}{'ratio':>8}  equal")
    for name in args.models:
        model = model_of(name)
        ids = torch.randint(0, 500, (args.groups, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
        prompts = [ids[g].tolist() for g in range(args.groups) for _ in range(args.group_size)]
        times, outs = {True: [], False: []}, {}
        for _ in range(args.repeats):
            for share in (True, False):
                start = time.perf_counter()
                outs[share] = generate(model, prompts, max_new_tokens=args.new_tokens, stop_ids=[], pad_id=0,
                                       temperature=1.0, generator=torch.Generator().manual_seed(0),
                                       share_prefill=share)
                times[share].append(time.perf_counter() - start)
        equal = torch.equal(outs[True].completion_ids, outs[False].completion_ids)
        shared, per_row = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name:<14}{len(prompts):>6}{args.prompt_tokens:>8}{args.new_tokens:>6}{shared:>11.3f}"
              f"{per_row:>11.3f}{per_row / shared:>7.2f}x  {equal}")


if __name__ == "__main__":
    main()
