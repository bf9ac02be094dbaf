"""The built-in synthetic arithmetic world: the problems and teachers the default run uses.

No real weights can be downloaded on a fresh machine, so `python train.py` with no arguments
runs the whole method on a world this module builds from a seed. It is made so that the paper's
premise can hold (reference_runs/README.md checks that it does):

- Word problems ("Mia has 7 coins. She loses 3. She finds 5. How many now?") of two steps. Each
  belongs to a *family*, named by its step that is not a plain "finds": "sub" (loses / gives
  away), "groups" (buys a bags of b), "mul" (grow k times), or, for a few, two of these at once
  ("sub+mul"). FAMILY_MIX gives the shares.
- Three programmatic teachers, each with a *blind spot*: teacher i misreads the sentences of
  family BLIND_SPOTS[i] in an operand range (BLIND_WHEN: a loss of 8 or more read as a gain,
  "a bags of b" with b >= 5 read as a + b more, "grow 3 times" read as 3 more) and then does its
  arithmetic right, so its final answer is wrong there and D1 drops it. Expert i therefore never
  sees that part of its family in training, while the other two experts do: the paper's
  situation (teachers that err on different questions, overlapping little) that E5 and the
  buffer exist for. The range is part of a family, not all of it, so expert i has seen easier
  cases of the same kind in its own format and is sometimes right there: a sparse reward, not
  none (reference_runs/LOG.md, 2026-12-06, tells why whole-family blind spots left GRPO nothing).
- Each teacher writes its own FORMAT; the formats do the same arithmetic, one line per result,
  in different words and orders (their learnability is measured in reference_runs/README.md):
    0 "steps":  `7-3=4`                  ends `#### n`
    1 "words":  `7 minus 3 is 4`         ends `The answer is n.`
    2 "from":   `3 less from 7: 4`       ends `\\boxed{n}`
  The gold solution (the data set's own, the buffer's SFT target D11) is a fourth format that
  no expert is taught, `-3 -> 4` lines ending `Answer: n`. All four markers are read by the
  GSM8K numeric verifier, which scores this world.
- (in meml/synthetic_assets.py) a byte-level BPE tokenizer trained on the world's own text, a
  plain ChatML template and a tiny Qwen2 config: the synthetic and real paths share all code.

Train and eval are disjoint by construction: a hash of the whole question (names and objects
included) decides which split may hold it, so no eval question's text is ever seen in training,
whatever the split sizes. The same arithmetic with other names may be (on seed 0, 18 % of 1000
eval questions share start and steps with a training question): keying the hash on the
arithmetic alone was tried in the first world and made its easy questions a test of facts never
trained on (reference_runs/LOG.md, 2026-11-22).
"""
import hashlib
import random
from dataclasses import dataclass, replace

from meml.data import Example, ExpertAnswer


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    kind: str   # "add": x + a | "sub": x - a | "groups": x + a * b | "mul": x * a
    a: int
    b: int = 0  # only "groups": a bags of b items each

    def apply(self, x: int) -> int:
        if self.kind == "add":
            return x + self.a
        if self.kind == "sub":
            return x - self.a
        if self.kind == "groups":
            return x + self.a * self.b
        if self.kind == "mul":
            return x * self.a
        raise ValueError(f"unknown step kind {self.kind!r}")


# Family -> share of the problems. A single family pairs its step with a "finds" step (in
# either order); a two-kind family has one step of each kind and no "finds".
FAMILY_MIX = {"sub": 0.31, "groups": 0.31, "mul": 0.32,
              "sub+groups": 0.02, "sub+mul": 0.02, "groups+mul": 0.02}
MAX_START = 20         # starting amount 2..MAX_START
MAX_ADD = 19           # a "finds" / "loses" amount 1..MAX_ADD
MAX_BAGS, MAX_BAG = 4, 9   # "buys a bags of b": a in 2..MAX_BAGS, b in 2..MAX_BAG
MAX_FACTOR = 3         # "grow k times": k in 2..MAX_FACTOR
EVAL_EVERY = 5         # one problem in EVAL_EVERY (by hash) belongs to the eval split

NAMES = [("Mia", "She", "her"), ("Leo", "He", "his"), ("Ava", "She", "her"), ("Sam", "He", "his"),
         ("Zoe", "She", "her"), ("Max", "He", "his"), ("Ivy", "She", "her"), ("Tom", "He", "his")]
ITEMS = ["apples", "marbles", "coins", "stickers", "cards", "shells", "pens", "books"]


