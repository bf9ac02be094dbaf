"""The training loop's learning-rate schedule, worked by hand."""
import math

import pytest

from meml.trainer import Stage, lr_at


def test_cosine_decay_starts_where_warm_up_ends():
    stage = Stage("mef", total_steps=110, lr=1.0, save_every=10, warmup_steps=10, schedule="cosine")
    assert [lr_at(s, stage) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(10, stage) == pytest.approx(1.0)        # first step after warm-up: no decay yet
    middle = 10 + 99 / 2                                  # progress 1/2 over steps 10 .. 109
    assert lr_at(int(middle), stage) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 49 / 99)))
    assert lr_at(109, stage) == pytest.approx(0.1)        # the last step: 10% of lr


def test_constant_schedule_after_warm_up():
    stage = Stage("riel", total_steps=5, lr=2.0, save_every=1, warmup_steps=2)
    assert [lr_at(s, stage) for s in range(5)] == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0])
