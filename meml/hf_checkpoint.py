"""The Hugging Face checkpoint layout that `Transformer` loads and saves.

A checkpoint folder holds config.json and the weights as model.safetensors, or as shards listed
in model.safetensors.index.json, each tensor under its HF name
(`model.layers.0.self_attn.q_proj.weight`). Our decoder's names are the same except for one
fused projection (see meml/model.py): `qkv_proj` stacks the rows of q_proj, k_proj and v_proj.
`fuse_projections` and `split_projections` convert between the two; everything else here reads
and writes files, and every error a user can cause names the file and the tensor.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from meml.errors import InputError
from meml.model_config import ModelConfig


QKV = ("q_proj", "k_proj", "v_proj")  # stacked in this order, along the output rows, in qkv_proj


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ours: each layer's q/k/v_proj tensors (weights, and biases if any)
    concatenated into qkv_proj. Other tensors pass through."""
    state = dict(state)
    for name in [n for n in state if ".self_attn.q_proj." in n]:  # model.layers.3.self_attn.q_proj.bias
        prefix, suffix = name.split(".q_proj.")
        state[f"{prefix}.qkv_proj.{suffix}"] = torch.cat([state.pop(f"{prefix}.{p}.{suffix}") for p in QKV])
    return state


def split_projections(state: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """Ours -> HF names, the inverse of fuse_projections. The q/k/v pieces are copies: as views
    of one tensor they would share memory, which safetensors refuses to save (or, in its newer
    versions, has to inspect); they are ~10 % of a layer's weights."""
    rows = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_key_value_heads * c.head_dim)
    split = {}
    for name, tensor in state.items():
        if ".self_attn.qkv_proj." in name:
            prefix, suffix = name.split(".qkv_proj.")
            split.update({f"{prefix}.{p}.{suffix}": piece.clone() for p, piece in zip(QKV, tensor.split(rows))})
        else:
            split[name] = tensor
    return split


def read_tensors(path: Path, expected: dict[str, tuple], config: ModelConfig, dtype, device
                 ) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `path` (HF names), cast to dtype, checked against
    `expected` (name -> shape): an unexpected, misshapen or missing tensor is an error naming it.

    A tied model (config.tie_word_embeddings) expects no lm_head.weight; a stored copy is
    accepted only if it equals the embedding.
    """
    state, stored_head = {}, None
    for file, names in checkpoint_files(path).items():
        with _open_safetensors(file, device) as f:
            for name in names:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    stored_head = (file, f.get_tensor(name).to(dtype))  # a copy some tied checkpoints keep
                    continue
                if name not in expected:
                    raise InputError(f"{file}: unexpected tensor {name!r} (not part of a "
                                     f"{config.model_type} model as config.json describes it)")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != expected[name]:
                    raise InputError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)} but "
                                     f"config.json implies {expected[name]}")
                state[name] = tensor.to(dtype)
    missing = sorted(expected.keys() - state.keys())
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InputError(f"{path}: checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}; "
                         "do config.json and the safetensors files belong to the same model?")
    if stored_head is not None and not torch.equal(stored_head[1], state["model.embed_tokens.weight"]):
        raise InputError(f"{stored_head[0]}: lm_head.weight differs from model.embed_tokens.weight but "
                         f"{path / 'config.json'} says tie_word_embeddings=true; set it to false")
    return state


def _open_safetensors(file: Path, device):
    """safe_open, with a truncated or corrupt file named in the error (the library's own message
    does not say which file it was reading)."""
    try:
        return safe_open(file, framework="pt", device=str(device))
    except SafetensorError as err:
        raise InputError(f"{file}: not a readable safetensors file ({err}); it may be truncated "
                         "or corrupt: copy or download it again") from None


def checkpoint_files(path: Path) -> dict[Path, list[str]]:
    """safetensors file -> tensor names in it, from model.safetensors or model.safetensors.index.json."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        with _open_safetensors(single, "cpu") as f:
            return {single: list(f.keys())}
    if not index.is_file():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    files = {}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{index}: not a safetensors index (a JSON object with a 'weight_map'): {err}") from None
    for name, shard in weight_map.items():
        files.setdefault(path / shard, []).append(name)
    for shard in files:
        if not shard.is_file():
            raise FileNotFoundError(f"{index}: lists shard {shard.name}, which is not in {path}")
    return files


def write_checkpoint(path, state: dict[str, torch.Tensor], config: dict) -> None:
    """config.json + model.safetensors (tensors contiguous, HF names) into `path`, each file
    written atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json(path / "config.json", config)


def write_json(path: Path, obj) -> None:
    """obj as indented JSON in `path`, written atomically (config.json and its siblings)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def atomic_write(final: Path, write):
    """write(tmp) into a temporary file beside `final`, then rename it over `final` in one step."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