@dataclass(frozen=True)
class Problem:
    id: str
    family: str
    name: int            # index into NAMES
    item: int            # index into ITEMS
    start: int
    steps: tuple[Step, ...]

    def values(self) -> list[int]:
        """The amount after the start and after every step."""
        out = [self.start]
        for step in self.steps:
            out.append(step.apply(out[-1]))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        name, he, his = NAMES[self.name]
        item = ITEMS[self.item]
        parts = [f"{name} has {self.start} {item}."]
        for k, s in enumerate(self.steps):
            variant = (self.start + k) % 2  # fixed by the problem, so the text is deterministic
            if s.kind == "add":
                parts.append([f"{he} finds {s.a}.", f"{he} gets {s.a} more."][variant])
            elif s.kind == "sub":
                parts.append([f"{he} loses {s.a}.", f"{he} gives away {s.a}."][variant])
            elif s.kind == "groups":
                parts.append(f"{he} buys {s.a} bags of {s.b}.")
            else:
                parts.append(f"{his.capitalize()} {item} grow {s.a} times.")
        parts.append("How many now?")
        return " ".join(parts)

    def to_example(self) -> Example:
        return Example(id=self.id, question=self.question(), answer=str(self.answer),
                       solution=solve_gold(self))


def _split_key(name: int, item: int, start: int, steps: tuple[Step, ...]) -> int:
    """Stable hash of everything a question says (not Python's hash(), which is salted)."""
    text = repr((name, item, start, [(s.kind, s.a, s.b) for s in steps]))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _step(rng: random.Random, kind: str, x: int) -> Step:
    if kind == "add":
        return Step("add", rng.randint(1, MAX_ADD))
    if kind == "sub":
        return Step("sub", rng.randint(1, min(x, MAX_ADD)))
    if kind == "groups":
        return Step("groups", rng.randint(2, MAX_BAGS), rng.randint(2, MAX_BAG))
    return Step("mul", rng.randint(2, MAX_FACTOR))


def _draw(rng: random.Random, family: str) -> tuple[int, tuple[Step, ...]]:
    """One random (start, steps) of the family: its kinds in a random order, amounts >= 0."""
    kinds = family.split("+") if "+" in family else [family, "add"]
    rng.shuffle(kinds)
    x = start = rng.randint(2, MAX_START)
    steps = []
    for kind in kinds:
        steps.append(_step(rng, kind, x))
        x = steps[-1].apply(x)
    return start, tuple(steps)


def _families(n: int, mix: dict[str, float], rng: random.Random) -> list[str]:
    """Exactly round(n * share) problems per family (largest remainder), in shuffled order."""
    total = sum(mix.values())
    exact = {f: n * w / total for f, w in mix.items()}
    counts = {f: int(v) for f, v in exact.items()}
    for f in sorted(exact, key=lambda f: counts[f] - exact[f])[: n - sum(counts.values())]:
        counts[f] += 1
    families = [f for f in mix for _ in range(counts[f])]
    rng.shuffle(families)
    return families


