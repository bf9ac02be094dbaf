"""reference_runs/: the run plan is valid train.py input, the report's statistics are right, and
the committed README is what report.py writes from the committed run folders."""
import sys

import pytest

from conftest import REPO_ROOT

sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "reference_runs")]
import report  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402


def test_every_planned_command_is_valid_train_input_and_starts_from_a_planned_run_of_its_seed():
    plan = {r.name: r for r in runs.plan()}
    assert len(plan) == len(runs.plan())  # names are unique
    for run in plan.values():
        args = train.parse_args(run.command()[2:])
        assert args.output.name == run.name
        if run.init_from:
            assert plan[run.init_from].seed == run.seed and not plan[run.init_from].init_from
            assert list(plan).index(run.init_from) < list(plan).index(run.name)  # started first


def _fake(name, group, seed, per_question_correct):
    result = {"per_question": [{"id": f"syn-eval-d{1 + q % 3}-{q:05d}", "correct": c, "vote": c[0]}
                               for q, c in enumerate(per_question_correct)]}
    return report.Run(name, {"group": group, "seed": seed}, {"results": {"after RIEL": result}}, None)


def test_paired_difference_and_its_two_standard_errors_by_hand():
    # seed 0: A right on 3 of 4 questions, B on 1: per-question differences 1, 1, 0, 0 (one expert)
    # seed 1: differences 1, 0, 0, 0
    a = [_fake("a0", "A", 0, [[1], [1], [1], [0]]), _fake("a1", "A", 1, [[1], [0], [0], [0]])]
    b = [_fake("b0", "B", 0, [[0], [0], [1], [0]]), _fake("b1", "B", 1, [[0], [0], [0], [0]])]
    p = report.paired(a, b, report.per_question)
    assert p.diff == pytest.approx((0.5 + 0.25) / 2)
    assert p.se_seeds == pytest.approx(abs(0.5 - 0.25) / 2 ** 0.5 / 2 ** 0.5)  # s.d. of (0.5, 0.25) / √2
    var0, var1 = (1 / 3) / 4, (0.25 * 4 / 3 * 0.75) / 4   # sample variances / 4 questions
    assert p.se_questions == pytest.approx((var0 + var1) ** 0.5 / 2)
    assert p.verdict() == "within noise"


def test_the_committed_readme_is_what_the_report_writes_from_the_committed_runs(tmp_path):
    committed = REPO_ROOT / "reference_runs" / "README.md"
    if not (REPO_ROOT / "reference_runs" / "runs").exists():
        pytest.skip("no committed run folders")
    out = tmp_path / "README.md"
    assert report.main(["--no-plots", "--out", str(out)]) == 0
    assert out.read_text() == committed.read_text(), "run `python reference_runs/report.py` and commit README.md"
