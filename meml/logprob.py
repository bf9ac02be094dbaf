"""Per-token log-probabilities log pi(target) without materialising [tokens x vocab] logits.

Every RL loss here (E3..E7) needs log pi(y_t | ...) only at the sampled tokens, yet the
softmax runs over Qwen's whole vocabulary (151,936 ids): fp32 logits for 24 rollouts x 512
tokens are 7.5 GB, and autograd keeps two or three such tensors alive for the backward.

    token_logprobs(hidden [N, H], weight [V, H], targets [N]) = log softmax(hidden @ weight.T / T)[targets]

has three implementations behind one function:
  naive   : full logits, log_softmax, gather. Short and obviously right: the test oracle.
  chunked : a torch.autograd.Function that walks the vocabulary in column chunks, holds one
            [N, chunk] block of logits at a time, saves only (hidden, weight, targets, per-row
            logsumexp and entropy) and recomputes each block of logits in the backward. Four
            matmuls instead of autograd's three; the default on CPU.
  triton  : the same chunk loop with the elementwise work (online logsumexp, target gather,
            softmax gradient) fused in Triton kernels (meml/logprob_triton.py); the default on
            CUDA when triton imports.

All three accumulate in fp32 whatever the input dtype (the matmul runs in the input dtype,
as a bf16 model's lm_head would) and return fp32. Rows whose target is `ignore_index` give 0
and no gradient. The optional entropy -sum_v p_v log p_v (per row, fp32) is differentiable too.
"""
import torch

# Logits block held at once by the chunked path, in elements: 2**24 fp32 = 64 MB. Measured
# with bench/bench_logprob.py (reference_runs/LOG.md): 2**22 was ~10% slower at N = 2048;
# 2**23 .. 2**25 were within the noise of this shared machine, so the middle one.
CHUNK_ELEMENTS = 2**24
MIN_CHUNK_COLUMNS = 1024


