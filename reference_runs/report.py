"""Write reference_runs/README.md (and its plots) from the committed run folders, and nothing else.

    python reference_runs/report.py            # README.md + plots/ (plots need matplotlib)
    python reference_runs/report.py --no-plots # README.md only

Every number in the README is computed here from reference_runs/runs/<name>/{run.json,
results.json, metrics.jsonl} (and the premise's teacher figures from meml/synthetic.py itself);
no figure is typed by hand, and the reading's verdicts are computed with their numbers.
tests/test_reference_runs.py checks that this script, run on the committed folders, gives the
committed README byte for byte.

Statistics (reference_runs/stats.py). A method's figure is the mean over its seeds (± the seeds'
standard deviation). A comparison A − B pairs the two methods' runs by seed (same synthetic
world, same SFT start where both start from one, same 1000 held-out questions); its interval is
the paired t interval over seeds (95 %, t at seeds − 1 degrees of freedom). Beside it, the
question-level standard error (per seed the s.d. of the per-question differences / √questions,
combined over seeds) shows how much of the spread evaluation alone would give. Each comparison
is made on two views: the expert chosen on the dev split (the paper's inference mode: one model,
one prompt) and the mean over experts.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from meml import plots, synthetic  # noqa: E402
from meml.config import PRESETS, SYNTHETIC_SETTINGS, RielConfig  # noqa: E402
from meml.rewards import verifier_for  # noqa: E402
from reading import READING  # noqa: E402  (the hand-written words; every number and verdict is computed)
from runs import EVALUATION, PRIMARY, SEEDS, plan  # noqa: E402
from stats import paired_t  # noqa: E402

FAMILIES = synthetic.BLIND_SPOTS  # the one-kind families; expert i's teacher is blind to FAMILIES[i]
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
SECONDARY = [  # (A, B, what A − B measures): read beside the primary ones, not counted with them
    ("MEML-GRPO", "MEML-GRPO start", "what MEML's RIEL adds to its MoE-SFT start"),
    ("MEML-GRPO", "MEML-GRPO w/o MEF", "MEF with blind teachers, or SFT on the gold solutions, before MEML's RIEL"),
    ("MEML-GRPO", "MoE-SFT-Dr.GRPO", "MEML against Dr.GRPO from the same start"),
    ("MEML-GRPO", "MEML-GRPO w/o buffer", "the buffer (E6) on top of E5"),
    ("MEML-GRPO", "MEML-GRPO w/o inter-expert", "the inter-expert term (E5) on top of E6"),
    ("MEML-GRPO w/o inter-expert", "MEML-GRPO E3 only", "the buffer alone"),
    ("MEML-GRPO w/o buffer", "MEML-GRPO E3 only", "the inter-expert term alone"),
    ("MoE-SFT-GRPO + dynamic sampling", "MoE-SFT-GRPO", "dynamic sampling on top of GRPO"),
    ("MoE-SFT", "Single expert, SFT", "the paper's MEF claim: one model on all teachers, or one per teacher"),
    ("MoE-SFT, equal steps per format", "MoE-SFT", "MoE-SFT given each format as many steps as ExpertX-SFT"),
]
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

    def verdict(self, comparisons: int = 1) -> str:
        """"A better" / "B better" when the 95 % interval excludes 0 (and, with several
        comparisons, "(holds at 0.05 / comparisons)" when p is below that too)."""
        if self.seeds < 2 or self.low <= 0 <= self.high:
            return "not shown"
        word = "A better" if self.diff > 0 else "B better"
        if comparisons > 1:
            word += " (Bonferroni: holds)" if self.p < 0.05 / comparisons else " (Bonferroni: not shown)"
        return word

    def __str__(self) -> str:
        if self.seeds < 2:
            return f"{100 * self.diff:+.1f} (one seed)"
        return (f"{100 * self.diff:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}], p = {self.p:.3f}; "
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


# ---------------------------------------------------------------------------------------------
# The premise (issue 23): checked before any comparison is read

def teacher_overlap(seeds) -> dict:
    """The teachers' errors on each seed's training questions (meml/synthetic.py's world as
    train.py builds it, judged by the verifier D1 uses): each teacher's error rate, and the share
    of questions wrong for two or more."""
    rates, both, verifier = [], [], verifier_for("synthetic")
    for s in seeds:
        train, _, answers = synthetic.load_synthetic(seed=s)
        by_id = {ex.id: ex for ex in train}
        wrong: dict[str, list[int]] = {}
        for a in answers:
            wrong.setdefault(a.id, []).append(int(verifier(a.response, by_id[a.id]) != 1.0))
        rows = list(wrong.values())
        rates.append([mean([row[i] for row in rows]) for i in range(3)])
        both.append(mean([float(sum(row) >= 2) for row in rows]))
    return {"rates": [mean([r[i] for r in rates]) for i in range(3)], "overlap": mean(both)}


def blind_spot_margins(runs: list[Run]) -> dict[str, float]:
    """Per one-kind family, after MoE-SFT: how far the experts whose teachers solve it are ahead
    of the expert whose teacher is blind to part of it (the lower of the two margins): (mean over
    seeds, the lowest seed's)."""
    out = {}
    for blind, family in enumerate(FAMILIES):
        margins = []
        for r in runs:
            acc = r.final["by_family"][family]["accuracy"]
            margins.append(min(acc[i] for i in range(3) if i != blind) - acc[blind])
        out[family] = (mean(margins), min(margins))
    return out


def metric_mean(runs: list[Run], key: str) -> float | None:
    values = [m[key] for r in runs for m in r.metrics() if key in m]
    return mean(values) if values else None


@dataclass
class Check:
    what: str
    figure: str
    holds: bool | None   # None: its runs are not there yet


def premise_checks(groups) -> list[Check]:
    checks = []
    seeds = sorted({r.seed for r in groups.get("MoE-SFT", [])}) or list(SEEDS)
    t = teacher_overlap(seeds)
    checks.append(Check("the teachers err on different questions: two or more wrong on under 10 % of the "
                        "training questions (the paper's teachers: 3.06 %)",
                        f"{pct(t['overlap'])} % wrong for two or more; each teacher wrong on "
                        + " / ".join(f"{pct(x)} %" for x in t["rates"]), t["overlap"] < 0.10))
    fmt = [groups.get(f"Expert{x}-SFT, no blind spot", []) for x in range(3)]
    if all(fmt):
        means = [mean([r.final["accuracy"][0] for r in runs]) for runs in fmt]
        checks.append(Check("no format is privileged: each teacher's format without its blind spot, learned "
                            "alone at equal steps, within 5 points of the others",
                            " / ".join(f"{pct(m)} %" for m in means) + f" (spread {100 * (max(means) - min(means)):.1f})",
                            max(means) - min(means) <= 0.05 + EPS))
    else:
        checks.append(Check("no format is privileged (format learnability runs)", "not run yet", None))
    moe = groups.get("MoE-SFT", [])
    if moe:
        margins = blind_spot_margins(moe)
        checks.append(Check("after MoE-SFT each expert is ahead on its teacher's strong families: on every "
                            "family, the experts taught it lead the blind one by at least 10 points",
                            "; ".join(f"{f}: {100 * m:+.1f} (lowest seed {100 * low:+.1f})"
                                      for f, (m, low) in margins.items()),
                            min(m for m, _ in margins.values()) >= 0.10 - EPS))
    else:
        checks.append(Check("after MoE-SFT each expert is ahead on its teacher's strong families", "not run yet", None))
    grpo = groups.get("MoE-SFT-GRPO", [])
    rescuable, all_wrong = metric_mean(grpo, "premise/rescuable"), metric_mean(grpo, "premise/all_wrong")
    checks.append(Check("reward sparsity that other experts can rescue: during GRPO from MoE-SFT, on at least "
                        "10 % of questions one expert's G rollouts are all wrong while another's has a right one",
                        "not run yet" if rescuable is None else
                        f"{pct(rescuable)} % of questions (all N x G wrong: {pct(all_wrong)} %)",
                        None if rescuable is None else rescuable >= 0.10 - EPS))
    gain = paired(grpo, groups.get("MoE-SFT-GRPO start", []), "mean expert") if grpo else None
    checks.append(Check("RL matters: GRPO raises its MoE-SFT start's held-out accuracy (mean expert) by at "
                        f"least 5 points over {len(SEEDS)} seeds, the interval above 0",
                        "not run yet" if gain is None else f"{gain} ({gain.seeds} of {len(SEEDS)} seeds)",
                        None if gain is None or gain.seeds < len(SEEDS) else (gain.diff >= 0.05 - EPS and gain.low > 0)))
    return checks


def premise_table(checks: list[Check]) -> str:
    word = {True: "**holds**", False: "**does not hold**", None: "–"}
    return table(["premise", "measured", ""], [[c.what, c.figure, word[c.holds]] for c in checks])


# ---------------------------------------------------------------------------------------------
# Tables

def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def listed(groups, names) -> list[str]:
    return [n for n in names if groups.get(n)]


def main_table(groups) -> str:
    rows = []
    for method in listed(groups, SFT_METHODS + RIEL_METHODS + list(SINGLE)):
        runs = groups[method]
        x = expert_of(runs[0])
        if x is not None:
            experts = [mean_sd([r.final["accuracy"][0] for r in runs]) if i == x else "" for i in range(3)]
        else:
            experts = [mean_sd([r.final["accuracy"][i] for r in runs]) for i in range(3)]
        multi = x is None
        rows.append([method, str(len(runs)), *experts, mean_sd([dev_chosen(r.final) for r in runs]),
                     mean_sd([mean_expert(r.final) for r in runs]),
                     mean_sd([r.final["oracle"] for r in runs]) if multi else ""])
    return table(["method", "seeds", "expert 0", "expert 1", "expert 2", "dev-chosen expert", "mean expert",
                  "oracle"], rows)


@cache
def misread_by(seed: int) -> dict[str, list[bool]]:
    """Eval question id -> for each expert, whether its teacher misreads the question (the
    runs' held-out pool, rebuilt from meml/synthetic.py as train.py builds it)."""
    pool = max(300, sum(int(EVALUATION[EVALUATION.index(flag) + 1]) for flag in ("--eval-size", "--dev-size")))
    return {p.id: [any(synthetic.blind(kind, step) for step in p.steps) for kind in FAMILIES]
            for p in synthetic.generate_problems(pool, "eval", seed)}


def blind_accuracy(run: Run, misread: bool) -> float:
    """Mean over experts of each expert's accuracy on the questions its teacher misreads (or on
    the others)."""
    blind = misread_by(run.seed)
    rows = run.final["per_question"]
    return mean([mean([q["correct"][i] for q in rows if blind[q["id"]][i] == misread]) for i in range(3)])


def family_table(groups) -> str:
    """Where the accuracy is: each expert on the questions its teacher misread, and elsewhere."""
    rows = []
    for method in listed(groups, ["MoE-SFT", "Gold-SFT"] + RIEL_METHODS + list(SINGLE)):
        runs = groups[method]
        if "by_family" not in runs[0].final:
            continue
        cells = [mean_sd([mean(r.final["by_family"][f]["accuracy"]) for r in runs]) for f in FAMILIES]
        rows.append([method, mean_sd([blind_accuracy(r, True) for r in runs]),
                     mean_sd([blind_accuracy(r, False) for r in runs]), *cells])
    return table(["method", "each expert where its teacher misreads", "each expert elsewhere",
                  *[f"{f}: mean expert" for f in FAMILIES]], rows)


def comparisons_table(groups, pairs, counted: int) -> str:
    rows = []
    for a, b, what in pairs:
        if not groups.get(a) or not groups.get(b) or paired(groups[a], groups[b], "mean expert") is None:
            rows.append([f"{a} − {b}", what, "–", "not run yet", "", "", ""])
            continue
        cells = []
        for view in VIEWS:
            p = paired(groups[a], groups[b], view)
            cells += [str(p), p.verdict(counted)]
        rows.append([f"{a} − {b}", what, str(paired(groups[a], groups[b], "mean expert").seeds), *cells])
    return table(["A − B", "question", "seeds", "dev-chosen expert: points [95 % t interval]", "verdict",
                  "mean expert: points [95 % t interval]", "verdict"], rows)


def weights(run: Run) -> tuple[float, float]:
    """(λ1, λ2) of a run: its command's, else the defaults."""
    words, r = run.info.get("command", "").split(), RielConfig()
    get = lambda flag, default: float(words[words.index(flag) + 1]) if flag in words else default  # noqa: E731
    return get("--lambda1", r.lambda1), get("--lambda2", r.lambda2)


def compute_table(groups) -> str:
    """What each RIEL method spent, per run (mean over seeds), and how its loss was made up."""
    rows = []
    for method in listed(groups, RIEL_METHODS + [p.format(x=x) for p in list(SINGLE.values())[1:] for x in range(3)]):
        runs = groups[method]
        per_run = lambda key: mean([sum(m.get(key, 0) for m in r.metrics()) for r in runs])  # noqa: E731
        steps = [m for r in runs for m in r.metrics() if "loss/policy" in m]
        if not steps:
            continue
        sft_steps = mean([float(m["buffer/sft_items"] > 0) for m in steps])
        lambda1, lambda2 = weights(runs[0])
        policy = mean([abs(m["loss/policy"]) for m in steps])
        kl = mean([lambda1 * m["loss/inter_expert_kl"] for m in steps])
        sft = [lambda2 * m["loss/sft"] for m in steps if m["buffer/sft_items"] > 0]
        ratio = lambda x: f"{x / policy:.1f}x" if policy > 0 and x else "–"  # noqa: E731
        rows.append([method, f"{per_run('compute/rollouts'):,.0f}", f"{per_run('compute/sampled_tokens'):,.0f}",
                     f"{per_run('buffer/sft_items'):,.0f}", f"{per_run('compute/sft_tokens'):,.0f}",
                     f"{100 * sft_steps:.0f} %", ratio(kl), ratio(mean(sft)) if sft else "–"])
    return table(["method", "rollouts", "sampled tokens", "gold SFT items", "SFT tokens", "steps with buffer SFT",
                  "λ1·E5 / |E3| (mean over steps)", "λ2·E6 / |E3| (on SFT steps)"], rows)


def sparsity_table(groups) -> str:
    rows = []
    for method in listed(groups, RIEL_METHODS):
        rescuable = metric_mean(groups[method], "premise/rescuable")
        if rescuable is None:
            continue
        rows.append([method, pct(rescuable), pct(metric_mean(groups[method], "premise/all_wrong"))])
    return table(["method", "one expert all wrong, another right (% of questions)", "all N x G wrong (%)"], rows)


def label_free_table(groups) -> str:
    rows = []
    for method in listed(groups, ["MoE-SFT"] + RIEL_METHODS):
        runs = groups[method]
        best = [max(r.final["accuracy"]) for r in runs]
        hits = sum(r.final["accuracy"][r.final["dev_choice"]["expert"]] == max(r.final["accuracy"]) for r in runs)
        rows.append([method, mean_sd(best), mean_sd([dev_chosen(r.final) for r in runs]), f"{hits} of {len(runs)}",
                     mean_sd([r.final["confidence_choice"] for r in runs]),
                     mean_sd([r.final["majority_vote"] for r in runs]), mean_sd([r.final["oracle"] for r in runs])])
    return table(["method", "best expert (on the eval labels)", "dev-chosen expert", "dev choice = best",
                  "most confident per question", "majority", "oracle"], rows)


def overlap_table(groups) -> str:
    rows = []
    for method in listed(groups, ["MoE-SFT"] + RIEL_METHODS):
        runs = groups[method]
        counts = [[3 - sum(q["correct"]) for q in r.final["per_question"]] for r in runs]
        rows.append([method] + [f"{mean([c.count(k) for c in counts]):.0f}" for k in (3, 2, 1, 0)])
    return table(["method", "all 3 wrong", "exactly 2 wrong", "exactly 1 wrong", "none wrong"], rows)


# ---------------------------------------------------------------------------------------------
# Plots

def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def figures(groups) -> list[tuple[str, str, object]]:
    """(caption, path relative to reference_runs/, draw(path)) of every figure."""
    main = listed(groups, ["MoE-SFT-GRPO", "MoE-SFT-GRPO + dynamic sampling", "MEML-GRPO", "MEML-GRPO buffer control",
                           "MEML-GRPO w/o MEF"])
    if not main:
        return []
    metrics = {m: [r.metrics() for r in groups[m]] for m in main}
    out = [("Held-out accuracy over RIEL steps, mean over experts and seeds (150 questions, greedy)",
            "plots/accuracy.png", lambda path: plots.plot_comparison(
                metrics, "eval/expert_{i}/accuracy", "points", "held-out accuracy (mean over experts)", path)),
           ("Training reward over RIEL steps, mean over experts and seeds (rolling mean of 10 steps)",
            "plots/reward.png", lambda path: plots.plot_comparison(
                metrics, "rewards/expert_{i}/mean", "rolling", "training reward (mean over experts)", path))]
    return out + [(m, f"plots/{slug(m)}.png", lambda path, m=m: plots.plot_method(metrics[m], m, path)) for m in main]


# ---------------------------------------------------------------------------------------------

def commits(groups) -> str:
    seen = sorted({r.info["commit"] or "unknown" for runs in groups.values() for r in runs if "commit" in r.info})
    return ", ".join(f"`{c[:12]}`" for c in seen)


def verdict_sentences(groups) -> str:
    """One sentence per primary comparison and view, its words computed with its numbers."""
    lines, counted = [], 2 * len(PRIMARY)
    for a, b, what in PRIMARY:
        if not groups.get(a) or not groups.get(b) or paired(groups[a], groups[b], "mean expert") is None:
            lines.append(f"- {what[0].upper() + what[1:]} ({a} − {b}): not run yet.")
            continue
        said = []
        for view in VIEWS:
            p = paired(groups[a], groups[b], view)
            if p.seeds < 2:
                said.append(f"on the {view} {100 * p.diff:+.1f} points (one seed: no interval, no verdict)")
                continue
            v = p.verdict(counted)
            word = ("not shown either way" if v == "not shown" else
                    f"{a if v.startswith('A') else b} is ahead" + v[8:])
            said.append(f"on the {view} {100 * p.diff:+.1f} points [{100 * p.low:+.1f}, {100 * p.high:+.1f}]: {word}")
        seeds = f"{p.seeds} seed" + "s" * (p.seeds != 1)
        lines.append(f"- {what[0].upper() + what[1:]} ({a} − {b}, {seeds}): " + "; ".join(said) + ".")
    return "\n".join(lines)


def render(groups, figures: list[tuple[str, str, object]]) -> str:
    real = {g: runs for g, runs in groups.items() if runs and runs[0].folder is not None}
    n_runs = sum(len(runs) for runs in real.values())
    planned = {r.name for r in plan()}
    missing = sorted(planned - {r.name for runs in real.values() for r in runs})
    missing_groups = sorted({r.group for r in plan() if r.name in missing})
    checks = premise_checks(groups)
    settings = {k: SYNTHETIC_SETTINGS[k] for k in ("mef_steps", "mef_batch_size", "mef_lr", "riel_steps", "riel_lr",
                                                   "riel.questions_per_step", "riel.group_size",
                                                   "riel.buffer_capacity")}
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
        f"{n_runs} runs" + (f", code at commit {commits(real)}" if n_runs else "") + "."
        + (f" Not run yet: {len(missing)} of the {len(planned)} planned runs, of {', '.join(missing_groups)}."
           if missing else ""),
        "",
        "## The premise, checked first",
        "",
        READING["premise"],
        "",
        premise_table(checks),
        "",
        READING["setting"].format(**{k.replace(".", "_"): v for k, v in settings.items()}, grpo_beta=PRESETS[
            "moe-sft-grpo"]["riel.beta"]),
        "",
        "## Primary comparisons",
        "",
        READING["primary"].format(n=len(PRIMARY), tests=2 * len(PRIMARY), seeds=len(SEEDS),
                                  bonferroni=f"{0.05 / (2 * len(PRIMARY)):.4f}"),
        "",
        comparisons_table(groups, PRIMARY, 2 * len(PRIMARY)),
        "",
        "**Reading**, computed with the table:",
        "",
        verdict_sentences(groups),
        "",
        f"## Secondary comparisons ({len(SECONDARY)}, each on both views; not counted in the multiplicity above)",
        "",
        comparisons_table(groups, SECONDARY, 1),
        "",
        "## Held-out accuracy (%, greedy, 1000 questions; mean ± s.d. over seeds)",
        "",
        main_table(groups),
        "",
        READING["main"],
        "",
        "## Where the accuracy is: the questions each expert's teacher misread (%, mean ± s.d. over seeds)",
        "",
        family_table(groups),
        "",
        "## What each RIEL method spent, and how its loss was made up (per run, mean over seeds)",
        "",
        READING["compute"],
        "",
        compute_table(groups),
        "",
        "## Reward sparsity during RIEL (mean over steps and seeds)",
        "",
        sparsity_table(groups),
        "",
        "## Choosing an expert without labels",
        "",
        label_free_table(groups),
        "",
        "## Do the experts keep distinct errors? (questions of 1000 by how many experts get them wrong)",
        "",
        overlap_table(groups),
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
    groups = load_runs(args.runs) if args.runs.exists() else {}
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
