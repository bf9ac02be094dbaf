"""Write reference_runs/README.md (and its plots) from the committed run folders, and nothing else.

    python reference_runs/report.py            # README.md + plots/ (plots need matplotlib)
    python reference_runs/report.py --no-plots # README.md only

Every number in the README is computed here from reference_runs/runs/<name>/{run.json,
results.json, metrics.jsonl}; no figure is typed by hand. tests/test_reference_runs.py checks
that this script, run on the committed folders, gives the committed README byte for byte.

Statistics. A method's figure is the mean over its seeds (± the seeds' standard deviation). A
paired difference A − B compares two methods on the same seeds (same synthetic world, same MEF
checkpoint where both start from one, same 1000 held-out questions) and carries two standard
errors: over seeds (the s.d. of the per-seed differences / √seeds: training noise) and over
questions (per seed, the s.d. of the per-question differences / √questions, combined over
seeds: evaluation noise). A difference counts as real when it exceeds twice the larger of the two.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from meml import plots  # noqa: E402
from reading import READING  # noqa: E402  (the hand-written reading: words, no numbers)
from runs import plan  # noqa: E402

LEVELS = ("1", "2", "3")
SFT_METHODS = ["Expert0-SFT", "Expert1-SFT", "Expert2-SFT", "MoE-SFT"]
RIEL_METHODS = ["Expert0-SFT-GRPO", "Expert1-SFT-GRPO", "Expert2-SFT-GRPO",
                "Expert0-SFT-Dr.GRPO", "Expert1-SFT-Dr.GRPO", "Expert2-SFT-Dr.GRPO",
                "MoE-SFT-GRPO", "MoE-SFT-Dr.GRPO", "MEML-GRPO"]
ABLATIONS = ["MEML-GRPO E3 only", "MEML-GRPO w/o inter-expert", "MEML-GRPO w/o buffer", "MEML-GRPO w/o MEF"]
PAIRS = [  # (A, B, what A − B measures)
    ("MEML-GRPO", "MoE-SFT-GRPO", "MEML against GRPO from the same MEF checkpoint"),
    ("MEML-GRPO", "MoE-SFT-Dr.GRPO", "MEML against Dr.GRPO from the same MEF checkpoint"),
    ("MEML-GRPO w/o inter-expert", "MEML-GRPO E3 only", "the buffer (E6) alone"),
    ("MEML-GRPO w/o buffer", "MEML-GRPO E3 only", "the inter-expert term (E5) alone"),
    ("MEML-GRPO", "MEML-GRPO w/o inter-expert", "E5 on top of E6"),
    ("MEML-GRPO", "MEML-GRPO w/o buffer", "E6 on top of E5"),
    ("MEML-GRPO", "MEML-GRPO w/o MEF", "MEF (stage 1) before MEML's RIEL"),
]
LAMBDAS = (0.0, 0.01, 0.03, 0.1, 0.3)
VARIANTS = ("sequence", "token_mean")


@dataclass
class Run:
    name: str
    info: dict      # run.json
    results: dict   # results.json
    folder: Path

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
        return plots.read_metrics(self.folder / "metrics.jsonl")


def load_runs(folder: Path) -> dict[str, list[Run]]:
    """group -> its runs, in seed order."""
    groups: dict[str, list[Run]] = {}
    for run_dir in sorted(p for p in folder.iterdir() if (p / "results.json").exists()):
        run = Run(run_dir.name, json.loads((run_dir / "run.json").read_text()),
                  json.loads((run_dir / "results.json").read_text()), run_dir)
        groups.setdefault(run.group, []).append(run)
    return {g: sorted(runs, key=lambda r: r.seed) for g, runs in groups.items()}


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


def per_question(result: dict, level: str | None = None) -> list[float]:
    """Per question: the fraction of experts that are right (optionally one difficulty level)."""
    rows = result["per_question"]
    if level is not None:
        rows = [r for r in rows if r["id"].split("-")[2] == f"d{level}"]
    return [mean(r["correct"]) for r in rows]


def vote_per_question(result: dict) -> list[float]:
    return [float(r["vote"]) for r in result["per_question"]]


def oracle_per_question(result: dict) -> list[float]:
    return [float(any(r["correct"])) for r in result["per_question"]]


@dataclass
class Paired:
    diff: float
    se_seeds: float
    se_questions: float
    seeds: int

    @property
    def se(self) -> float:
        return max(x for x in (self.se_seeds, self.se_questions) if not math.isnan(x))

    def verdict(self) -> str:
        if abs(self.diff) <= 2 * self.se:
            return "within noise"
        return "A better" if self.diff > 0 else "B better"

    def __str__(self) -> str:
        seeds = "–" if math.isnan(self.se_seeds) else f"{100 * self.se_seeds:.1f}"
        return f"{100 * self.diff:+.1f} (s.e. {seeds} / {100 * self.se_questions:.1f})"


def paired(a: list[Run], b: list[Run], per_q, which=("final", "final")) -> Paired | None:
    """A − B over the seeds both have, each seed a per-question paired difference."""
    b_by_seed = {r.seed: r for r in b}
    pairs = [(ra, b_by_seed[ra.seed]) for ra in a if ra.seed in b_by_seed]
    if not pairs:
        return None
    means, variances = [], []
    for ra, rb in pairs:
        qa, qb = per_q(getattr(ra, which[0])), per_q(getattr(rb, which[1]))
        d = [x - y for x, y in zip(qa, qb)]
        means.append(mean(d))
        variances.append(sd(d) ** 2 / len(d))
    se_seeds = sd(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
    return Paired(mean(means), se_seeds, math.sqrt(sum(variances)) / len(means), len(means))


def expert_of(run: Run) -> int | None:
    words = run.info["command"].split()
    return int(words[words.index("--expert") + 1]) if "--expert" in words else None


# ---------------------------------------------------------------------------------------------
# Tables

def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main_table(groups) -> str:
    rows = []
    for method in SFT_METHODS + RIEL_METHODS + ABLATIONS:
        runs = groups.get(method)
        if not runs:
            continue
        x = expert_of(runs[0])
        experts = []
        for i in range(3):
            if x is None:
                experts.append(mean_sd([r.final["accuracy"][i] for r in runs]))
            else:
                experts.append(mean_sd([r.final["accuracy"][0] for r in runs]) if i == x else "")
        multi = x is None
        rows.append([method, str(len(runs)), *experts,
                     mean_sd([mean_expert(r.final) for r in runs]),
                     mean_sd([max(r.final["accuracy"]) for r in runs]),
                     mean_sd([r.final["majority_vote"] for r in runs]) if multi else "",
                     mean_sd([r.final["oracle"] for r in runs]) if multi else ""])
    return table(["method", "seeds", "expert 0", "expert 1", "expert 2", "mean expert", "best expert",
                  "majority", "oracle"], rows)


def difficulty_table(groups) -> str:
    rows = []
    for method in SFT_METHODS + RIEL_METHODS + ABLATIONS:
        runs = groups.get(method)
        if not runs:
            continue
        cells = []
        for level in LEVELS:
            cells.append(mean_sd([mean_expert(r.final["by_difficulty"][level]) for r in runs]))
        for level in LEVELS[1:]:
            cells.append(mean_sd([r.final["by_difficulty"][level]["oracle"] for r in runs])
                         if expert_of(runs[0]) is None else "")
        rows.append([method, *cells])
    return table(["method", "d1 mean expert", "d2 mean expert", "d3 mean expert", "d2 oracle", "d3 oracle"], rows)


def riel_gain_table(groups) -> str:
    """What RIEL adds to the checkpoint it starts from, paired on the same questions."""
    rows = []
    for method in RIEL_METHODS + ABLATIONS:
        runs = groups.get(method)
        if not runs:
            continue
        cells = [str(paired(runs, runs, per_question, ("final", "start")))]
        for level in LEVELS[1:]:
            cells.append(str(paired(runs, runs, lambda r, lv=level: per_question(r, lv), ("final", "start"))))
        rows.append([method, mean_sd([mean_expert(r.start) for r in runs]), *cells])
    return table(["method", "start: mean expert", "RIEL gain, mean expert", "gain on d2", "gain on d3"], rows)


def pairs_table(groups) -> str:
    rows = []
    for a, b, what in PAIRS:
        if a not in groups or b not in groups:
            continue
        p = paired(groups[a], groups[b], per_question)
        hard = paired(groups[a], groups[b], lambda r: per_question(r, "2") + per_question(r, "3"))
        vote = paired(groups[a], groups[b], vote_per_question)
        oracle = paired(groups[a], groups[b], oracle_per_question)
        rows.append([f"{a} − {b}", what, str(p.seeds), str(p), p.verdict(), str(hard), hard.verdict(),
                     str(vote), str(oracle)])
    return table(["A − B", "measures", "seeds", "mean expert", "verdict", "mean expert, d2 + d3", "verdict", "majority",
                  "oracle"], rows)


LADDER = [("MoE-SFT", "MoE-SFT (no RIEL)"), ("MEML-GRPO E3 only", "RIEL with E3 only"),
          ("MEML-GRPO w/o inter-expert", "+ buffer (E6)"), ("MEML-GRPO w/o buffer", "+ inter-expert (E5)"),
          ("MEML-GRPO", "+ both: MEML-GRPO")]


def ladder_table(groups) -> str:
    """The paper's ablation ladder, every rung from the same MEF checkpoints; Δ against the rung
    of E3 alone, paired."""
    rows = []
    base = groups.get("MEML-GRPO E3 only")
    hard = lambda r: per_question(r, "2") + per_question(r, "3")  # noqa: E731
    for group, label in LADDER:
        runs = groups.get(group)
        if not runs:
            continue
        delta = paired(runs, base, per_question) if base and group != "MEML-GRPO E3 only" else None
        delta_hard = paired(runs, base, hard) if delta else None
        rows.append([label, str(len(runs)), mean_sd([mean_expert(r.final) for r in runs]),
                     mean_sd([mean(hard(r.final)) for r in runs]),
                     mean_sd([r.final["majority_vote"] for r in runs]), mean_sd([r.final["oracle"] for r in runs]),
                     str(delta) if delta else "", str(delta_hard) if delta_hard else ""])
    return table(["rung", "seeds", "mean expert", "mean expert, d2 + d3", "majority", "oracle",
                  "Δ mean expert vs E3 only", "Δ d2 + d3 vs E3 only"], rows)


def sweep_group(lambda1: float, variant: str) -> str:
    if lambda1 == 0:
        return "MEML-GRPO w/o inter-expert"
    if lambda1 == 0.1 and variant == "sequence":
        return "MEML-GRPO"
    return f"λ1={lambda1} {variant}"


def sweep_table(groups) -> str:
    rows = []
    base = groups.get(sweep_group(0, "sequence"))
    for lambda1 in LAMBDAS:
        cells = []
        for variant in VARIANTS:
            runs = groups.get(sweep_group(lambda1, variant))
            if not runs:
                cells += ["", "", ""]
                continue
            cells.append(f"{mean_sd([mean_expert(r.final) for r in runs])} ({len(runs)} seed{'s' * (len(runs) > 1)})")
            d = paired(runs, base, lambda r: per_question(r, "2") + per_question(r, "3")) if base and lambda1 else None
            cells.append(str(d) if d else "")
            cells.append(loss_scale(runs, lambda1) if lambda1 else "")
        rows.append([str(lambda1), *cells])
    return table(["λ1", "sum: mean expert", "sum: Δ d2+d3 vs λ1 = 0", "sum: λ1·E5 / E3",
                  "per token: mean expert", "per token: Δ d2+d3 vs λ1 = 0", "per token: λ1·E5 / E3"], rows)


def loss_scale(runs: list[Run], lambda1: float) -> str:
    """Mean λ1·L_KL over steps against the mean |L_GRPO|: how much E5 weighs in E7."""
    kl, policy = [], []
    for r in runs:
        rows = [m for m in r.metrics() if "loss/policy" in m]
        kl += [lambda1 * m["loss/inter_expert_kl"] for m in rows]
        policy += [abs(m["loss/policy"]) for m in rows]
    return f"{mean(kl) / mean(policy):.1f}x" if mean(policy) > 0 else "–"


def label_free_table(groups) -> str:
    rows = []
    for method in ["MoE-SFT"] + [m for m in RIEL_METHODS + ABLATIONS if not m.startswith("Expert")]:
        runs = groups.get(method)
        if not runs:
            continue
        rows.append([method,
                     mean_sd([max(r.final["accuracy"]) for r in runs]),
                     mean_sd([r.final["dev_choice"]["accuracy"] for r in runs]),
                     mean_sd([r.final["confidence_choice"] for r in runs]),
                     mean_sd([r.final["majority_vote"] for r in runs]),
                     mean_sd([r.final["oracle"] for r in runs]),
                     mean_sd([mean_expert(r.final) for r in runs])])
    return table(["method", "best expert (chosen on the eval labels)", "best on dev (300)",
                  "most confident per question", "majority", "oracle", "mean expert"], rows)


def overlap_counts(result: dict) -> dict:
    wrong = [3 - sum(r["correct"]) for r in result["per_question"]]
    only = [sum(1 for r in result["per_question"] if sum(r["correct"]) == 2 and not r["correct"][i])
            for i in range(3)]
    return {"all": wrong.count(3), "two": wrong.count(2), "one": wrong.count(1), "only": only,
            "oracle_gain": result["oracle"] - max(result["accuracy"])}


def overlap_table(groups) -> str:
    rows = []
    for method in ["MoE-SFT"] + [m for m in RIEL_METHODS + ABLATIONS if not m.startswith("Expert")]:
        runs = groups.get(method)
        if not runs:
            continue
        stages = [("final", "after MEF")] if method == "MoE-SFT" else [("start", "before RIEL"), ("final", "after RIEL")]
        for when, label in stages:
            counts = [overlap_counts(getattr(r, when)) for r in runs]
            rows.append([method, label,
                         f"{mean([c['all'] for c in counts]):.0f}", f"{mean([c['two'] for c in counts]):.0f}",
                         f"{mean([c['one'] for c in counts]):.0f}",
                         " / ".join(f"{mean([c['only'][i] for c in counts]):.0f}" for i in range(3)),
                         mean_sd([c["oracle_gain"] for c in counts])])
    return table(["method", "when", "all 3 wrong", "exactly 2 wrong", "exactly 1 wrong",
                  "wrong only by expert 0 / 1 / 2", "oracle − best expert (points)"], rows)


# ---------------------------------------------------------------------------------------------
# Plots

def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def figures(groups) -> list[tuple[str, str, object]]:
    """(caption, path relative to reference_runs/, draw(path)) of every figure."""
    main = [m for m in ["MoE-SFT-GRPO", "MoE-SFT-Dr.GRPO", "MEML-GRPO"] + ABLATIONS if m in groups]
    metrics = {m: [r.metrics() for r in groups[m]] for m in main}
    if not main:
        return []
    out = [("Held-out accuracy over RIEL steps, mean over experts and seeds (150 questions, greedy)",
            "plots/accuracy.png", lambda path: plots.plot_comparison(
                metrics, "eval/expert_{i}/accuracy", "points", "held-out accuracy (mean over experts)", path)),
           ("Training reward over RIEL steps, mean over experts and seeds (rolling mean of 10 steps)",
            "plots/reward.png", lambda path: plots.plot_comparison(
                metrics, "rewards/expert_{i}/mean", "rolling", "training reward (mean over experts)", path))]
    return out + [(m, f"plots/{slug(m)}.png", lambda path, m=m: plots.plot_method(metrics[m], m, path))
                  for m in main]


# ---------------------------------------------------------------------------------------------

def commits(groups) -> str:
    seen = sorted({r.info["commit"] or "unknown" for runs in groups.values() for r in runs})
    return ", ".join(f"`{c[:12]}`" for c in seen)


def render(groups, figures: list[tuple[str, str, object]]) -> str:
    n_runs = sum(len(runs) for runs in groups.values())
    planned = {r.name for r in plan()}
    done = {r.name for runs in groups.values() for r in runs}
    missing = sorted(planned - done)
    missing_groups = sorted({r.group for r in plan() if r.name in missing})
    parts = [
        "# Reference runs: the paper's comparison on the synthetic world",
        "",
        "Generated by `python reference_runs/report.py` from the run folders in `reference_runs/runs/`; "
        "every number below is computed from them (tests/test_reference_runs.py checks that the script "
        "reproduces this file). The exact command of every run: `python reference_runs/runs.py list`; "
        "`python reference_runs/runs.py check NAME` reruns one and compares its results.json (run it "
        "from a checkout of the commit the run's run.json names: a later commit may round a float "
        "differently, and a few hundred training steps amplify that). "
        "The engineering log of how they were run is `LOG.md`.",
        "",
        f"{n_runs} runs, code at commit {commits(groups)}."
        + (f" Not run yet: {len(missing)} of the {len(planned)} planned runs, of {', '.join(missing_groups)}."
           if missing else ""),
        "",
        READING["setting"],
        "",
        "## Main comparison (held-out accuracy, %, greedy, 1000 questions; mean ± s.d. over seeds)",
        "",
        main_table(groups),
        "",
        READING["main"],
        "",
        "## Per difficulty (mean expert accuracy, %; oracle for the multi-expert methods)",
        "",
        difficulty_table(groups),
        "",
        "## What RIEL adds to its starting checkpoint (points; paired on the same questions)",
        "",
        "Differences in points, with two standard errors: over seeds / over questions.",
        "",
        riel_gain_table(groups),
        "",
        "## The ablation ladder (held-out accuracy, %; Δ in points, s.e. over seeds / questions)",
        "",
        ladder_table(groups),
        "",
        READING["ladder"],
        "",
        "## Paired differences between methods (points, same seeds and questions)",
        "",
        "A − B with its standard error over seeds / over questions; the verdict says whether the "
        "difference exceeds twice the larger one (d2 + d3: the 2- and 3-step questions only).",
        "",
        pairs_table(groups),
        "",
        READING["pairs"],
        "",
        "## λ1 and E5's scale",
        "",
        "MEML-GRPO with E5 summed over O+'s tokens (the paper's form, `--inter-expert-variant sequence`) "
        "or divided by |O+| (`token_mean`); λ1 = 0 is MEML-GRPO without the inter-expert term and "
        "(0.1, sum) is MEML-GRPO itself. Δ: paired difference on the 2- and 3-step questions against "
        "λ1 = 0, with its standard errors over seeds / questions. λ1·E5 / E3: the mean weighted E5 "
        "loss against the mean |policy loss| over the run's steps.",
        "",
        sweep_table(groups),
        "",
        READING["sweep"],
        "",
        "## Choosing an expert without labels",
        "",
        "Accuracy (%) when one answer per question is taken from: the expert best on the eval "
        "questions themselves (uses their labels: the fixed best expert), the expert best on 300 "
        "separate dev questions, the expert whose greedy answer has the highest mean token "
        "log-probability (per question, no labels), the majority vote, and the oracle.",
        "",
        label_free_table(groups),
        "",
        READING["label_free"],
        "",
        "## Do the experts keep distinct errors? (the paper's Table 1 analogue)",
        "",
        "Questions (of 1000, mean over seeds) by how many of the three experts get them wrong.",
        "",
        overlap_table(groups),
        "",
        READING["overlap"],
        "",
        "## Plots",
        "",
    ]
    if figures:
        for caption, path, _ in figures:
            parts += [f"{caption}:", "", f"![{caption}]({path})", ""]
    else:
        parts += ["(no RIEL runs yet)", ""]
    parts += ["## Real data", "", READING["real_data"], ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    p.add_argument("--out", type=Path, default=HERE / "README.md")
    p.add_argument("--no-plots", action="store_true", help="write README.md only (it links the plots all the same)")
    args = p.parse_args(argv)
    groups = load_runs(args.runs)
    figs = figures(groups)
    drawn = not args.no_plots and plots.available()
    if drawn:
        for _, path, draw in figs:
            draw(args.out.parent / path)
    args.out.write_text(render(groups, figs))
    print(f"wrote {args.out}" + (f" and {len(figs)} plots" if drawn else " (no plots: --no-plots, or no matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
