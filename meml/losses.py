"""Policy-gradient and likelihood losses: E3 (the paper's GRPO form), E3' (clipped GRPO),
the NLL of E1 (MEF) and E6 (hard-example buffer), and the total E7.

Every loss here is built the same way: a per-token quantity [B, T] is reduced over the tokens
of an explicit completion mask [B, T] by one of three aggregation modes (E3'; decision D6 in
README.md):

  "token_mean"           sum_{b,t} x·m / sum_{b,t} m           one global denominator
  "seq_mean_token_mean"  mean_b ( sum_t x·m / |o_b| )           GRPO: every sequence weighs 1/B
  "dr_grpo"              sum_{b,t} x·m / (B · max_len)          Dr.GRPO: a constant denominator

Each is a sum divided by a denominator. When rows are scored in micro-batches, each micro-batch
is given the whole batch's denominator (`denominator=`), so the micro-batches' losses and
gradients add up to the whole batch's: how the RIEL step accumulates E7 (meml/riel.py).

Rows are sequences. The training loop flattens rollouts [Q, N, G] into B = Q·N·G rows; since
every (question, expert) group has the same G, the batch mean over rows *is* the paper's
(1/N) Σ_i E_g[...] (averaged over questions too). The paper's log π(O) is a sum over tokens;
"seq_mean_token_mean" replaces it with the token mean (GRPO), and "dr_grpo" keeps the sum,
divided by the constant max_len so that the learning rate means the same across lengths.

Per-token log-probs come in as [B, T]; whatever sits at masked positions (0, -inf, nan) changes
neither the value nor the gradient. Nothing is inferred from token values.
"""
import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")
POLICY_LOSSES = ("paper", "clipped")  # E3 as the paper writes it, E3' the clipped surrogate


