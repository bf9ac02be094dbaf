"""E8: how a multi-expert model is scored.

Inference uses one model with one expert prompt and greedy decoding (E8). Besides each expert's
accuracy, METHOD.md asks for three views across experts, all computed here from a table of
per-question correctness and extracted answers, so they can be checked by hand:

- majority vote: the answer most experts give (ties go to the answer of the lowest-index expert
  among the tied ones; an expert with no extractable answer casts no vote);
- oracle: a question counts if any expert is right;
- error overlap: for every subset S of experts, how many questions every expert in S gets wrong,
  and how many questions exactly S (and no other expert) gets wrong.

pass@k uses the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), for n samples
of which c are correct.
"""
from collections import Counter
from itertools import combinations
from math import comb


def accuracy(correct: list[bool]) -> float:
    return sum(correct) / len(correct) if correct else 0.0


def majority_vote(answers: list[str | None]) -> str | None:
    """The most common non-empty answer among experts; ties go to the lowest-index expert."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == top)


def oracle_accuracy(correct: list[list[bool]]) -> float:
    """correct[q][i]: expert i right on question q. Fraction of questions some expert gets right."""
    return accuracy([any(row) for row in correct])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def error_overlap(correct: list[list[bool]]) -> list[dict]:
    """One row per non-empty subset S of experts (by size, then index order):
    {"experts": S, "all_wrong": #questions every expert in S gets wrong,
     "exactly_wrong": #questions whose set of wrong experts is exactly S}."""
    num_experts = len(correct[0]) if correct else 0
    wrong_sets = [frozenset(i for i, ok in enumerate(row) if not ok) for row in correct]
    rows = []
    for size in range(1, num_experts + 1):
        for subset in combinations(range(num_experts), size):
            s = frozenset(subset)
            rows.append({
                "experts": list(subset),
                "all_wrong": sum(s <= w for w in wrong_sets),
                "exactly_wrong": sum(s == w for w in wrong_sets),
            })
    return rows
