"""E3, E3', E1/E6 NLL and E7 (meml/losses.py): values and gradients against closed forms."""
import math

import pytest
import torch

from meml.advantage import group_advantages
from meml.config import RielConfig
from meml.losses import E7_PARTS, aggregate, clip_fraction, e7_weights, nll_loss, policy_loss, total_loss

# Three completions of lengths 2, 5 and 3 in a [B=3, T=6] batch; row 2's tokens do not start
# at position 0 (left-aligned or not, only the mask decides what counts).
MASK = torch.tensor([
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0],
    [0, 1, 1, 1, 0, 0],
], dtype=torch.bool)
LENGTHS = torch.tensor([2.0, 5.0, 3.0])
ADV = torch.tensor([0.5, -1.0, 2.0])
B, T = MASK.shape


def logprobs_leaf(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(B, T, generator=g) * 3).requires_grad_()


def grad_of(loss_fn):
    logp = logprobs_leaf()
    loss_fn(logp).backward()
    return logp.grad


def test_aggregation_values_by_hand():
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(x, m, "token_mean").item() == pytest.approx(7 / 3)       # (1+2+4)/3
    assert aggregate(x, m, "seq_mean_token_mean").item() == pytest.approx(2.75)  # (1.5+4)/2
    assert aggregate(x, m, "dr_grpo").item() == pytest.approx(7 / 6)         # 7/(2*3)
    assert aggregate(x, m, "dr_grpo", max_len=7).item() == pytest.approx(0.5)  # 7/(2*7)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, m, "mean")
    with pytest.raises(ValueError, match="same shape"):
        aggregate(x, m[:, :2], "token_mean")


# Gradient of each E3 mode with respect to the per-token log-probs, written out in closed form.
# Called with the advantages A [B]; the NLL is the same form with A = 1.
CLOSED_FORMS = {
    # GRPO: each sequence weighs 1/B, each of its tokens 1/|o|.
    "seq_mean_token_mean": lambda a=ADV: -a[:, None] / (B * LENGTHS[:, None]) * MASK,
    # one global denominator: the number of completion tokens in the batch (10).
    "token_mean": lambda a=ADV: -a[:, None] / LENGTHS.sum() * MASK,
    # Dr.GRPO: a constant B * max_len (max_len = 6 = T by default).
    "dr_grpo": lambda a=ADV: -a[:, None] / (B * T) * MASK,
}


@pytest.mark.parametrize("aggregation", list(CLOSED_FORMS))
def test_e3_gradient_closed_form(aggregation):
    grad = grad_of(lambda lp: policy_loss(lp, MASK, ADV, aggregation=aggregation))
    assert torch.allclose(grad, CLOSED_FORMS[aggregation](), atol=1e-7)
    assert torch.equal(grad[~MASK], torch.zeros(int((~MASK).sum())))  # padding: exactly 0


def test_dr_grpo_uses_max_len_not_t():
    grad = grad_of(lambda lp: policy_loss(lp, MASK, ADV, aggregation="dr_grpo", max_len=16))
    assert torch.allclose(grad, -ADV[:, None] / (B * 16) * MASK, atol=1e-7)


@pytest.mark.parametrize("aggregation", list(CLOSED_FORMS))
def test_e3_prime_on_policy_equals_e3(aggregation):
    # pi_old = pi_theta (one update per rollout batch): ratio 1, nothing clipped, same gradient
    # and the same value.
    logp = logprobs_leaf()
    old = logp.detach().clone()
    clipped = policy_loss(logp, MASK, ADV, old_logprobs=old, aggregation=aggregation)
    clipped.backward()
    expected_value = aggregate(-ADV[:, None].expand(B, T), MASK, aggregation)
    assert clipped.item() == pytest.approx(expected_value.item())
    assert torch.allclose(logp.grad, CLOSED_FORMS[aggregation](), atol=1e-7)


