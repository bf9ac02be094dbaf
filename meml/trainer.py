"""What every training stage shares: the loop, the log, checkpoints, resume and the NaN guard.

MEF (meml/mef.py) and RIEL (meml/riel.py) each provide one function, `step_fn(step)`, that
builds its batch for that step, computes the loss, calls backward and yields its metrics:
once per optimizer update, so once for MEF and μ times for RIEL's `--num-iterations μ` (several
updates on one rollout batch). This loop does the rest the way a user of TRL or nanoGPT expects:

- a progress line (step, rewards, loss parts, tokens/s, ETA) and one JSON line of metrics per
  step in `metrics.jsonl` (loss parts, clip ratio and gradient norm averaged over the step's
  updates; everything else from its last);
- gradient clipping and an AdamW step after each update's backward;
- a loss that is NaN or infinite stops the run *before* the optimizer touches the weights, with
  a message naming the step and the loss parts; the last good checkpoint stays as it was;
- a checkpoint every `save_every` steps and at the end of the stage, written atomically
  (meml/checkpoint.py), holding what `resume` needs to continue bit-for-bit: the optimizer, the
  random generators and whatever state the stage hands over (buffer, counters).

Mixed precision (`Stage.compute_dtype = torch.bfloat16`): the step runs under torch.autocast, so
matmuls and attention run in bf16 while the weights, AdamW's states, RMSNorm statistics, RoPE and
every log-softmax stay fp32, what TRL, verl and nanochat call bf16 training. Small updates
survive: at lr 1e-6 a bf16 *weight* would round most AdamW updates away (bf16 keeps 8 bits of
mantissa, so an update below ~2^-9 of the weight is lost), an fp32 master weight does not. The
HF model files of a checkpoint can still be bf16 (`Stage.save_dtype`); the fp32 masters then go
into trainer_state.pt, so a resumed run continues from exactly the weights it had.

Determinism on resume rests on one rule: every random choice a stage makes draws from a
`torch.Generator` whose state is saved here, and every batch is a function of the step number.
"""
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meml import distributed, lora
from meml.checkpoint import save_checkpoint
from meml.errors import InputError


class LossNotFinite(RuntimeError):
    pass


@dataclass
class Stage:
    name: str                    # "mef" or "riel": written into every checkpoint
    total_steps: int
    lr: float
    save_every: int
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"   # after warm-up: "constant" or "cosine" (to 10% of lr)
    step_offset: int = 0         # steps of earlier stages: checkpoints are numbered globally
    hidden_losses: tuple = ()    # loss parts switched off in this run: kept out of the progress line
    loss_metric: str = "loss/total"  # the metric holding the loss the step minimised (the NaN guard's)
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # saved and restored
    extra_state: dict = field(default_factory=dict)  # objects with state_dict()/load_state_dict()
    compute_dtype: torch.dtype = torch.float32  # bfloat16: matmuls under autocast (mixed precision)
    save_dtype: torch.dtype | None = None       # the HF files' dtype (None: the weights' own)


