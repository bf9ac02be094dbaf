"""--buffer-control end to end: train.py reads the matched run's per-step insertions from its
metrics.jsonl, and its buffer takes exactly that many items at each step."""
import json

import pytest

import train
from meml.buffer import quota_from_metrics
from meml.errors import InputError

TINY = ["--mef-steps", "2", "--riel-steps", "3", "--train-size", "8", "--eval-size", "2", "--pass-k", "0",
        "--max-new-tokens", "4", "--eval-max-new-tokens", "4", "--questions-per-step", "2", "--group-size", "2",
        "--buffer-k", "1", "--buffer-capacity", "3", "--mef-batch-size", "4", "--threads", "1"]


def riel_lines(run) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("stage") == "riel" and "buffer/insertions" in r}


def test_the_control_takes_the_matched_runs_count_at_every_step(tmp_path):
    assert train.main([*TINY, "--output", str(tmp_path / "meml")]) == 0
    method = riel_lines(tmp_path / "meml")
    assert sum(m["buffer/insertions"] for m in method.values()) > 0  # something to match
    # the matched run's counts, shifted so that they differ from what its own coins would give
    matched = tmp_path / "matched.jsonl"
    quota = {1: 3, 2: 0, 3: 2}
    matched.write_text("".join(json.dumps({"stage": "riel", "step": s, "buffer/insertions": n}) + "\n"
                               for s, n in quota.items()))
    assert train.main([*TINY, "--buffer-control", str(matched), "--output", str(tmp_path / "control")]) == 0
    control = riel_lines(tmp_path / "control")
    assert {s: m["buffer/insertions"] for s, m in control.items()} == quota
    assert control[1]["buffer/sft_items"] == 3 and control[3]["buffer/fill"] == 2  # B = 3 filled at step 1


def test_control_quota_reads_the_first_line_of_each_step_and_names_a_bad_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"stage": "mef", "step": 1, "loss/nll": 1.0},
        {"stage": "riel", "step": 1, "buffer/insertions": 4},
        {"stage": "riel", "step": 1, "buffer/insertions": 4},     # μ = 2: the same step again
        {"stage": "riel", "step": 2, "samples": []},
        {"stage": "riel", "step": 3, "buffer/insertions": 1}]) + "\n")
    assert quota_from_metrics(str(f)) == [4, 0, 1]
    f.write_text('{"stage": "riel", "step": 1, "buffer/insertions": 4}\nnot json\n')
    with pytest.raises(InputError, match=r"metrics.jsonl:2: not a JSON line"):
        quota_from_metrics(str(f))
    f.write_text('{"stage": "mef", "step": 1}\n')
    with pytest.raises(InputError, match="no RIEL step with buffer/insertions"):
        quota_from_metrics(str(f))
    with pytest.raises(InputError, match="cannot read it"):
        quota_from_metrics(str(tmp_path / "missing.jsonl"))
