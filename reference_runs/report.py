"""Write reference_runs/README.md (and its plots) from the committed run folders, and nothing else.

    python reference_runs/report.py            # README.md + plots/ (plots need matplotlib)
    python reference_runs/report.py --no-plots # README.md only

Every number in the README is computed here from reference_runs/runs/<name>/{run.json,
results.json, metrics.jsonl} (and the premise's teacher figures from meml/synthetic.py itself);
no figure is typed by hand, and the reading's verdicts are computed with their numbers.
tests/test_reference_runs.py checks that this script, run on the committed folders, gives the
committed README byte for byte. How runs are loaded and compared (the statistics) is
compare.py; the premise checks are premise.py.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from compare import (RIEL_METHODS, SFT_METHODS, SINGLE, VIEWS, Run, dev_chosen, expert_of, load_runs,  # noqa: E402
                     mean, mean_expert, mean_sd, paired, pct)
from meml import plots  # noqa: E402
from meml.config import PRESETS, SYNTHETIC_SETTINGS, make_config, overrides_from  # noqa: E402
from premise import FAMILIES, Check, blind_accuracy, metric_mean, premise_checks  # noqa: E402
from reading import READING  # noqa: E402  (the hand-written words; every number and verdict is computed)
from runs import PRIMARY, SEEDS, plan  # noqa: E402
import train  # noqa: E402  (how a run's command resolves to its settings)

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
    """(λ1, λ2) of a run, as train.py resolves its command (preset, then flags)."""
    words = run.info["command"].split()
    args = train.parse_args(words[words.index("train.py") + 1:])
    riel = make_config(args.preset, synthetic=True, overrides=overrides_from(args)).riel
    return riel.lambda1, riel.lambda2


def loss_ratio(steps: list[dict], weight: float, key: str) -> str:
    """weight · (the mean of a loss part) / (the mean of abs(E3)), over the same steps; "–" where
    the part is off or never ran."""
    part = weight * mean([m[key] for m in steps]) if steps else 0.0
    policy = mean([abs(m["loss/policy"]) for m in steps]) if steps else 0.0
    return f"{part / policy:.1f}x" if part and policy > 0 else "–"


def compute_table(groups) -> str:
    """What each RIEL method spent, per run (mean over seeds), and how its loss was made up."""
    rows = []
    for method in listed(groups, RIEL_METHODS + [p.format(x=x) for p in list(SINGLE.values())[1:] for x in range(3)]):
        runs = groups[method]
        per_run = lambda key: mean([sum(m.get(key, 0) for m in r.metrics()) for r in runs])  # noqa: E731
        steps = [m for r in runs for m in r.metrics() if "loss/policy" in m]
        if not steps:
            continue
        lambda1, lambda2 = weights(runs[0])
        sft_steps = [m for m in steps if m["buffer/sft_items"] > 0]
        rows.append([method, f"{per_run('compute/rollouts'):,.0f}", f"{per_run('compute/sampled_tokens'):,.0f}",
                     f"{per_run('buffer/sft_items'):,.0f}", f"{per_run('compute/sft_tokens'):,.0f}",
                     f"{100 * len(sft_steps) / len(steps):.0f} %", loss_ratio(steps, lambda1, "loss/inter_expert_kl"),
                     loss_ratio(sft_steps, lambda2, "loss/sft")])
    return table(["method", "rollouts", "sampled tokens", "gold SFT items", "SFT tokens", "steps with buffer SFT",
                  "λ1·E5 / abs(E3), every step", "λ2·E6 / abs(E3), steps with buffer SFT"], rows)


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
        rows.append([method] + [f"{mean([c.count(k) for c in counts]):.1f}" for k in (3, 2, 1, 0)])
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
    """Each commit the runs were made at, with its count of runs; "+changes" marks a tree that had
    edits not yet committed when the run started (train.py's meml_run.json says so)."""
    counts = Counter(r.info["commit"] or "unknown" for runs in groups.values() for r in runs if "commit" in r.info)
    return ", ".join(f"`{c[:12]}{c[40:]}` ({n} run{'s' * (n > 1)})" for c, n in sorted(counts.items()))


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
            if p.no_interval:
                said.append(f"on the {view} {100 * p.diff:+.1f} points ({p.no_interval}: no interval, no verdict)")
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
        "every number below is computed from them, except in the last section, Real data, whose figures "
        "are published settings and arithmetic typed by hand (tests/test_reference_runs.py checks that "
        "the script reproduces this file). The exact command of every run: "
        "`python reference_runs/runs.py list`; `python reference_runs/runs.py check NAME` reruns one and "
        "compares its results.json (run it from a checkout of the commit the run's run.json names: a "
        "later commit may round a float differently, and a few hundred training steps amplify that; a "
        "commit marked +changes had edits not yet committed, which LOG.md names). "
        "The engineering log of how they were run is `LOG.md`.",
        "",
        f"{n_runs} runs" + (f", code at commit {commits(real)}" if n_runs else "") + "."
        + (f" Not run yet: {len(missing)} of the {len(planned)} planned runs; groups not complete yet: "
           f"{', '.join(missing_groups)}."
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
    # a mistyped path is one line, before anything is written: an empty report must not replace
    # the committed README
    if not args.runs.is_dir():
        p.error(f"--runs {args.runs}: no such folder")
    if args.out.is_dir():
        p.error(f"--out {args.out}: is a folder; name the file to write")
    if not args.out.parent.is_dir():
        p.error(f"--out {args.out}: no folder {args.out.parent}")
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
