"""The GRPO variants a comparison needs (D23-D25): GSPO, CISPO, truncated importance sampling,
and the two ways of handling completions cut at the length limit.

Oracles, each independent of meml/losses.py:
- by-hand numbers for one tiny case of each (worked in the comments);
- the formulas as TRL's GRPOTrainer writes them (sequence-level importance weights, CISPO's
  clamped and detached ratio, the sampler correction, the truncation mask), computed here from
  their definitions on hand-made batches where every clip, cap and mask is active;
- E7 written out on the whole batch against the RIEL step's micro-batched gradient
  (meml.riel.backward_e7), for each variant.
"""
import math
from types import SimpleNamespace

import pytest
import torch

import test_riel
from meml.advantage import group_advantages
from meml.config import RielConfig, clip_bounds, make_config
from meml.e7 import Denominators
from meml.errors import InputError
from meml.kl import reference_kl_loss
from meml.losses import clip_fraction, importance_ratio, overlong_penalty, policy_loss, truncated_is_weights
from test_riel import (BY_ID, G, TWO_ACTIVE, assert_same_grads, grads, make_rollouts, padded, seq_logprob, step_e7,
                       tiny_model)

# ---- by hand ----


def test_gspo_by_hand():
    """One row, log-ratios 0.1 and 0.3: s = exp(0.2) = 1.221403, clipped to [0.8, 1.2].
    A = +1: -min(1.2214, 1.2) = -1.2, the clipped branch, no gradient.
    A = -1: -min(-1.2214, -1.2) = +1.221403, gradient s / 2 = 0.610701 per token."""
    old = torch.tensor([[-1.0, -2.0]])
    for a, value, grad in [(1.0, -1.2, 0.0), (-1.0, math.exp(0.2), math.exp(0.2) / 2)]:
        logp = (old + torch.tensor([[0.1, 0.3]])).requires_grad_()
        loss = policy_loss(logp, torch.ones(1, 2), torch.tensor([a]), old, clip_eps=0.2, level="sequence")
        loss.backward()
        assert loss.item() == pytest.approx(value, abs=1e-6)
        assert logp.grad[0].tolist() == pytest.approx([grad, grad], abs=1e-6)