def mixed_precision(device_type: str, compute_dtype: torch.dtype):
    """torch.autocast to compute_dtype on this device type; nothing for fp32."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=compute_dtype)


def make_optimizer(model, stage: Stage) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters per step (TRL's default too). The per-parameter loop
    # took ~7x as long on CPU at Qwen2.5-0.5B's 494M parameters (reference_runs/LOG.md); the two
    # round differently in the last bit.
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.95), fused=True)


def lr_at(step: int, stage: Stage) -> float:
    """Linear warm-up to lr, then constant or a cosine decay to 10% of lr over the remaining
    steps (the paper gives no schedule). The decay starts where warm-up ends."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return stage.lr
    progress = (step - stage.warmup_steps) / max(1, stage.total_steps - stage.warmup_steps - 1)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def trainer_state(stage: Stage, step: int, optimizer, carry: dict, model, weights: dict) -> dict:
    """What resume needs; weights: the model's whole-tensor state dict. Every rank calls it (a
    sharded model's optimizer states are gathered whole)."""
    weights_dtype = next(model.parameters()).dtype
    masters = {"master_weights": weights} if stage.save_dtype not in (None, weights_dtype) else {}
    if lora.adapters(model):  # LoRA: the frozen weights are the run's --model; the adapters, exactly
        masters = {"adapters": lora.peft_state(model), "lora_base": model.lora_settings["base"]}
    return {**masters,
        "stage": stage.name,
        "step": step,
        "optimizer": distributed.full_optimizer_state(optimizer),
        "torch_rng": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in stage.generators.items()},  # rank 0's
        "generators_by_rank": distributed.all_gather_objects({k: g.get_state() for k, g in stage.generators.items()}),
        "extra": {k: obj.state_dict() for k, obj in stage.extra_state.items()},
        "carry": carry,  # plain data the run wants back on resume (e.g. the after-MEF table)
    }


def restore(state: dict, stage: Stage, optimizer) -> int:
    """Put the optimizer, generators and extra state back; return the step to continue from.
    The optimizer's saved tensors are taken out of `state` (loaded on the CPU, copied to the
    parameters' device by load_state_dict), so the run does not hold a second copy of them."""
    if state["stage"] != stage.name:
        raise ValueError(f"checkpoint is from stage {state['stage']!r}, not {stage.name!r}")
    try:
        optimizer.load_state_dict(distributed.shard_optimizer_state(state.pop("optimizer"), optimizer))
    except ValueError as err:  # e.g. saved before q/k/v_proj became one qkv_proj (3 tensors, now 1)
        raise ValueError(f"its optimizer state does not fit this model's parameters ({err}); it was "
                         "written for another model layout, e.g. by a meml from before q/k/v_proj "
                         "were fused into qkv_proj") from err
    torch.set_rng_state(state["torch_rng"])
    by_rank = state.get("generators_by_rank", [state["generators"]])
    for k, g in stage.generators.items():
        # a run resumed at another world size: ranks beyond the saved ones keep their fresh seeds
        if distributed.rank() < len(by_rank):
            g.set_state(by_rank[distributed.rank()][k])
    for k, obj in stage.extra_state.items():
        obj.load_state_dict(state["extra"][k])
    return state["step"]


def truncate_metrics(path: Path, stage: str, step: int) -> None:
    """On resume, forget the metric lines of steps after the checkpoint: they will be run again.
    A last line cut short (the run was killed while writing it) is dropped with a note; an
    unreadable line anywhere else is an error naming it."""
    if not path.exists():
        return
    order = {"mef": 0, "riel": 1}
    lines, keep = path.read_text(encoding="utf-8", errors="replace").splitlines(), []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            position = (order[row["stage"]], row["step"])
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                print(f"{path}: dropped its last line, cut short when the run stopped ({line[:40]!r}...)")
                continue
            raise InputError(f"{path}:{number}: not a metrics line of train.py ({line[:60]!r})") from None
        if position <= (order[stage], step):
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _progress_line(stage: Stage, step: int, metrics: dict, eta: float) -> str:
    parts = [f"[{stage.name}] step {step}/{stage.total_steps}"]
    if "reward" in metrics:
        per_expert = " ".join(f"{v:.2f}" for k, v in sorted(metrics.items())
                              if k.startswith("rewards/expert_") and k.endswith("/mean"))
        parts.append(f"reward {metrics['reward']:.3f} [{per_expert}]")
        watched = []  # what a MEML user watches besides the reward: E5's reach, the buffer's fill
        if "loss/inter_expert_kl" not in stage.hidden_losses and "inter_expert/active_questions" in metrics:
            watched.append(f"E5 on {metrics['inter_expert/active_questions']} q")
        if "loss/sft" not in stage.hidden_losses and "buffer/capacity" in metrics:
            watched.append(f"buffer {metrics['buffer/fill']}/{metrics['buffer/capacity']}")
        if watched:
            parts.append(", ".join(watched))
    losses = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in metrics.items()
                      if k.startswith("loss/") and k not in stage.hidden_losses)
    parts.append(f"loss {losses}")
    parts.append(f"{metrics.get('tokens_per_second', 0):.0f} tok/s")
    parts.append(f"ETA {_fmt_eta(eta)}")
    return " | ".join(parts)


