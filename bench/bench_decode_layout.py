"""A decode step's products: `x @ W.T` (F.linear) against `(W @ x.T).T` (meml.model.decode_linear).

A decode step multiplies a handful of rows, one new token per sequence, by every weight of the
model. The two orientations compute the same sums; this script times both at each weight shape
of a model (Qwen2.5-0.5B's by default) for 1 to 128 rows, and says whether a row's result has the
same bits as the same row inside a --reference-rows product. That second column is what decision
D22 rests on: a rollout is the same at any world size only while a row's logits do not depend on
how many rows share its decode step.

Prints GB/s of weights read (higher is faster) per layout and their ratio; `=` after a figure:
the rows' bits equal those in the big product, `!`: they differ.

    python -m bench.bench_decode_layout                 # Qwen2.5-0.5B shapes, 2 threads
    python -m bench.bench_decode_layout --threads 1 --rows 8 16 24
"""
import argparse
import time

import torch
import torch.nn.functional as F

from meml.model import decode_linear


def seconds_per_call(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def cpu_name() -> str:
    """The CPU's model name (the figures depend on it: MKL picks its kernels by CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "CPU model unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--qkv", type=int, default=1152, help="rows of the fused q/k/v weight")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64, 128])
    p.add_argument("--reference-rows", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=0.3, help="about this long per timing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h = args.hidden
    shapes = {"qkv": (args.qkv, h), "o": (h, h), "gate/up": (args.intermediate, h),
              "down": (h, args.intermediate), "lm head": (args.vocab, h)}
    print(cpu_name())
    print(f"GB/s of fp32 weights, {args.threads} threads; '=' a row's bits equal its bits in a "
          f"{args.reference_rows}-row product, '!' they differ")
    print(f"{'weight':<9}{'rows':>5}  {'F.linear':>10}  {'decode_linear':>13}  ratio")
    for name, (out_features, in_features) in shapes.items():
        weight = torch.randn(out_features, in_features) / in_features ** 0.5
        big = torch.randn(max(args.reference_rows, max(args.rows)), in_features)
        reference = {"linear": F.linear(big, weight), "decode": decode_linear(big, weight)}
        for rows in args.rows:
            x = big[:rows].clone()
            cells = []
            for layout, fn in (("linear", lambda: F.linear(x, weight)), ("decode", lambda: decode_linear(x, weight))):
                once = seconds_per_call(fn, 1)
                seconds = seconds_per_call(fn, max(1, int(args.seconds / max(once, 1e-6))))
                same = torch.equal(fn(), reference[layout][:rows])
                cells.append((weight.numel() * 4 / seconds / 1e9, "=" if same else "!"))
            (gbs_linear, bits_linear), (gbs_decode, bits_decode) = cells
            print(f"{name:<9}{rows:>5}  {gbs_linear:>9.1f}{bits_linear}  {gbs_decode:>12.1f}{bits_decode}  "
                  f"{gbs_decode / gbs_linear:.2f}x")


if __name__ == "__main__":
    main()
