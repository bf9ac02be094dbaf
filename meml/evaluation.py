"""E8: how a multi-expert model is scored.

Inference uses one model with one expert prompt and greedy decoding (E8). Besides each expert's
accuracy, E8 asks for three views across experts, all computed here from a table of
per-question correctness and extracted answers, so they can be checked by hand:

- majority vote: the answer most experts give (ties go to the answer of the lowest-index expert
  among the tied ones; an expert with no extractable answer casts no vote);
- oracle: a question counts if any expert is right;
- error overlap: for every subset S of experts, how many questions every expert in S gets wrong,
  and how many questions exactly S (and no other expert) gets wrong.

Choosing an expert without labels (the paper leaves open how to pick an expert at inference):
- confidence: per question, the expert whose greedy answer has the highest mean token
  log-probability (ties go to the lowest index);
- dev choice: the one expert with the best accuracy on a separate dev split (`best_expert`).

pass@k uses the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), for n samples
of which c are correct.
"""
from collections import Counter
from itertools import combinations
import math

import torch

from meml import distributed
from meml.inference import complete
from meml.prompts import expert_grid
from meml.rewards import Verifier, verifier_for


def accuracy(correct: list[bool]) -> float:
    return sum(correct) / len(correct) if correct else 0.0


def majority_vote(answers: list[str | None]) -> str | None:
    """The most common non-empty answer among experts; ties go to the lowest-index expert."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == top)


def judge(verifier: Verifier, texts: list[str], example) -> tuple[list[bool], bool | None]:
    """One question's expert answers -> (each expert right, i.e. reward 1?, is the majority vote
    right?). Votes read each answer exactly as the reward does (`extract_answer` with the
    question's options), so a MathQA answer written as an option's value votes for that option's
    letter; a reward function of one's own reads no answers, so it takes no vote (None)."""
    correct = [verifier(text, example) == 1.0 for text in texts]
    if verifier.builtin is None:
        return correct, None
    answers = [verifier.answer(text, example) for text in texts]
    winner = majority_vote(answers)
    return correct, winner is not None and correct[answers.index(winner)]


def oracle_accuracy(correct: list[list[bool]]) -> float:
    """correct[q][i]: expert i right on question q. Fraction of questions some expert gets right."""
    return accuracy([any(row) for row in correct])


def confidence_choice(correct: list[list[bool]], confidence: list[list[float]]) -> float:
    """Accuracy when each question is answered by the expert whose greedy answer the model is
    most confident in: confidence[q][i] = mean token log-prob of expert i's answer to question q.
    Ties go to the lowest-index expert."""
    chosen = [max(range(len(c)), key=lambda i: (c[i], -i)) for c in confidence]
    return accuracy([row[i] for row, i in zip(correct, chosen)])


def best_expert(accuracies: list[float]) -> int:
    """The expert with the highest accuracy (ties: the lowest index), e.g. on a dev split."""
    return max(range(len(accuracies)), key=lambda i: (accuracies[i], -i))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


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


def _percent(value: float | None) -> str:
    return f"{'n/a':>10}" if value is None else f"{value:>10.1%}"


def format_results(results: dict[str, dict]) -> str:
    """The E8 table for one or more named results of `evaluate_experts` (e.g. after MEF, after
    RIEL): greedy accuracy per expert, majority, oracle, pass@k, and the last one's error overlap."""
    rows = [(name, r) for name, r in results.items() if r is not None]
    n = len(rows[0][1]["accuracy"])
    lines = [f"{'greedy accuracy (E8)':<24}" + "".join(f"{'expert ' + str(i):>10}" for i in range(n))
             + f"{'majority':>10}{'oracle':>10}"]
    for name, r in rows:
        lines.append(f"{name:<24}" + "".join(f"{a:>10.1%}" for a in r["accuracy"])
                     + _percent(r["majority_vote"]) + f"{r['oracle']:>10.1%}")
        for family, t in r.get("by_family", {}).items():
            label = f"  {family} ({t['num_questions']})"
            lines.append(f"{label:<24}"
                         + "".join(f"{a:>10.1%}" for a in t["accuracy"])
                         + _percent(t["majority_vote"]) + f"{t['oracle']:>10.1%}")
        for key in [k for k in r if k.startswith("pass@")]:
            lines.append(f"{'  ' + key + ' (T=1)':<24}" + "".join(f"{a:>10.1%}" for a in r[key]))
        choice = f"  without labels: most confident expert per question {r['confidence_choice']:.1%}"
        if "dev_choice" in r:
            d = r["dev_choice"]
            choice += f"; best on {d['num_questions']} dev questions, expert {d['expert']}: {d['accuracy']:.1%}"
        lines.append(choice)
    name, last = rows[-1]
    lines.append(f"\nerror overlap ({name}, {last['num_questions']} questions): "
                 "subset -> all wrong / exactly these wrong")
    lines += [f"  experts {row['experts']}: {row['all_wrong']} / {row['exactly_wrong']}" for row in last["error_overlap"]]
    return "\n".join(lines)


@torch.no_grad()
def evaluate_experts(model, tokenizer, examples, system_prompts: list[str], dataset: str, *, verifier=None,
                     max_new_tokens: int = 256, batch_size: int = 64, pass_k: int = 0,
                     seed: int = 0, family=None) -> dict:
    """E8: greedy accuracy per expert prompt, majority vote, oracle, error overlap, the
    confidence choice; and pass@1 / pass@k per expert from `pass_k` samples at temperature 1
    (skipped when pass_k is 0). `family` (example id -> a name, e.g. the synthetic world's
    `family_of`) adds the same figures per family of questions. "per_question" keeps, for every question,
    each expert's correctness and confidence and whether the vote was right, so any other view
    (paired differences, error overlap of a subset) can be computed from the result alone.

    Across processes (meml/distributed.py) each rank answers a contiguous share of the questions
    and the per-question results are gathered: the greedy figures are those of one process;
    pass@k draws its samples per rank (seed + rank), so it is not."""
    model.eval()
    verifier = verifier_for(dataset, verifier)  # "right": reward 1
    mine, _ = distributed.my_share(examples)  # this rank's questions (any number: shares may differ by one)
    conversations, rows = expert_grid(mine, system_prompts, dataset, copies=1)  # rows [Q, N, 1]
    greedy = complete(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = [[greedy.texts[row] for row in rows[q, :, 0].tolist()] for q in range(len(mine))]  # one per expert
    confidence = [[greedy.logprobs[row].mean().item() if len(greedy.logprobs[row]) else -math.inf
                   for row in rows[q, :, 0].tolist()] for q in range(len(mine))]
    hits = None
    if pass_k:
        conversations, rows = expert_grid(mine, system_prompts, dataset, copies=pass_k)  # [Q, N, k]
        seed_of_rank = seed + 1_000_003 * distributed.rank()
        generator = torch.Generator(device=model.output_weight.device).manual_seed(seed_of_rank)
        sampled = complete(model, tokenizer, conversations, max_new_tokens=max_new_tokens, temperature=1.0,
                           batch_size=batch_size, generator=generator).texts
        hits = [[sum(verifier(sampled[row], ex) == 1.0 for row in rows[q, i].tolist())
                 for i in range(len(system_prompts))] for q, ex in enumerate(mine)]  # [Q][N]
    answers, confidence, hits = _gathered(answers), _gathered(confidence), _gathered(hits) if pass_k else None
    correct, votes_right = [], []
    for ex, row in zip(examples, answers):
        ok, vote_ok = judge(verifier, row, ex)
        correct.append(ok)
        votes_right.append(vote_ok)
    result = {**_table(correct, votes_right, confidence),
              "samples": [{"id": examples[q].id, "expert": i, "text": answers[q][i]}
                          for q in range(min(3, len(examples))) for i in range(len(system_prompts))]}
    if family is not None:
        names = [family(ex.id) for ex in examples]
        result["by_family"] = {
            str(name): _table(*[[x for x, f in zip(column, names) if f == name]
                                for column in (correct, votes_right, confidence)], overlap=False)
            for name in sorted(set(names))}
    result["per_question"] = [{"id": ex.id, "correct": [int(c) for c in ok], "vote": None if v is None else int(v),
                               "confidence": [round(c, 4) for c in conf]}
                              for ex, ok, v, conf in zip(examples, correct, votes_right, confidence)]
    for k in sorted({1, pass_k}) if pass_k else []:
        result[f"pass@{k}"] = [sum(pass_at_k(pass_k, row[i], k) for row in hits) / len(examples)
                               for i in range(len(system_prompts))]
    return result


def _table(correct: list[list[bool]], votes_right: list[bool], confidence: list[list[float]],
           overlap: bool = True) -> dict:
    """The E8 figures of one set of questions from its per-question results."""
    num_experts = len(correct[0]) if correct else 0
    out = {"num_questions": len(correct),
           "accuracy": [accuracy([row[i] for row in correct]) for i in range(num_experts)],
           "majority_vote": None if None in votes_right else accuracy(votes_right),
           "oracle": oracle_accuracy(correct),
           "confidence_choice": confidence_choice(correct, confidence)}
    if overlap:
        out["error_overlap"] = error_overlap(correct)
    return out


def _gathered(per_question: list) -> list:
    """Every rank's per-question list, concatenated in rank (so question) order."""
    return [item for part in distributed.all_gather_objects(per_question) for item in part]
