"""Plots of RIEL runs from their metrics.jsonl: one run, or several seeds of one method.

matplotlib is optional (not in requirements.txt): `available()` says whether it is installed,
and train.py says how to get the plots when it is not. Every figure is drawn from metric lines
alone, so the same code plots a run as it trains and the committed reference runs.

A figure has six panels, each a quantity over RIEL steps (the mean over seeds as a line, the
seeds' range as a band when there are several):

  reward per expert         rewards/expert_i/mean, rolling mean over 10 steps
  held-out accuracy         eval/expert_i/accuracy (--eval-every: greedy, the curve subset)
  entropy per expert        entropy/expert_i, rolling mean over 10 steps
  buffer fill               buffer/fill after each step (E6)
  SFT triggers              buffer/sft_triggers, cumulative (E6)
  E5 active questions       inter_expert/active_questions, rolling mean over 10 steps
"""
import json
from pathlib import Path

ROLLING = 10
PANELS = [  # (title, metric key with {i} for the expert, how the series is shown)
    ("reward per expert (rolling mean, 10 steps)", "rewards/expert_{i}/mean", "rolling"),
    ("held-out accuracy per expert (greedy)", "eval/expert_{i}/accuracy", "points"),
    ("entropy per expert (rolling mean, 10 steps)", "entropy/expert_{i}", "rolling"),
    ("hard-example buffer fill", "buffer/fill", "raw"),
    ("buffer SFT triggers (cumulative)", "buffer/sft_triggers", "cumulative"),
    ("E5 active questions per step (rolling mean)", "inter_expert/active_questions", "rolling"),
]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def read_metrics(path: Path) -> list[dict]:
    """The RIEL lines of a metrics.jsonl."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("stage") == "riel"]


def series(rows: list[dict], key: str, how: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric of one run, shown as `how`."""
    points = [(r["step"], r[key]) for r in rows if key in r]
    steps, values = [s for s, _ in points], [v for _, v in points]
    if how == "cumulative":
        values = [sum(values[:k + 1]) for k in range(len(values))]
    elif how == "rolling":
        values = [sum(values[max(0, k - ROLLING + 1):k + 1]) / len(values[max(0, k - ROLLING + 1):k + 1])
                  for k in range(len(values))]
    return steps, values


def over_seeds(runs: list[list[dict]], key: str, how: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, low, high) over the runs (seeds) of one method, on the steps all of them have."""
    per_run = [dict(zip(*series(rows, key, how))) for rows in runs]
    steps = sorted(set.intersection(*(set(s) for s in per_run))) if per_run else []
    mean = [sum(s[t] for s in per_run) / len(per_run) for t in steps]
    return steps, mean, [min(s[t] for s in per_run) for t in steps], [max(s[t] for s in per_run) for t in steps]


def num_experts(rows: list[dict]) -> int:
    return sum(1 for k in (rows[-1] if rows else {}) if k.startswith("rewards/expert_") and k.endswith("/mean"))


def plot_method(runs: list[list[dict]], title: str, path: Path) -> Path:
    """The six panels for one method: `runs` holds each seed's RIEL metric lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    n = num_experts(runs[0])
    for ax, (panel, key, how) in zip(axes.flat, PANELS):
        keys = [(key.format(i=i), f"expert {i}") for i in range(n)] if "{i}" in key else [(key, None)]
        for name, label in keys:
            steps, mean, low, high = over_seeds(runs, name, how)
            if not steps:
                continue
            marker = "o" if how == "points" else None
            ax.plot(steps, mean, label=label, marker=marker, markersize=3)
            if len(runs) > 1:
                ax.fill_between(steps, low, high, alpha=0.2)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("RIEL step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    spread = f"mean over {len(runs)} seeds, band: their range" if len(runs) > 1 else "one run"
    fig.suptitle(f"{title} ({spread})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
    return path


def plot_comparison(methods: dict[str, list[list[dict]]], key: str, how: str, title: str, path: Path) -> Path:
    """One quantity, mean over experts, for several methods (each the mean over its seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in methods.items():
        n = num_experts(runs[0])
        per_expert = [over_seeds(runs, key.format(i=i), how) for i in range(n)]
        steps = per_expert[0][0]
        if not steps:
            continue
        mean = [sum(p[1][k] for p in per_expert) / n for k in range(len(steps))]
        ax.plot(steps, mean, label=name, marker="o" if how == "points" else None, markersize=3)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("RIEL step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
    return path


def plot_run(run_dir: Path) -> Path | None:
    """A finished run's figure, run_dir/plots/riel.png (None: no RIEL lines to plot)."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not any("reward" in r for r in rows):
        return None
    return plot_method([rows], Path(run_dir).name, Path(run_dir) / "plots" / "riel.png")
