"""The premise of the synthetic world (issue 23), checked before any comparison is read: the
teachers err on different questions, each expert is ahead where its teacher is right, the reward
is sparse in a way other experts can rescue, and RL moves held-out accuracy."""
from dataclasses import dataclass
from functools import cache

from compare import EPS, Run, mean, paired, pct
from meml import synthetic
from meml.rewards import verifier_for
from runs import EVALUATION, FEW_SEEDS, SEEDS

FAMILIES = synthetic.BLIND_SPOTS  # the one-kind families; expert i's teacher is blind to FAMILIES[i]


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


def blind_spot_margins(runs: list[Run]) -> dict[str, dict[int, float]]:
    """Per one-kind family and seed, after MoE-SFT: how far the experts whose teachers solve the
    family are ahead of the expert whose teacher is blind to part of it (the lower of the two
    margins)."""
    out = {}
    for blind, family in enumerate(FAMILIES):
        out[family] = {}
        for r in runs:
            acc = r.final["by_family"][family]["accuracy"]
            out[family][r.seed] = min(acc[i] for i in range(3) if i != blind) - acc[blind]
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
        by_seed = [{r.seed: r.final["accuracy"][0] for r in runs} for runs in fmt]  # per format
        means = [mean(list(acc.values())) for acc in by_seed]
        fmt_seeds = min(len(acc) for acc in by_seed)  # judged, like the GRPO gain, once every planned seed is in
        # judged on the means; each seed's own spread and lowest format are shown beside them, so a
        # reader sees how far one seed's formats differ and whether the same format is always last
        shared = sorted(set.intersection(*(set(acc) for acc in by_seed)))
        spreads = [max(acc[s] for acc in by_seed) - min(acc[s] for acc in by_seed) for s in shared]
        lowest = [min(range(len(by_seed)), key=lambda x: by_seed[x][s]) for s in shared]
        checks.append(Check("no format is privileged: each teacher's format without its blind spot, learned "
                            f"alone at equal steps, within 5 points of the others (mean over {len(FEW_SEEDS)} seeds)",
                            " / ".join(f"{pct(m)} %" for m in means)
                            + f" (spread {100 * (max(means) - min(means)):.1f}; {fmt_seeds} of {len(FEW_SEEDS)} seeds);"
                            + " within one seed: spread " + " / ".join(f"{100 * d:.1f}" for d in spreads)
                            + ", lowest format " + " / ".join(str(x) for x in lowest),
                            max(means) - min(means) <= 0.05 + EPS if fmt_seeds == len(FEW_SEEDS) else None))
    else:
        checks.append(Check("no format is privileged (format learnability runs)", "not run yet", None))
    moe = groups.get("MoE-SFT", [])
    if moe:
        margins = blind_spot_margins(moe)
        average = {f: mean(list(by_seed.values())) for f, by_seed in margins.items()}
        low = {f: min(by_seed, key=by_seed.get) for f, by_seed in margins.items()}
        short = sorted({s for by_seed in margins.values() for s, m in by_seed.items() if m < 0.10 - EPS})
        checks.append(Check("after MoE-SFT each expert is ahead on its teacher's strong families: on every "
                            "family, the experts taught it lead the blind one by at least 10 points "
                            "(mean over seeds; the lowest seed is shown)",
                            "; ".join(f"{f}: {100 * average[f]:+.1f} (lowest: seed {low[f]}, "
                                      f"{100 * by_seed[low[f]]:+.1f})" for f, by_seed in margins.items())
                            + (f"; seeds under 10 on a family: {', '.join(map(str, short))}" if short else ""),
                            min(average.values()) >= 0.10 - EPS))
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
    judged = gain is not None and gain.seeds == len(SEEDS)
    checks.append(Check("RL matters: GRPO raises its MoE-SFT start's held-out accuracy (mean expert) by at "
                        f"least 5 points over {len(SEEDS)} seeds, the interval above 0",
                        "not run yet" if gain is None else f"{gain} ({gain.seeds} of {len(SEEDS)} seeds)",
                        (gain.diff >= 0.05 - EPS and gain.verdict() == "A better") if judged else None))
    return checks


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
