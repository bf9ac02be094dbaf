"""What a run shows while it runs: the progress line's MEML figures and --report-to tensorboard.

The oracle for TensorBoard is TensorBoard's own reader (EventAccumulator) against metrics.jsonl,
the run's record.
"""
import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
import train  # noqa: E402

TINY = ["--train-size", "16", "--eval-size", "2", "--pass-k", "0", "--max-new-tokens", "8", "--eval-max-new-tokens", "4",
        "--questions-per-step", "2", "--group-size", "4", "--buffer-k", "2", "--mef-batch-size", "8",
        "--mef-steps", "2", "--riel-steps", "3", "--buffer-capacity", "5", "--sample-every", "1"]


def test_tensorboard_holds_every_figure_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: --report-to tensorboard is untested")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert train.main(["--output", str(tmp_path), "--report-to", "tensorboard"] + TINY) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    offset = {"mef": 0, "riel": 2}
    checked = 0
    for row in rows:
        for key in ("loss/nll", "reward", "loss/total", "buffer/fill", "rewards/expert_1/mean"):
            if key in row:
                scalar = {e.step: e.value for e in events.Scalars(f"{row['stage']}/{key}")}
                assert scalar[offset[row["stage"]] + row["step"]] == pytest.approx(row[key], rel=1e-6), key
                checked += 1
    assert checked == 2 + 3 * 4  # 2 MEF lines, 3 RIEL lines of 4 figures each
    assert any(tag.startswith("riel/sample_") for tag in events.Tags()["tensors"])


def test_without_tensorboard_the_flag_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import importlib
    real = importlib.import_module

    def missing(name, *args):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *args)
    monkeypatch.setattr(importlib, "import_module", missing)
    assert train.main(["--output", str(tmp_path / "run"), "--report-to", "tensorboard"] + TINY) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: --report-to tensorboard needs the tensorboard package: pip install tensorboard")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset, shown", [("meml-grpo", True), ("moe-sft-grpo", False)])
def test_the_progress_line_shows_e5_and_the_buffer_when_the_method_has_them(preset, shown, tmp_path, capsys):
    assert train.main(["--output", str(tmp_path), "--preset", preset] + TINY) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[riel] step 3/3")][0]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    if shown:
        assert f"E5 on {last['inter_expert/active_questions']} q" in line
        assert f"buffer {last['buffer/fill']}/5" in line
    else:
        assert "E5 on" not in line and "buffer" not in line
