"""Keyed draws: what it costs to give every rollout its own random numbers (D22).

RIEL draws rollout (q, i, g) from a key of (seed, step, question, expert, rollout), so a
question samples the same completions in any batch and at any world size. This script times
generation at RIEL's layout (`--questions` x 3 experts x G rows) with keyed draws against one
torch.Generator for the whole batch (the sampler's other mode), interleaved in one process, one
thread, the synthetic world's model shape by default.

    python -m bench.bench_rollout_keys
    python -m bench.bench_rollout_keys --hidden 896 --layers 4 --vocab 151936   # bigger shapes
"""
import argparse
import statistics
import time

import torch

from meml.model import ModelConfig, Transformer
from meml.sampler import generate, int64_bits, stream_key


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6), source="bench")
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = []
    for q in range(args.questions):
        for i in range(3):
            prompt = torch.randint(0, args.vocab, (args.prompt_tokens,), generator=g).tolist()
            prompts += [prompt] * args.group_size
    keys = torch.tensor([int64_bits(stream_key(0, 5, r)) for r in range(len(prompts))], dtype=torch.long)
    # no stop ids: every row runs the full length, so both modes do the same work
    kwargs = dict(max_new_tokens=args.new_tokens, stop_ids=[], pad_id=0, temperature=1.0)
    times = {"one generator": [], "keyed": []}
    for _ in range(args.repeats):
        for mode in times:
            t0 = time.process_time()
            if mode == "keyed":
                generate(model, prompts, row_keys=keys, **kwargs)
            else:
                generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
            times[mode].append(time.process_time() - t0)
    base = statistics.median(times["one generator"])
    print(f"{len(prompts)} rows x {args.new_tokens} tokens, hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}; process CPU seconds, median of {args.repeats}")
    for mode, ts in times.items():
        print(f"  {mode:<14} {statistics.median(ts):.3f} s  ({statistics.median(ts) / base:.3f}x)")


if __name__ == "__main__":
    main()
