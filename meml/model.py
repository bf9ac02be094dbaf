"""A hand-written Qwen2 / Qwen2.5 / Llama 3.x decoder that loads and saves Hugging Face checkpoints.

The rest of meml (sampler, log-probs, GRPO) trains this model, so every line of it should be
checkable. One class covers both families: Qwen2 is Llama with a bias on q/k/v (and rope_theta
1e6). Module and parameter names mirror the HF checkpoint (`model.layers.0.self_attn.o_proj.weight`)
except for one fused projection (below), so loading is a `load_state_dict` after one
concatenation; `tests/test_model.py` checks the logits and gradients against `transformers` itself.

Where it departs from the HF code:
- q_proj, k_proj and v_proj are one `qkv_proj` (as nanoGPT's c_attn, gpt-fast and vLLM have
  it): one matmul instead of three made greedy decoding of the tiny benchmark model 7 % faster
  and costs nothing at Qwen2.5-0.5B's shape. `from_pretrained` concatenates the checkpoint's
  tensors, `hf_state_dict` splits them back (meml/hf_checkpoint.py). (Fusing gate_proj and
  up_proj the same way made the 0.5B shape's MLP 9 % slower on CPU, so they stay apart.)
- A decode step (one new token per row) on CPU in fp32 computes each projection as
  (W @ x.T).T instead of x @ W.T (`Linear`, `decode_linear`): the same sums, which MKL runs
  faster for a handful of rows (generation ~1.4x at Qwen2.5-0.5B's shape on the two CPUs
  measured). Every other forward is F.linear.
- RoPE is applied in fp32 for every model dtype (HF rotates in the model dtype), so bf16 logits
  differ from HF's in the last bits, never in fp32.
- One preallocated `KVCache` with one length for the whole batch: ragged prompts are left-padded,
  and each row gets its own positions from the attention mask (cumsum - 1). Training forwards
  that share a prompt across rows use `PromptKV` instead, which autograd can see through.
- Every query may attend to its own slot, even a padded one, so no softmax row is ever empty
  and padded rows give finite garbage instead of NaN.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from meml.hf_checkpoint import fuse_projections, read_tensors, split_projections, write_checkpoint
from meml.lora import merged_state
from meml.model_config import ModelConfig  # re-exported: `from meml.model import ModelConfig` works

# ---------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half convention, as in the HF checkpoints)

def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, in fp32 [head_dim/2]; Llama 3 rescales them."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device="cpu").float() / d))
    if config.rope_scaling is None:
        return inv_freq
    # Llama 3: three bands by wavelength. Long waves (> old_ctx / low_freq_factor) are slowed
    # down by `factor`, short waves (< old_ctx / high_freq_factor) kept, the band between blended.
    s = config.rope_scaling
    factor, old_ctx = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)  # 0 at the long edge, 1 at the short edge
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_ctx / low, inv_freq / factor,
                       torch.where(wavelen < old_ctx / high, inv_freq, blended))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, d] by its positions' angles, in fp32 (cos, sin: [B, 1, T, d] fp32).

    Rotate-half convention: dimensions i and i + d/2 form a pair, and
    x' = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1). Here `sin` comes from
    `Transformer.rope_tables` with its first half negated, so rotate_half(x) * sin becomes
    cat(x2, x1) * sin = roll(x, d/2) * sin: the same numbers bit for bit (-a * b == a * -b),
    in four ops instead of eight (every layer runs this for every decoded token).
    """
    x32 = x.float()
    return (x32 * cos + x32.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


# ---------------------------------------------------------------------------------------------
# Decoder blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        """weight * x / sqrt(mean(x^2) + eps), normalised in fp32 (F.rms_norm without a weight)."""
        x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x32.type_as(x)  # cast back before the gain, as HF does


class KVCache:
    """Preallocated keys and values for every layer, [B, kv_heads, max_len, head_dim] each.

    All rows share one `length` (slots filled so far); ragged rows are padded, and the caller's
    attention mask [B, length + T] says which slots are real. `Transformer.forward` appends the
    new tokens of every layer, then advances `length`.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        # zeros, not empty: padded slots are masked, but 0 * NaN from stale memory would still be NaN
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    def select_rows(self, index: torch.Tensor) -> "KVCache":
        """A cache whose row r is a copy of this cache's row index[r] (same length and slots)."""
        out = KVCache.__new__(KVCache)
        out.keys = [k.index_select(0, index) for k in self.keys]
        out.values = [v.index_select(0, index) for v in self.values]
        out.batch_size, out.max_len, out.length = len(index), self.max_len, self.length
        return out

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, kv_heads, T, d] at slots [length, length+T); return slots [0, length+T)."""
        T, end = k.shape[2], self.length + k.shape[2]
        self.keys[layer].narrow(2, self.length, T).copy_(k)
        self.values[layer].narrow(2, self.length, T).copy_(v)
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)


class PromptKV:
    """The keys and values of some prompts, for a training forward in two passes (meml/policy.py):
    the distinct prompts once, then every row's completion attending to its prompt's slots.

    Unlike KVCache nothing is written in place, so autograd sees through it: a prompt's keys and
    values get the gradient of every row that attends to them. A pass may be recomputed (activation
    checkpointing) because neither `append` below depends on what the other stored:
    - the prompt pass (`length` 0) keeps each layer's k, v [U, kv_heads, P, d] as they are;
    - `select_rows(index)` gives row r prompt index[r]'s keys and values, `frozen`;
    - the completion pass then attends to [prompt slots, new slots] and keeps nothing.
    """
    max_len = math.inf

    def __init__(self, num_layers: int, batch_size: int):
        self.keys, self.values = [None] * num_layers, [None] * num_layers
        self.batch_size, self.length, self.frozen = batch_size, 0, False

    def select_rows(self, index: torch.Tensor) -> "PromptKV":
        out = PromptKV(len(self.keys), len(index))
        out.keys = [k.index_select(0, index) for k in self.keys]
        out.values = [v.index_select(0, index) for v in self.values]
        out.length, out.frozen = self.length, True
        return out

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.frozen:
            return torch.cat((self.keys[layer], k), 2), torch.cat((self.values[layer], v), 2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, in] @ weight.T + bias -> [B, out], the product of a decode step.

    A decode step multiplies a handful of rows (one new token per sequence) by every weight. On
    CPU in fp32 this computes the same sums in the other orientation, (weight @ x.T).T, which
    MKL's sgemm ran faster at 8-48 rows on both CPUs measured: 1.3-2.4x for the MLP and LM-head
    weights on one, about even but for the LM head's 1.2-1.5x on an AMD EPYC, where generation at
    Qwen2.5-0.5B's shape still gained ~1.4x (bench/bench_decode_layout.py, LOG 2026-12-06).
    In bf16 (weights or autocast), where this orientation is slower, and on any other device
    (not measured): plain F.linear.
    """
    fp32 = x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
    if x.device.type != "cpu" or not fp32:
        return F.linear(x, weight, bias)
    out = weight @ x.T if bias is None else torch.addmm(bias[:, None], weight, x.T)  # [out, B]
    return out.T.contiguous()


