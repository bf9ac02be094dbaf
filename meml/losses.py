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
from dataclasses import dataclass

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")
# E3 as the paper writes it, E3' the clipped surrogate, CISPO's clipped and detached weight
POLICY_LOSSES = ("paper", "clipped", "cispo")
IMPORTANCE_LEVELS = ("token", "sequence")  # the ratio per token (GRPO) or per sequence (GSPO)


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


def importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                     level: str = "token") -> torch.Tensor:
    """ρ [B, T]: π_θ / π_old per token ("token"), or GSPO's sequence ratio ("sequence"),
    s_b = exp( (1/|o_b|) Σ_t (log π_θ − log π_old) ), the same at every token of row b (GSPO:
    the geometric mean of the token ratios, so a long sequence is not clipped for its length)."""
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"level={level!r}: expected one of {IMPORTANCE_LEVELS}")
    mask = mask.bool()
    # log-ratio 0 on padding, so exp cannot overflow there (its gradient would be nan).
    log_ratio = (logprobs - old_logprobs.detach()).masked_fill(~mask, 0.0)  # [B, T]
    if level == "sequence":
        per_row = log_ratio.sum(1) / mask.sum(1).clamp(min=1)               # [B]
        log_ratio = per_row[:, None].expand_as(logprobs)
    return torch.exp(log_ratio)


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
    *,
    kind: str | None = None,
    level: str = "token",
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """E3 (kind "paper", the default without old_logprobs), E3' ("clipped", the default with
    them) or CISPO ("cispo"), to be minimised.

    logprobs:      [B, T] log π_θ of each sampled token (temperature-scaled logits), with grad
    mask:          [B, T] 1 on completion tokens (EOS included), 0 elsewhere
    advantages:    [B] one advantage per sequence (E2), broadcast over its tokens
    old_logprobs:  [B, T] log π_old from the sampling pass (no grad)
    level:         the ratio ρ per token (GRPO) or per sequence (GSPO), `importance_ratio`
    token_weights: [B, T] detached weights of each token's term (truncated importance
                   sampling's min(π_old / π_sampler, C)), or None

    E3, the paper's on-policy form:   per token  −A · log π_θ(o_t)
        L_GRPO = (1/N) Σ_i −E_g[ log π_θ(O_g^i) · max(A_g^i, 0) ]; the clamp max(A, 0) is
        applied upstream by `group_advantages(..., positive_only=True)`, so this function takes
        advantages as they are and serves the unclamped baselines unchanged.
    E3', the clipped surrogate:       per token  −min( ρ·A, clip(ρ, 1−ε, 1+ε_high)·A )
        ε_high = clip_eps_high, default ε (DAPO's "clip-higher" raises it). On the first update
        of a rollout batch ρ = 1 and the gradient equals E3's; the clip bites on later updates
        of the same batch (--num-iterations): a token whose ρ is past the bound on the side its
        advantage pushes gets exactly zero gradient. With level "sequence" this is GSPO.
    CISPO (MiniMax-M1):               per token  −sg(min(ρ, 1+ε_high)) · A · log π_θ(o_t)
        the ratio only weighs the REINFORCE term, capped and detached: a capped token keeps its
        gradient (scaled), where E3' would drop it. No lower cap (clip_eps is not used).
    denominator: the whole batch's, when these rows are one micro-batch of it (`aggregate`).
    """
    kind = kind or ("paper" if old_logprobs is None else "clipped")
    if kind not in POLICY_LOSSES:
        raise ValueError(f"kind={kind!r}: expected one of {POLICY_LOSSES}")
    advantages = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if kind == "paper":
        per_token = -advantages * logprobs
    else:
        if old_logprobs is None:
            raise ValueError(f"kind={kind!r} needs old_logprobs (π_old)")
        ratio = importance_ratio(logprobs, old_logprobs, mask, level)       # [B, T]
        if kind == "clipped":
            clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high)
            per_token = -torch.minimum(ratio * advantages, clipped * advantages)
        else:
            per_token = -ratio.clamp(max=1.0 + high).detach() * advantages * logprobs
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    return aggregate(per_token, mask, aggregation, max_len, denominator)