def run_stage(stage: Stage, model, optimizer, step_fn, *, run_dir: Path, tokenizer_dir: Path,
              start_step: int = 0, carry: dict | None = None, log_every: int = 1,
              sample_every: int = 10, print_fn=print, probe=None, report=None) -> None:
    """Run steps start_step .. total_steps-1 of one stage, checkpointing as it goes.

    probe(step) -> dict, if given, is called before the first step (step 0, logged as a line of
    its own) and after every step (merged into that step's line): e.g. a learning curve's
    evaluation, which returns {} on the steps it skips. Every rank calls it. report(stage,
    global step, metrics, samples), if given, is handed each metrics line (rank 0)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    carry = carry or {}
    started = time.time()
    device_type = next(model.parameters()).device.type
    main = distributed.is_main()  # rank 0 logs and checkpoints; every rank trains
    with open(run_dir / "metrics.jsonl", "a") if main else contextlib.nullcontext() as log:
        if probe is not None and start_step == 0:
            _log_probe(probe(0), stage, 0, log, print_fn)
        for step in range(start_step, stage.total_steps):
            t0 = time.time()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, stage)
            updates = []
            optimizer.zero_grad(set_to_none=True)
            for metrics in _under_autocast(step_fn(step), device_type, stage.compute_dtype):
                # backward done; one optimizer update each, outside autocast (see _under_autocast)
                grad_norm = _checked_grad_norm(stage, model, step, metrics, run_dir)
                optimizer.step()
                _check_weights_finite(stage, model, step, run_dir)
                optimizer.zero_grad(set_to_none=True)
                updates.append({**metrics, "grad_norm": grad_norm})
            metrics = _merge_updates(updates)
            samples = metrics.pop("samples", None)
            metrics.update({"stage": stage.name, "step": step + 1, "lr": lr_at(step, stage),
                            "time/step": time.time() - t0})
            if probe is not None:
                t1 = time.time()
                found = probe(step + 1)
                if found:
                    metrics.update({**found, "time/eval": time.time() - t1})
                    _log_probe(found, stage, step + 1, None, print_fn)
            if main:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if report is not None:  # --report-to: the same line elsewhere (meml/report_to.py)
                    report(stage.name, stage.step_offset + step + 1, metrics,
                           samples if (step + 1) % sample_every == 0 else None)
            if main and samples and (step + 1) % sample_every == 0:
                with open(run_dir / "samples.jsonl", "a") as f:
                    f.write(json.dumps({"stage": stage.name, "step": step + 1, "samples": samples}) + "\n")
                print_fn(f"  sample (expert {samples[0]['expert']}, reward {samples[0]['reward']}): "
                         f"{samples[0]['text'][:200]!r}")
            done = step + 1 - start_step
            eta = (time.time() - started) / done * (stage.total_steps - step - 1)
            if main and ((step + 1) % log_every == 0 or step + 1 == stage.total_steps):
                print_fn(_progress_line(stage, step + 1, metrics, eta))
            if (step + 1) % stage.save_every == 0 or step + 1 == stage.total_steps:
                weights = distributed.full_state_dict(model)  # every rank: gathers a sharded model
                state = trainer_state(stage, step + 1, optimizer, carry, model, weights)
                # rank 0 writes; every rank waits for it (no rank runs ahead of a checkpoint it may
                # resume from) and stops with it if the write failed (a full disk: one line)
                distributed.agree(lambda: save_checkpoint(run_dir, stage.step_offset + step + 1, model, tokenizer_dir,
                                                          state, dtype=stage.save_dtype, weights=weights))


def _under_autocast(updates, device_type: str, compute_dtype: torch.dtype):
    """The step's updates, each computed (forward and backward) in its own autocast region.

    Autocast caches the low-precision copy of every weight until its region exits, so a forward
    after optimizer.step() inside the same region would still see the weights from before the
    step: with --num-iterations 2 the second update would train on stale weights (ρ = 1, the
    clip never acting, the same gradient applied twice). Here each update's computation runs
    inside a region of its own, and the optimizer step outside any."""
    while True:
        with mixed_precision(device_type, compute_dtype):
            update = next(updates, None)
        if update is None:
            return
        yield update


def _log_probe(found: dict, stage: Stage, step: int, log, print_fn) -> None:
    """A probe's figures: printed; written as a metrics line of their own when `log` is given."""
    if not found or not distributed.is_main():
        return
    if log is not None:
        log.write(json.dumps({"stage": stage.name, "step": step, **found}) + "\n")
        log.flush()
    print_fn(f"[{stage.name}] step {step}: " + ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in found.items()
                                                       if isinstance(v, float) and "/d" not in k))


