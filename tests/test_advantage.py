"""E2: group advantages, checked against numbers worked by hand (meml/advantage.py)."""
import math

import pytest
import torch

from meml.advantage import group_advantages, reward_stats, zero_signal_fraction

ONE_RIGHT = torch.tensor([0.0, 0, 0, 1, 0, 0, 0, 0])  # 1 correct of G = 8


def test_no_scaling_is_reward_minus_group_mean():
    # mean = 1/8: the correct rollout gets 7/8, the seven others -1/8.
    adv = group_advantages(ONE_RIGHT)
    expected = torch.full((8,), -0.125)
    expected[3] = 0.875
    assert torch.equal(adv, expected)


def test_group_std_uses_population_std():
    # ddof=0: var = p(1-p) = 7/64, std = sqrt(7)/8, so A = (7/8)/(sqrt(7)/8) = sqrt(7) for the
    # correct rollout and (-1/8)/(sqrt(7)/8) = -1/sqrt(7) for the others.
    # (ddof=1 would give std = sqrt(1/8) and A = 2.4749 instead of 2.6458.)
    adv = group_advantages(ONE_RIGHT, scale="group_std")
    assert adv[3].item() == pytest.approx(math.sqrt(7), rel=1e-5)
    assert adv[0].item() == pytest.approx(-1 / math.sqrt(7), rel=1e-5)
    # [1, 1, 0, 0]: mean 1/2, std 1/2, A = +-1 (up to eps = 1e-6 in the denominator).
    half = group_advantages(torch.tensor([1.0, 1, 0, 0]), scale="group_std")
    assert torch.allclose(half, torch.tensor([1.0, 1, -1, -1]), atol=1e-5)


def test_eps_is_added_to_the_std():
    adv = group_advantages(torch.tensor([1.0, 0.0]), scale="group_std", eps=0.5)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5]))  # 0.5 / (0.5 + 0.5)


def test_batch_std_divides_every_group_by_one_std():
    # Eight rewards, five of them 1: mean 5/8, std = sqrt(15/64) = sqrt(15)/8. Group 0 is
    # [0,0,0,1] with its own mean 1/4: A = (3/4)/(sqrt(15)/8) = 6/sqrt(15), (-1/4)/... = -2/sqrt(15).
    rewards = torch.tensor([[0.0, 0, 0, 1], [1.0, 1, 1, 1]])
    adv = group_advantages(rewards, scale="batch_std")
    s = math.sqrt(15)
    assert torch.allclose(adv[0], torch.tensor([-2 / s, -2 / s, -2 / s, 6 / s]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))


@pytest.mark.parametrize("scale", ["none", "group_std", "batch_std"])
def test_all_equal_group_is_exactly_zero(scale):
    # 0.1 is not representable; r - mean could leave a residue that / eps would blow up.
    rewards = torch.stack([torch.full((7,), 0.1), torch.full((7,), 1.0), torch.zeros(7)])
    assert torch.equal(group_advantages(rewards, scale=scale), torch.zeros(3, 7))


def test_positive_only_is_the_clamp_of_e3():
    adv = group_advantages(ONE_RIGHT, positive_only=True)
    expected = torch.zeros(8)
    expected[3] = 0.875
    assert torch.equal(adv, expected)


def test_works_on_q_n_g_tables():
    rewards = torch.tensor([[[1.0, 0], [1.0, 1]], [[0.0, 0], [0.0, 1]]])  # [Q=2, N=2, G=2]
    adv = group_advantages(rewards)
    assert torch.equal(adv, torch.tensor([[[0.5, -0.5], [0, 0]], [[0, 0], [-0.5, 0.5]]]))


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(ONE_RIGHT, scale="std")


def test_zero_signal_fraction_per_expert():
    # [Q=4, N=3, G=3]. Expert 0: all groups mixed (0/4). Expert 1: all-correct and all-wrong
    # groups on questions 0 and 1 (2/4). Expert 2: every group all-equal (4/4).
    rewards = torch.tensor([
        [[1.0, 0, 0], [1, 1, 1], [0, 0, 0]],
        [[0.0, 1, 0], [0, 0, 0], [1, 1, 1]],
        [[0.0, 0, 1], [0, 1, 0], [0, 0, 0]],
        [[1.0, 1, 0], [1, 0, 0], [1, 1, 1]],
    ])
    assert torch.equal(zero_signal_fraction(rewards), torch.tensor([0.0, 0.5, 1.0]))
    stats = reward_stats(rewards)
    assert torch.allclose(stats["mean_reward"], torch.tensor([5 / 12, 5 / 12, 6 / 12]))
    assert torch.equal(stats["all_correct"], torch.tensor([0.0, 0.25, 0.5]))
    assert torch.equal(stats["all_wrong"], torch.tensor([0.0, 0.25, 0.5]))
    # The zero-signal groups are exactly the ones whose advantages vanish.
    adv = group_advantages(rewards, scale="group_std")
    assert torch.equal((adv == 0).all(dim=-1).float().mean(dim=0), stats["zero_signal"])
