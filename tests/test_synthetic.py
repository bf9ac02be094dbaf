"""Tests for meml/synthetic.py: the built-in arithmetic world, its teachers and their blind spots.

The oracles are independent of the generator's own arithmetic: a reader that recomputes the
answer from the *question text* alone (and, misreading one kind of sentence on purpose, what a
blind teacher must answer), and a parser per format that checks every line the teachers write
with Python arithmetic.
"""
import re
from collections import Counter

import pytest

from meml.synthetic import (BLIND_SPOTS, EXPERT_FORMATS, EXPERT_PROMPTS, FAMILY_MIX, family_of,
                            generate_problems, load_synthetic, solve_gold, teacher, teacher_answers)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(900, "train", seed=0) + generate_problems(300, "eval", seed=0)


def read_question(text: str, blind_to: str | None = None) -> tuple[list[str], int]:
    """Recompute the answer from the words alone: the step kinds in order, and the answer.
    blind_to: read that kind of sentence as a teacher blind to it does (a gain of the number(s))
    where it is blind: a loss of 8 or more, bags of 5 or more, growing 3 times. The kinds of the
    misread sentences get a "!" ("sub!")."""
    sentences = re.findall(r"[^.?]+[.?]", text)
    assert sentences[-1].strip() == "How many now?", text
    x = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0].strip()).group(1))
    kinds = []
    for sentence in sentences[1:-1]:
        s = sentence.strip()
        if m := re.fullmatch(r"(?:She|He) (?:finds (\d+)|gets (\d+) more)\.", s):
            kinds.append("add")
            x += int(m.group(1) or m.group(2))
        elif m := re.fullmatch(r"(?:She|He) (?:loses (\d+)|gives away (\d+))\.", s):
            a = int(m.group(1) or m.group(2))
            misread = blind_to == "sub" and a >= 8
            kinds.append("sub!" if misread else "sub")
            x += a if misread else -a
        elif m := re.fullmatch(r"(?:She|He) buys (\d+) bags of (\d+)\.", s):
            a, b = int(m.group(1)), int(m.group(2))
            misread = blind_to == "groups" and b >= 5
            kinds.append("groups!" if misread else "groups")
            x += a + b if misread else a * b
        elif m := re.fullmatch(r"(?:Her|His) \w+ grow (\d+) times\.", s):
            k = int(m.group(1))
            misread = blind_to == "mul" and k == 3
            kinds.append("mul!" if misread else "mul")
            x = x + k if misread else x * k
        else:
            raise AssertionError(f"unrecognised sentence {s!r} in {text!r}")
    return kinds, x


# Every line of each format: (regex, what its numbers must satisfy).
LINES = {
    "steps": [(r"(\d+)\+(\d+)=(-?\d+)", lambda x, a, y: x + a == y), (r"(\d+)-(\d+)=(-?\d+)", lambda x, a, y: x - a == y),
              (r"(\d+)\*(\d+)=(-?\d+)", lambda x, a, y: x * a == y)],
    "words": [(r"(\d+) plus (\d+) is (-?\d+)", lambda x, a, y: x + a == y),
              (r"(\d+) minus (\d+) is (-?\d+)", lambda x, a, y: x - a == y),
              (r"(\d+) times (\d+) is (-?\d+)", lambda x, a, y: x * a == y)],
    "from": [(r"(\d+) more on (\d+): (-?\d+)", lambda a, x, y: x + a == y),
             (r"(\d+) less from (\d+): (-?\d+)", lambda a, x, y: x - a == y),
             (r"(\d+) fold of (\d+): (-?\d+)", lambda a, x, y: x * a == y),
             (r"(\d+) bags of (\d+): (-?\d+)", lambda a, b, y: a * b == y)],
}
ENDS = {"steps": r"#### (-?\d+)", "words": r"The answer is (-?\d+)\.", "from": r"\\boxed\{(-?\d+)\}",
        "gold": r"Answer: (-?\d+)"}


def check_solution(text: str, fmt: str) -> int:
    """Every line true arithmetic in `fmt`'s own words; returns the answer after its marker."""
    *body, last = text.splitlines()
    for line in body:
        if fmt == "gold":
            assert re.fullmatch(r"Start \d+|[-+x]\d+ -> \d+|\d+x\d+ = \d+", line), line
            continue
        hits = [(check, m) for pattern, check in LINES[fmt] if (m := re.fullmatch(pattern, line))]
        assert len(hits) == 1, (fmt, line)
        check, m = hits[0]
        assert check(*map(int, m.groups())), (fmt, line)
    return int(re.fullmatch(ENDS[fmt], last).group(1))


