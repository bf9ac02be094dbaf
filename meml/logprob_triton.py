"""Triton kernels for token_logprobs: the chunk loop of meml/logprob.py with fused elementwise work.

The matmuls stay in cuBLAS (torch.mm, one block of vocabulary columns at a time); what Triton
fuses is everything between them, which in plain PyTorch costs several passes over the
[N, chunk] block and an fp32 copy of it when the model runs in bf16:
  forward : one pass per block: online (running-max) logsumexp and entropy over BLOCK_V-wide
            column tiles, plus the target-logit gather; torch merges the blocks' statistics
            (meml.logprob.merge_chunk_stats).
  backward: one pass per block: p = exp(z - lse) and
            dz = g [v = target] - p (g + e (log p + entropy)),
            written over the logits buffer in their own dtype, ready for the two matmuls.

Imported only when impl="triton" (or "auto" on CUDA), so CPU users need no triton. Under
TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors: that is
how the tests check them without a GPU.
"""
import torch
import triton
import triton.language as tl

from meml.logprob import finish_forward, vocab_chunks

BLOCK_V = 1024   # column tile of one program; the interpreter is fastest with wide tiles too


@triton.jit
def _chunk_stats_kernel(logits_ptr, row_stride, width, inv_temperature, targets_ptr, chunk_start,
                        lse_ptr, entropy_ptr, target_logit_ptr, BLOCK_V: tl.constexpr):
    """One program per row of a [N, width] block of logits; z = logits / T. Writes the block's
    logsumexp and entropy of z[row] and, if the target falls in the block, its z. Walks BLOCK_V
    columns at a time keeping a running max m, mass = sum exp(z - m), a = sum exp(z - m) (z - m)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    m = -float("inf")
    mass = 0.0
    a = 0.0
    for start in range(0, width, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < width
        z = tl.load(row_ptr + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Rescale what was summed under the old max: exp(z - m) = exp(z - m_new) exp(m - m_new),
        # and (z - m) = (z - m_new) - (m_new - m).
        alpha = tl.exp(m - m_new)
        a = alpha * (a + mass * tl.where(mass > 0, m - m_new, 0.0))
        mass = alpha * mass
        e = tl.where(valid, tl.exp(z - m_new), 0.0)
        mass += tl.sum(e, axis=0)
        a += tl.sum(e * tl.where(valid, z - m_new, 0.0), axis=0)
        m = m_new
    tl.store(lse_ptr + row, m + tl.log(mass))
    tl.store(entropy_ptr + row, tl.log(mass) - a / mass)   # log Z - E[z], both relative to m
    local = tl.load(targets_ptr + row) - chunk_start
    here = (local >= 0) & (local < width)
    z_target = tl.load(row_ptr + local, mask=here, other=0.0).to(tl.float32) * inv_temperature
    tl.store(target_logit_ptr + row, z_target, mask=here)


@triton.jit
def _chunk_grad_kernel(logits_ptr, row_stride, width, inv_temperature, targets_ptr, chunk_start,
                       lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
                       BLOCK_V: tl.constexpr):
    """Program (row, tile) of a [N, width] block: overwrite logits[row, tile] with their gradient
    dz / T, where z = logits / T and dz = g [v = target] - p (g + e (log p + entropy))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = cols < width
    ptrs = logits_ptr + row * row_stride + cols
    z = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32) * inv_temperature
    g = tl.load(grad_logp_ptr + row)
    e = tl.load(grad_entropy_ptr + row)
    log_p = z - tl.load(lse_ptr + row)
    dz = -tl.exp(log_p) * (g + e * (log_p + tl.load(entropy_ptr + row)))
    dz += tl.where(cols == tl.load(targets_ptr + row) - chunk_start, g, 0.0)
    tl.store(ptrs, (dz * inv_temperature).to(logits_ptr.dtype.element_ty), mask=valid)


class TritonTokenLogprobs(torch.autograd.Function):
    """Same contract and equations as meml.logprob.ChunkedTokenLogprobs (read its docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy):
        n_rows, vocab_size = hidden.shape[0], weight.shape[0]
        chunks = vocab_chunks(n_rows, vocab_size)
        chunk_lse = hidden.new_empty(len(chunks), n_rows, dtype=torch.float32)   # [C, N]
        chunk_entropy = torch.empty_like(chunk_lse)                              # [C, N]
        target_logit = hidden.new_zeros(n_rows, dtype=torch.float32)             # [N]
        for c, (start, end) in enumerate(chunks):
            logits = hidden @ weight[start:end].T            # [N, chunk], input dtype (cuBLAS)
            _chunk_stats_kernel[(n_rows,)](logits, logits.stride(0), end - start, 1 / temperature,
                                           targets, start,
                                           chunk_lse[c], chunk_entropy[c], target_logit,
                                           BLOCK_V=BLOCK_V)
            del logits
        return finish_forward(ctx, hidden, weight, targets, temperature, with_entropy,
                              chunk_lse, chunk_entropy, target_logit)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        n_rows, vocab_size = hidden.shape[0], weight.shape[0]
        real = targets >= 0
        zeros = hidden.new_zeros(n_rows, dtype=torch.float32)
        g = zeros if grad_logp is None else torch.where(real, grad_logp.float(), 0.0).contiguous()
        e = zeros if grad_entropy is None else torch.where(real, grad_entropy.float(), 0.0).contiguous()

        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for start, end in vocab_chunks(n_rows, vocab_size):
            w = weight[start:end]                                                # [chunk, H]
            grad_logits = hidden @ w.T              # [N, chunk]: logits, then their gradient
            grid = (n_rows, triton.cdiv(end - start, BLOCK_V))
            _chunk_grad_kernel[grid](grad_logits, grad_logits.stride(0), end - start,
                                     1 / ctx.temperature, targets, start, lse, entropy, g, e,
                                     BLOCK_V=BLOCK_V)
            grad_hidden += grad_logits @ w
            if grad_weight is not None:
                torch.mm(grad_logits.T, hidden, out=grad_weight[start:end])
            del grad_logits
        grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None
