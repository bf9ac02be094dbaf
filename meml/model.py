"""A hand-written Qwen2 / Qwen2.5 / Llama 3.x decoder that loads and saves Hugging Face checkpoints.

The rest of meml (sampler, log-probs, GRPO) trains this model, so every line of it should be
checkable. One class covers both families: Qwen2 is Llama with a bias on q/k/v (and rope_theta
1e6). Module and parameter names mirror the HF checkpoint (`model.layers.0.self_attn.q_proj.weight`),
so loading is a plain `load_state_dict`; `tests/test_model.py` checks the logits against
`transformers` itself.

Where it departs from the HF code:
- RoPE is applied in fp32 for every model dtype (HF rotates in the model dtype), so bf16 logits
  differ from HF's in the last bits, never in fp32.
- One preallocated `KVCache` with one length for the whole batch: ragged prompts are left-padded,
  and each row gets its own positions from the attention mask (cumsum - 1).
- Every query may attend to its own slot, even a padded one, so no softmax row is ever empty
  and padded rows give finite garbage instead of NaN.
"""
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

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
    """Rotate x [B, heads, T, d] by its positions' angles (cos, sin [B, T, d] fp32), in fp32."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # pairs (i, i + d/2) rotate together
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Decoder blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)  # cast back before the gain, as HF does


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

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, kv_heads, T, d] at slots [length, length+T); return slots [0, length+T)."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # [B, h, T, d]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, kv, T, d]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # [B, kv, S, d], S = past + T
        # GQA: each group of n_heads / n_kv_heads consecutive query heads shares one key/value
        # head. enable_gqa reads the shared head in place (the same result as repeat_interleave
        # on dim 1, without copying the whole cache every step).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=True)  # [B, h, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

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


def attention_mask_4d(attention_mask: torch.Tensor, past: int, T: int) -> torch.Tensor:
    """Boolean [B, 1, T, S] (True = may attend) for T new queries at slots past..past+T-1.

    A query sees real keys at or before its own slot, and always its own slot, so a padded
    query (no real key before it) still has one key and softmax never divides 0 by 0.
    """
    device = attention_mask.device
    query_slot = torch.arange(past, past + T, device=device)[:, None]      # [T, 1]
    key_slot = torch.arange(past + T, device=device)[None, :]              # [1, S]
    allowed = (key_slot <= query_slot) & attention_mask.bool()[:, None, :]  # [B, T, S]
    return (allowed | (key_slot == query_slot))[:, None]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # plain attributes, not buffers: model.to(bfloat16) must not round the frequencies
        self.inv_freq = rope_inv_freq(config)  # [head_dim/2] fp32, CPU
        self.rope_cos = self.rope_sin = None   # [positions, head_dim] fp32, built by rope_tables

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
        """cos and sin of every position's angles, [L, head_dim] fp32, L >= length.

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
            self.rope_cos, self.rope_sin = angles.cos(), angles.sin()
        return self.rope_cos, self.rope_sin

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, w.dtype, w.device)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, return_hidden=False):
        """input_ids [B, T]; attention_mask [B, past + T] (1 real, 0 pad) over cached + new slots.

        Returns logits [B, T, V] in the model dtype, or with return_hidden the final-norm hidden
        states [B, T, H] (logits = hidden @ output_weight.T), so log-probs can skip full logits.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"KV cache was made for batch size {kv_cache.batch_size}, input_ids has {B} rows")
        if kv_cache is not None and past + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} slots; {past} used, {T} more do not fit")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{(B, past + T)} = (batch, cached + new tokens)")
        if attention_mask is None and kv_cache is not None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            else:  # a row's position counts its real tokens only, so left padding does not shift it
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]

        cos_table, sin_table = self.rope_tables(past + T, input_ids.device)
        cos, sin = cos_table[position_ids], sin_table[position_ids]  # [B, T, d] fp32
        # no mask and no cache: plain causal attention, which lets SDPA pick its fastest kernel
        mask = None if attention_mask is None else attention_mask_4d(attention_mask, past, T)

        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        for i, layer in enumerate(self.model.layers):
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
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if config.tie_word_embeddings:
            del expected["lm_head.weight"]  # tied: the head is the embedding, HF does not store it

        state, stored_head = {}, None
        for file, names in checkpoint_files(path).items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in names:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        stored_head = (file, f.get_tensor(name).to(dtype))  # a copy some tied checkpoints keep
                        continue
                    if name not in expected:
                        raise ValueError(f"{file}: unexpected tensor {name!r} (not part of a "
                                         f"{config.model_type} model as config.json describes it)")
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != expected[name]:
                        raise ValueError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)} but "
                                         f"config.json implies {expected[name]}")
                    state[name] = tensor.to(dtype)
        missing = sorted(expected.keys() - state.keys())
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"{path}: checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}; "
                             "do config.json and the safetensors files belong to the same model?")
        if stored_head is not None and not torch.equal(stored_head[1], state["model.embed_tokens.weight"]):
            raise ValueError(f"{stored_head[0]}: lm_head.weight differs from model.embed_tokens.weight but "
                             f"{path / 'config.json'} says tie_word_embeddings=true; set it to false")
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()  # assign=True replaced the embedding parameter; point the head at it again
        return model

    def save_pretrained(self, path):
        """Write config.json + model.safetensors that transformers loads unchanged (atomic per file)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]  # as HF: the tied head is not stored
        dtype = str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        config = {**self.config.to_dict(), "torch_dtype": dtype}
        _atomic_write(path / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        _atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def checkpoint_files(path: Path) -> dict[Path, list[str]]:
    """safetensors file -> tensor names in it, from model.safetensors or model.safetensors.index.json."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {single: list(f.keys())}
    if not index.is_file():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    files = {}
    for name, shard in json.loads(index.read_text())["weight_map"].items():
        files.setdefault(path / shard, []).append(name)
    for shard in files:
        if not shard.is_file():
            raise FileNotFoundError(f"{index}: lists shard {shard.name}, which is not in {path}")
    return files


def _atomic_write(final: Path, write):
    """write(tmp) into a temporary file beside `final`, then rename it over `final` in one step."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