def test_gold_solution_answers_what_the_question_says(problems):
    for p in problems:
        kinds, answer = read_question(p.question())
        assert p.to_example().answer == str(answer)
        assert check_solution(solve_gold(p), "gold") == answer
        assert p.to_example().solution == solve_gold(p)


def test_each_teacher_is_wrong_exactly_where_it_misreads(problems):
    seen = Counter()
    for p in problems:
        kinds, answer = read_question(p.question())
        for i, fmt in enumerate(EXPERT_FORMATS):
            said = check_solution(teacher(i, p), fmt)             # arithmetic right in its own format
            read, misread = read_question(p.question(), blind_to=BLIND_SPOTS[i])
            assert said == misread
            assert check_solution(teacher(i, p, blind=False), fmt) == answer
            blind = any(k.endswith("!") for k in read)
            assert (said != answer) == blind                       # no misreading is right by chance
            seen[i, BLIND_SPOTS[i] in kinds, blind] += 1
    for i in range(3):
        # blind on part of its family only: some of its kind it reads right, nothing else wrong
        assert seen[i, True, True] > 0 and seen[i, True, False] > 0 and seen[i, False, True] == 0


def test_teachers_err_on_different_questions(problems):
    """The error overlap: two teachers wrong together only on some two-kind questions (< 6 %)."""
    answers = {p.id: p.answer for p in problems}
    by_question = Counter()
    for a in teacher_answers(problems):
        by_question[a.id] += check_solution(a.response, EXPERT_FORMATS[a.expert]) != answers[a.id]
    both = sum(n >= 2 for n in by_question.values()) / len(problems)
    two_kind = sum(w for f, w in FAMILY_MIX.items() if "+" in f) / sum(FAMILY_MIX.values())
    assert 0 < both <= two_kind + 0.01
    assert sum(n == 3 for n in by_question.values()) == 0


def test_formats_write_the_same_arithmetic_in_different_words(problems):
    for p in problems:
        lines = [teacher(i, p, blind=False).splitlines() for i in range(3)]
        assert len({len(x) for x in lines}) == 1                    # one line per result in each
        assert len(solve_gold(p).splitlines()) == len(lines[0]) + 1  # + its "Start" line
        assert len({x[-1].split()[0] for x in lines}) == 3           # three different markers
    assert len(set(EXPERT_PROMPTS)) == 3 == len(set(EXPERT_FORMATS))


def test_families_come_in_their_shares_and_are_written_into_the_ids():
    ps = generate_problems(1000, "train", seed=2)
    counts = Counter(p.family for p in ps)
    total = sum(FAMILY_MIX.values())
    for family, w in FAMILY_MIX.items():
        assert abs(counts[family] - 1000 * w / total) < 1
    for p in ps:
        kinds, _ = read_question(p.question())
        assert family_of(p.id) == p.family
        expected = sorted(p.family.split("+")) if "+" in p.family else sorted([p.family, "add"])
        assert sorted(kinds) == expected
        assert all(v >= 0 for v in p.values())
    assert Counter(p.family for p in generate_problems(10, "train", seed=1, mix={"sub": 1, "mul": 4})) == {
        "sub": 2, "mul": 8}
    with pytest.raises(ValueError, match="unknown families"):
        generate_problems(3, "train", mix={"div": 1.0})


def test_same_seed_same_data_and_splits_are_disjoint():
    assert generate_problems(50, "train", seed=3) == generate_problems(50, "train", seed=3)
    assert generate_problems(50, "train", seed=3) != generate_problems(50, "train", seed=4)
    assert generate_problems(40, "eval", seed=3) == generate_problems(40, "eval", seed=3)
    train = {p.question() for p in generate_problems(3000, "train", seed=3)}
    evals = {p.question() for p in generate_problems(600, "eval", seed=3)}
    assert not train & evals                            # no question in both splits


def test_load_synthetic_gives_three_answers_per_train_example_of_the_chosen_teachers():
    train, evals, answers = load_synthetic(n_train=30, n_eval=9, seed=0)
    assert len(train) == 30 and len(evals) == 9 and len(answers) == 90
    assert len({e.id for e in train + evals}) == 39
    assert Counter(a.expert for a in answers) == {0: 30, 1: 30, 2: 30}
    by_id = {e.id: e for e in train}
    for a in load_synthetic(n_train=30, n_eval=9, seed=0, teachers="gold")[2]:
        assert a.response == by_id[a.id].solution
    for a in load_synthetic(n_train=30, n_eval=9, seed=0, teachers="correct")[2]:
        assert check_solution(a.response, EXPERT_FORMATS[a.expert]) == int(by_id[a.id].answer)
    assert teacher_answers([]) == []
    with pytest.raises(ValueError, match="teachers must be"):
        teacher_answers([], "perfect")