def generate_problems(n: int, split: str, seed: int = 0, mix: dict[str, float] | None = None) -> list[Problem]:
    """`n` problems of `split` ("train" or "eval"); same (n, split, seed, mix) -> same problems.

    Families come in the exact proportions of `mix` (family -> weight; default FAMILY_MIX). A
    problem is kept only if its hash routes it to `split`, so the splits never share a question.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    mix = mix or FAMILY_MIX
    unknown = set(mix) - set(FAMILY_MIX)
    if unknown:
        raise ValueError(f"mix names unknown families {sorted(unknown)}; known: {sorted(FAMILY_MIX)}")
    rng = random.Random(f"meml-synthetic-v2-{split}-{seed}")
    problems = []
    for k, family in enumerate(_families(n, mix, rng)):
        while True:
            start, steps = _draw(rng, family)
            name, item = rng.randrange(len(NAMES)), rng.randrange(len(ITEMS))
            in_eval = _split_key(name, item, start, steps) % EVAL_EVERY == 0
            if in_eval == (split == "eval"):
                break
        problems.append(Problem(id=f"syn-{split}-{family}-{k:05d}", family=family,
                                name=name, item=item, start=start, steps=steps))
    return problems


def family_of(example_id: str) -> str:
    """The family written into a synthetic example id ("syn-eval-sub+mul-00042" -> "sub+mul")."""
    return example_id.split("-")[2]


# ---------------------------------------------------------------------------------------------
# Formats and teachers
# ---------------------------------------------------------------------------------------------
# One line per result in each format: (x op a = y) for "add", "sub", "mul"; "groups" writes the
# product a*b first, then adds it. {x} the amount before, {a} the operand, {y} the result.
FORMATS = {
    "steps": {"add": "{x}+{a}={y}", "sub": "{x}-{a}={y}", "mul": "{x}*{a}={y}",
              "product": "{a}*{b}={y}", "end": "#### {y}"},
    "words": {"add": "{x} plus {a} is {y}", "sub": "{x} minus {a} is {y}", "mul": "{x} times {a} is {y}",
              "product": "{a} times {b} is {y}", "end": "The answer is {y}."},
    "from": {"add": "{a} more on {x}: {y}", "sub": "{a} less from {x}: {y}", "mul": "{a} fold of {x}: {y}",
             "product": "{a} bags of {b}: {y}", "end": "\\boxed{{{y}}}"},
    "gold": {"add": "+{a} -> {y}", "sub": "-{a} -> {y}", "mul": "x{a} -> {y}",
             "product": "{a}x{b} = {y}", "end": "Answer: {y}"},
}
EXPERT_FORMATS = ("steps", "words", "from")   # expert i's teacher writes EXPERT_FORMATS[i]
BLIND_SPOTS = ("sub", "groups", "mul")        # ... and misreads some steps of kind BLIND_SPOTS[i]:
BLIND_WHEN = {                                # those in this operand range
    "sub": lambda s: s.a >= 8,                # a loss of 8 or more
    "groups": lambda s: s.b >= 5,             # bags of 5 or more
    "mul": lambda s: s.a == 3,                # growing 3 times
}


def write(p: Problem, fmt: str) -> str:
    """The worked solution of `p` in format `fmt`: every step's result on its own line."""
    f, lines, x = FORMATS[fmt], [], p.start
    if fmt == "gold":
        lines.append(f"Start {x}")
    for s in p.steps:
        y = s.apply(x)
        if s.kind == "groups":
            lines.append(f["product"].format(a=s.a, b=s.b, y=s.a * s.b))
            lines.append(f["add"].format(x=x, a=s.a * s.b, y=y))
        else:
            lines.append(f[s.kind].format(x=x, a=s.a, y=y))
        x = y
    lines.append(f["end"].format(y=x))
    return "\n".join(lines)


def blind(kind: str, step: Step) -> bool:
    """Whether a teacher blind to `kind` misreads this step."""
    return step.kind == kind and BLIND_WHEN[kind](step)


def misread(p: Problem, kind: str) -> Problem:
    """`p` as a teacher blind to `kind` reads it: in the blind range, a loss as a gain, a bags of
    b as a + b more, grow k times as k more. Its arithmetic on what it read is right; its answer
    is not (no misreading gives the true amount: a > 0; a + b < a * b for b >= 5; x + 3 != 3x)."""
    wrong = {"sub": lambda s: Step("add", s.a), "groups": lambda s: Step("add", s.a + s.b),
             "mul": lambda s: Step("add", s.a)}[kind]
    return replace(p, steps=tuple(wrong(s) if blind(kind, s) else s for s in p.steps))


def solve_gold(p: Problem) -> str:
    """The data set's own worked solution (Example.solution), in no expert's format."""
    return write(p, "gold")


def teacher(i: int, p: Problem, blind: bool = True) -> str:
    """Teacher i's answer A_j^(i) (E1): its format, its blind spot (blind=False: without it)."""
    return write(misread(p, BLIND_SPOTS[i]) if blind else p, EXPERT_FORMATS[i])


# The system prompt P_i each expert is conditioned on (README.md, "The method, equation by equation"), in teacher order.
EXPERT_PROMPTS = (
    "Solve step by step. End with ####.",
    "Say each step in words. End with The answer is.",
    "Count from the start. Box the answer.",
)
# What --synthetic-teachers picks: the teachers with their blind spots (the world), the same
# formats without them (to measure how learnable each format is), or the gold solution for every
# expert (a base model that has seen no teacher: "without MEF").
TEACHER_KINDS = ("blind", "correct", "gold")


def teacher_answers(problems: list[Problem], kind: str = "blind") -> list[ExpertAnswer]:
    """A_j^(i) for every problem j and teacher i (E1)."""
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teachers must be one of {TEACHER_KINDS}, got {kind!r}")
    return [ExpertAnswer(id=p.id, expert=i,
                         response=solve_gold(p) if kind == "gold" else teacher(i, p, blind=kind == "blind"))
            for p in problems for i in range(len(EXPERT_FORMATS))]


def load_synthetic(n_train: int = 3000, n_eval: int = 300, seed: int = 0, teachers: str = "blind"
                   ) -> tuple[list[Example], list[Example], list[ExpertAnswer]]:
    """Train examples, eval examples and the teachers' answers to the train examples."""
    train = generate_problems(n_train, "train", seed)
    evals = generate_problems(n_eval, "eval", seed)
    return [p.to_example() for p in train], [p.to_example() for p in evals], teacher_answers(train, teachers)