def aggregation_denominator(lengths: torch.Tensor, aggregation: str, max_len: int) -> torch.Tensor:
    """The denominator of `aggregate` for rows of these completion lengths [B]: the number of
    completion tokens (token_mean), of rows (seq_mean_token_mean), or rows x max_len (dr_grpo)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    if aggregation == "token_mean":
        return lengths.sum().clamp(min=1).to(torch.float32)
    rows = torch.tensor(float(lengths.shape[0]), device=lengths.device)
    return rows if aggregation == "seq_mean_token_mean" else rows * max_len


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "seq_mean_token_mean",
    max_len: int | None = None,
    denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a per-token quantity [B, T] over the completion mask [B, T] to a scalar.

    Every mode is a sum over the batch divided by a denominator:
      numerator    Σ_{b,t} x·m (token_mean, dr_grpo), or Σ_b Σ_t x·m / |o_b| (seq_mean_token_mean)
      denominator  `aggregation_denominator` of these rows, unless given. When these rows are one
                   micro-batch of a larger batch, pass the larger batch's denominator: the
                   micro-batches' values then add up to the whole batch's.
    max_len (dr_grpo only): the denominator's length, normally the sampler's max_new_tokens;
    default T. A row with no completion tokens contributes 0 (its length is clamped to 1).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    if per_token.shape != mask.shape:
        raise ValueError(f"per-token values {tuple(per_token.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape [B, T]")
    mask = mask.bool()
    lengths = mask.sum(dim=1)  # [B]
    if denominator is None:
        denominator = aggregation_denominator(lengths, aggregation, per_token.shape[1] if max_len is None else max_len)
    # where, not multiply: a padded position holding inf or nan must not poison the sum.
    masked = torch.where(mask, per_token, 0.0)  # [B, T]
    if aggregation == "seq_mean_token_mean":
        return (masked.sum(dim=1) / lengths.clamp(min=1)).sum() / denominator
    return masked.sum() / denominator


def policy_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    aggregation: str = "seq_mean_token_mean",
    max_len: int | None = None,
    denominator: torch.Tensor | float | None = None,
    clip_eps_high: float | None = None,
) -> torch.Tensor:
    """E3 (old_logprobs=None) or E3' (old_logprobs given), to be minimised.

    logprobs:     [B, T] log π_θ of each sampled token (temperature-scaled logits), with grad
    mask:         [B, T] 1 on completion tokens (EOS included), 0 elsewhere
    advantages:   [B] one advantage per sequence (E2), broadcast over its tokens
    old_logprobs: [B, T] log π_old from the sampling pass (no grad)

    E3, the paper's on-policy form:   per token  −A · log π_θ(o_t)
        L_GRPO = (1/N) Σ_i −E_g[ log π_θ(O_g^i) · max(A_g^i, 0) ]; the clamp max(A, 0) is
        applied upstream by `group_advantages(..., positive_only=True)`, so this function takes
        advantages as they are and serves the unclamped baselines unchanged.
    E3', the clipped surrogate:       per token  −min( ρ_t·A, clip(ρ_t, 1−ε, 1+ε_high)·A ),
        ρ_t = exp(log π_θ − log π_old); ε_high = clip_eps_high, default ε (DAPO's "clip-higher"
        raises it). On the first update of a rollout batch ρ = 1 and the gradient equals E3's;
        the clip bites on later updates of the same batch (--num-iterations): a token whose ρ is
        past the bound on the side its advantage pushes gets exactly zero gradient.
    denominator: the whole batch's, when these rows are one micro-batch of it (`aggregate`).
    """
    advantages = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    if old_logprobs is None:
        per_token = -advantages * logprobs
    else:
        # log-ratio 0 on padding, so exp cannot overflow there (its gradient would be nan).
        log_ratio = (logprobs - old_logprobs.detach()).masked_fill(~mask.bool(), 0.0)
        ratio = torch.exp(log_ratio)  # [B, T]
        high = clip_eps if clip_eps_high is None else clip_eps_high
        clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    return aggregate(per_token, mask, aggregation, max_len, denominator)


def clip_fraction(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> torch.Tensor:
    """Fraction of completion tokens whose E3' term is clipped (and so has zero gradient):
    ρ > 1+ε_high with A > 0, or ρ < 1−ε with A < 0. A scalar for the training log."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    with torch.no_grad():
        ratio = torch.exp(logprobs - old_logprobs)
        adv = advantages.unsqueeze(1)
        clipped = ((ratio > 1.0 + high) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
        mask = mask.bool()
        return (clipped & mask).sum().float() / mask.sum().clamp(min=1).float()


def nll_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token_mean",
    max_len: int | None = None,
    denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of target completions: E1 (MEF) and E6 (the buffer's L_SFT).

    logprobs: [B, T] log π_θ of each target token; mask: [B, T] 1 on the answer tokens (EOS
    included), 0 on prompt and padding.
    E1 writes −Σ_j Σ_i log π_θ(A_j^(i) | Q_j, P_i) and E6 −mean log π_θ(S | Q, P), both with
    sequence log-probs (sums over tokens). The default "token_mean" is that same sum divided by
    the number of answer tokens in the batch: the gradient direction within a batch is the
    literal E1's, and the scale does not grow with batch size or answer length.
    """
    return aggregate(-logprobs, mask, aggregation, max_len, denominator)


def total_loss(
    policy: torch.Tensor | None = None,
    inter_expert_kl: torch.Tensor | None = None,
    sft: torch.Tensor | None = None,
    reference_kl: torch.Tensor | None = None,
    lambda1: float = 0.1,
    lambda2: float = 1.0,
    beta: float = 0.0,
) -> torch.Tensor:
    """E7: L = L_GRPO + λ1·L_KL + λ2·L_SFT  (+ β·L_ref, the optional E4 term; β = 0 for MEML).

    A part that is None is absent (no active question for E5, buffer not full for E6, no
    reference model for E4); a part whose weight is 0 is left out. The defaults λ1 = 0.1 and
    λ2 = 1.0 are decision D9 (README.md, "Decisions"). E7 is linear in its parts, so applying it
    to each micro-batch's share of the parts and summing (meml/riel.py) gives E7 of the whole
    batch: this function is the only place where λ1, λ2 and β multiply anything.
    """
    weighted = [weight * part for weight, part in
                [(1.0, policy), (lambda1, inter_expert_kl), (lambda2, sft), (beta, reference_kl)]
                if part is not None and weight != 0.0]
    return sum(weighted[1:], weighted[0]) if weighted else torch.tensor(0.0)
