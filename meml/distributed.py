"""Training across processes with torch.distributed: what crosses ranks, in one place.

One process per device, started by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous); a plain `python train.py` is a world of one, where every function here is the
identity and no process group exists. The model is replicated: every rank holds all weights and
the same optimizer state, and stays identical because every rank applies the same update.

What the training step sends across ranks (meml/riel.py, meml/mef.py, meml/evaluation.py):
- the loss's denominators (completion tokens and rows of the step, active E5 questions, buffer
  target tokens) are summed over ranks before any backward (`all_reduce_sum`), so each rank's
  backward is its exact share of the one global loss;
- gradients are summed once per optimizer update (`sum_gradients`), then clipped: the update is
  that of a world of one given the same rollouts;
- RIEL's rewards are gathered so every rank fills the hard-example buffer identically, in global
  question order (`all_gather_tensor`); metrics are sums of numerators and counts;
- evaluation results are gathered (`all_gather_objects`) and rank 0 reports them.
Collectives run under the process group's timeout, so a rank that stops answering fails the run
instead of hanging it.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

from meml.errors import InputError

TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("MEML_DIST_TIMEOUT_MIN", "30")))


def init(device: str) -> torch.device:
    """Join the process group torchrun describes (nothing for a world of one): NCCL on CUDA,
    gloo on CPU. Returns the device this rank uses (on CUDA, device LOCAL_RANK). Every rank
    computes; only rank 0 prints, so the other ranks' standard output is dropped."""
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def finish(exit_code: int) -> int:
    """The end of a run on every rank: leave the process group and, when there was one, leave
    the process at once with exit_code (a world of one just returns it).

    Why not a normal exit: gloo's worker threads can outlive destroy_process_group and abort
    the interpreter's finalisation (SIGABRT, "terminate called without an active exception";
    seen in 2 of ~20 two-process runs here, under load), which torchrun then reports as a
    failed run although its work is done and written. Output is flushed first."""
    if not dist.is_initialized():
        return exit_code
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(items: list, what: str) -> list:
    """This rank's contiguous share of `items`; their number must divide by the world size."""
    n, w = len(items), world_size()
    if n % w:
        raise InputError(f"{what}: {n} do not split evenly over {w} processes; make it a multiple of {w}")
    return items[rank() * n // w:(rank() + 1) * n // w]


def all_reduce_sum(value: float | int | torch.Tensor) -> torch.Tensor:
    """The sum over ranks, as a float64 tensor on the CPU (a world of one: the value itself)."""
    out = torch.as_tensor(value, dtype=torch.float64).clone().cpu()
    if dist.is_initialized():
        out = out.to(_device())
        dist.all_reduce(out)
    return out.cpu()


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` (same shape on every rank) along dim 0, in rank order."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t, device=_device()) for _ in range(world_size())]
    dist.all_gather(parts, t.to(_device()))
    return torch.cat([p.to(t.device) for p in parts])


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_gradients(model) -> None:
    """Sum every parameter's gradient over ranks (a rank that scored nothing contributes
    zeros), in one flattened all-reduce."""
    if not dist.is_initialized():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _device() -> torch.device:
    """Where collectives run: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
