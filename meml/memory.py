"""Will it fit? The bytes a run needs on each device, known before any weight is loaded.

`train.py --plan` prints this table and stops; every run prints its one-line total at start, and
on a GPU a run whose micro-batch would not fit takes the largest one that does (micro-batching
changes memory only, not the gradient). The terms, per device (P parameters, W = world size
under --fsdp, else 1; b(x) the bytes of dtype x):

  weights          P b(weights) / W           fp32 masters, or bf16 with --bf16-weights
  gradients        P b(weights) / W
  AdamW states     2 P b(weights) / W         exp_avg and exp_avg_sq
  reference model  P b(compute)               E4 (β > 0): the policy as RIEL starts, not sharded
  With --lora-rank the weights are P b(compute) plus the adapters' L fp32 parameters, and the
  gradients and AdamW states are those of the L adapter parameters alone; E4's reference is the
  same model with the adapters off (no bytes).
  then the larger of the two phases of a step:
  rollouts         the bf16 copy generation runs on (P b(compute), mixed precision), the KV cache
                   of one sampler call (rows x tokens x layers x 2 x kv_heads x head_dim x
                   b(compute)) and its [rows, V] fp32 sampling buffers
  update           the activations autograd keeps for one micro-batch: tokens x layers x the
                   bytes one decoder layer saves per token (`layer_bytes_per_token`, measured by
                   running one layer of the model's shape on fake tensors: no memory, the code's
                   own saved tensors) and the attention mask; the weights' bf16 casts autocast
                   keeps for the backward (P b(compute)); the LM head's fp32 logit chunk

A micro-batch holds `micro_batch_size` rows of prompt + completion tokens (the prompt counted
in full: a conservative bound, since rows that share a prompt run it once). With activation
checkpointing a layer keeps only its input per token, and one layer's activations are rebuilt
at a time in the backward. tests/test_memory.py checks every term against the tensors a real
step holds (tiny shape) and against a whole forward on fake tensors at the Qwen2.5-0.5B and
1.5B shapes, within 15 %. `fit` prints a run's peak at start and, on a GPU, picks its
micro-batch; `settings_for` reads a run's Settings from its task and config.
"""
import os
import sys
from dataclasses import dataclass, replace

import torch

from meml import distributed
from meml.logprob import CHUNK_ELEMENTS
from meml.lora import TARGETS as LORA_TARGETS
from meml.model import ModelConfig

GB = 1e9
PROBE_TOKENS = 64  # tokens of the one-layer fake forward that measures a token's activations


def bytes_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parameter_count(c: ModelConfig) -> int:
    attention = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim \
        + c.num_attention_heads * c.head_dim * c.hidden_size
    bias = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim if c.attention_bias else 0
    layer = attention + bias + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * layer + embeddings + c.hidden_size


def lora_parameter_count(c: ModelConfig, rank: int, targets) -> int:
    """The adapters' parameters: r (in + out) for every target projection of every layer."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    H, inter = c.hidden_size, c.intermediate_size
    shapes = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H), "gate_proj": (H, inter),
              "up_proj": (H, inter), "down_proj": (inter, H)}
    return c.num_hidden_layers * sum(rank * sum(shapes[t]) for t in targets)


def layer_bytes_per_token(c: ModelConfig, compute: torch.dtype) -> float:
    """What autograd keeps per token in one decoder layer's forward, found by running one layer
    of this shape on fake tensors (FakeTensorMode: shapes only, no memory) under
    saved_tensors_hooks, at two lengths: the difference per token leaves out what does not grow
    with the tokens (autocast's casts of the layer's weights, counted on their own)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from meml.model import DecoderLayer

    def saved(tokens: int) -> int:
        with FakeTensorMode():
            layer = DecoderLayer(c)
            weights = {p.untyped_storage()._cdata for p in layer.parameters()}
            found = {}

            def keep(t):
                storage = t.untyped_storage()
                if storage._cdata not in weights:
                    found[storage._cdata] = storage.nbytes()
                return t
            x = torch.empty(1, tokens, c.hidden_size, requires_grad=True)
            cos = torch.empty(1, 1, tokens, c.head_dim)
            with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32), \
                    torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                layer(x, cos, cos, None, None, 0)
        return sum(found.values())
    return (saved(2 * PROBE_TOKENS) - saved(PROBE_TOKENS)) / PROBE_TOKENS


