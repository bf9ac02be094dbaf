"""The verifier on adversarial completions: milliseconds per call at 200 KB (D16).

A policy that degenerates can write a marker thousands of times; the reward must stay cheap on
such text, since RIEL scores N x G completions per question. This prints the median time of
`meml.rewards.reward` over a few repeats for each data set's reader on texts that repeat a
marker, a marker with an unreadable answer, a marker's fragments, or no marker at all (the
issue's target: at most 10 ms per call at 200 KB).

    python -m bench.bench_verifier
    python -m bench.bench_verifier --size 1000000
"""
import argparse
import statistics
import time

from meml.data import Example
from meml.rewards import reward

UNITS = {"\\boxed{": "boxed-open", "#### ": "hash", "the answer is ": "answer-is", "\\boxed{1.2.3} ": "boxed-bad",
         "#### 1.2.3 ": "hash-bad", "answe": "fragment", "{": "brace", "x": "no-marker",
         "\\boxed{\\text{": "boxed-text", "answer: (": "answer-paren"}
EXAMPLES = {"gsm8k": Example("b", "q", "5", "#### 5"), "strategyqa": Example("b", "q", "yes", "yes"),
            "mathqa": Example("b", "q", "c", "c", {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"})}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=200_000, help="characters per completion")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    worst = 0.0
    print(f"{'text':<14}" + "".join(f"{d:>12}" for d in EXAMPLES) + "   (ms per call, median)")
    for unit, name in UNITS.items():
        text = (unit * (args.size // len(unit) + 1))[:args.size]
        row = []
        for dataset, example in EXAMPLES.items():
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                reward(dataset, text, example)
                times.append(time.perf_counter() - t0)
            row.append(statistics.median(times) * 1000)
        worst = max(worst, *row)
        print(f"{name:<14}" + "".join(f"{ms:>12.2f}" for ms in row))
    print(f"worst: {worst:.2f} ms per call at {args.size} characters")


if __name__ == "__main__":
    main()
