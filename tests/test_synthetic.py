"""Tests for meml/synthetic.py: the built-in arithmetic world and its teachers.

The oracles are independent of the generator's own arithmetic: a reader that recomputes the
answer from the *question text* alone, a tiny recursive-descent evaluator for the compact
expression, and Python arithmetic on every "a op b = c" line the teachers write.
"""
import re
from collections import Counter

import pytest

from meml.synthetic import (DIFFICULTIES, EXPERT_PROMPTS, MAX_VALUE, TEACHERS, compact_expression,
                            difficulty_of, generate_problems, load_synthetic, teacher_answers)

MARKERS = [re.compile(r"^#### (\d+)$"), re.compile(r"^The answer is (\d+)\.$"), re.compile(r"^\\boxed\{(\d+)\}$")]


@pytest.fixture(scope="module")
def problems():
    return generate_problems(600, "train", seed=0) + generate_problems(300, "eval", seed=0)


def read_question(text: str) -> tuple[list[tuple[str, int]], int]:
    """Recompute the answer from the words alone: [(op, operands...)], answer."""
    sentences = re.findall(r"[^.?]+[.?]", text)
    assert sentences[-1].strip() == "How many now?", text
    start = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0].strip()).group(1))
    ops, x = [], start
    for sentence in sentences[1:-1]:
        s = sentence.strip()
        if m := re.fullmatch(r"(?:She|He) (?:finds (\d+)|gets (\d+) more)\.", s):
            ops.append(("+", int(m.group(1) or m.group(2))))
            x += ops[-1][1]
        elif m := re.fullmatch(r"(?:She|He) (?:loses (\d+)|gives away (\d+))\.", s):
            ops.append(("-", int(m.group(1) or m.group(2))))
            x -= ops[-1][1]
        elif m := re.fullmatch(r"(?:She|He) buys (\d+) bags of (\d+)\.", s):
            ops.append(("bags", int(m.group(1)), int(m.group(2))))
            x += ops[-1][1] * ops[-1][2]
        elif m := re.fullmatch(r"(?:Her|His) \w+ grow (\d+) times\.", s):
            ops.append(("*", int(m.group(1))))
            x *= ops[-1][1]
        else:
            raise AssertionError(f"unrecognised sentence {s!r} in {text!r}")
    return [("start", start)] + ops, x


def evaluate(expr: str) -> int:
    """Integer + - * and brackets, by recursive descent (never eval())."""
    tokens = re.findall(r"\d+|[-+*()]", expr)
    assert "".join(tokens) == expr.replace(" ", ""), expr
    pos = 0

    def atom():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            value = total()
            assert tokens[pos] == ")"
            pos += 1
            return value
        return int(tok)

    def product():
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            value *= atom()
        return value

    def total():
        nonlocal pos
        value = product()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            value = value + product() if op == "+" else value - product()
        return value

    value = total()
    assert pos == len(tokens), expr
    return value


def test_gold_answer_matches_the_question_text_and_the_compact_expression(problems):
    for p in problems:
        _, answer = read_question(p.question())
        assert p.to_example().answer == str(answer), p.question()
        assert evaluate(compact_expression(p)) == answer, compact_expression(p)


def test_every_teacher_ends_with_its_marker_and_the_gold_answer(problems):
    for p in problems:
        for i, teach in enumerate(TEACHERS):
            last = teach(p).splitlines()[-1]
            m = MARKERS[i].match(last)
            assert m and m.group(1) == p.to_example().answer, (i, teach(p))


def test_every_equation_a_teacher_writes_is_true(problems):
    for p in problems:
        for teach in TEACHERS:
            for line in teach(p).splitlines()[:-1]:
                lhs, rhs = re.sub(r"^(gains|losses) ", "", line).split("=")
                assert evaluate(lhs) == int(rhs), line


def test_teachers_use_different_formats(problems):
    multi = [p for p in problems if len(p.steps) >= 3]
    for p in multi:
        steps, compact, ledger = (t(p).splitlines() for t in TEACHERS)
        assert len(compact) == 2                           # one expression, one answer line
        assert len(steps) == len(p.steps) + sum(s.kind == "groups" for s in p.steps) + 1
    # the ledger decomposes differently from the step list on most multi-step problems
    differ = sum(TEACHERS[0](p).splitlines()[:-1] != TEACHERS[2](p).splitlines()[:-1] for p in multi)
    assert differ / len(multi) > 0.5
    assert any("gains " in TEACHERS[2](p) for p in multi) and any("losses " in TEACHERS[2](p) for p in multi)
    assert len(set(EXPERT_PROMPTS)) == 3


def test_difficulty_sets_steps_operand_sizes_and_kinds(problems):
    seen = Counter()
    for p in problems:
        d = DIFFICULTIES[p.difficulty]
        assert difficulty_of(p.id) == p.difficulty
        ops, _ = read_question(p.question())
        assert len(ops) - 1 == len(p.steps) == d.steps
        assert all(s.kind in d.kinds for s in p.steps)
        assert p.start <= d.max_operand
        assert all(s.a <= d.max_operand for s in p.steps if s.kind in ("add", "sub"))
        assert all(0 <= v <= MAX_VALUE for v in p.values())
        seen[p.difficulty] += 1
    assert seen[1] == seen[2] == seen[3] == 300        # equal mix by default, exact counts


def test_mix_gives_exact_proportions():
    ps = generate_problems(10, "train", seed=1, mix={1: 1, 3: 4})
    assert Counter(p.difficulty for p in ps) == {1: 2, 3: 8}
    with pytest.raises(ValueError, match="unknown difficulty"):
        generate_problems(3, "train", mix={7: 1.0})


def test_same_seed_same_data_and_splits_are_disjoint():
    assert generate_problems(50, "train", seed=3) == generate_problems(50, "train", seed=3)
    assert generate_problems(50, "train", seed=3) != generate_problems(50, "train", seed=4)
    # a split does not depend on the other split's size
    assert generate_problems(40, "eval", seed=3) == generate_problems(40, "eval", seed=3)
    train = {p.question() for p in generate_problems(3000, "train", seed=3)}
    evals = {p.question() for p in generate_problems(600, "eval", seed=3)}
    assert not train & evals                            # no question in both splits


def test_load_synthetic_gives_three_answers_per_train_example_gold_first():
    train, evals, answers = load_synthetic(n_train=30, n_eval=9, seed=0)
    assert len(train) == 30 and len(evals) == 9 and len(answers) == 90
    assert len({e.id for e in train + evals}) == 39
    by_id = {e.id: e for e in train}
    for a in answers:
        if a.expert == 0:
            assert a.response == by_id[a.id].solution
    assert Counter(a.expert for a in answers) == {0: 30, 1: 30, 2: 30}
    assert teacher_answers([]) == []