def test_e3_paper_form_is_mean_over_experts_and_rollouts():
    # "(1/N) sum_i -E_g[ log pi(O_g^i) * A_g^i ]" for one question, N = 2 experts, G = 2 rollouts,
    # with log pi(O) the token mean (GRPO): a double loop over experts and rollouts equals
    # the seq_mean_token_mean loss on the flattened [N*G] rows.
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    adv = torch.tensor([0.5, -0.5, 0.0, 0.0])  # rows: (expert 0, g 0), (0, 1), (1, 0), (1, 1)
    by_hand = 0.0
    for i in range(2):
        expectation = 0.0
        for gi in range(2):
            row = 2 * i + gi
            seq_logp = sum(logp[row, t].item() for t in range(5) if mask[row, t]) / int(mask[row].sum())
            expectation += seq_logp * adv[row].item() / 2
        by_hand += -expectation / 2
    assert policy_loss(logp, mask, adv).item() == pytest.approx(by_hand)


def test_clipped_surrogate_zero_gradient_exactly_where_clipped():
    # Ratios 0.5, 0.9, 1.0, 1.1, 1.5 against eps = 0.2, once with A = +1 and once with A = -1.
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5])
    old = torch.full((2, 5), -1.0)
    logp = (old + ratios.log()).requires_grad_()
    mask = torch.ones(2, 5, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    policy_loss(logp, mask, adv, old_logprobs=old, aggregation="token_mean").backward()
    # Clipped on the advantage's side: rho > 1.2 with A > 0, rho < 0.8 with A < 0.
    clipped = torch.tensor([[False, False, False, False, True],
                            [True, False, False, False, False]])
    # Elsewhere d(-rho*A)/dlogp = -rho*A, over the 10 tokens of the token mean.
    expected = torch.where(clipped, 0.0, -ratios * adv[:, None] / 10)
    assert torch.equal(logp.grad[clipped], torch.zeros(2))
    assert (logp.grad[~clipped] != 0).all()
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    assert clip_fraction(logp, old, mask, adv).item() == pytest.approx(2 / 10)


def test_clip_fraction_ignores_padding():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[2.0, 2.0, 0.0, 0.0]])  # rho = e^2 > 1.2 on the first two tokens
    mask = torch.tensor([[1, 0, 1, 1]])
    assert clip_fraction(logp, old, mask, torch.tensor([1.0])).item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("aggregation", list(CLOSED_FORMS))
def test_nll_gradient_is_e3_with_unit_advantage(aggregation):
    grad = grad_of(lambda lp: nll_loss(lp, MASK, aggregation))
    expected = CLOSED_FORMS[aggregation](torch.ones(B))
    assert torch.allclose(grad, expected, atol=1e-7)


def test_nll_value_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.5, 0.3, 0.3]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # token mean: -(ln 0.5 + ln 0.25 + ln 0.5)/3 = 4 ln 2 / 3
    assert nll_loss(logp, mask).item() == pytest.approx(4 * 0.6931471805599453 / 3, rel=1e-6)


def test_total_loss_e7():
    p, kl, sft, ref = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    paper = e7_weights(RielConfig())  # λ1 = 0.1, λ2 = 1, β = 0 (D9)
    assert total_loss({"policy": p, "inter_expert_kl": kl, "sft": sft}, paper).item() == pytest.approx(1 + 0.1 * 2 + 1.0 * 3)
    assert total_loss({"policy": p}, paper).item() == 1.0
    assert total_loss({"policy": p, "sft": sft}, e7_weights(RielConfig(lambda2=0.5))).item() == pytest.approx(2.5)
    assert total_loss({"policy": p, "reference_kl": ref}, paper).item() == 1.0  # beta = 0: the MEML preset
    assert total_loss({"policy": p, "reference_kl": ref}, e7_weights(RielConfig(beta=0.04))).item() == pytest.approx(1.2)
    with pytest.raises(ValueError, match=r"\['entropy'\] are not parts of E7"):
        total_loss({"policy": p, "entropy": kl}, paper)