def test_cispo_by_hand():
    """ρ = (e^0.1, e^2) = (1.10517, 7.389), capped at 1 + 4 = 5 -> weights (1.10517, 5), A = 2,
    log π = (-1, -2): per token -w A log π = (2.21034, 20), token mean 11.10517; the gradient of
    the token mean is -w A / 2 = (-1.10517, -5): the capped token keeps a gradient."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach() - torch.tensor([[0.1, 2.0]])
    loss = policy_loss(logp, torch.ones(1, 2), torch.tensor([2.0]), old, clip_eps_high=4.0, kind="cispo",
                       aggregation="token_mean")
    loss.backward()
    assert loss.item() == pytest.approx((2 * math.exp(0.1) + 20) / 2, abs=1e-5)
    assert logp.grad[0].tolist() == pytest.approx([-math.exp(0.1), -5.0], abs=1e-5)


def test_truncated_importance_weights_by_hand():
    """log π_old − log π_sampler = (0.5, −0.2, 2.0, 9.0 on padding), cap 2:
    (e^0.5, e^−0.2, min(e^2, 2), 0) = (1.648721, 0.818731, 2, 0)."""
    old = torch.tensor([[0.5, -0.2, 2.0, 9.0]])
    w = truncated_is_weights(old, torch.zeros(1, 4), torch.tensor([[1, 1, 1, 0]]), cap=2.0)
    assert w[0].tolist() == pytest.approx([math.exp(0.5), math.exp(-0.2), 2.0, 0.0], abs=1e-6)


def test_overlong_penalty_by_hand():
    """DAPO's soft punishment with L_max = 10, L_buffer = 4: nothing up to 6 tokens, then
    (6 − |o|) / 4: 7 -> −0.25, 9 -> −0.75, 10 (cut) -> −1."""
    got = overlong_penalty(torch.tensor([3, 6, 7, 9, 10]), max_len=10, buffer=4)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.75, -1.0])
    assert overlong_penalty(torch.tensor([10]), max_len=10, buffer=0).tolist() == [0.0]


# ---- against the formulas as TRL writes them, where every clip, cap and mask acts ----

def _batch():
    """4 rows of up to 6 tokens, ragged; ratios from e^-1.5 to e^1.5; advantages of both signs."""
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=gen) * 3
    old = logp + (torch.rand(4, 6, generator=gen) - 0.5) * 3
    sampler = old + (torch.rand(4, 6, generator=gen) - 0.5) * 2
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]]).bool()
    return logp, old, sampler, mask, torch.tensor([1.0, -0.5, 2.0, -1.5])


def _trl_like(logp, old, sampler, mask, adv, *, loss_type, level, low, high, cap=None):
    """The per-token loss of TRL's GRPOTrainer, from its definitions: log-ratio masked, averaged
    over the sequence's tokens at sequence level; E3' = -min(coef_1 A, clamp(coef_1) A); CISPO =
    -clamp(coef_1, max=cap).detach() A log π; the sampler correction multiplies the per-token loss
    by min(exp(old − sampler), C). Then the mean over rows of each row's token mean."""
    log_ratio = (logp - old) * mask
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    a = adv.unsqueeze(-1)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=1 + high).detach() * a * logp
    else:
        coef_2 = torch.clamp(coef_1, 1 - low, 1 + high)
        per_token = -torch.min(coef_1 * a, coef_2 * a)
    per_token = per_token.expand_as(logp)
    if cap is not None:
        per_token = per_token * torch.clamp(torch.exp(old - sampler), max=cap)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@pytest.mark.parametrize("loss_type, level, low, high, cap", [
    ("clipped", "sequence", 3e-4, 4e-4, None),      # GSPO at its paper's range
    ("clipped", "sequence", 0.2, 0.28, None),       # GSPO with clip-higher
    ("cispo", "token", 0.2, 0.5, None),             # CISPO, cap 1.5: several tokens capped
    ("cispo", "sequence", 0.2, 0.5, None),
    ("clipped", "token", 0.2, 0.2, 1.5),            # E3' with truncated importance sampling
    ("paper", "token", 0.2, 0.2, 1.2),
], ids=["gspo", "gspo-clip-higher", "cispo", "cispo-sequence", "clipped-tis", "paper-tis"])
def test_values_and_gradients_equal_the_formulas_as_trl_writes_them(loss_type, level, low, high, cap):
    logp, old, sampler, mask, adv = _batch()
    ours_in, theirs_in = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    weights = truncated_is_weights(old, sampler, mask, cap) if cap is not None else None
    ours = policy_loss(ours_in, mask, adv, None if loss_type == "paper" else old, clip_eps=low, clip_eps_high=high,
                       kind=loss_type, level=level, token_weights=weights)
    if loss_type == "paper":  # TRL has no such loss: the REINFORCE term -A log π, weighted the same way
        per_token = -adv.unsqueeze(-1) * theirs_in * torch.clamp(torch.exp(old - sampler), max=cap)
        theirs = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    else:
        theirs = _trl_like(theirs_in, old, sampler, mask, adv, loss_type=loss_type, level=level, low=low, high=high,
                           cap=cap)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-7, rtol=1e-6)
    # the batch does exercise what it tests: some ratios past the bounds, some weights capped
    ratio = importance_ratio(logp, old, mask, level)[mask]
    assert ((ratio > 1 + high) | (ratio < 1 - low)).any() or loss_type == "paper"
    if cap is not None:
        assert (torch.exp(old - sampler)[mask] > cap).any()


def test_gspo_ratio_is_the_geometric_mean_of_the_token_ratios():
    logp, old, _, mask, _ = _batch()
    seq = importance_ratio(logp, old, mask, "sequence")
    tok = importance_ratio(logp, old, mask, "token")
    for b in range(4):
        n = int(mask[b].sum())
        assert seq[b, 0].item() == pytest.approx(tok[b, :n].prod().item() ** (1 / n), rel=1e-5)
        assert torch.all(seq[b, mask[b]] == seq[b, 0])


def test_cispo_clip_fraction_counts_capped_weights():
    logp, old, _, mask, adv = _batch()
    ratio = torch.exp(logp - old)[mask]
    assert clip_fraction(logp, old, mask, adv, 0.2, 0.5, kind="cispo").item() == \
        pytest.approx((ratio > 1.5).float().mean().item())


def test_each_objectives_default_bounds():
    """D23: E3' 0.2 both sides; GSPO its paper's 3e-4 / 4e-4; CISPO a cap of 5; a given
    --clip-eps is both sides unless --clip-eps-high is given too."""
    assert clip_bounds(RielConfig(loss="clipped")) == (0.2, 0.2)
    assert clip_bounds(RielConfig(loss="clipped", importance_sampling_level="sequence")) == (3e-4, 4e-4)
    assert clip_bounds(RielConfig(loss="clipped", importance_sampling_level="sequence", clip_eps=1e-3)) == (1e-3, 1e-3)
    assert clip_bounds(RielConfig(loss="clipped", clip_eps=0.1, clip_eps_high=0.3)) == (0.1, 0.3)
    assert clip_bounds(RielConfig(loss="cispo"))[1] == 4.0


