"""E4 reference KL estimators and E5 inter-expert KL (meml/kl.py).

Oracles: torch.distributions.kl_divergence for exact KLs between categorical distributions,
closed-form gradients, and hand-worked reward tables.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical, kl_divergence

from meml.kl import (
    inter_expert_kl,
    inter_expert_kl_full_vocab,
    kl_estimates,
    plus_rollouts,
    reference_kl_loss,
    select_expert_pairs,
)

# ---------------------------------------------------------------------------------------------
# E4
# ---------------------------------------------------------------------------------------------

logp_values = st.floats(min_value=-60.0, max_value=0.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(logp=logp_values, ref=logp_values, double=st.booleans())
def test_k2_k3_are_never_negative(logp, ref, double):
    dtype = torch.float64 if double else torch.float32
    _, k2, k3 = kl_estimates(torch.tensor(logp, dtype=dtype), torch.tensor(ref, dtype=dtype))
    assert k3.item() >= 0.0 and k2.item() >= 0.0


def test_estimators_vanish_when_distributions_agree():
    logp = torch.log(torch.tensor([[0.1, 0.7, 1.0], [0.3, 1e-6, 0.5]]))
    for k in kl_estimates(logp, logp.clone()):
        assert torch.equal(k, torch.zeros_like(k))


# policy pi_theta and reference over 4 outcomes; KL(p||ref) = 0.1064 and KL(ref||p) = 0.1218
# differ by ~15 standard errors at 200k samples, so the test also pins the direction.
P_THETA = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
P_REF = torch.full((4,), 0.25, dtype=torch.float64)


def test_monte_carlo_means_estimate_kl_policy_to_reference():
    n = 200_000
    g = torch.Generator().manual_seed(1234)
    tokens = torch.multinomial(P_THETA, n, replacement=True, generator=g)  # sampled from pi_theta
    k1, k2, k3 = kl_estimates(P_THETA.log()[tokens], P_REF.log()[tokens])
    forward = kl_divergence(Categorical(probs=P_THETA), Categorical(probs=P_REF)).item()
    reverse = kl_divergence(Categorical(probs=P_REF), Categorical(probs=P_THETA)).item()
    assert forward == pytest.approx(0.10644, abs=1e-4)  # sum p ln(4p), worked by hand
    for k in (k1, k3):  # unbiased for KL(pi_theta || pi_ref)
        se = k.std().item() / math.sqrt(n)
        assert abs(k.mean().item() - forward) < 5 * se
        assert abs(k.mean().item() - reverse) > 5 * se
    # k2 is biased: its exact mean is E_p[x^2]/2, close to (not equal to) the KL.
    x = P_REF.log() - P_THETA.log()
    k2_exact = (P_THETA * x * x / 2).sum().item()
    assert abs(k2.mean().item() - k2_exact) < 5 * k2.std().item() / math.sqrt(n)
    assert k2_exact == pytest.approx(forward, rel=0.15)


def test_reference_kl_loss_k3_gradient():
    # d/dlogp [exp(x) - x - 1] with x = ref - logp is 1 - exp(x).
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1, 1, 0]])
    loss = reference_kl_loss(logp, ref, mask, estimator="k3", aggregation="token_mean")
    loss.backward()
    x = ref - logp.detach()
    assert loss.item() == pytest.approx(((x.exp() - x - 1) * mask).sum().item() / 2)
    assert torch.allclose(logp.grad, (1 - x.exp()) * mask / 2)
    with pytest.raises(ValueError, match="estimator"):
        reference_kl_loss(logp, ref, mask, estimator="k4")


# ---------------------------------------------------------------------------------------------
# E5: selection
# ---------------------------------------------------------------------------------------------

def table(*rows):
    """Each row lists, per expert, the number of correct rollouts out of G = 4."""
    return torch.tensor([[[1.0] * c + [0.0] * (4 - c) for c in row] for row in rows])


def test_selection_tie_and_skip_rules():
    rewards = table(
        (2, 1, 3),  # 0: plain case: E+ = 2, E- = 1
        (2, 2, 2),  # 1: all experts tie: skipped (both indices fall to 0)
        (3, 3, 1),  # 2: tie for best: lowest index (0) is E+
        (1, 4, 1),  # 3: tie for worst: lowest index (0) is E-
        (0, 0, 0),  # 4: nobody right: skipped
        (4, 4, 4),  # 5: everybody right: skipped
        (0, 1, 0),  # 6: a single correct rollout is enough
    )
    e_plus, e_minus, active = select_expert_pairs(rewards)
    assert e_plus.tolist() == [2, 0, 0, 1, 0, 0, 1]
    assert e_minus.tolist() == [1, 0, 2, 0, 0, 0, 0]
    assert active.tolist() == [True, False, True, True, False, False, True]


def test_skip_when_best_expert_has_no_correct_rollout():
    # Partial rewards: expert 0 is ahead on average but no rollout reached reward 1.
    rewards = torch.tensor([[[0.5, 0.5], [0.0, 0.0]]])
    _, _, active = select_expert_pairs(rewards)
    assert active.tolist() == [False]


def test_plus_rollouts_are_e_plus_correct_ones():
    rewards = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 1, 0]],
                            [[1.0, 1, 0, 1], [0, 0, 0, 0]]])
    e_plus, _, _ = select_expert_pairs(rewards)
    assert plus_rollouts(rewards, e_plus).tolist() == [[False, True, True, False],
                                                       [True, True, False, True]]


# ---------------------------------------------------------------------------------------------
# E5: the loss
# ---------------------------------------------------------------------------------------------

def test_inter_expert_kl_gradient_reaches_only_e_minus():
    plus = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)    # log pi(O+ | P+)
    minus = torch.tensor([-4.0, -9.0, -2.5], requires_grad=True)   # log pi(O+ | P-)
    loss = inter_expert_kl(plus, minus)
    loss.backward()
    assert loss.item() == pytest.approx((1.0 + 4.0 + 0.5) / 3)
    assert plus.grad is None
    assert torch.allclose(minus.grad, torch.full((3,), -1 / 3))  # minimising raises log pi(O+|P-)


def test_inter_expert_kl_through_one_shared_model():
    # One "model" scored under two prompts: logits = base + prompt_bias[p]. Only the E- prompt's
    # parameters and the shared base (through the E- branch) may receive gradient.
    base = torch.tensor([0.2, -0.1, 0.4], requires_grad=True)
    prompt_bias = torch.zeros(2, 3, requires_grad=True)
    completion = torch.tensor([2, 0])  # O+: two tokens

    def seq_logp(p):
        return torch.log_softmax(base + prompt_bias[p], dim=-1)[completion].sum()

    loss = inter_expert_kl(seq_logp(0).unsqueeze(0), seq_logp(1).unsqueeze(0))
    loss.backward()
    assert torch.equal(prompt_bias.grad[0], torch.zeros(3))
    assert prompt_bias.grad[1].abs().sum() > 0
    assert torch.allclose(base.grad, prompt_bias.grad[1])  # base's only path is the E- branch


def test_inter_expert_kl_mean_per_question():
    # Question 7 has three O+ rows, question 2 one: each question weighs 1/2.
    plus = torch.zeros(4)
    minus = torch.tensor([-1.0, -2.0, -3.0, -10.0], requires_grad=True)
    loss = inter_expert_kl(plus, minus, question_index=torch.tensor([7, 7, 7, 2]))
    loss.backward()
    assert loss.item() == pytest.approx((2.0 + 10.0) / 2)
    assert torch.allclose(minus.grad, torch.tensor([-1 / 6, -1 / 6, -1 / 6, -1 / 2]))


def test_token_mean_form_divides_each_rollout_by_its_length():
    plus, minus = torch.tensor([-2.0, -6.0, -1.0]), torch.tensor([-5.0, -9.0, -4.0], requires_grad=True)
    loss = inter_expert_kl(plus, minus, torch.tensor([0, 0, 1]), num_tokens=torch.tensor([3, 6, 2]))
    # question 0: (3/3 + 3/6) / 2 = 0.75; question 1: 3/2 = 1.5; mean over questions 1.125
    assert loss.item() == pytest.approx(1.125)
    loss.backward()
    assert torch.allclose(minus.grad, torch.tensor([-1 / 3 / 2 / 2, -1 / 6 / 2 / 2, -1 / 2 / 2]))


def test_full_vocab_kl_by_hand():
    # Vocabulary of 3. Token 0: p+ = (1/2, 1/4, 1/4), p- = (1/4, 1/2, 1/4):
    # KL = 1/2 ln 2 + 1/4 ln(1/2) + 0 = ln(2)/4. Token 1 is masked out.
    plus = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]])).requires_grad_()
    minus_probs = torch.tensor([[[0.25, 0.5, 0.25], [0.8, 0.1, 0.1]]])
    minus = (minus_probs.log() + 3.0).requires_grad_()  # logits: a shift leaves softmax alone
    mask = torch.tensor([[1, 0]])
    loss = inter_expert_kl_full_vocab(plus, minus, mask)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2) / 4, rel=1e-6)
    oracle = kl_divergence(Categorical(probs=torch.tensor([0.5, 0.25, 0.25])),
                           Categorical(probs=torch.tensor([0.25, 0.5, 0.25])))
    assert loss.item() == pytest.approx(oracle.item(), rel=1e-6)
    assert plus.grad is None  # teacher detached
    # d KL / d minus_logits = p- - p+ on the unmasked token, 0 on the masked one.
    assert torch.allclose(minus.grad[0, 0], torch.tensor([-0.25, 0.25, 0.0]), atol=1e-6)
    assert torch.equal(minus.grad[0, 1], torch.zeros(3))


def test_sequence_estimator_averages_to_full_vocab_kl():
    # One-token completions O+ ~ p(.|P+): the sequence estimator's Monte-Carlo mean approaches
    # the full-vocabulary value, KL(p+ || p-).
    p_plus = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    p_minus = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    tokens = torch.multinomial(p_plus, 100_000, replacement=True, generator=g)
    per_rollout = p_plus.log()[tokens] - p_minus.log()[tokens]
    estimate = inter_expert_kl(p_plus.log()[tokens], p_minus.log()[tokens])
    exact = inter_expert_kl_full_vocab(p_plus.log().view(1, 1, 3), p_minus.log().view(1, 1, 3),
                                       torch.ones(1, 1))
    se = per_rollout.std().item() / math.sqrt(len(tokens))
    assert abs(estimate.item() - exact.item()) < 5 * se


def test_reference_kl_loss_ignores_padding_garbage():
    logp = torch.tensor([[-1.0, 80.0]], requires_grad=True)  # exp(ref - 80) fine, but
    ref = torch.tensor([[-1.5, 0.0]])
    logp2 = torch.tensor([[-1.0, -200.0]], requires_grad=True)  # exp(200) overflows float32
    mask = torch.tensor([[1, 0]])
    for lp in (logp, logp2):
        loss = reference_kl_loss(lp, ref, mask, estimator="k3")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        assert lp.grad[0, 1].item() == 0.0