class Linear(nn.Linear):
    """nn.Linear whose product in a decode step is decode_linear's.

    A decode step is told by its shape, one new token per row ([B, 1, in]), never by how many
    rows it has: a row is computed the same way whatever else shares its batch, which is what
    lets RIEL sample the same rollouts at any world size (decision D22). A training forward one
    token long takes the same path (same sums, gradients tested); every other is F.linear.
    """

    def forward(self, x):
        if x.dim() == 3 and x.shape[1] == 1:
            y = decode_linear(x[:, 0], self.weight, self.bias)[:, None]  # [B, 1, out]
        else:
            y = super().forward(x)
        lora = self._modules.get("lora")  # low-rank adapters, --lora-rank (meml/lora.py)
        return y if lora is None or not lora.enabled else y + lora(x)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        # rows: q_proj's n_heads * head_dim, then k_proj's and v_proj's n_kv_heads * head_dim each
        self.qkv_proj = Linear(c.hidden_size, (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim,
                               bias=c.attention_bias)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache, layer):
        B, T, _ = x.shape
        h, kv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, h + 2 * kv, self.head_dim).transpose(1, 2)  # [B, h + 2kv, T, d]
        qk, v = qkv.split((h + kv, kv), dim=1)
        q, k = apply_rope(qk, cos, sin).split((h, kv), dim=1)  # q and k rotate together: [B, h|kv, T, d]
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # [B, kv, S, d], S = past + T
        out = grouped_query_attention(q, k, v, mask)  # [B, h, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def grouped_query_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v for q [B, h, T, d] and k, v [B, kv, S, d], kv divides h.

    Each group of h / kv consecutive query heads shares one key/value head. SDPA's enable_gqa
    reads the shared head in place (the same result as repeat_interleave on dim 1, without
    copying the cache every step). mask: None (plain causal) or additive [B, 1, T, S].
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, kv_cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_bias(attention_mask: torch.Tensor, past: int, T: int, dtype) -> torch.Tensor:
    """Additive mask [B, 1, T, S] (0: may attend, -inf: may not) for T new queries at slots
    past..past+T-1, from attention_mask [B, S] (1 real, 0 pad) over all S = past + T slots.

    A query sees real keys at or before its own slot, and always its own slot, so a padded
    query (no real key before it) still has one key and softmax never divides 0 by 0. Additive
    and built once per forward, because SDPA would convert a boolean mask in every layer.
    """
    B, S = attention_mask.shape
    future = torch.ones(T, S, dtype=torch.bool, device=attention_mask.device).triu(past + 1)  # key > query
    hidden = future | (attention_mask == 0)[:, None, :]                                     # [B, T, S]
    hidden.diagonal(past, dim1=1, dim2=2).fill_(False)                                      # own slot
    return torch.zeros(B, 1, T, S, dtype=dtype, device=attention_mask.device).masked_fill_(
        hidden[:, None], float("-inf"))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # plain attributes, not buffers: model.to(bfloat16) must not round the frequencies
        self.inv_freq = rope_inv_freq(config)  # [head_dim/2] fp32, CPU
        self.rope_cos = self.rope_sin = None   # [positions, head_dim] fp32, built by rope_tables
        # True: a training forward keeps only each layer's input and recomputes the layer in the
        # backward (activation memory of one layer instead of all, ~1/3 more compute)
        self.activation_checkpointing = False

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Fresh weights for training from scratch, as transformers initialises these models:
        N(0, std) for every projection and the embedding, zero biases, unit norm scales.
        (PyTorch's own defaults, N(0, 1) embeddings, would make tied logits ~sqrt(H) wide.)"""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @property
    def output_weight(self) -> torch.Tensor:
        """[V, H]: logits = hidden @ output_weight.T (the embedding itself when tied)."""
        return self.lm_head.weight

    def rope_tables(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position's angles, [L, head_dim] fp32, L >= length (the sin
        table's first half negated, see apply_rope).

        Built once per device for max(max_position_embeddings, length) positions and only rebuilt
        when a longer one is needed, so a decode step looks its rows up instead of recomputing
        them. (Sized to max_position_embeddings, not to `length`, because a caller may pass
        position_ids larger than the number of slots.)
        """
        if self.rope_cos is None or self.rope_cos.device != torch.device(device) \
                or self.rope_cos.shape[0] < length:
            positions = torch.arange(max(self.config.max_position_embeddings, length), device=device)
            freqs = positions[:, None].float() * self.inv_freq.to(device)  # [L, d/2]
            angles = torch.cat((freqs, freqs), dim=-1)                     # [L, d]
            # sin's first half negated: apply_rope's roll then rotates the pairs the right way
            self.rope_cos, self.rope_sin = angles.cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        return self.rope_cos, self.rope_sin

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, w.dtype, w.device)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, return_hidden=False):
        """input_ids [B, T]; attention_mask [B, past + T] (1 real, 0 pad) over cached + new slots.

        attention_mask may instead be an additive mask [B, 1, T, past + T] (0 attend, -inf not,
        in the model dtype), used as is; then position_ids are required. A caller that decodes
        step after step builds it once and slices it (meml/sampler.py), which saves rebuilding it
        from the 0/1 mask at every token.

        kv_cache: a KVCache (decoding: written in place) or a PromptKV (a training forward whose
        rows share prompts, meml/policy.py); `length` slots of either count as past.

        Returns logits [B, T, V] in the model dtype, or with return_hidden the final-norm hidden
        states [B, T, H] (logits = hidden @ output_weight.T), so log-probs can skip full logits.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"KV cache was made for batch size {kv_cache.batch_size}, input_ids has {B} rows")
        if kv_cache is not None and past + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} slots; {past} used, {T} more do not fit")
        additive = attention_mask is not None and attention_mask.dim() == 4
        expected = (B, 1, T, past + T) if additive else (B, past + T)
        if attention_mask is not None and tuple(attention_mask.shape) != expected:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected} = "
                             f"(batch, {'1, new tokens, ' if additive else ''}cached + new tokens)")
        if additive and position_ids is None:
            raise ValueError("position_ids are required with an additive [B, 1, T, S] attention_mask")
        if attention_mask is None and kv_cache is not None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            else:  # a row's position counts its real tokens only, so left padding does not shift it
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]

        cos_table, sin_table = self.rope_tables(past + T, input_ids.device)
        cos, sin = cos_table[position_ids][:, None], sin_table[position_ids][:, None]  # [B, 1, T, d] fp32
        # no mask and no cache: plain causal attention, which lets SDPA pick its fastest kernel
        mask = attention_mask if additive or attention_mask is None else \
            attention_bias(attention_mask, past, T, self.model.embed_tokens.weight.dtype)  # [B, 1, T, S]

        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        # (a KVCache is written in place, so a layer that uses one cannot be recomputed)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and not isinstance(kv_cache, KVCache)
        for i, layer in enumerate(self.model.layers):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv_cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    # -----------------------------------------------------------------------------------------
    # Hugging Face checkpoints: config.json + model.safetensors (or a sharded index)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        path = Path(path)
        config = ModelConfig.from_json(path / "config.json")
        with torch.device("meta"):  # no memory and no random init for weights about to be replaced
            model = cls(config)
        expected = {name: tuple(t.shape) for name, t in model.hf_state_dict().items()}
        state = read_tensors(path, expected, config, dtype, device)  # HF names, each one checked
        model.load_state_dict(fuse_projections(state), strict=False, assign=True)
        model.tie_weights()  # assign=True replaced the embedding parameter; point the head at it again
        return model

    def hf_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """The state dict (default: this model's own) under the checkpoint's names: qkv_proj
        split back into q/k/v_proj (copies), and no lm_head.weight when tied (HF does not store
        the head then). Low-rank adapters are merged into their weights (meml/lora.py)."""
        state = self.state_dict() if state is None else state
        if any(".lora." in k for k in state):
            state = merged_state(self, state)
        state = split_projections(state, self.config)
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]
        return state

    def save_pretrained(self, path, dtype: torch.dtype | None = None, state: dict | None = None):
        """Write config.json + model.safetensors that transformers loads unchanged (atomic per
        file), the tensors in `dtype` (None: the weights' own). `state`: whole tensors to write
        instead of this model's own (a sharded model's, gathered by meml.distributed)."""
        dtype = dtype or self.model.embed_tokens.weight.dtype
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.hf_state_dict(state).items()}
        write_checkpoint(path, state, {**self.config.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")})