def test_the_defaults_are_todays_runs():
    """Every variant is off by default, in every preset: today's runs are unchanged."""
    for preset in ("meml-grpo", "moe-sft-grpo", "expert-sft-dr-grpo"):
        r = make_config(preset, synthetic=True, overrides={}).riel
        assert (r.importance_sampling_level, r.tis_cap, r.mask_truncated, r.overlong_penalty) == ("token", None, False, 0)
        assert r.loss in ("paper", "clipped") and clip_bounds(r) == (0.2, 0.2)


def test_a_penalty_longer_than_the_limit_is_refused():
    with pytest.raises(InputError, match="--overlong-penalty 300 must be at most --max-new-tokens 256"):
        make_config("meml-grpo", synthetic=False, overrides={"riel.overlong_penalty": 300})


# ---- through the RIEL step: micro-batched E7 against E7 on the whole batch ----

world = test_riel.world  # the RIEL tests' tiny model and world (a module-scoped fixture)


@pytest.mark.parametrize("variant", ["gspo", "cispo", "tis", "mask-truncated"])
def test_the_step_computes_each_variant_of_e7_on_the_whole_batch(world, variant):
    """π_old ≠ π_θ ≠ π_sampler, β > 0, micro-batches of 3 rows: each variant's micro-batched
    gradient equals E7 written out on the whole batch with the TRL-style formula above."""
    model, w, config = world
    ref_model = tiny_model(config, 1)
    ro = make_rollouts(w)
    V = w.tokenizer.vocab_size
    noise = torch.Generator().manual_seed(7)
    with torch.no_grad():  # the sampler's log-probs, π_old = the sampler's shifted (as a bf16 gap would)
        ro.sampler_logprobs = [seq_logprob(model, p, c, V) + 0.6 * (torch.rand(len(c), generator=noise) - 0.5)
                           for p, c in zip(ro.prompts, ro.completions)]
        recomputed = [lp + 0.6 * (torch.rand(len(lp), generator=noise) - 0.5) for lp in ro.sampler_logprobs]
    ro.finished = [r % 4 != 1 for r in range(len(ro.prompts))]  # every fourth row was cut at the limit
    advantages = group_advantages(TWO_ACTIVE, scale="group_std")
    settings = {"gspo": dict(loss="clipped", importance_sampling_level="sequence", clip_eps=0.02),
                "cispo": dict(loss="cispo", clip_eps_high=0.1),
                "tis": dict(loss="clipped", clip_eps=0.1, tis_cap=1.1),
                "mask-truncated": dict(loss="clipped", clip_eps=0.1, mask_truncated=True)}[variant]
    cfg = RielConfig(group_size=G, aggregation="seq_mean_token_mean", beta=0.3, lambda1=0.0, micro_batch_size=3,
                     max_new_tokens=14, recompute_old_logprobs=True, **settings)
    model.zero_grad()
    out, batch = step_e7(model, w, ro, TWO_ACTIVE, advantages, [], cfg, ref_model, old_logprobs=recomputed)
    got = grads(model)

    model.zero_grad()
    logp, mask = padded([seq_logprob(model, p, c, V) for p, c in zip(ro.prompts, ro.completions)])
    with torch.no_grad():
        ref_logp, _ = padded([seq_logprob(ref_model, p, c, V) for p, c in zip(ro.prompts, ro.completions)])
    old, _ = padded(recomputed)
    sampler, _ = padded(ro.sampler_logprobs)
    # D25: a cut completion is no row of E3 / E4 at all, nor of their denominators (TRL zeroes its
    # completion mask; its token-level losses then agree, its "grpo" loss still counts the row)
    keep = torch.tensor(ro.finished) if variant == "mask-truncated" else torch.ones(len(ro.prompts), dtype=torch.bool)
    low, high = clip_bounds(cfg)
    e3 = _trl_like(logp[keep], old[keep], sampler[keep], mask[keep], advantages.flatten()[keep], loss_type=cfg.loss,
                   level=cfg.importance_sampling_level, low=low, high=high, cap=cfg.tis_cap)
    e4 = reference_kl_loss(logp[keep], ref_logp[keep], mask[keep], "k3", "seq_mean_token_mean")
    (e3 + 0.3 * e4).backward()
    assert out["loss/policy"] == pytest.approx(e3.item(), rel=1e-4, abs=1e-6)
    assert_same_grads(got, grads(model))
    if variant == "tis":
        assert 0 < out["tis/capped_ratio"] < 1 and out["tis/mean_weight"] > 0
    if variant == "mask-truncated":
        assert all(ro.finished[r] for r in batch.policy_rows)



