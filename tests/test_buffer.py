"""E6 hard-example buffer (meml/buffer.py): threshold, insertion rate, trigger, clear, resume."""
import io
import math

import pytest
import torch

from meml.buffer import HardExampleBuffer
from meml.errors import InputError
from meml.riel import fill_buffer


def test_k_wrong_never_inserts_and_draws_nothing():
    buf = HardExampleBuffer(k=6, g=8, seed=0)
    before = buf.generator.get_state()
    assert not any(buf.maybe_add(("q", 0), num_wrong=w) for w in range(7) for _ in range(50))
    assert len(buf) == 0
    assert torch.equal(buf.generator.get_state(), before)  # ineligible groups flip no coin


def test_k_plus_one_wrong_may_insert():
    buf = HardExampleBuffer(k=6, g=8, seed=0)
    added = [buf.maybe_add(i, num_wrong=7) for i in range(20)]
    assert any(added) and len(buf) == sum(added)


@pytest.mark.parametrize("num_wrong", [7, 8])
def test_insertion_rate_is_k_over_g(num_wrong):
    # 4000 eligible trials at p = 6/8: the count is Binomial(4000, 0.75), sd = 27.4.
    # Capacity is large enough that nothing is dropped.
    n, p = 4000, 6 / 8
    buf = HardExampleBuffer(capacity=n, k=6, g=8, seed=num_wrong)
    added = sum(buf.maybe_add(i, num_wrong=num_wrong) for i in range(n))
    assert abs(added - n * p) < 5 * math.sqrt(n * p * (1 - p))


def test_full_at_capacity_then_pop_clears():
    buf = HardExampleBuffer(capacity=5, k=1, g=1, seed=0)  # p = 1: every eligible group enters
    for i in range(4):
        assert buf.maybe_add(("ex", i), num_wrong=2)
        assert not buf.is_full
    assert buf.maybe_add(("ex", 4), num_wrong=2)
    assert buf.is_full
    assert not buf.maybe_add(("ex", 5), num_wrong=2)  # full: dropped and counted
    assert buf.num_dropped == 1
    assert buf.pop_batch() == [("ex", i) for i in range(5)]
    assert len(buf) == 0 and not buf.is_full and buf.pop_batch() == []


def test_save_restore_continues_the_same_random_sequence():
    a = HardExampleBuffer(capacity=100, seed=3)
    for i in range(10):
        a.maybe_add(("early", i), num_wrong=8)
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)  # through a real checkpoint round trip (weights_only load)
    later_a = [a.maybe_add(("late", i), num_wrong=8) for i in range(50)]

    b = HardExampleBuffer(capacity=100, seed=999)  # a different seed: the state must win
    saved.seek(0)
    b.load_state_dict(torch.load(saved))
    later_b = [b.maybe_add(("late", i), num_wrong=8) for i in range(50)]
    assert later_a == later_b
    assert a.pop_batch() == b.pop_batch()
    assert 0 < sum(later_a) < 50  # the sequence is random, not constant


def test_restore_refuses_other_settings():
    state = HardExampleBuffer(capacity=64, k=6, g=8).state_dict()
    with pytest.raises(ValueError, match="capacity=64"):
        HardExampleBuffer(capacity=32).load_state_dict(state)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="k=9"):
        HardExampleBuffer(k=9, g=8)
    with pytest.raises(ValueError, match="capacity"):
        HardExampleBuffer(capacity=0)


def test_control_buffer_takes_the_matched_runs_count_at_random_from_the_step():
    """--buffer-control: step t takes quota[t] items (the matched run's buffer/insertions at its
    step t), each a uniform draw from the step's (question, expert) pool, hard or not; it pops
    when full like the method's buffer; its stream and step count are saved and restored."""
    examples = [type("Ex", (), {"id": f"q{k}"})() for k in range(6)]
    rewards = torch.zeros(6, 3, 8)
    rewards[:, 1] = 1.0                                  # expert 1 always right: never hard
    control = HardExampleBuffer(5, 6, 8, seed=4, quota=[3, 0, 4])
    pool = [(f"q{k}", i) for k in range(6) for i in range(3)]
    popped, n = fill_buffer(control, examples, rewards)
    assert (popped, n, len(control)) == ([], 3, 3) and set(control.items) <= set(pool)
    assert fill_buffer(control, examples, rewards) == ([], 0)
    state = control.state_dict()
    popped, n = fill_buffer(control, examples, rewards)    # 3 + 4 items: one fill of B = 5 pops
    assert n == 4 and len(popped) == 5 and len(control) == 2
    assert fill_buffer(control, examples, rewards) == ([], 0)  # past the matched run's last step
    again = HardExampleBuffer(5, 6, 8, seed=99, quota=[3, 0, 4])
    again.load_state_dict(state)
    assert fill_buffer(again, examples, rewards) == (popped, 4)  # resumed: the same draws
    # many draws: every (question, expert) of the pool is taken, expert 1 included, about equally
    big = HardExampleBuffer(10**6, 6, 8, seed=1, quota=[50] * 300)
    for _ in range(300):
        fill_buffer(big, examples, rewards)
    counts = torch.bincount(torch.tensor([pool.index(item) for item in big.items]), minlength=18)
    assert counts.min() > 0.8 * counts.float().mean() and counts.max() < 1.2 * counts.float().mean()
    # a buffer of the other kind refuses the state, before changing anything
    plain = HardExampleBuffer(5, 6, 8)
    with pytest.raises(InputError, match="--buffer-control"):
        plain.load_state_dict(state)
    assert plain.items == []