def clip_fraction(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    *,
    kind: str = "clipped",
    level: str = "token",
) -> torch.Tensor:
    """Fraction of completion tokens the clip acts on, a scalar for the training log. E3': the
    term is clipped (zero gradient), ρ > 1+ε_high with A > 0 or ρ < 1−ε with A < 0. CISPO: the
    weight is capped, ρ > 1+ε_high (the token keeps a gradient)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    with torch.no_grad():
        ratio = importance_ratio(logprobs, old_logprobs, mask, level)
        adv = advantages.unsqueeze(1)
        if kind == "cispo":
            clipped = ratio > 1.0 + high
        else:
            clipped = ((ratio > 1.0 + high) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
        mask = mask.bool()
        return (clipped & mask).sum().float() / mask.sum().clamp(min=1).float()


def truncated_is_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Truncated importance sampling [B, T]: min(π_old / π_sampler, cap) per token, detached, 0
    off the mask. When π_old is recomputed by the training forward (D21) the rollouts were still
    drawn from the sampler's distribution (which differs under bf16): this weight corrects the
    policy term for that gap, capped so that a rare token cannot dominate."""
    log_w = (old_logprobs - sampler_logprobs).detach().masked_fill(~mask.bool(), 0.0)
    return torch.where(mask.bool(), log_w.exp().clamp(max=cap), 0.0)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the verifier's reward before E2: 0 for a
    completion of at most max_len − buffer tokens, then falling linearly to −1 at max_len
    (where the sampler cuts it): (max_len − buffer − |o|) / buffer. lengths [...] in tokens."""
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -(over / buffer).clamp(max=1.0)


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


@dataclass(frozen=True)
class Part:
    """One part of E7: the RielConfig field its weight is read from (None: weight 1) and the
    key it is logged as in metrics.jsonl."""
    weight: str | None
    metric: str


# E7's parts, in the order their weighted values are summed. The one table the backward, the
# logged metrics and the total all read (meml/riel.py, train.py): a new term of E7 is a function
# that computes its share, a line here, and its weight's option in meml/config.py.
E7_PARTS = {
    "policy": Part(None, "loss/policy"),                         # E3 / E3' / CISPO
    "inter_expert_kl": Part("lambda1", "loss/inter_expert_kl"),  # E5
    "sft": Part("lambda2", "loss/sft"),                          # E6
    "reference_kl": Part("beta", "loss/ref_kl"),                 # E4
}


def e7_weights(cfg) -> dict[str, float]:
    """Each part's weight in E7, read from a RielConfig (λ1, λ2, β; the policy term's is 1)."""
    return {name: 1.0 if part.weight is None else getattr(cfg, part.weight) for name, part in E7_PARTS.items()}


def total_loss(parts: dict[str, torch.Tensor | None], weights: dict[str, float]) -> torch.Tensor:
    """E7: L = L_GRPO + λ1·L_KL + λ2·L_SFT  (+ β·L_ref, the optional E4 term; β = 0 for MEML).

    parts: name -> value (or a micro-batch's share of it); a part that is missing or None is
    absent (no active question for E5, buffer not full for E6, no reference model for E4), a
    part whose weight is 0 is left out. The defaults λ1 = 0.1 and λ2 = 1.0 are decision D9
    (README.md, "Decisions"). E7 is linear in its parts, so applying it to each micro-batch's
    share of the parts and summing (meml/riel.py) gives E7 of the whole batch: this function is
    the only place where λ1, λ2 and β multiply anything.
    """
    unknown = parts.keys() - E7_PARTS.keys()
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not parts of E7: add them to meml.losses.E7_PARTS")
    weighted = [weights[name] * parts[name] for name in E7_PARTS
                if parts.get(name) is not None and weights[name] != 0.0]
    return sum(weighted[1:], weighted[0]) if weighted else torch.tensor(0.0)
