"""The Hugging Face config.json this decoder supports: read it, check it, write it back.

Qwen2 / Qwen2.5 and Llama 3.x configs, in transformers' 4.x keys (rope_theta, rope_scaling) or
5.x keys (rope_parameters). Anything the decoder in meml/model.py would silently get wrong is
refused with the file and the field named, rather than loaded and run differently.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from meml.errors import InputError

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    model_type: str                # "qwen2" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None   # None, or {"rope_type": "llama3", *LLAMA3_ROPE_KEYS}
    attention_bias: bool = False       # bias on q/k/v (Qwen2: always)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found (expected a Hugging Face model folder)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        """Read a transformers config (v4 keys rope_theta/rope_scaling or v5 rope_parameters).

        Anything this decoder would silently get wrong (another architecture or activation, MLP
        bias, sliding-window layers, a RoPE type other than default/llama3), and sizes that are
        not positive integers or heads that do not divide, are an InputError naming the source
        file and the field.
        """
        def unsupported(field, why):
            return InputError(f"{source}: {field}={raw.get(field)!r} is not supported: {why}")

        def need(field):
            if raw.get(field) is None:
                raise InputError(f"{source}: required field {field!r} is missing")
            return raw[field]

        def count(field, value=None):  # a size: a positive integer (not a bool, not "896")
            value = need(field) if value is None else value
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{source}: {field}={value!r} must be a positive integer")
            return value

        def number(field, value):  # a float field ("1e-6" as a string is refused, not parsed)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise InputError(f"{source}: {field}={value!r} must be a positive number")
            return float(value)

        if not isinstance(raw, dict):
            raise InputError(f"{source}: expected a JSON object")

        model_type = need("model_type")
        if model_type not in ARCHITECTURES:
            raise unsupported("model_type", f"only {sorted(ARCHITECTURES)}")
        if raw.get("hidden_act", "silu") != "silu":
            raise unsupported("hidden_act", "only 'silu' (SwiGLU MLP)")
        if raw.get("mlp_bias"):
            raise unsupported("mlp_bias", "MLP projections have no bias here")
        if model_type == "llama" and raw.get("attention_bias"):
            raise unsupported("attention_bias", "Llama with attention biases (on o_proj too) is not implemented")
        if raw.get("use_sliding_window"):
            raise unsupported("use_sliding_window", "only full causal attention")
        if any(t != "full_attention" for t in raw.get("layer_types") or []):
            raise unsupported("layer_types", "only 'full_attention' layers")

        # RoPE: v5 writes rope_parameters = {rope_theta, rope_type, ...}; v4 rope_theta + rope_scaling.
        rope_field = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise unsupported(rope_field, "per-layer-type RoPE settings")
        rope_theta = number("rope_theta", rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise unsupported(rope_field, "partial_rotary_factor must be 1")
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
            if missing:
                raise unsupported(rope_field, f"llama3 RoPE needs {missing}")
            rope_scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS}}
        else:
            raise unsupported(rope_field, f"rope type {rope_type!r}; only 'default' and 'llama3'")

        hidden, heads = count("hidden_size"), count("num_attention_heads")
        kv_heads = count("num_key_value_heads", raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise unsupported("num_key_value_heads", f"must divide num_attention_heads={heads}")
        head_dim = count("head_dim", raw.get("head_dim") or hidden // heads)
        if head_dim % 2:
            raise unsupported("head_dim", "RoPE rotates pairs of dimensions: it must be even")
        return cls(
            model_type=model_type, vocab_size=count("vocab_size"), hidden_size=hidden,
            intermediate_size=count("intermediate_size"), num_hidden_layers=count("num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=number("rms_norm_eps", raw.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
            rope_scaling=rope_scaling, attention_bias=model_type == "qwen2",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=count("max_position_embeddings", raw.get("max_position_embeddings", 32768)),
            bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"))

    def to_dict(self) -> dict:
        """The config.json transformers expects (v4 keys, which v5 also reads)."""
        d = asdict(self)
        if self.model_type == "qwen2":
            del d["attention_bias"]  # Qwen2 has no such key: its q/k/v bias is fixed
        return {"architectures": [ARCHITECTURES[self.model_type]], "hidden_act": "silu", **d}
