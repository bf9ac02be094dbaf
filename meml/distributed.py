"""Training across processes with torch.distributed: what crosses ranks, in one place.

One process per device, started by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous); a plain `python train.py` is a world of one, where every function here is the
identity and no process group exists. The model is replicated: every rank holds all weights and
the same optimizer state, and stays identical because every rank applies the same update.

What the training step sends across ranks (meml/riel.py, meml/mef.py, meml/evaluation.py):
- RIEL gathers the step's grid of per-rollout figures (`all_gather_tensor`: rewards, lengths,
  finished), from which every rank computes the loss's denominators (completion tokens and rows
  of the step, active E5 questions, buffer target tokens) before any backward, so each rank's
  backward is its exact share of the one global loss (MEF sums its token count, `all_reduce_sum`);
- gradients are summed once per optimizer update (`sum_gradients`), then clipped: the update is
  that of a world of one given the same rollouts;
- the same gathered rewards let every rank fill the hard-example buffer identically, in global
  question order; metrics are sums of numerators and counts (`all_reduce_sum`);
- evaluation results are gathered (`all_gather_objects`) and rank 0 reports them.
Collectives run under the process group's timeout, so a rank that stops answering fails the run
instead of hanging it.

Sharded instead of replicated (`--fsdp`, `shard_model`): PyTorch's FSDP2 (`fully_shard`) splits
every decoder layer's weights, and the embedding, head and final norm, across ranks; a forward
all-gathers a layer's weights and frees them after, a backward reduce-scatters its gradients,
and AdamW keeps only each rank's shard of its states. Three rules keep it the same update as the
replicated model's and keep it from hanging:
- gradients are *summed* over ranks, as `sum_gradients` does (FSDP2's default is the mean);
- every rank runs the same number of forward and backward passes, since each one is a
  collective: `equal_passes` pads a rank's shorter lists of micro-batches, and meml/e7.py makes
  a zero-weight pass for each pad;
- generation runs inside `gathered(model)`: every weight is gathered once and kept until the
  rollouts are done, so decoding (whose number of steps differs by rank) runs no collective.
Checkpoints hold full tensors (`full_state_dict`, `full_optimizer_state`), gathered one tensor at
a time onto rank 0's CPU: the same HF files and trainer_state.pt as a replicated run, so a
sharded run resumes replicated and the other way. A resume shards the model first and then
loads each rank's slices (`load_full_state_dict`).
"""
import contextlib
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
    device = checked_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def device_name(name: str) -> str:
    """--device NAME checked to be a name torch knows (whether or not this machine has it)."""
    try:
        torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    return name


