"""Low-rank adapters (LoRA) on meml's own Linear: y = W x + (α/r)·B A x, and only A and B train.

With `--lora-rank r` every target projection keeps its weight W frozen and learns A [r, in] and
B [out, r] (B starts at 0, so training starts from the model as it is; A as peft initialises it,
Kaiming-uniform). The weights can stay bf16 and AdamW holds states for the adapters alone. The
fused qkv_proj (meml/model.py) carries one adapter per part it fuses, q_proj, k_proj and v_proj,
as a checkpoint of the unfused model has them, so the adapters are the ones peft would train.

Checkpoints hold the merged model, W + (α/r)·B A, in Hugging Face layout (what evaluate.py and
transformers load), and the adapters in the layout peft reads (`adapter_config.json` and
`adapter_model.safetensors`, `save_adapters`). E4's reference model, when β > 0, is the same
model with the adapters switched off (`WithoutAdapters`): no second copy of the weights.
"""
import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRA(nn.Module):
    """The adapters of one Linear: per output part (q, k, v of qkv_proj; the whole output of any
    other projection) A [r, in] and B [rows, r]; parts that are not targets get none (zeros)."""

    def __init__(self, in_features: int, parts: dict[str, int], targets, rank: int, alpha: float):
        super().__init__()
        self.parts, self.scale, self.enabled = dict(parts), alpha / rank, True
        self.A = nn.ParameterDict({n: nn.Parameter(torch.empty(rank, in_features)) for n in parts if n in targets})
        self.B = nn.ParameterDict({n: nn.Parameter(torch.zeros(rows, rank))
                                   for n, rows in parts.items() if n in targets})
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r)·B A x for every part, zeros where a part has no adapter: [..., out]."""
        outs = [(x @ self.A[n].T.to(x.dtype)) @ self.B[n].T.to(x.dtype) if n in self.A
                else x.new_zeros(*x.shape[:-1], rows) for n, rows in self.parts.items()]
        return self.scale * torch.cat(outs, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B A as one [out, in] matrix: what merging adds to W."""
        a = next(iter(self.A.values()))
        blocks = [self.B[n] @ self.A[n] if n in self.A else a.new_zeros(rows, a.shape[1])
                  for n, rows in self.parts.items()]
        return self.scale * torch.cat(blocks, dim=0)


def add_lora(model, rank: int, alpha: float, targets=TARGETS) -> list[str]:
    """Freeze every weight of `model` (meml.model.Transformer) and give each target projection
    its adapters. Returns the names of the projections that got them."""
    from meml.model import Linear
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"--lora-targets {sorted(unknown)}: not a projection (one of {', '.join(TARGETS)})")
    model.requires_grad_(False)
    c, adapted = model.config, []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parts = ({"q_proj": c.num_attention_heads * c.head_dim, "k_proj": c.num_key_value_heads * c.head_dim,
                  "v_proj": c.num_key_value_heads * c.head_dim} if leaf == "qkv_proj" else {leaf: module.out_features})
        if set(parts) & set(targets):
            module.lora = LoRA(module.in_features, parts, targets, rank, alpha).to(module.weight.device)
            adapted.append(name)
    model.lora_settings = {"rank": rank, "alpha": alpha, "targets": list(targets), "base": ""}
    return adapted


def adapters(model) -> dict:
    """name -> LoRA module, for every adapted projection of `model`."""
    return {name[:-len(".lora")]: m for name, m in model.named_modules() if isinstance(m, LoRA)}


@contextlib.contextmanager
def adapters_off(model):
    """The model as its frozen weights alone compute it (E4's reference when β > 0)."""
    found = adapters(model).values()
    for m in found:
        m.enabled = False
    try:
        yield
    finally:
        for m in found:
            m.enabled = True


class WithoutAdapters:
    """`model` with its adapters off, where a reference model is expected: E4's π_ref."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def merged_state(model, state: dict) -> dict:
    """`state` (the model's state dict) with every adapted weight merged, W + (α/r)·B A, and the
    adapters' own tensors left out: the plain model's state dict."""
    out = {k: v for k, v in state.items() if ".lora." not in k}
    with torch.no_grad():
        for name, m in adapters(model).items():
            weight = out[f"{name}.weight"]
            # in fp32 whatever W's dtype: a bf16 W + (α/r)·B A rounds most of a small update away
            out[f"{name}.weight"] = weight.float() + m.delta_weight().float().to(weight.device)
    return out


def peft_state(model) -> dict[str, torch.Tensor]:
    """The adapters under peft's names: base_model.model.<HF module>.lora_A.weight / lora_B.weight."""
    out = {}
    for name, m in adapters(model).items():
        for part in m.A:
            module = name.rsplit(".", 1)[0] + "." + part  # qkv_proj's parts are q/k/v_proj in HF
            out[f"base_model.model.{module}.lora_A.weight"] = m.A[part].detach().float().cpu().contiguous()
            out[f"base_model.model.{module}.lora_B.weight"] = m.B[part].detach().float().cpu().contiguous()
    return out


def save_adapters(model, folder: Path, rank: int, alpha: float, targets, base: str) -> None:
    """adapter_config.json + adapter_model.safetensors, as peft writes them for a LoRA of a
    causal LM (fp32 tensors: also what an exact resume reads back)."""
    folder = Path(folder)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "base_model_name_or_path": base, "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": None, "use_rslora": False, "use_dora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_file(peft_state(model), str(folder / "adapter_model.safetensors"))


def load_adapters(model, state: dict[str, torch.Tensor]) -> None:
    """Put peft-named adapter tensors (`peft_state`'s layout) back into `model`'s adapters."""
    with torch.no_grad():
        for name, m in adapters(model).items():
            for part in m.A:
                module = "base_model.model." + name.rsplit(".", 1)[0] + "." + part
                m.A[part].copy_(state[f"{module}.lora_A.weight"])
                m.B[part].copy_(state[f"{module}.lora_B.weight"])
