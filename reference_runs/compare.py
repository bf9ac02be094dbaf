"""The committed reference runs, loaded, and compared: paired by seed, with intervals over seeds.

Statistics (reference_runs/stats.py). A method's figure is the mean over its seeds (± the seeds'
standard deviation). A comparison A − B pairs the two methods' runs by seed (same synthetic
world, same SFT start where both start from one, same 1000 held-out questions); its interval is
the paired t interval over seeds (95 %, t at seeds − 1 degrees of freedom). Beside it, the
question-level standard error (per seed the s.d. of the per-question differences / √questions,
combined over seeds) shows how much of the spread evaluation alone would give. Each comparison
is made on two views: the expert chosen on the dev split (the paper's inference mode: one model,
one prompt) and the mean over experts.
"""
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from meml import plots  # noqa: E402
from stats import paired_t  # noqa: E402

SFT_METHODS = ["Expert0-SFT", "Expert1-SFT", "Expert2-SFT", "MoE-SFT", "MoE-SFT, equal steps per format",
               "Gold-SFT"]
RIEL_METHODS = ["MoE-SFT-GRPO", "MoE-SFT-Dr.GRPO", "MoE-SFT-GRPO + dynamic sampling", "MEML-GRPO",
                "MEML-GRPO buffer control", "MEML-GRPO w/o buffer", "MEML-GRPO w/o inter-expert",
                "MEML-GRPO E3 only", "MEML-GRPO w/o MEF"]
SINGLE = {  # one model per expert, taken together: (its runs' group, with "{x}" for the expert)
    "Single expert, SFT": "Expert{x}-SFT",
    "Single expert, GRPO": "Expert{x}-SFT-GRPO",
    "Single expert, N x G rollouts": "Expert{x}-SFT-GRPO, N x G rollouts",
}
LEVEL = 0.95
EPS = 1e-9  # thresholds are met by k/n fractions: 0.9 − 0.8 is 0.0999… in floats


@dataclass
class Run:
    name: str
    info: dict      # run.json
    results: dict   # results.json
    folder: Path | None

    @property
    def group(self) -> str:
        return self.info["group"]

    @property
    def seed(self) -> int:
        return self.info["seed"]

    @property
    def final(self) -> dict:
        r = self.results["results"]
        return r.get("after RIEL") or r["after MEF"]

    @property
    def start(self) -> dict | None:
        r = self.results["results"]
        return r.get("before RIEL") or (r.get("after MEF") if r.get("after RIEL") else None)

    def metrics(self) -> list[dict]:
        return plots.read_metrics(self.folder / "metrics.jsonl") if self.folder else []


def load_runs(folder: Path) -> dict[str, list[Run]]:
    """group -> its runs, in seed order; plus each group's start ("X start": its runs' first
    evaluation) and the one-model-per-expert groups of SINGLE."""
    groups: dict[str, list[Run]] = {}
    for run_dir in sorted(p for p in folder.iterdir() if (p / "results.json").exists()):
        run = Run(run_dir.name, json.loads((run_dir / "run.json").read_text()),
                  json.loads((run_dir / "results.json").read_text()), run_dir)
        groups.setdefault(run.group, []).append(run)
    return with_derived({g: sorted(runs, key=lambda r: r.seed) for g, runs in groups.items()})


def with_derived(groups: dict[str, list[Run]]) -> dict[str, list[Run]]:
    out = dict(groups)
    for name in RIEL_METHODS:
        if name in groups:
            out[f"{name} start"] = [Run(r.name, r.info, {"results": {"after MEF": r.start}}, None) for r in groups[name]]
    for name, pattern in SINGLE.items():
        per_expert = [{r.seed: r for r in groups.get(pattern.format(x=x), [])} for x in range(3)]
        seeds = sorted(set.intersection(*(set(runs) for runs in per_expert)))
        if seeds:
            out[name] = [Run(f"{name} s{s}", {"group": name, "seed": s},
                             {"results": {"after MEF": one_per_expert([runs[s].final for runs in per_expert])}}, None)
                         for s in seeds]
    return out