def checked_device(name: str) -> torch.device:
    """--device NAME as a torch.device, or an error naming the flag: a name torch does not know,
    or a CUDA device this machine does not have."""
    device = torch.device(device_name(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this machine has no CUDA device (torch.cuda.is_available() is "
                         f"False, torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def agree(check):
    """Run check() on rank 0 alone (claiming the run folder, choosing or writing a checkpoint)
    and give every rank its result, or stop every rank with the InputError or OSError it raised:
    a refusal is one line on every rank instead of a hang at the next collective. A sync point
    for every rank, as a barrier is."""
    outcome = (None, None)
    if is_main():
        try:
            outcome = (None, check())
        except (InputError, OSError) as err:
            outcome = (str(err), None)
    error, result = all_gather_objects(outcome)[0]
    if error is not None:
        raise InputError(error)
    return result


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


def my_share(items: list, what: str | None = None) -> tuple[list, slice]:
    """This rank's contiguous share of `items` and where it sits in them. With `what` (the flag
    that sets the count) the share must be even: the count must divide by the world size."""
    n, w = len(items), world_size()
    if what is not None and n % w:
        raise InputError(f"{what}: {n} do not split evenly over {w} processes; make it a multiple of {w}")
    where = slice(rank() * n // w, (rank() + 1) * n // w)
    return items[where], where


def shard(items: list, what: str) -> list:
    """This rank's contiguous share of `items`; their number must divide by the world size."""
    return my_share(items, what)[0]


def dealt(items: list) -> list:
    """This rank's items when `items` are dealt round-robin (item k to rank k mod world size)."""
    return items[rank()::world_size()]


def all_reduce_sum(value: float | int | torch.Tensor) -> torch.Tensor:
    """The sum over ranks, as a float64 tensor on the CPU (a world of one: the value itself)."""
    out = torch.as_tensor(value, dtype=torch.float64).clone().cpu()
    if dist.is_initialized():
        out = out.to(_device())
        dist.all_reduce(out)
    return out.cpu()


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` (same shape on every rank) along dim 0, in rank order.
    Input and outputs are made contiguous: NCCL refuses a strided tensor (gloo takes it), and
    `empty_like` of a view such as `x[:, rows].movedim(0, 1)` keeps its strides."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty(t.shape, dtype=t.dtype, device=_device()) for _ in range(world_size())]
    dist.all_gather(parts, t.to(_device()).contiguous())
    return torch.cat([p.to(t.device) for p in parts])


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(values: list[int]) -> list[int]:
    """The element-wise maximum over ranks of a list of integers (the same length everywhere)."""
    out = torch.tensor(values, dtype=torch.long)
    if dist.is_initialized():
        out = out.to(_device())
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.cpu().tolist()


def equal_passes(model, batches: dict[str, list]) -> dict[str, list]:
    """FSDP2's rule for a step's micro-batches: every forward and backward of a sharded model is
    a collective, so every rank must make as many passes of each kind as the busiest rank. Each
    list of micro-batches is padded with None (the caller makes a pass with weight 0 for each)
    to the longest over ranks. A replicated model waits only at the gradient sum: unchanged."""
    if not dist.is_initialized() or not is_sharded(model):
        return batches
    most = all_reduce_max([len(v) for v in batches.values()])
    return {kind: v + [None] * (m - len(v)) for (kind, v), m in zip(batches.items(), most)}


def sum_gradients(model) -> None:
    """Sum every parameter's gradient over ranks (a rank that scored nothing contributes
    zeros), in one flattened all-reduce. A sharded model's gradients were summed by FSDP2's
    reduce-scatter already."""
    if not dist.is_initialized() or is_sharded(model):
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


# ---------------------------------------------------------------------------------------------
# FSDP2 (--fsdp)

def shard_model(model, compute_dtype: torch.dtype = torch.float32) -> None:
    """Shard `model` (meml.model.Transformer) across the ranks with FSDP2: one unit per decoder
    layer, and the root (embedding, final norm, head) as one more. Gradients are summed, not
    averaged (every rank's loss is already its share of the one global loss). Under bf16
    compute, a MixedPrecisionPolicy all-gathers the weights in bf16 (half the traffic of the
    fp32 masters) and reduces gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if world_size() == 1:
        raise InputError("--fsdp shards the model across torchrun's processes; a world of one has nothing "
                         "to shard (start it with torchrun --nproc_per_node N, N > 1)")
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype != torch.float32 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for unit in _fsdp_units(model):
        unit.set_gradient_divide_factor(1.0)        # a sum ...
        unit.set_force_sum_reduction_for_comms(True)  # ... as a plain SUM (gloo has no pre-scaled one)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model):
    """Inside: a sharded model holds all its weights, gathered once on entry and freed on exit,
    so forwards in between (decoding, whose steps differ by rank) run no collective. Every rank
    must enter it at the same point. Nothing for a replicated model."""
    if not dist.is_initialized() or not is_sharded(model):
        yield
        return
    units = _fsdp_units(model)
    layers = [u for u in units if u is not model]  # the root keeps its weights after a forward anyway
    for unit in units:
        unit.unshard()
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()


def _full(value):
    """A sharded tensor (DTensor) gathered whole on every rank; anything else as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _to_rank0_cpu(value):
    """A tensor whole on rank 0's CPU, None on the other ranks. A sharded one is gathered alone
    (one tensor's worth of device memory at a time, freed as soon as it is copied), never the
    whole model at once on every rank: ~18.6 GB per rank at 1.5B with AdamW, ~84 GB at 7B."""
    if not torch.is_tensor(value):
        return value
    whole = _full(value)
    return whole.detach().cpu() if is_main() else None


def full_state_dict(model) -> dict:
    """The model's state dict as whole tensors on rank 0's CPU, {} on the other ranks (a
    collective under FSDP: every rank calls it; rank 0 writes checkpoints)."""
    gathered = {name: _to_rank0_cpu(t) for name, t in model.state_dict().items()}
    return gathered if is_main() else {}


def full_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with whole tensors on rank 0's CPU, what a replicated run saves;
    the other ranks' copy holds no tensors (every rank calls it)."""
    state = optimizer.state_dict()
    return {"state": {i: {k: _to_rank0_cpu(v) for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_full_state_dict(model, weights: dict) -> None:
    """Load whole tensors (every rank read the same file, onto its CPU) into `model`: a sharded
    model takes each rank's slice of each tensor, with no communication and without ever
    holding the whole model on the device; a replicated one loads them as they are."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = model.state_dict()
    if not any(isinstance(p, DTensor) for p in params.values()):
        model.load_state_dict(weights)
        return
    missing = params.keys() - weights.keys()
    if missing:
        raise InputError(f"the checkpoint's weights lack {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            whole = weights[name].to(device=p.device, dtype=p.dtype)
            shard = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())
            del whole, shard


def shard_optimizer_state(state: dict, optimizer) -> dict:
    """A saved (whole-tensor) optimizer state cut to this rank's shards of a sharded model's
    parameters, ready for optimizer.load_state_dict (no communication: every rank read the
    same file). A replicated model's state is returned as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return state
    out = {}
    for i, s in state["state"].items():
        p = params[i]
        out[i] = {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                  if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                  for k, v in s.items()}
    return {"state": out, "param_groups": state["param_groups"]}
