"""KL terms: the optional reference-model KL (E4) and MEML's inter-expert mutual learning (E5).

E4 compares the policy with a frozen reference model along the policy's own samples, with
Schulman's three estimators k1, k2, k3. E5 compares the policy with *itself* under two system
prompts: per question the best expert E+ and the worst E−, along E+'s correct rollouts O+.

Departure from the paper, decision D7 (README.md, "Decisions"): the paper prints
log p(O+|P−) − log p(O+|P+); minimised literally, that pushes the weak expert *away* from the
good answer. Here the term is sg(log π(O+|P+)) − log π(O+|P−): only the E− branch receives
gradient, and it moves toward O+.
Its value is a one-sample estimate of KL(π(·|P+) ‖ π(·|P−)) along O+.
"""
import torch

from meml.losses import aggregate

ESTIMATORS = ("k1", "k2", "k3")
# `inter_expert_kl` (sequence; token_mean with num_tokens), `inter_expert_kl_full_vocab`
INTER_EXPERT_VARIANTS = ("sequence", "token_mean", "full_vocab")


# ---------------------------------------------------------------------------------------------
# E4: reference-model KL
# ---------------------------------------------------------------------------------------------

def kl_estimates(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E4: per-token estimators of KL(π_θ ‖ π_ref) from tokens sampled from π_θ.

    With x = log π_ref(o_t) − log π_θ(o_t)  (any shape, e.g. [B, T]):
      k1 = −x              unbiased for KL(π_θ ‖ π_ref); can be negative per token
      k2 = x² / 2          biased (its mean is E[x²]/2 ≥ 0), close to the KL when π_θ ≈ π_ref
      k3 = exp(x) − x − 1  unbiased for KL(π_θ ‖ π_ref) (E_πθ[π_ref/π_θ] = 1) and ≥ 0 always
    Gradients flow through `logprobs` only; `ref_logprobs` is treated as a constant.
    """
    x = ref_logprobs.detach() - logprobs
    return -x, 0.5 * x * x, torch.expm1(x) - x


def reference_kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    aggregation: str = "seq_mean_token_mean",
    max_len: int | None = None,
    denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """E4 as a loss term: the chosen estimator per completion token, aggregated like E3.

    logprobs, ref_logprobs, mask: [B, T]. Multiply by β (0.04 typical for baselines, 0 in the
    MEML preset) in E7 (`meml.losses.total_loss`). denominator: the whole batch's, when these
    rows are one micro-batch of it (`meml.losses.aggregate`).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: expected one of {ESTIMATORS}")
    # Zero x on padding before exp, so garbage there cannot overflow into a nan gradient.
    padding = ~mask.bool()
    per_token = kl_estimates(logprobs.masked_fill(padding, 0.0),
                             ref_logprobs.masked_fill(padding, 0.0))[ESTIMATORS.index(estimator)]
    return aggregate(per_token, mask, aggregation, max_len, denominator)


# ---------------------------------------------------------------------------------------------
# E5: inter-expert mutual learning
# ---------------------------------------------------------------------------------------------

def select_expert_pairs(
    rewards: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E5's choice of teacher and student per question.

    rewards: [Q, N, G] 0/1. With R̄_i = mean_g r(O_g^i):
      e_plus  [Q] long: argmax_i R̄_i, ties broken toward the lowest expert index
      e_minus [Q] long: argmin_i R̄_i, ties broken toward the lowest expert index
      active  [Q] bool: R̄_{E+} > R̄_{E−} and E+ has at least one correct rollout (reward 1);
                        False means the question skips the term (e.g. all experts tie)
    """
    mean_reward = rewards.float().mean(dim=-1)  # [Q, N]
    # torch.argmax / argmin return the first extremal index: the lowest-index tie rule.
    e_plus = mean_reward.argmax(dim=-1)
    e_minus = mean_reward.argmin(dim=-1)
    best = mean_reward.gather(1, e_plus[:, None]).squeeze(1)
    worst = mean_reward.gather(1, e_minus[:, None]).squeeze(1)
    plus_has_correct = plus_rollouts(rewards, e_plus).any(dim=-1)
    return e_plus, e_minus, (best > worst) & plus_has_correct


def plus_rollouts(rewards: torch.Tensor, e_plus: torch.Tensor) -> torch.Tensor:
    """[Q, N, G], [Q] -> [Q, G] bool: which rollouts of E+ are correct (reward 1): the O+ of E5.
    AND with `active[:, None]` to keep only questions that take part."""
    index = e_plus[:, None, None].expand(-1, 1, rewards.shape[-1])  # [Q, 1, G]
    return rewards.gather(1, index).squeeze(1) == 1


def _mean_per_question(values: torch.Tensor, question_index: torch.Tensor | None,
                       num_questions: int | None) -> torch.Tensor:
    """[M] -> scalar: mean over each question's O+, then sum over questions / num_questions
    (default: the number of questions present). None for question_index: a flat mean."""
    if question_index is None:
        return values.mean()
    _, group = torch.unique(question_index, return_inverse=True)  # [M] in 0..present-1
    present = int(group.max()) + 1
    sums = values.new_zeros(present).index_add(0, group, values)
    counts = values.new_zeros(present).index_add(0, group, torch.ones_like(values))
    return (sums / counts).sum() / (present if num_questions is None else num_questions)


def inter_expert_kl(
    plus_seq_logprobs: torch.Tensor,
    minus_seq_logprobs: torch.Tensor,
    question_index: torch.Tensor | None = None,
    num_questions: int | None = None,
    num_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """E5, sequence estimator: L_KL = mean_{O+} [ sg(log π_θ(O+|Q,P+)) − log π_θ(O+|Q,P−) ].

    plus_seq_logprobs:  [M] log π_θ(O+ | Q, P_{E+}), the sum of O+'s per-token log-probs under
                        E+'s prompt (detached here: the teacher side gets no gradient)
    minus_seq_logprobs: [M] the same completions O+ scored under E−'s prompt, with grad
    question_index:     [M] which question each O+ row belongs to. Given: mean over each
                        question's O+, then mean over questions (each active question weighs
                        the same). None: a flat mean over all M rows.
    num_questions:      the step's number of active questions, when these rows are the O+ of
                        only some of them (a micro-batch holding whole questions): the
                        micro-batches' values then add up to the whole step's L_KL.
    num_tokens:         [M] |O+| per row, for the per-token form (variant "token_mean", D8):
                        each row's difference divided by its length, i.e. the mean over O+'s
                        tokens instead of their sum. The sum is ~|O+| times larger than the
                        token-mean E3, which makes λ1 depend on answer length.
    Sign and stop-gradient: decision D7 (README.md); minimising raises log π_θ(O+ | P−).
    """
    per_rollout = plus_seq_logprobs.detach() - minus_seq_logprobs  # [M]
    if num_tokens is not None:
        per_rollout = per_rollout / num_tokens
    return _mean_per_question(per_rollout, question_index, num_questions)


def inter_expert_kl_full_vocab(
    plus_logits: torch.Tensor,
    minus_logits: torch.Tensor,
    mask: torch.Tensor,
    question_index: torch.Tensor | None = None,
    num_questions: int | None = None,
) -> torch.Tensor:
    """E5, full-vocabulary variant: the exact per-token KL( p(·|P+) ‖ p(·|P−) ) summed along O+.

    plus_logits, minus_logits: [M, T, V] next-token logits (already divided by the sampling
        temperature) at O+'s positions under E+'s and E−'s prompts; log-probs work too, since
        log_softmax leaves them unchanged. The E+ (teacher) side is detached.
    mask: [M, T] 1 on O+'s completion tokens.
    Per row: Σ_t m_t Σ_v p+(v) (log p+(v) − log p−(v)); rows reduced as in `inter_expert_kl`.
    Its expectation over O+ ~ π(·|P+) equals the sequence estimator's, with no sampling noise
    in the per-token part. Memory is M·T·V floats: chunk over rows for large vocabularies.
    """
    plus_logp = torch.log_softmax(plus_logits.detach().float(), dim=-1)  # [M, T, V]
    minus_logp = torch.log_softmax(minus_logits.float(), dim=-1)         # [M, T, V]
    per_token = (plus_logp.exp() * (plus_logp - minus_logp)).sum(dim=-1)  # [M, T]
    per_rollout = torch.where(mask.bool(), per_token, 0.0).sum(dim=-1)   # [M]
    return _mean_per_question(per_rollout, question_index, num_questions)