def one_per_expert(results: list[dict]) -> dict:
    """Three single-expert models' results as one three-expert result: each question's
    correctness per model, and the dev choice among the models (ties: the lowest index)."""
    if len({tuple(q["id"] for q in r["per_question"]) for r in results}) > 1:
        raise ValueError("single-expert models evaluated on different questions")
    dev = [r["dev_choice"]["dev_accuracy"][0] for r in results]
    chosen = dev.index(max(dev))
    rows = [{"id": rows[0]["id"], "correct": [row["correct"][0] for row in rows]}
            for rows in zip(*(r["per_question"] for r in results))]
    return {"accuracy": [r["accuracy"][0] for r in results], "per_question": rows,
            "oracle": mean([float(any(row["correct"])) for row in rows]),
            "dev_choice": {"dev_accuracy": dev, "expert": chosen, "accuracy": results[chosen]["accuracy"][0]},
            "by_family": {f: {"accuracy": [r["by_family"][f]["accuracy"][0] for r in results]}
                          for f in results[0].get("by_family", {})}}


# ---------------------------------------------------------------------------------------------
# Numbers

def mean(xs):
    return sum(xs) / len(xs)


def sd(xs):
    return math.sqrt(sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    return pct(mean(xs)) + ("" if len(xs) < 2 else f" ± {100 * sd(xs):.1f}")


def mean_expert(result: dict) -> float:
    return mean(result["accuracy"])


def dev_chosen(result: dict) -> float:
    return result["dev_choice"]["accuracy"]


VIEWS = {  # name -> (one number of a result, its per-question correctness)
    "dev-chosen expert": (dev_chosen, lambda r: [float(q["correct"][r["dev_choice"]["expert"]])
                                                 for q in r["per_question"]]),
    "mean expert": (mean_expert, lambda r: [mean(q["correct"]) for q in r["per_question"]]),
}


@dataclass
class Paired:
    """A − B over the seeds both have: the paired t interval over seeds, and the standard error
    that the questions alone would give."""
    diffs: list[float]          # per seed
    se_questions: float
    low: float = field(init=False)
    high: float = field(init=False)
    p: float = field(init=False)

    def __post_init__(self):
        _, self.low, self.high, self.p = paired_t(self.diffs, LEVEL)

    @property
    def diff(self) -> float:
        return mean(self.diffs)

    @property
    def seeds(self) -> int:
        return len(self.diffs)

    @property
    def no_interval(self) -> str | None:
        """Why there is no t interval: one seed, or every seed giving the same difference (the
        differences step in 1/questions, so two seeds can tie; a spread of zero is no evidence
        of no spread, and its zero-width interval and p = 0 would read as certainty)."""
        if self.seeds < 2:
            return "one seed"
        if max(self.diffs) - min(self.diffs) < EPS:
            return "the same on every seed"
        return None

    def verdict(self, comparisons: int = 1) -> str:
        """"A better" / "B better" when the 95 % interval excludes 0 (and, with several
        comparisons, "(holds at 0.05 / comparisons)" when p is below that too)."""
        if self.no_interval or self.low <= 0 <= self.high:
            return "not shown"
        word = "A better" if self.diff > 0 else "B better"
        if comparisons > 1:
            word += " (Bonferroni: holds)" if self.p < 0.05 / comparisons else " (Bonferroni: not shown)"
        return word

    def __str__(self) -> str:
        if self.no_interval:
            return f"{100 * self.diff:+.1f} ({self.no_interval}: no interval)"
        # p to 4 decimals, as the Bonferroni bound is printed, so a p just under it reads as under it
        p = "p < 0.0001" if self.p < 0.0001 else f"p = {self.p:.4f}"
        return (f"{100 * self.diff:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}], {p}; "
                f"s.e. questions {100 * self.se_questions:.1f}")


def paired(a: list[Run], b: list[Run], view: str) -> Paired | None:
    number, per_question = VIEWS[view]
    b_by_seed = {r.seed: r for r in b}
    pairs = [(ra.final, b_by_seed[ra.seed].final) for ra in a if ra.seed in b_by_seed]
    if not pairs:
        return None
    variances = []
    for ra, rb in pairs:
        if [q["id"] for q in ra["per_question"]] != [q["id"] for q in rb["per_question"]]:
            raise ValueError("a paired comparison of results on different questions")
        d = [x - y for x, y in zip(per_question(ra), per_question(rb))]
        variances.append(sd(d) ** 2 / len(d))
    return Paired([number(ra) - number(rb) for ra, rb in pairs], math.sqrt(sum(variances)) / len(pairs))


def expert_of(run: Run) -> int | None:
    words = run.info.get("command", "").split()
    return int(words[words.index("--expert") + 1]) if "--expert" in words else None
