"""The reward of the example task: full marks for the right final answer, half for a near miss.

    score(completion: str, example: dict) -> float in [0, 1]

`example` is the JSONL record as written in word_problems.jsonl, every field included: here
`answer` (the gold number) and `tolerance` (how far off a "near miss" may be). The final answer is
the number after the last "####", "The answer is" or "\\boxed{" (the three experts' formats).
"""
import re

_FINAL = re.compile(r"(?:####|answer is|\\boxed\{)\s*(-?\d+)")


def score(completion: str, example: dict) -> float:
    finals = _FINAL.findall(completion)
    if not finals:
        return 0.0
    off = abs(int(finals[-1]) - int(example["answer"]))
    return 1.0 if off == 0 else 0.5 if off <= example["tolerance"] else 0.0