@dataclass
class Settings:
    """What a run's memory depends on besides the model's shape."""
    weights: torch.dtype = torch.float32   # --bf16-weights: bfloat16
    compute: torch.dtype = torch.float32   # --dtype
    shards: int = 1                        # world size under --fsdp
    reference: bool = False                # β > 0
    micro_batch_size: int = 64
    rollout_rows: int = 256                # rows of one sampler call
    prompt_tokens: int = 256               # the longest prompt
    completion_tokens: int = 256           # --max-new-tokens (or the longest MEF answer)
    activation_checkpointing: bool = False
    lora_rank: int = 0                     # --lora-rank: only the adapters train (fp32, with AdamW)
    lora_targets: tuple = ()


def plan(c: ModelConfig, s: Settings) -> dict[str, int]:
    """Bytes per device of each term (see the module's docstring), and their peak as "total"."""
    n = parameter_count(c)
    w, b = bytes_of(s.weights), bytes_of(s.compute)
    mixed = s.compute != s.weights
    tokens = s.prompt_tokens + s.completion_tokens
    per_layer = layer_bytes_per_token(c, s.compute)
    rows_tokens = s.micro_batch_size * tokens
    if s.activation_checkpointing:  # each layer keeps its input; one layer is rebuilt at a time
        layers = rows_tokens * (c.num_hidden_layers * c.hidden_size * b + per_layer)
    else:
        layers = rows_tokens * c.num_hidden_layers * per_layer
    mask = s.micro_batch_size * s.completion_tokens * tokens * w    # additive [B, 1, T, S]
    logits = 3 * CHUNK_ELEMENTS * 4                                 # the LM head's fp32 chunk
    trained, t = (n, w) if not s.lora_rank else (lora_parameter_count(c, s.lora_rank, s.lora_targets), 4)
    out = {
        "weights": n * w // s.shards + (trained * t if s.lora_rank else 0),  # LoRA: and the adapters
        "gradients": trained * t // s.shards,
        "AdamW states": 2 * trained * t // s.shards,
        "reference model": n * b if s.reference and not s.lora_rank else 0,  # LoRA: the adapters off
        "rollouts: bf16 weights copy": n * b if mixed else 0,
        "rollouts: KV cache": s.rollout_rows * tokens * c.num_hidden_layers * 2 * c.num_key_value_heads
        * c.head_dim * b,
        "rollouts: sampling buffers": 4 * s.rollout_rows * c.vocab_size * 4,
        "update: saved activations": int(layers) + mask,
        "update: autocast weight casts": n * b if mixed else 0,
        "update: LM-head logit chunk": logits,
    }
    static = sum(v for k, v in out.items() if ":" not in k)
    rollouts = sum(v for k, v in out.items() if k.startswith("rollouts"))
    update = sum(v for k, v in out.items() if k.startswith("update"))
    out["total"] = static + max(rollouts, update)
    return out


