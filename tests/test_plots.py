"""meml/plots.py: the series a figure draws, worked by hand (the drawing itself needs matplotlib)."""
import pytest

from meml import plots


ROWS = [{"stage": "riel", "step": s, "buffer/sft_triggers": t, "rewards/expert_0/mean": r}
        for s, t, r in [(1, 0, 0.2), (2, 1, 0.4), (3, 0, 0.6), (4, 1, 0.0)]]


def test_cumulative_and_rolling_series_by_hand(monkeypatch):
    assert plots.series(ROWS, "buffer/sft_triggers", "cumulative") == ([1, 2, 3, 4], [0, 1, 1, 2])
    monkeypatch.setattr(plots, "ROLLING", 2)
    steps, values = plots.series(ROWS, "rewards/expert_0/mean", "rolling")
    assert steps == [1, 2, 3, 4] and values == pytest.approx([0.2, 0.3, 0.5, 0.3])


def test_mean_and_range_over_seeds_on_common_steps():
    other = [dict(r, **{"rewards/expert_0/mean": 1.0}) for r in ROWS[:3]]  # a seed with 3 steps
    steps, mean, low, high = plots.over_seeds([ROWS, other], "rewards/expert_0/mean", "raw")
    assert steps == [1, 2, 3]
    assert mean == pytest.approx([0.6, 0.7, 0.8]) and low == [0.2, 0.4, 0.6] and high == [1.0, 1.0, 1.0]