def token_logprobs(hidden, weight, targets, temperature=1.0, *, ignore_index=-100,
                   return_entropy=False, impl="auto"):
    """log softmax(hidden @ weight.T / temperature) at `targets`, fp32 [N] (and entropy [N]).

    hidden [N, H] and weight [V, H] share a dtype (fp32 or bf16); targets [N] long in [0, V)
    or == ignore_index. Pass weight[:tokenizer.vocab_size] to exclude padded vocabulary ids.
    impl: "naive", "chunked", "triton" or "auto" (triton on CUDA tensors when triton imports,
    else chunked).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: need hidden [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs: targets {tuple(targets.shape)} must be [N] with "
                         f"N = hidden.shape[0] = {hidden.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature} "
                         "(greedy decoding has no log-probabilities to train on)")
    targets = targets.long()
    real = targets != ignore_index
    bad = real & ((targets < 0) | (targets >= weight.shape[0]))
    if bad.any():
        raise ValueError(f"token_logprobs: target id {int(targets[bad][0])} is outside the "
                         f"vocabulary [0, {weight.shape[0]}) and is not ignore_index "
                         f"({ignore_index}); mask it with ignore_index or pass the full weight")
    # -1 marks an ignored row from here on (the kernels and chunk loops test target >= 0).
    targets = torch.where(real, targets, -1)

    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _triton_available() else "chunked"
    if impl == "naive":
        logp, entropy = naive_token_logprobs(hidden, weight, targets, temperature)
    elif impl == "chunked":
        logp, entropy = ChunkedTokenLogprobs.apply(hidden, weight, targets, float(temperature),
                                                   return_entropy)
    elif impl == "triton":
        from meml.logprob_triton import TritonTokenLogprobs
        logp, entropy = TritonTokenLogprobs.apply(hidden, weight, targets, float(temperature),
                                                  return_entropy)
    else:
        raise ValueError(f"token_logprobs: impl must be auto, naive, chunked or triton, got {impl!r}")
    return (logp, entropy) if return_entropy else logp


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def naive_token_logprobs(hidden, weight, targets, temperature=1.0):
    """The reference: full fp32 logits [N, V], log_softmax, gather. targets: -1 = ignored row."""
    logits = (hidden @ weight.T).float() / temperature                 # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)                       # [N, V]
    real = targets >= 0
    logp = logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros((), device=hidden.device)
    return torch.where(real, logp, zero), torch.where(real, entropy, zero)


def vocab_chunks(n_rows, vocab_size):
    """Column ranges [start, end) of the vocabulary so that one [n_rows, end-start] block of
    fp32 logits holds about CHUNK_ELEMENTS elements."""
    width = max(MIN_CHUNK_COLUMNS, CHUNK_ELEMENTS // max(n_rows, 1))
    return [(start, min(start + width, vocab_size)) for start in range(0, vocab_size, width)]


def merge_chunk_stats(chunk_lse, chunk_entropy=None):
    """Combine per-chunk logsumexp and entropy into whole-vocabulary ones.

    chunk_lse, chunk_entropy: [C, N], each computed over one block of columns alone. Block c
    holds a share q_c = exp(lse_c - lse) of the probability mass, so lse = logsumexp_c lse_c,
    and (the chain rule of entropy over disjoint blocks) entropy = sum_c q_c (H_c - log q_c).
    Written this way no large logits are subtracted from each other, so fp32 keeps ~1e-6.
    Returns lse [N] and entropy [N] (None when chunk_entropy is None).
    """
    lse = torch.logsumexp(chunk_lse, dim=0)
    if chunk_entropy is None:
        return lse, None
    log_share = chunk_lse - lse
    return lse, (log_share.exp() * (chunk_entropy - log_share)).sum(0)


def finish_forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_lse, chunk_entropy,
                   target_logit):
    """The end of both chunked forwards (here and in logprob_triton.py): merge the per-block
    statistics, form log p = z_target - logsumexp, zero ignored rows, save what backward needs."""
    lse, entropy = merge_chunk_stats(chunk_lse, chunk_entropy)
    real = targets >= 0
    logp = torch.where(real, target_logit - lse, 0.0)
    entropy = torch.where(real, entropy, 0.0) if with_entropy else torch.zeros_like(logp)
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.temperature = temperature
    if not with_entropy:
        ctx.mark_non_differentiable(entropy)
    ctx.set_materialize_grads(False)     # an unused output's gradient arrives as None
    return logp, entropy


class ChunkedTokenLogprobs(torch.autograd.Function):
    """Chunk-over-vocabulary log-probs and entropy; logits are recomputed in the backward.

    With z = hidden @ weight.T / T (one block of columns at a time), p = softmax(z):
      forward : lse = log sum_v exp z_v, logp = z_target - lse, entropy = lse - sum_v p_v z_v
      backward: d logp / dz_v = [v = target] - p_v
                d entropy / dz_v = -p_v (z_v - lse + entropy)
      so with incoming gradients g (logp) and e (entropy), per row,
                dz_v = g [v = target] - p_v (g + e (z_v - lse + entropy))
      and d hidden = (dz / T) @ weight, d weight = (dz / T).T @ hidden. dz is linear in (g, e),
      so dz / T comes straight from (g / T, e / T).
    Logits are computed exactly as the naive path does, (hidden @ weight.T).float() / T, so
    bf16 inputs round the same way in both. The entropy costs one more pass over each block
    (and its own branch in the backward), so it is computed only when asked for; otherwise the
    second output is zeros without a gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy):
        n_rows, vocab_size = hidden.shape[0], weight.shape[0]
        chunks = vocab_chunks(n_rows, vocab_size)
        chunk_lse = hidden.new_empty(len(chunks), n_rows, dtype=torch.float32)   # [C, N]
        chunk_entropy = torch.empty_like(chunk_lse) if with_entropy else None     # [C, N]
        target_logit = hidden.new_zeros(n_rows, dtype=torch.float32)             # [N]
        for c, (start, end) in enumerate(chunks):
            z = (hidden @ weight[start:end].T).float().div_(temperature)        # [N, chunk]
            in_chunk = (targets >= start) & (targets < end)
            local = (targets - start).clamp(0, end - start - 1)[:, None]
            target_logit += torch.where(in_chunk, z.gather(1, local).squeeze(1), 0.0)
            row_max = z.amax(dim=1, keepdim=True)                                # [N, 1]
            e = z.sub_(row_max).exp_()            # in place: z is dead, e = exp(z - max)
            mass = e.sum(1)
            chunk_lse[c] = mass.log() + row_max.squeeze(1)
            if with_entropy:
                # The block's own entropy, log mass - sum_v e_v (z_v - max) / mass, where
                # e_v (z_v - max) = xlogy(e_v, e_v): no need to keep z.
                chunk_entropy[c] = mass.log() - torch.special.xlogy(e, e).sum(1) / mass
            del z, e
        return finish_forward(ctx, hidden, weight, targets, temperature, with_entropy,
                              chunk_lse, chunk_entropy, target_logit)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        n_rows, vocab_size = hidden.shape[0], weight.shape[0]
        real = targets >= 0
        # g, e: incoming gradients of logp and entropy, already divided by T (see above).
        g = hidden.new_zeros(n_rows, dtype=torch.float32) if grad_logp is None \
            else torch.where(real, grad_logp.float(), 0.0) / temperature          # [N]
        e = None if grad_entropy is None \
            else torch.where(real, grad_entropy.float(), 0.0) / temperature       # [N]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        rows = torch.arange(n_rows, device=hidden.device)
        for start, end in vocab_chunks(n_rows, vocab_size):
            w = weight[start:end]                                                # [chunk, H]
            z = (hidden @ w.T).float().div_(temperature)                        # [N, chunk]
            log_p = z.sub_(lse[:, None])                                         # in place
            if e is None:
                dz = log_p.exp_().mul_(-g[:, None])       # -g p, in place: one pass
            else:
                p = log_p.exp()
                dz = log_p.mul_(-e[:, None]).sub_((g + e * entropy)[:, None]).mul_(p)  # in place
                del p
            in_chunk = (targets >= start) & (targets < end)
            dz[rows[in_chunk], targets[in_chunk] - start] += g[in_chunk]        # + g [v = target]
            dz = dz.to(hidden.dtype)
            grad_hidden += dz @ w
            if grad_weight is not None:
                torch.mm(dz.T, hidden, out=grad_weight[start:end])
            del z, log_p, dz
        grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None