def test_every_part_of_e7_has_an_option_for_its_weight_and_a_metric():
    """The table E7_PARTS is read by the backward, the metrics and the total (meml/riel.py): a
    part added there without its weight's option, or with a metric name another part has,
    fails here."""
    from meml.config import flag_options
    options = {key for key, _ in flag_options()}
    for name, part in E7_PARTS.items():
        assert part.weight is None or f"riel.{part.weight}" in options, name
    metrics = [part.metric for part in E7_PARTS.values()]
    assert len(set(metrics)) == len(metrics) and all(m.startswith("loss/") for m in metrics)
    assert list(E7_PARTS)[0] == "policy" and E7_PARTS["policy"].weight is None


@pytest.mark.parametrize("old", [None, "given"])
def test_garbage_on_padding_changes_nothing(old):
    # Padding may hold -inf or nan (e.g. a log-prob of an ignored position): neither the value
    # nor the gradient may see it.
    clean = logprobs_leaf()
    dirty_values = clean.detach().clone()
    dirty_values[~MASK] = torch.tensor([float("-inf"), float("nan"), 50.0] * 3)[: int((~MASK).sum())]
    dirty = dirty_values.requires_grad_()
    old_lp = None if old is None else clean.detach() - 0.1
    losses = [policy_loss(lp, MASK, ADV, old_logprobs=old_lp, aggregation="token_mean")
              for lp in (clean, dirty)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == losses[1].item()
    assert torch.equal(clean.grad, dirty.grad)


def test_paper_clamp_reinforces_only_above_mean_rollouts():
    # E3 with max(A, 0): one question, one expert, rewards [0, 0, 0, 1] -> A = [0, 0, 0, 0.75].
    # Only the correct rollout's tokens get gradient: -0.75 / (B * |o|) in the GRPO mode.
    adv = group_advantages(torch.tensor([0.0, 0, 0, 1]), positive_only=True)
    logp = torch.full((4, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]])
    policy_loss(logp, mask, adv).backward()
    expected = torch.zeros(4, 3)
    expected[3, :2] = -0.75 / (4 * 2)
    assert torch.equal(logp.grad, expected)


@pytest.mark.parametrize("advantage, ratio, clipped", [
    # A > 0: the upper bound 1 + eps_high = 1.28 (clip-higher) is the one that bites
    (1.0, 1.2799, False), (1.0, 1.2801, True), (1.0, 0.5, False),
    # A < 0: the lower bound 1 - eps = 0.8 is the one that bites
    (-1.0, 0.8001, False), (-1.0, 0.7999, True), (-1.0, 1.9, False),
])
def test_clip_bounds_are_pinned_on_both_sides(advantage, ratio, clipped):
    """eps = 0.2 below, eps_high = 0.28 above (DAPO's clip-higher): a token past the bound on the
    side its advantage pushes gets exactly zero gradient, one just inside gets A·ρ's."""
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    adv = torch.tensor([advantage])
    loss = policy_loss(logp, mask, adv, old_logprobs=old, clip_eps=0.2, clip_eps_high=0.28, aggregation="token_mean")
    loss.backward()
    expected = 0.0 if clipped else -advantage * ratio  # d(-A·ρ)/d log π = -A·ρ
    assert logp.grad.item() == pytest.approx(expected, abs=0.0 if clipped else 1e-6)
    assert clip_fraction(logp, old, mask, adv, 0.2, 0.28).item() == float(clipped)


def test_clip_eps_high_defaults_to_clip_eps():
    logp, old, mask = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
    adv = torch.tensor([1.0])
    assert policy_loss(logp, mask, adv, old, clip_eps=0.2).item() == pytest.approx(-1.2)
    assert policy_loss(logp, mask, adv, old, clip_eps=0.2, clip_eps_high=0.3).item() == pytest.approx(-1.25)