def _checked_grad_norm(stage: Stage, model, step: int, metrics: dict, run_dir: Path) -> float:
    """Clip the gradient and return its norm, or stop the run before an update with a loss or
    gradient that is not finite (the weights stay as the last step left them)."""
    parts = {k: v for k, v in metrics.items() if k.startswith("loss/")}
    loss = metrics[stage.loss_metric]
    if not math.isfinite(loss):
        raise LossNotFinite(
            f"[{stage.name}] loss became {loss} at step {step + 1} (parts: {parts}); "
            f"the weights were not updated and the last checkpoint in {run_dir} is intact")
    distributed.sum_gradients(model)  # every rank's share of the one loss: their sum is its gradient
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # sharded (FSDP2)
    if not torch.isfinite(grad_norm):
        raise LossNotFinite(
            f"[{stage.name}] gradient norm became {grad_norm.item()} at step {step + 1} "
            f"(loss {loss:.4g}, parts: {parts}); the weights were not updated and "
            f"the last checkpoint in {run_dir} is intact")
    return grad_norm.item()


def _check_weights_finite(stage: Stage, model, step: int, run_dir: Path) -> None:
    """Stop the run when an update left a weight NaN or infinite (a finite loss and gradient can
    still do that, e.g. at an infinite learning rate), before any checkpoint is written from
    them. One fused reduction per update: the largest |w| of every tensor (NaN propagates), on
    each rank's own shard, summed over ranks so that every rank stops together."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    largest = torch.stack(torch._foreach_norm([p.detach() for p in params], float("inf")))
    bad = distributed.all_reduce_sum((~torch.isfinite(largest)).sum().item()).item()
    if bad:
        raise LossNotFinite(
            f"[{stage.name}] the update of step {step + 1} left weights that are NaN or infinite (the loss and "
            f"gradient were finite: is a learning rate too large?); no checkpoint was written from them, "
            f"the last checkpoint in {run_dir} is intact")


def _merge_updates(updates: list[dict]) -> dict:
    """One log line for a step of several updates: loss parts, clip ratio and gradient norm
    averaged over them, everything else (rewards, buffer, timings, samples) from the last."""
    merged = dict(updates[-1])
    for key in merged:
        if key.startswith("loss/") or key in ("clip_ratio", "grad_norm"):
            merged[key] = sum(u[key] for u in updates) / len(updates)
    return merged


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The items of batch `step`: consecutive slices of a stream of seeded per-epoch shuffles.
    A pure function of its arguments, so a resumed run sees the batches it would have seen."""
    out, position = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position + len(out), num_items)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += order[offset:offset + batch_size - len(out)].tolist()
    return out