def test_the_overlong_penalty_reaches_e2_only(world, monkeypatch):
    """riel_step adds D25's penalty to the verifier's rewards before E2; the buffer (E6), E5's
    expert pairs and the logged reward see the verifier's 0/1 alone."""
    from meml import riel
    _, w, _ = world
    ro = make_rollouts(w)  # completions of 6 to 12 tokens
    lengths = torch.tensor([len(c) for c in ro.completions])[ro.rows]
    seen = {}
    monkeypatch.setattr(riel, "sample_rollouts", lambda *a, **k: ro)
    monkeypatch.setattr(riel, "score_rollouts", lambda *a, **k: TWO_ACTIVE.clone())
    real_fill = riel.fill_buffer
    monkeypatch.setattr(riel, "fill_buffer",
                        lambda buffer, ex, r, below: (seen.update(buffer_rewards=r), real_fill(buffer, ex, r, below))[1])

    def fake_batch(ro, grid, advantages, mine, sft, cfg):  # what E7 would be computed from
        seen.update(rewards=grid.reward[mine], advantages=advantages[mine])
        return SimpleNamespace(d=Denominators(torch.tensor(1.0), 0, torch.tensor(1.0)))
    monkeypatch.setattr(riel, "e7_batch", fake_batch)
    monkeypatch.setattr(riel, "micro_batches", lambda b, cfg: {})
    from meml.buffer import HardExampleBuffer
    cfg = RielConfig(group_size=G, max_new_tokens=12, overlong_penalty=4, advantage_scale="none", positive_only=False)
    metrics = next(riel.riel_step(torch.nn.Linear(1, 1), w, [BY_ID["q0"], BY_ID["q1"]], cfg, 0,
                                     HardExampleBuffer(16, 1, G, 0), BY_ID))
    penalty = -((lengths.float() - 8).clamp(min=0) / 4).clamp(max=1)
    assert penalty.min() < 0  # some completions are within the last 4 tokens of the limit
    shaped = TWO_ACTIVE + penalty
    assert torch.allclose(seen["advantages"], shaped - shaped.mean(-1, keepdim=True))
    assert torch.equal(seen["rewards"], TWO_ACTIVE) and torch.equal(seen["buffer_rewards"], TWO_ACTIVE)
    assert metrics["reward"] == pytest.approx(TWO_ACTIVE.mean().item())
    assert metrics["rewards/overlong_penalty"] == pytest.approx(penalty.mean().item())


def test_train_help_groups_the_variants():
    import sys

    from conftest import REPO_ROOT
    sys.path.insert(0, str(REPO_ROOT))
    import train
    text = train.make_parser().format_help()
    section = text[text.index("GRPO variants (D23-D25):"):]
    section = section[:section.index("\n\n")]
    for flag in ("--importance-sampling-level", "--tis-cap", "--mask-truncated", "--overlong-penalty"):
        assert flag in section, flag
    assert "cispo" in text[text.index("--loss"):][:400]


@pytest.mark.parametrize("flags", [
    ["--loss", "cispo"],
    ["--loss", "clipped", "--importance-sampling-level", "sequence", "--tis-cap", "2",
     "--overlong-penalty", "4", "--num-iterations", "2", "--dtype", "bfloat16", "--beta", "0.04"],
    ["--loss", "clipped", "--mask-truncated", "--beta", "0.04"],
], ids=["cispo", "gspo-tis-overlong", "mask-truncated"])
def test_train_runs_with_the_variants(flags, tmp_path):
    """The flags reach the step through train.py, with μ = 2, bf16 (π_old recomputed, so the
    truncated IS weights differ from 1) and E4 composed."""
    import json
    import math
    import sys

    from conftest import REPO_ROOT
    sys.path.insert(0, str(REPO_ROOT))
    import train
    tiny = ["--train-size", "8", "--eval-size", "2", "--pass-k", "0", "--max-new-tokens", "8",
            "--eval-max-new-tokens", "4", "--questions-per-step", "2", "--group-size", "4", "--buffer-k", "2",
            "--mef-batch-size", "8", "--mef-steps", "1", "--riel-steps", "2"]
    assert train.main(["--output", str(tmp_path)] + tiny + flags) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    riel = [r for r in rows if r["stage"] == "riel"]
    assert len(riel) == 2 and all(math.isfinite(r["loss/total"]) for r in riel)
    if "--tis-cap" in flags:
        assert all(r["tis/mean_weight"] > 0 and r["rewards/overlong_penalty"] <= 0 for r in riel)
    if "--mask-truncated" in flags:  # an untrained model is cut at 8 tokens: E3 and E4 see no row
        assert all(r["completions/clipped_ratio"] < 1 or r["loss/policy"] == r["loss/ref_kl"] == 0 for r in riel)
