"""Training checkpoints that are written atomically and resume exactly.

A checkpoint is a folder `checkpoint-000012/` inside the run folder holding
- the model in Hugging Face layout (config.json + model.safetensors) and the tokenizer files,
  so `evaluate.py --model` and `transformers` load it as they would any checkpoint;
- `meml_run.json`: the run's data set, expert prompts and held-out question ids (evaluate.py);
- `trainer_state.pt`: optimizer state, every random generator's state, the hard-example
  buffer, the data position and the step, i.e. everything a resumed run needs to take the same
  path as an uninterrupted one; and the fp32 master weights when the HF files hold a lower
  precision (a bf16 checkpoint of a mixed-precision run).

Atomicity: everything is written into a hidden temporary folder beside the final one, flushed
to disk, and only then renamed into place. A run killed mid-write leaves at most a stray
temporary folder, which `latest_checkpoint` ignores; the previous checkpoint stays intact. A
write that fails (a full disk above all) removes its temporary folder and says so in one line;
the previous checkpoint stays the newest.

Which checkpoint a resume takes (`loadable_checkpoint`): the newest one whose trainer state and
model files can be read. A newer one that cannot (truncated, empty, garbage) is renamed
`<name>.unreadable`, kept for a look but out of the rotation, and named with the reason.
"""
import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch

from meml import distributed, lora
from meml.errors import InputError
from meml.hf_checkpoint import checkpoint_files

TRAINER_STATE = "trainer_state.pt"
# Everything `meml.tokenizer.Tokenizer.from_pretrained` reads (chat_template.jinja wins over the
# template in tokenizer_config.json when present), copied from the checkpoint training started from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
# What evaluate.py needs to score a checkpoint as its run did: the data set, the experts' system
# prompts and the held-out questions. Written by train.py into the run folder, copied into every
# checkpoint so that a checkpoint moved elsewhere still knows.
RUN_INFO = "meml_run.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, model, tokenizer_dir: Path, trainer_state: dict,
                    keep: int = 2, dtype: torch.dtype | None = None, weights: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically, the HF files in `dtype` (None: the weights' own);
    keep only the newest `keep` checkpoints. weights: the model's state dict as whole tensors,
    when the model itself holds shards (meml.distributed.full_state_dict)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".checkpoint-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp, dtype=dtype, state=weights)  # with LoRA: the merged model
        if lora.adapters(model):  # and the adapters in the layout peft reads
            lora.save_adapters(model, tmp, **model.lora_settings)
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        if (run_dir / RUN_INFO).exists():
            shutil.copyfile(run_dir / RUN_INFO, tmp / RUN_INFO)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        _fsync_tree(tmp)
    except Exception as err:
        # A full disk surfaces as ENOSPC, or as the writer's own error (safetensors, torch.save's
        # "unexpected pos") with the disk found full: either way one line, and no partial folder.
        full = _is_disk_full(err, run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        newest = latest_checkpoint(run_dir)
        raise InputError(f"no space left on {run_dir}: {final.name} was not written (its partial copy is "
                         f"removed); the newest checkpoint is still {newest.name if newest else 'none'}. "
                         f"Free space, then continue with --resume {run_dir}") from None
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in the run folder, oldest first (temporary folders are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name)) and (p / TRAINER_STATE).exists()]
    return [p for _, p in sorted(found)]


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC anywhere in the exception's chain, or less than 1 MiB free where it was writing."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__cause__ or err.__context__
    try:
        return shutil.disk_usage(folder).free < 2 ** 20
    except OSError:
        return False


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(checkpoint_dir: Path) -> dict:
    """trainer_state.pt of a checkpoint, onto the CPU (a rank moves what it needs to its device);
    a file that cannot be read is an InputError naming it."""
    path = Path(checkpoint_dir) / TRAINER_STATE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {checkpoint_dir} is not a complete meml "
                                f"checkpoint (expected config.json, model.safetensors, {TRAINER_STATE})")
    try:  # memory-mapped: ranks on one node share the page cache instead of a copy each
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as err:  # noqa: BLE001 -- damaged bytes raise whatever the unpickler meets first
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise InputError(f"{path}: unreadable ({first_line})") from None
    if not (isinstance(state, dict) and {"stage", "step", "optimizer"} <= state.keys()):
        raise InputError(f"{path}: not a meml trainer state (no stage, step and optimizer)")
    return state


def loadable_checkpoint(run_dir: Path, print_fn=print) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of the run folder that can be read, and its trainer state; newer
    ones that cannot are named with the reason and renamed <name>.unreadable. Rank 0 decides and
    every rank loads the one it chose. Checkpoints that exist but none readable is an error
    (nothing is renamed): a resume never silently starts a run over."""
    def choose():
        skipped = []
        for checkpoint in reversed(list_checkpoints(run_dir)):
            try:
                load_trainer_state(checkpoint)
                checkpoint_files(checkpoint)  # opens each safetensors file's header
                return checkpoint.name, skipped
            except (InputError, OSError) as err:
                print_fn(f"skipping {checkpoint.name}: {err}")
                skipped.append(checkpoint.name)
        if skipped:
            raise InputError(f"no checkpoint in {run_dir} can be read ({', '.join(skipped)}: see above); "
                             "nothing was changed")
        return None, skipped
    name, skipped = distributed.agree(choose)
    if name is None:
        return None, None
    distributed.agree(lambda: [os.rename(run_dir / s, run_dir / f"{s}.unreadable") for s in skipped])
    return Path(run_dir) / name, load_trainer_state(Path(run_dir) / name)


def read_run_info(checkpoint_dir: Path) -> dict | None:
    """The run information a checkpoint carries (see RUN_INFO), or None for other checkpoints."""
    path = Path(checkpoint_dir) / RUN_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not the JSON object train.py writes ({err})") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: not the JSON object train.py writes")
    return info