def device_bytes(device: torch.device) -> int:
    """The memory a run can use on `device`: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fitting_micro_batch(c: ModelConfig, s: Settings, budget: int) -> int | None:
    """The largest micro-batch size, halving from s.micro_batch_size, whose plan fits 90 % of
    budget; None if not even one row does."""
    size = s.micro_batch_size
    while size >= 1:
        if plan(c, Settings(**{**s.__dict__, "micro_batch_size": size}))["total"] <= 0.9 * budget:
            return size
        size //= 2
    return None


def advice(c: ModelConfig, s: Settings, budget: int) -> list[str]:
    """What to change when the plan exceeds the budget, each with the total it would give."""
    def total(**change):
        return plan(c, Settings(**{**s.__dict__, **change}))["total"]
    out = []
    fits = fitting_micro_batch(c, s, budget)
    if fits is not None and fits < s.micro_batch_size:
        out.append(f"--micro-batch-size {fits}: {size(total(micro_batch_size=fits))}")
    if not s.activation_checkpointing:
        out.append(f"--activation-checkpointing: {size(total(activation_checkpointing=True))}")
    if not s.lora_rank:  # LoRA runs replicated (its weights are already in the compute dtype)
        out.append(f"--fsdp under torchrun --nproc_per_node 8: {size(total(shards=8 * s.shards))} per device")
        lora = total(lora_rank=16, lora_targets=LORA_TARGETS, weights=s.compute, reference=False)
        out.append(f"--lora-rank 16: {size(lora)} (only the adapters train)")
    if s.weights == torch.float32 and s.compute == torch.bfloat16 and not s.lora_rank:
        out.append(f"--bf16-weights: {size(total(weights=torch.bfloat16))} (small updates are lost; "
                   "see its help)")
    return out


def size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


def format_plan(c: ModelConfig, s: Settings, budget: int, where: str) -> str:
    terms = plan(c, s)
    lines = [f"memory plan per device ({parameter_count(c) / 1e6:.2f}M parameters, compute {s.compute}, "
             f"weights {s.weights}, micro-batch {s.micro_batch_size} x {s.prompt_tokens}+{s.completion_tokens} "
             f"tokens, rollout batch {s.rollout_rows}{', FSDP over ' + str(s.shards) if s.shards > 1 else ''}"
             f"{', activation checkpointing' if s.activation_checkpointing else ''}):"]
    lines += [f"  {name:<32}{size(value):>12}" for name, value in terms.items() if name != "total" and value]
    lines.append(f"  {'peak':<32}{size(terms['total']):>12} of {size(budget)} ({where})")
    if terms["total"] > 0.9 * budget:
        lines.append("  does not fit; each of these would give:")
        lines += [f"    {a}" for a in advice(c, s, budget)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A run's plan (train.py)

def settings_for(task, cfg, precision) -> Settings:
    """The plan's view of a run (a meml.task.Task, its TrainConfig and Precision): precision,
    sharding and sizes, the longest prompt and completion (a generated one or a MEF answer)."""
    world = distributed.world_size() if distributed.world_size() > 1 else int(os.environ.get("WORLD_SIZE", "1"))
    r = cfg.riel
    rows = r.questions_per_step * len(task.system_prompts) * r.group_size // world if cfg.run_riel else 0
    completion = max(r.max_new_tokens if cfg.run_riel else 0, task.longest_answer if cfg.run_mef else 0,
                     cfg.eval_max_new_tokens)
    return Settings(weights=precision.compute if cfg.lora_rank else precision.weights, compute=precision.compute,
                    shards=world if cfg.fsdp else 1, reference=cfg.run_riel and r.beta > 0,
                    micro_batch_size=r.micro_batch_size, rollout_rows=max(1, min(r.rollout_batch_size, rows)),
                    prompt_tokens=task.longest_prompt, completion_tokens=completion,
                    activation_checkpointing=cfg.activation_checkpointing, lora_rank=cfg.lora_rank,
                    lora_targets=tuple(cfg.lora_targets.split(",")))


def fit(task, cfg, precision, device, given):
    """Print the plan's peak, and return cfg fitted to the device: on a GPU, when
    --micro-batch-size was not given (`given`: the parsed flags, None where not named) and the
    default does not fit, the largest micro-batch that does (the gradient is the same, only
    memory changes), with activation checkpointing if not even one row fits without it."""
    c, settings = task.model.config, settings_for(task, cfg, precision)
    budget = device_bytes(device)
    peak = plan(c, settings)["total"]
    chosen = ""
    if device.type == "cuda" and peak > 0.9 * budget and getattr(given, "riel.micro_batch_size") is None:
        rows = fitting_micro_batch(c, settings, budget)
        if rows is None and getattr(given, "activation_checkpointing") is None:
            settings.activation_checkpointing = True
            rows = fitting_micro_batch(c, settings, budget)
            settings.activation_checkpointing = rows is not None
            cfg = replace(cfg, activation_checkpointing=rows is not None)
        if rows is not None:
            settings.micro_batch_size = rows
            cfg = replace(cfg, riel=replace(cfg.riel, micro_batch_size=rows))
            peak = plan(c, settings)["total"]
            chosen = (f"; took --micro-batch-size {rows}"
                      f"{' with activation checkpointing' if cfg.activation_checkpointing else ''} to fit")
    print(f"memory plan: {size(peak)} per device of {size(budget)} on {device}{chosen} "
          "(train.py --plan for the terms)")
    if peak > 0.9 * budget:
        print("memory plan: this run may not fit; " + "; ".join(advice(c, settings, budget)), file=sys.stderr)
    return cfg
