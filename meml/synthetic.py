"""The built-in synthetic arithmetic world: the problems and teachers the default run uses.

No real weights can be downloaded on a fresh machine, so `python train.py` with no arguments
runs the whole method on a world this module builds from a seed:

- word problems ("Mia has 7 coins. She buys 3 bags of 4. ... How many now?") whose integer answer is
  the result of a chain of steps; difficulty sets the number of steps, the operand sizes and
  which kinds of step appear (DIFFICULTIES);
- three programmatic teachers that solve every problem correctly in *different formats*, so
  that experts learned from them make different mistakes, as the paper's heterogeneous teachers
  do (E1). Teacher 0 is the gold solution (Expert0 = the data set's gold solution):
    0 "steps":   one line per step with its intermediate result, ends `#### n`
    1 "compact": the whole problem as one expression, evaluated at once, ends `The answer is n.`
    2 "ledger":  all gains and all losses of a stretch totalled first, then combined, ends
                 `\\boxed{n}` (a different decomposition and order of the same arithmetic)
  All three markers are accepted by the GSM8K numeric verifier, which scores this world;
- (in meml/synthetic_assets.py) a byte-level BPE tokenizer trained on the world's own text, a
  plain ChatML template and a tiny Qwen2 config: the synthetic and real paths share all code.
  Solutions are written without spaces ("7+5=12") to keep sequences short on a CPU.

Train and eval are disjoint by construction: a hash of the whole problem decides which split
may hold it, so no eval question is ever seen in training, whatever the split sizes. The hash
covers names and objects too: keying it on the arithmetic alone was tried and made difficulty 1
(about 120 distinct one-step calculations) a test of facts never trained on (reference_runs/LOG.md).
"""
import hashlib
import random
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Difficulty:
    steps: int               # number of steps after the starting amount
    max_operand: int         # largest start / added / subtracted amount
    kinds: tuple[str, ...]   # step kinds drawn from
    max_factor: int = 3      # largest multiplier: "mul" factor and number of bags in "groups"


DIFFICULTIES = {
    1: Difficulty(steps=1, max_operand=9, kinds=("add", "sub")),
    2: Difficulty(steps=2, max_operand=20, kinds=("add", "sub", "groups")),
    3: Difficulty(steps=3, max_operand=30, kinds=("add", "sub", "groups", "mul")),
}
MAX_VALUE = 999          # every intermediate amount stays in [0, MAX_VALUE]
EVAL_EVERY = 5           # one problem in EVAL_EVERY (by hash) belongs to the eval split

NAMES = [("Mia", "She", "her"), ("Leo", "He", "his"), ("Ava", "She", "her"), ("Sam", "He", "his"),
         ("Zoe", "She", "her"), ("Max", "He", "his"), ("Ivy", "She", "her"), ("Tom", "He", "his")]
ITEMS = ["apples", "marbles", "coins", "stickers", "cards", "shells", "pens", "books"]


@dataclass(frozen=True)
class Problem:
    id: str
    difficulty: int
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
                       solution=solve_steps(self))


def _split_key(name: int, item: int, start: int, steps: tuple[Step, ...]) -> int:
    """Stable hash of everything a question says (not Python's hash(), which is salted)."""
    text = repr((name, item, start, [(s.kind, s.a, s.b) for s in steps]))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _draw(rng: random.Random, level: int) -> tuple[int, tuple[Step, ...]]:
    """One random (start, steps) of the given difficulty, every amount kept in [0, MAX_VALUE]."""
    d = DIFFICULTIES[level]
    while True:
        x = start = rng.randint(2, d.max_operand)
        steps = []
        for _ in range(d.steps):
            kind = rng.choice(d.kinds)
            if kind == "sub" and x < 2:
                kind = "add"
            if kind == "add":
                step = Step("add", rng.randint(1, d.max_operand))
            elif kind == "sub":
                step = Step("sub", rng.randint(1, min(x, d.max_operand)))
            elif kind == "groups":
                step = Step("groups", rng.randint(2, d.max_factor), rng.randint(2, 9))  # bags of 2-9
            else:
                step = Step("mul", rng.randint(2, d.max_factor))
            steps.append(step)
            x = step.apply(x)
        if x <= MAX_VALUE:
            return start, tuple(steps)


def _levels(n: int, mix: dict[int, float], rng: random.Random) -> list[int]:
    """Exactly round(n * share) problems per level (largest remainder), in shuffled order."""
    total = sum(mix.values())
    exact = {lv: n * w / total for lv, w in mix.items()}
    counts = {lv: int(v) for lv, v in exact.items()}
    for lv in sorted(exact, key=lambda lv: counts[lv] - exact[lv])[: n - sum(counts.values())]:
        counts[lv] += 1
    levels = [lv for lv in sorted(counts) for _ in range(counts[lv])]
    rng.shuffle(levels)
    return levels


TRAIN_MIX = {1: 1.0, 2: 1.0, 3: 1.0}
EVAL_MIX = {1: 1.0, 2: 1.0, 3: 1.0}


