"""DAPO's dynamic sampling (D27, meml.riel.dynamic_sampling): questions whose rewards are all
equal are dropped and the batch refilled. Rollouts are made up and rewards scripted (GRIDS), so
the oracle is riel_step itself on the kept questions alone, in one process and at world size 2.
"""
import os

import pytest
import torch

from meml.config import RielConfig
from meml.data import Example
from meml.e7 import Rollouts
from test_distributed import _world, run_ranks
from test_riel import EXAMPLES, G, TWO_ACTIVE, assert_same_grads, grads, make_rollouts

world = __import__("test_riel").world  # the RIEL tests' tiny model and experts (a module-scoped fixture)


FOUR = EXAMPLES + [Example("q2", "Ann has 5 pens and finds 2. How many?", "7", "5 + 2 = 7 #### 7"),
                   Example("q3", "Bo has 8 cups and breaks 1. How many?", "7", "8 - 1 = 7 #### 7")]
# q0: every rollout wrong (no signal); q1, q2: signal; q3: every rollout right (no signal)
GRIDS = {"q0": torch.zeros(3, G), "q1": TWO_ACTIVE[1], "q2": TWO_ACTIVE[0], "q3": torch.ones(3, G)}


def _dynamic_step(world, monkeypatch, examples, more, rounds):
    """riel_step with made-up rollouts and the rewards of GRIDS; records every sampler call."""
    from meml import riel
    from meml.buffer import HardExampleBuffer
    model, w, _ = world
    calls, offered = [], []
    monkeypatch.setattr(riel, "sample_rollouts", lambda model, experts, questions, cfg, key, first_question=0: (
        calls.append(([q.id for q in questions], first_question)),
        Rollouts.joined([make_rollouts(w, [q]) for q in questions]))[1])  # a question's rollouts are its own
    monkeypatch.setattr(riel, "score_rollouts", lambda ro, experts, questions: torch.stack([GRIDS[q.id] for q in questions]))
    real_fill = riel.fill_buffer
    monkeypatch.setattr(riel, "fill_buffer", lambda buffer, ex, r, below: (offered.extend(q.id for q in ex),
                                                                         real_fill(buffer, ex, r, below))[1])
    cfg = RielConfig(group_size=G, lambda1=0.5, micro_batch_size=4, max_new_tokens=14, dynamic_sampling=rounds)
    model.zero_grad()
    by_id = {ex.id: ex for ex in FOUR}
    metrics = next(riel.riel_step(model, w, examples, cfg, 5, HardExampleBuffer(100, 1, G, 0), by_id,
                                  more_examples=more))
    return metrics, calls, offered, grads(model)


def test_dynamic_sampling_drops_questions_without_signal_and_refills_the_batch(world, monkeypatch):
    """D27, DAPO's dynamic sampling, 2 questions a step: q0 (all wrong) is dropped, round 1 brings
    q2 (kept) and q3 (all right, dropped). E2-E7 train on [q1, q2], exactly the step on those two
    alone; round 1's rollouts are keyed as questions 2 and 3 of the step (D22); the buffer is
    offered every question sampled; the extra rollouts are counted."""
    metrics, calls, offered, got = _dynamic_step(world, monkeypatch, FOUR[:2], lambda k: FOUR[2:], rounds=2)
    assert calls == [(["q0", "q1"], 0), (["q2", "q3"], 2)]
    assert offered == ["q0", "q1", "q2", "q3"]
    assert metrics["dynamic/kept_questions"] == 2 and metrics["dynamic/extra_rollouts"] == 2 * 3 * G
    # the step's cost counts everything sampled, the dropped questions too (reference_runs' compute table)
    model, w, _ = world
    assert metrics["compute/rollouts"] == 4 * 3 * G
    assert metrics["compute/sampled_tokens"] == sum(len(c) for q in FOUR for c in make_rollouts(w, [q]).completions)
    assert metrics["compute/sft_tokens"] == 0  # the buffer (B = 100) did not fill
    direct, _, _, expected = _dynamic_step(world, monkeypatch, [FOUR[1], FOUR[2]], None, rounds=0)
    for key in ("loss/policy", "loss/inter_expert_kl", "loss/total", "inter_expert/active_questions", "reward"):
        assert metrics[key] == pytest.approx(direct[key], rel=1e-6), key
    assert_same_grads(got, expected)


def test_dynamic_sampling_stops_after_its_rounds_with_what_it_found(world, monkeypatch):
    """One extra round that finds no signal (q3): the batch is the one question with a signal."""
    metrics, calls, _, _ = _dynamic_step(world, monkeypatch, FOUR[:2], lambda k: [FOUR[3], FOUR[0]], rounds=1)
    assert len(calls) == 2 and metrics["dynamic/kept_questions"] == 1
    assert metrics["dynamic/extra_rollouts"] == 2 * 3 * G


def test_dynamic_sampling_that_finds_no_signal_trains_on_the_first_batch(world, monkeypatch):
    metrics, calls, offered, _ = _dynamic_step(world, monkeypatch, [FOUR[0], FOUR[3]], lambda k: [FOUR[3], FOUR[0]],
                                               rounds=2)
    assert len(calls) == 3 and offered == ["q0", "q3"] + ["q3", "q0"] * 2
    assert metrics["dynamic/kept_questions"] == 2 and metrics["reward"] == pytest.approx(0.5)


def _dynamic_riel_step(model, world):
    """riel_step with --dynamic-sampling on the FOUR questions (2 a step, so 1 per rank):
    round 0 is [q0 (no signal), q1], round 1 [q2, q3 (no signal)]. The kept batch is [q1, q2]:
    its first question is rank 1's and its second rank 0's, so a rank's kept questions are no
    longer the contiguous share in rank order that the plain step has."""
    from meml import riel
    from meml.buffer import HardExampleBuffer
    from meml.config import RielConfig
    saved = riel.sample_rollouts, riel.score_rollouts
    riel.sample_rollouts = lambda model, experts, questions, cfg, key, first_question=0: riel.Rollouts.joined(
        [make_rollouts(world, [q]) for q in questions])
    riel.score_rollouts = lambda ro, experts, questions: torch.stack([GRIDS[q.id] for q in questions])
    try:
        cfg = RielConfig(group_size=G, lambda1=0.5, micro_batch_size=4, max_new_tokens=14, dynamic_sampling=1)
        model.zero_grad()
        return next(riel.riel_step(model, world, FOUR[:2], cfg, 5, HardExampleBuffer(100, 1, G, 0),
                                   {ex.id: ex for ex in FOUR}, more_examples=lambda k: FOUR[2:]))
    finally:
        riel.sample_rollouts, riel.score_rollouts = saved


def _dynamic_worker(rank, tmp):
    from meml import distributed
    model, world, _ = _world(tmp)
    metrics = _dynamic_riel_step(model, world)
    distributed.sum_gradients(model)
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "metrics": metrics},
               os.path.join(tmp, f"rank{rank}.pt"))


def test_dynamic_sampling_at_world_size_2_equals_world_size_1(tmp_path):
    run_ranks(_dynamic_worker, tmp_path)
    model, world, _ = _world(str(tmp_path))
    single = _dynamic_riel_step(model, world)
    assert single["dynamic/kept_questions"] == 2
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, p in model.named_parameters():
            assert torch.allclose(got["grads"][name], p.grad, atol=1e-6, rtol=1e-4), (rank, name)
        for key in ("loss/total", "loss/inter_expert_kl", "reward", "buffer/insertions", "dynamic/extra_rollouts"):
            assert got["metrics"][key] == pytest.approx(single[key], rel=2e-5), key