def generate_problems(n: int, split: str, seed: int = 0, mix: dict[int, float] | None = None) -> list[Problem]:
    """`n` problems of `split` ("train" or "eval"); same (n, split, seed, mix) -> same problems.

    Difficulty levels come in the exact proportions of `mix` (level -> weight). A problem is
    kept only if its hash routes it to `split`, so the splits never share a question.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    mix = mix or (TRAIN_MIX if split == "train" else EVAL_MIX)
    unknown = set(mix) - set(DIFFICULTIES)
    if unknown:
        raise ValueError(f"mix names unknown difficulty levels {sorted(unknown)}; known: {sorted(DIFFICULTIES)}")
    rng = random.Random(f"meml-synthetic-{split}-{seed}")
    problems = []
    for k, level in enumerate(_levels(n, mix, rng)):
        while True:
            start, steps = _draw(rng, level)
            name, item = rng.randrange(len(NAMES)), rng.randrange(len(ITEMS))
            in_eval = _split_key(name, item, start, steps) % EVAL_EVERY == 0
            if in_eval == (split == "eval"):
                break
        problems.append(Problem(id=f"syn-{split}-d{level}-{k:05d}", difficulty=level,
                                name=name, item=item, start=start, steps=steps))
    return problems


def difficulty_of(example_id: str) -> int:
    """The difficulty level written into a synthetic example id ("syn-eval-d3-00042" -> 3)."""
    return int(example_id.split("-")[2][1:])


# ---------------------------------------------------------------------------------------------
# Teachers: three correct solutions in three formats (teacher 0 = the gold solution)
# ---------------------------------------------------------------------------------------------
def solve_steps(p: Problem) -> str:
    """Teacher 0, the gold solution: every step on its own line with its intermediate result."""
    lines, x = [], p.start
    for s in p.steps:
        if s.kind == "groups":
            lines.append(f"{s.a}*{s.b}={s.a * s.b}")
            lines.append(f"{x}+{s.a * s.b}={s.apply(x)}")
        else:
            lines.append(f"{x}{dict(add='+', sub='-', mul='*')[s.kind]}{s.a}={s.apply(x)}")
        x = s.apply(x)
    lines.append(f"#### {x}")
    return "\n".join(lines)


def compact_expression(p: Problem) -> str:
    """The whole problem as one expression with the fewest brackets ("(7+3*4-2)*3")."""
    expr, is_sum = str(p.start), False
    for s in p.steps:
        if s.kind == "mul":
            expr, is_sum = (f"({expr})" if is_sum else expr) + f"*{s.a}", False
        else:
            term = {"add": f"+{s.a}", "sub": f"-{s.a}", "groups": f"+{s.a}*{s.b}"}[s.kind]
            expr, is_sum = expr + term, True
    return expr


def solve_compact(p: Problem) -> str:
    """Teacher 1: one expression evaluated in a single line, no intermediate results."""
    return f"{compact_expression(p)}={p.answer}\nThe answer is {p.answer}."


def solve_ledger(p: Problem) -> str:
    """Teacher 2: per stretch between multiplications, total gains and losses, then combine."""
    lines, x, k = [], p.start, 0
    while k < len(p.steps):
        if p.steps[k].kind == "mul":
            s = p.steps[k]
            lines.append(f"{x}*{s.a}={s.apply(x)}")
            x, k = s.apply(x), k + 1
            continue
        gains, losses = [], []
        while k < len(p.steps) and p.steps[k].kind != "mul":
            s = p.steps[k]
            if s.kind == "groups":
                lines.append(f"{s.a}*{s.b}={s.a * s.b}")
                gains.append(s.a * s.b)
            else:
                (gains if s.kind == "add" else losses).append(s.a)
            k += 1
        for label, amounts in (("gains", gains), ("losses", losses)):
            if len(amounts) > 1:
                lines.append(f"{label} {'+'.join(map(str, amounts))}={sum(amounts)}")
        new_x = x + sum(gains) - sum(losses)
        combined = str(x) + (f"+{sum(gains)}" if gains else "") + (f"-{sum(losses)}" if losses else "")
        lines.append(f"{combined}={new_x}")
        x = new_x
    lines.append(f"\\boxed{{{x}}}")
    return "\n".join(lines)


TEACHERS = (solve_steps, solve_compact, solve_ledger)

# The system prompt P_i each expert is conditioned on (README.md, "The method, equation by equation"), in teacher order.
EXPERT_PROMPTS = (
    "Solve step by step. End with ####.",
    "Write one expression. End with The answer is.",
    "Total gains and losses first. Box the answer.",
)


def teacher_answers(problems: list[Problem]) -> list[ExpertAnswer]:
    """A_j^(i) for every problem j and teacher i (E1); expert 0's is the gold solution."""
    return [ExpertAnswer(id=p.id, expert=i, response=teach(p))
            for p in problems for i, teach in enumerate(TEACHERS)]


def load_synthetic(n_train: int = 3000, n_eval: int = 300, seed: int = 0
                   ) -> tuple[list[Example], list[Example], list[ExpertAnswer]]:
    """Train examples, eval examples and the teachers' answers to the train examples."""
    train = generate_problems(n_train, "train", seed)
    evals = generate_problems(n_eval, "eval", seed)
    return [p.to_example() for p in train], [p.to_example() for p in evals], teacher_answers(train)
