"""Train with MEML-GRPO: Stage 1 MEF (E1), Stage 2 RIEL (E2-E7), then evaluation (E8).

With no arguments it runs the whole method on the built-in synthetic arithmetic world (a tiny
model of the same decoder class, trained from scratch on a 2-core CPU in minutes) and prints
per-expert accuracy after each stage and the reward-sparsity figures:

    python train.py

On a real checkpoint and data set (Qwen2.5 or Llama 3.x in Hugging Face layout):

    python train.py --model DIR --dataset gsm8k --data train.jsonl --expert-data experts.jsonl

`--preset` picks MEML-GRPO, a baseline or an ablation (meml/config.py lists them);
`--resume RUN_DIR` continues a run from its newest checkpoint exactly where it stopped.
Under `torchrun --nproc_per_node N train.py ...` each process takes its share of every step
(meml/distributed.py says what crosses processes); rank 0 prints and writes the run's files.
Every method option is defined once, in meml/config.py; README.md "Decisions" lists the
choices the paper leaves open and the flag that flips each.
"""
import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from meml import data, distributed, lora, memory, plots, report_to, run_folder, synthetic
from meml.buffer import HardExampleBuffer, quota_from_metrics
from meml.checkpoint import TRAINER_STATE, latest_checkpoint, loadable_checkpoint
from meml.config import PRESETS, TrainConfig, add_option_flags, flag_name, make_config, overrides_from
from meml.errors import ArgumentParser, InputError, count_at_least, positive_number
from meml.evaluation import best_expert, evaluate_experts, format_results
from meml.losses import E7_PARTS, e7_weights
from meml.mef import mef_items, sft_loss
from meml.model import Transformer
from meml.e7 import Experts
from meml.riel import riel_step
from meml.sampler import stream_key
from meml.task import Precision, Task, build_task, init_weights, precision_of, write_run_info
from meml.trainer import (LossNotFinite, Stage, batch_indices, make_optimizer, mixed_precision, restore, run_stage,
                          truncate_metrics)


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train (default: the built-in synthetic world)")
    g.add_argument("--model", type=Path, help="checkpoint folder (config.json, model.safetensors, tokenizer)")
    g.add_argument("--dataset", choices=sorted(data.LOADERS), help="verifier and loader for --data")
    g.add_argument("--data", type=Path, help="training questions in the data set's original format (jsonl: one "
                   '{"question": text or messages, "answer", "id"?, "solution"?, ...} a line)')
    g.add_argument("--reward", help="the verifier: PATH.py:function or module:function, "
                   "function(completion: str, example: dict) -> float in [0, 1]; or a built-in (gsm8k, mathqa, "
                   "strategyqa); default: --dataset's own")
    g.add_argument("--eval-data", type=Path, help="held-out questions (default: the last --eval-size of --data)")
    g.add_argument("--expert-data", type=Path, action="append", default=[],
                   help='JSONL {"id", "expert", "response"} (repeatable); expert 0 defaults to the gold solutions')
    g.add_argument("--teacher", type=Path, action="append", default=[],
                   help="a local teacher checkpoint that writes expert 1, 2, ... data (repeatable)")
    g.add_argument("--system-prompts", type=Path, help="JSON list of the experts' system prompts")
    g.add_argument("--train-size", type=count_at_least(1), help="use only the first N training questions")
    g.add_argument("--preset", default="meml-grpo", choices=list(PRESETS), help="method, baseline or ablation")
    g = p.add_argument_group("run")
    g.add_argument("--output", type=Path, default=Path("runs/default"),
                   help="run folder (checkpoints, logs): must not exist or be empty; it is locked while the run lives")
    g.add_argument("--resume", type=Path, help="run folder to continue from, with its own arguments; only "
                   + ", ".join(flag_name(k) for k in RESUME_MAY_CHANGE) + " may be given beside it")
    g.add_argument("--init-from", type=Path,
                   help="start from the weights of another run's checkpoint (a checkpoint folder, or a run "
                        "folder: its newest checkpoint) instead of stage 1: MEF is skipped and RIEL starts "
                        "there, e.g. several RIEL methods from one MEF run. Same tokenizer required")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model lives (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype. auto: bfloat16 on a CUDA GPU that has it (else float32 with TF32 "
                        "matmuls), float32 on the CPU. bfloat16: mixed precision, matmuls in bf16 under autocast, fp32 "
                        "master weights and AdamW states (as TRL, verl and nanochat); checkpoints' HF "
                        "files in bf16, the fp32 masters in trainer_state.pt")
    g.add_argument("--bf16-weights", action="store_true",
                   help="with --dtype bfloat16: keep the weights and AdamW's states themselves in bf16 "
                        "(half the memory). An update smaller than ~2^-9 of a weight rounds away, so at "
                        "small learning rates (the paper's 1e-6) most updates are lost")
    g.add_argument("--report-to", default="none", choices=report_to.CHOICES,
                   help="also write every metrics.jsonl figure as TensorBoard scalars into RUN/tensorboard "
                        "(needs pip install tensorboard)")
    g.add_argument("--plan", nargs="?", type=positive_number, const=0.0, metavar="GB",
                   help="print the memory each device needs (weights, gradients, AdamW states, reference "
                        "model, rollouts' KV cache, a micro-batch's activations) and what to change if it "
                        "does not fit, then stop: no weight is loaded, nothing is written. GB: plan for a "
                        "device of that size (default: --device's)")
    add_option_flags(p)  # every method option of meml/config.py, grouped by stage
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def given_flags(argv: list[str]) -> set[str]:
    """The options named on this command line (whatever their values, defaults included)."""
    parser = make_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# What may change when a run continues (`--resume RUN --riel-steps 400`): how long it runs and
# how it reports, never what it computes. Every other flag given with --resume is an error.
RESUME_MAY_CHANGE = ("riel_steps", "save_every", "sample_every", "threads", "device", "report_to")
# Flags that describe a real checkpoint's task: without --model they would be silently unused.
MODEL_ONLY = ("dataset", "data", "eval_data", "expert_data", "teacher", "system_prompts", "reward")


def resumed_args(args, argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """--resume RUN: (arguments, their command line, the flags changed now). The run's own
    command line comes from RUN/args.json; the RESUME_MAY_CHANGE flags given now are appended to
    it (the last occurrence of a flag wins), any other flag is refused."""
    saved_file = args.resume / "args.json"
    if not saved_file.exists():
        raise InputError(f"{saved_file} not found: --resume takes the run folder of an earlier train.py run")
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{saved_file}: not the JSON list of arguments train.py writes ({err})") from None
    if not (isinstance(saved, list) and all(isinstance(a, str) for a in saved)):
        raise InputError(f"{saved_file}: not the JSON list of arguments train.py writes")
    given = sorted(given_flags(argv) - {"resume"})
    refused = [k for k in given if k not in RESUME_MAY_CHANGE]
    if refused:
        raise InputError(f"{flag_name(refused[0])}: --resume continues {args.resume} with the arguments it "
                         f"started with ({saved_file}); beside it only "
                         f"{', '.join(flag_name(k) for k in RESUME_MAY_CHANGE)} may be given")
    changes = []
    for i, token in enumerate(argv):  # what is left once --resume RUN is taken out
        if token == "--resume" or (i > 0 and argv[i - 1] == "--resume") or token.startswith("--resume="):
            continue
        changes.append(token)
    if "--dtype" not in saved:  # written before --dtype auto existed, when the default was float32
        saved = saved + ["--dtype", "float32"]
    command = saved + changes
    return parse_args(command + ["--resume", str(args.resume)]), command, changes


def check_applicable(args) -> None:
    """A flag that would be silently ignored is an error naming it."""
    if args.model is None:
        unused = [k for k in MODEL_ONLY if getattr(args, k)]
        if unused:
            raise InputError(f"{flag_name(unused[0])} needs --model: without --model the run trains on the "
                             "built-in synthetic world, which brings its own questions, experts and prompts")
    elif getattr(args, "synthetic_teachers", None) is not None:
        raise InputError("--synthetic-teachers picks the built-in world's teachers; with --model the expert "
                         "answers come from --expert-data or --teacher")


# ---------------------------------------------------------------------------------------------
# The stages

def resume_stage(state: dict | None, stage: Stage, optimizer, checkpoint: Path | None) -> int:
    """The step to start `stage` at: the checkpoint's step if it was written during this stage
    (optimizer, generators and buffer restored from it), else 0. Only once that worked are the
    metric lines of steps after the checkpoint dropped (they will be run again)."""
    if checkpoint is None or state["stage"] != stage.name:
        return 0
    try:
        step = restore(state, stage, optimizer)
    except ValueError as err:
        raise InputError(f"cannot resume from {checkpoint / TRAINER_STATE}: {err}") from None
    distributed.agree(lambda: truncate_metrics(checkpoint.parent / "metrics.jsonl", state["stage"], state["step"]))
    return step


def evaluate(task: Task, cfg: TrainConfig, precision: Precision, examples: list | None = None,
             full: bool = True) -> dict | None:
    """E8 on the held-out questions (None when there are none: --eval-size 0). With dev
    questions (--dev-size), also the best expert on them and its held-out accuracy. full=False:
    greedy figures only (the learning curve's points)."""
    examples = task.evals if examples is None else examples
    if not examples:
        return None
    family = synthetic.family_of if task.dataset == "synthetic" else None
    score = lambda questions, pass_k: evaluate_experts(  # noqa: E731
        task.model, task.tokenizer, questions, task.system_prompts, task.dataset, verifier=task.verifier,
        max_new_tokens=cfg.eval_max_new_tokens, pass_k=pass_k, seed=cfg.seed, family=family)
    training = task.model.training
    with mixed_precision(task.model.output_weight.device.type, precision.compute):
        result = score(examples, cfg.pass_k if full else 0)
        if full and task.devs:
            dev = score(task.devs, 0)
            chosen = best_expert(dev["accuracy"])
            result["dev_choice"] = {"num_questions": dev["num_questions"], "dev_accuracy": dev["accuracy"],
                                    "expert": chosen, "accuracy": result["accuracy"][chosen]}
    task.model.train(training)
    return result


def curve_probe(task: Task, cfg: TrainConfig, precision: Precision, total_steps: int):
    """--eval-every N: a function the RIEL loop calls after each step (and before the first); at
    every N-th step it returns the greedy accuracy on the first --curve-size held-out questions
    as metrics ("eval/..."). Greedy decoding draws no random numbers, so the run's trajectory is
    the one it has without the curve."""
    if not cfg.eval_every or not task.evals:
        return None
    subset = task.evals[:cfg.curve_size]

    def probe(step: int) -> dict:
        if step % cfg.eval_every and step != total_steps:
            return {}
        r = evaluate(task, cfg, precision, subset, full=False)
        out = {f"eval/expert_{i}/accuracy": a for i, a in enumerate(r["accuracy"])}
        out.update({"eval/majority_vote": r["majority_vote"], "eval/oracle": r["oracle"],
                    "eval/confidence_choice": r["confidence_choice"], "eval/num_questions": r["num_questions"]})
        for family, table in r.get("by_family", {}).items():
            out.update({f"eval/{family}/expert_{i}/accuracy": a for i, a in enumerate(table["accuracy"])})
        return out
    return probe


def mef_steps_of(task: Task, cfg: TrainConfig) -> int:
    items = sum(a.expert in task.experts for a in task.answers)
    return cfg.mef_steps if cfg.mef_steps is not None else math.ceil(items * cfg.mef_epochs / cfg.mef_batch_size)


def run_mef(task: Task, cfg: TrainConfig, run_dir: Path, state: dict | None, checkpoint: Path | None,
            precision: Precision, report=None) -> None:
    """Stage 1, E1: SFT of every expert prompt on its expert's verified answers."""
    items = mef_items(task.tokenizer, task.train, task.answers, task.system_prompts, task.dataset, task.experts)
    steps = mef_steps_of(task, cfg)
    print(f"MEF: {len(items)} answers from experts {task.experts} (dropped as wrong: "
          f"{ {i: task.dropped.get(i, 0) for i in task.experts} }), {steps} steps")
    if not items and steps:
        raise InputError(f"MEF has no verified answer to train on for experts {task.experts}")
    stage = Stage("mef", steps, cfg.mef_lr, cfg.save_every, grad_clip=cfg.grad_clip,
                  weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, schedule=cfg.mef_schedule,
                  compute_dtype=precision.compute, save_dtype=precision.save, loss_metric="loss/nll")
    optimizer = make_optimizer(task.model, stage)
    start = resume_stage(state, stage, optimizer, checkpoint)

    def mef_step(step):
        batch = [items[i] for i in batch_indices(len(items), cfg.mef_batch_size, step, cfg.seed)]
        mine = distributed.shard(batch, "--mef-batch-size")  # this process's answers of the step
        total = int(distributed.all_reduce_sum(sum(len(it.completion) for it in mine)))
        t0 = time.time()
        loss, _ = sft_loss(task.model, task.tokenizer, mine, cfg.riel.micro_batch_size, total_tokens=total)
        loss = distributed.all_reduce_sum(loss).item()
        yield {"loss/nll": loss, "tokens_per_second": total / (time.time() - t0)}

    task.model.train()
    run_stage(stage, task.model, optimizer, mef_step, run_dir=run_dir, tokenizer_dir=task.model_dir,
              start_step=start, log_every=max(1, steps // 20), report=report)


def riel_settings(cfg: TrainConfig, precision: Precision):
    """cfg.riel with the defaults that depend on precision resolved: π_old is recomputed with
    the training forward unless compute is fp32, where the sampler's equals it (D21)."""
    if cfg.riel.recompute_old_logprobs is not None:
        return cfg.riel
    return replace(cfg.riel, recompute_old_logprobs=precision.compute != torch.float32)


def run_riel(task: Task, cfg: TrainConfig, run_dir: Path, state: dict | None, checkpoint: Path | None,
             mef_steps: int, carry: dict, device, precision: Precision, report=None) -> None:
    """Stage 2, E2-E7: `riel_step` on batches of questions, --num-iterations optimizer steps each."""
    r = riel_settings(cfg, precision)
    steps = cfg.riel_steps if cfg.riel_steps is not None else math.ceil(len(task.train) * cfg.riel_epochs / r.questions_per_step)
    print(f"RIEL ({cfg.preset}): {steps} steps x {r.questions_per_step} questions x "
          f"{len(task.system_prompts)} experts x G={r.group_size}")
    # rollouts draw from keys of (seed, step, question, expert, rollout): nothing to save for
    # resume, the same at any world size (D22); the buffer's coins come from its own generator
    quota = quota_from_metrics(r.buffer_control) if r.buffer_control else None
    buffer = (HardExampleBuffer(r.buffer_capacity, r.buffer_k, r.group_size, cfg.seed, quota=quota)
              if r.hard_example_buffer else None)
    # the parts of E7 this run leaves out (weight 0; E6 without a buffer) stay off the progress line
    hidden = [part.metric for name, part in E7_PARTS.items()
              if e7_weights(r)[name] == 0 or (name == "sft" and buffer is None)]
    stage = Stage("riel", steps, cfg.riel_lr, cfg.save_every, grad_clip=cfg.grad_clip,
                  weight_decay=cfg.weight_decay, warmup_steps=0, step_offset=mef_steps,
                  extra_state={"buffer": buffer} if buffer is not None else {}, hidden_losses=tuple(hidden),
                  compute_dtype=precision.compute, save_dtype=precision.save)
    ref_model = None
    if r.beta > 0 and cfg.lora_rank:  # E4's reference: the same model with its adapters off
        ref_model = lora.WithoutAdapters(task.model)
    elif r.beta > 0:  # E4's reference: the policy as RIEL starts, kept on disk for resume
        ref_dir = run_dir / "reference"
        if checkpoint is None or state["stage"] != "riel":
            weights = distributed.full_state_dict(task.model)  # every rank: gathers a sharded model
            if distributed.is_main():
                task.model.save_pretrained(ref_dir, dtype=precision.compute, state=weights)
        distributed.barrier()
        ref_model = Transformer.from_pretrained(ref_dir, dtype=precision.compute, device=device).eval()
        ref_model.requires_grad_(False)
    optimizer = make_optimizer(task.model, stage)
    start = resume_stage(state, stage, optimizer, checkpoint)
    by_id = {ex.id: ex for ex in task.train}
    verified = {(a.id, task.experts.index(a.expert)): a.response for a in task.answers if a.expert in task.experts}
    experts = Experts(task.tokenizer, task.system_prompts, task.dataset, verified, task.verifier)
    no_target = [ex.id for ex in task.train if not ex.solution and r.hard_example_buffer
                 and not any((ex.id, i) in experts.verified_answers for i in range(len(task.system_prompts)))]
    if no_target:  # said once: such a question can enter the buffer, but its SFT item is skipped
        print(f"{len(no_target)} of {len(task.train)} training questions have no SFT target for the buffer (no "
              f"'solution' and no verified expert answer; first: {no_target[0]!r}): their buffer items are skipped")

    def riel_step_at(step):
        idx = batch_indices(len(task.train), r.questions_per_step, step, cfg.seed + 1)

        def more(k):  # --dynamic-sampling's round k: new questions, a stream of their own per (step, round)
            return [task.train[i] for i in batch_indices(len(task.train), r.questions_per_step, step,
                                                         cfg.seed + 1 + 7919 * k)]
        yield from riel_step(task.model, experts, [task.train[i] for i in idx], r, stream_key(cfg.seed, step), buffer,
                             by_id, ref_model, more_examples=more)

    steps_per_epoch = max(1, len(task.train) // r.questions_per_step)
    run_stage(stage, task.model, optimizer, riel_step_at, run_dir=run_dir, tokenizer_dir=task.model_dir,
              start_step=start, carry=carry, sample_every=cfg.sample_every,
              log_every=max(1, min(steps_per_epoch, steps) // 20),
              probe=curve_probe(task, cfg, precision, steps), report=report)


# ---------------------------------------------------------------------------------------------
# Memory (meml/memory.py)

def print_plan(args, cfg: TrainConfig, precision: Precision, device) -> int:
    """--plan: the model's shapes (config.json, no weights), the data's longest prompt, the plan."""
    with tempfile.TemporaryDirectory() as scratch:  # the synthetic world's assets, thrown away
        task = build_task(args, cfg, Path(scratch), device, precision, shapes_only=True)
    settings = memory.settings_for(task, cfg, precision)
    budget, where = (args.plan * memory.GB, "the size asked for") if args.plan else (memory.device_bytes(device), str(device))
    print(memory.format_plan(task.model.config, settings, int(budget), where))
    return 0


# ---------------------------------------------------------------------------------------------
# Reporting

def print_table(results: dict, riel_summary: dict | None, elapsed: float) -> None:
    if all(r is None for r in results.values()):
        return
    print("\n" + format_results(results))
    if riel_summary:
        print("\nreward sparsity during RIEL:")
        zs = " ".join(f"{v:.2f}" for v in riel_summary["frac_reward_zero_std"])
        aw = " ".join(f"{v:.2f}" for v in riel_summary["all_wrong"])
        print(f"  zero-signal groups per expert (all rewards equal): {zs}")
        print(f"  all-wrong groups per expert:                       {aw}")
        print(f"  questions one expert's group got all wrong and another's got right: "
              f"{riel_summary['rescuable']:.2f}; all N x G wrong: {riel_summary['all_wrong_questions']:.2f}")
        print(f"  buffer insertions {riel_summary['insertions']}, SFT triggers {riel_summary['sft_triggers']}, "
              f"inter-expert KL active on {riel_summary['active_questions']} questions")
    print(f"\ntotal time {elapsed / 60:.1f} min")


def summarise_riel(metrics_path: Path, num_experts: int) -> dict | None:
    if not metrics_path.exists():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if r.get("stage") == "riel" and "reward" in r]  # not the curve's step-0 line
    if not rows:
        return None
    def mean(key):  # over the lines that have it (a run resumed across versions may lack it in some)
        have = [r[key] for r in rows if key in r]
        return sum(have) / len(have) if have else float("nan")
    return {"frac_reward_zero_std": [mean(f"frac_reward_zero_std/expert_{i}") for i in range(num_experts)],
            "all_wrong": [mean(f"rewards/expert_{i}/all_wrong") for i in range(num_experts)],
            "insertions": sum(r["buffer/insertions"] for r in rows),
            "sft_triggers": sum(r["buffer/sft_triggers"] for r in rows),
            "active_questions": sum(r.get("inter_expert/active_questions", 0) for r in rows),
            "rescuable": mean("premise/rescuable"), "all_wrong_questions": mean("premise/all_wrong")}


# ---------------------------------------------------------------------------------------------

def run(argv=None) -> int:
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # 1. The run's arguments: a resumed run is the same run, its arguments read back from its
    #    folder (plus the few flags that may change now); a flag that would go unused is an error.
    changes = []
    if args.resume:
        args, argv, changes = resumed_args(args, argv)
    check_applicable(args)
    report_to.require(args.report_to)
    cfg = make_config(args.preset, synthetic=args.model is None, overrides=overrides_from(args))
    if cfg.riel.buffer_control:
        quota_from_metrics(cfg.riel.buffer_control)  # a bad file is named now, before the run folder exists
    if args.init_from is not None:
        if not cfg.run_riel:
            raise InputError(f"--init-from skips MEF, and --preset {cfg.preset} has no RIEL stage: nothing to run")
        cfg = replace(cfg, run_mef=False)
    if args.plan is not None:  # planning for another machine's device: the name is enough
        planned = torch.device(distributed.device_name(args.device))
        return print_plan(args, cfg, precision_of(args, planned, bf16_supported=True), planned)
    precision = precision_of(args, distributed.checked_device(args.device))
    if cfg.lora_rank:  # only the adapters (fp32) train: the frozen weights can stay in the compute dtype;
        # the merged checkpoint is fp32, where a bf16 W + (α/r)·B A would round most of the update away
        if args.bf16_weights:
            raise InputError("--bf16-weights with --lora-rank: LoRA keeps the frozen weights in the compute "
                             "dtype already, and its adapters (what trains) in fp32")
        precision = replace(precision, weights=precision.compute, save=torch.float32)
    device = distributed.init(args.device)  # under torchrun: join the others; rank 0 alone prints and writes
    run_dir = args.resume if args.resume else args.output
    if not args.resume and args.dtype == "auto":  # what auto chose is the run's: a resume keeps it
        argv = argv + ["--dtype", str(precision.compute).removeprefix("torch.")]
    # The folder is this run's alone from here on: rank 0 locks it (meml/run_folder.py).
    distributed.agree(lambda: run_folder.claim(run_dir, argv, resume=bool(args.resume), changes=changes))
    try:
        run_folder.check_shared(run_dir)  # several nodes: every rank sees what rank 0 writes
        return run_in(run_dir, args, cfg, precision, device, started)
    except (InputError, OSError):
        if not args.resume and distributed.is_main():
            run_folder.abandon(run_dir)  # stopped before its first step: the folder as it was found
        raise
    finally:
        run_folder.release(run_dir)


def run_in(run_dir: Path, args, cfg: TrainConfig, precision: Precision, device, started: float) -> int:
    """The run, in its claimed folder."""
    if args.bf16_weights:
        print("--bf16-weights: weights and AdamW states are bf16; an update smaller than ~2^-9 of a "
              "weight is rounded away, so at small learning rates most updates are lost", file=sys.stderr)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if precision.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"precision: {precision.describe(device)}")
    checkpoint, state = None, None
    if args.resume:
        checkpoint, state = loadable_checkpoint(run_dir)
        if checkpoint is None:
            print(f"no complete checkpoint in {run_dir}: the run starts again from its first step")
            if distributed.is_main():
                for name in ("metrics.jsonl", "samples.jsonl"):
                    (run_dir / name).unlink(missing_ok=True)
        else:
            print(f"resuming from {checkpoint} (stage {state['stage']}, step {state['step']})")
    # 2. What the run trains on; the weights of the checkpoint it resumes from.
    task = build_task(args, cfg, run_dir, device, precision)
    cfg = memory.fit(task, cfg, precision, device, given=args)
    task.model.activation_checkpointing = cfg.activation_checkpointing
    write_run_info(run_dir, task, cfg)
    base = str(args.model or "the built-in synthetic world")  # the weights LoRA keeps frozen
    if args.init_from is not None and checkpoint is None:
        base = str(init_weights(task, args.init_from, device, precision))
    elif args.init_from is not None and cfg.lora_rank:  # a LoRA resume: the same frozen weights again
        base = str(init_weights(task, Path(state["lora_base"]), device, precision))
    if cfg.lora_rank:  # only the adapters train (meml/lora.py); checkpoints hold them and the merged model
        lora.add_lora(task.model, cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank, cfg.lora_targets.split(","))
        task.model.lora_settings["base"] = base
    if cfg.fsdp:  # FSDP2: from here on each rank holds a shard of every weight
        distributed.shard_model(task.model, precision.compute)
    if checkpoint is not None and cfg.lora_rank:  # the frozen weights are --model's; the adapters come back
        lora.load_adapters(task.model, state.pop("adapters"))
    elif checkpoint is not None:  # the fp32 masters when the HF files hold less precision
        weights = state.pop("master_weights", None) or \
            Transformer.from_pretrained(checkpoint, dtype=precision.weights, device="cpu").state_dict()
        distributed.load_full_state_dict(task.model, weights)  # a sharded model takes its slices only
        del weights
    resumed_in_riel = checkpoint is not None and state["stage"] == "riel"
    results = {"after MEF": None, "after RIEL": None}
    if args.init_from is not None:  # the start, evaluated like MEF's end would be
        results = {"before RIEL": state["carry"]["before RIEL"] if resumed_in_riel else evaluate(task, cfg, precision),
                   "after RIEL": None}
    # 3-4. The two stages, reported as they go (--report-to)
    resumed_at = int(checkpoint.name.split("-")[1]) if checkpoint is not None else None
    report = report_to.make_report(args.report_to, run_dir, resumed_at) if distributed.is_main() else None
    try:
        results = run_stages(task, cfg, run_dir, state, checkpoint, results, device, precision, report)
    finally:
        if report is not None:
            report.close()
    # 5. Report (E8).
    if (not cfg.run_mef and not cfg.run_riel) or not distributed.is_main():
        return 0
    riel_summary = summarise_riel(run_dir / "metrics.jsonl", len(task.system_prompts)) if cfg.run_riel else None
    (run_dir / "results.json").write_text(json.dumps({"preset": cfg.preset, "results": results,
                                                      "riel_summary": riel_summary}, indent=1))
    print_table(results, riel_summary, time.time() - started)
    print(f"results: {run_dir / 'results.json'}; metrics: {run_dir / 'metrics.jsonl'}")
    if cfg.run_riel:
        if plots.available():
            print(f"plots: {plots.plot_run(run_dir)}")
        else:
            print("plots of this run (reward, held-out accuracy, buffer, E5, entropy per step): "
                  "pip install matplotlib, then python -c \"from meml.plots import plot_run; "
                  f"plot_run('{run_dir}')\"")
    return 0


def run_stages(task: Task, cfg: TrainConfig, run_dir: Path, state: dict | None, checkpoint: Path | None,
               results: dict, device, precision: Precision, report) -> dict:
    """Stage 1, MEF (E1), then stage 2, RIEL (E2-E7), each evaluated (E8) as it ends; a resumed
    run skips what its checkpoint already holds."""
    resumed_in_riel = checkpoint is not None and state["stage"] == "riel"
    mef_steps = mef_steps_of(task, cfg) if cfg.run_mef else 0
    if cfg.run_mef:
        if not resumed_in_riel:
            run_mef(task, cfg, run_dir, state, checkpoint, precision, report)
        results["after MEF"] = state["carry"]["after MEF"] if resumed_in_riel else evaluate(task, cfg, precision)
    if cfg.run_riel:
        carry = {k: v for k, v in results.items() if k != "after RIEL"}  # kept in checkpoints for --resume
        run_riel(task, cfg, run_dir, state, checkpoint, mef_steps, carry, device, precision, report)
        results["after RIEL"] = evaluate(task, cfg, precision)
    return results


def main(argv=None) -> int:
    """`run`, with a user's mistake printed as one line (exit 2) and a non-finite loss as exit 1;
    anything else is a bug and keeps its traceback. Under torchrun the process ends here
    (`distributed.finish`)."""
    try:
        code = run(argv)
    except (InputError, OSError) as err:
        print(f"train.py: {err}", file=sys.stderr)
        code = 2
    except LossNotFinite as err:
        print(f"train.py: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"train.py: interrupted; {where_to_resume(argv)}", file=sys.stderr)
        code = 130
    return distributed.finish(code)


def where_to_resume(argv) -> str:
    """After Ctrl-C: the newest checkpoint of the run folder, and the command that continues it."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except InputError:
        return "nothing was started"
    folder = args.resume or args.output
    newest = latest_checkpoint(folder)
    if newest is None:
        return f"no checkpoint was written in {folder}; python train.py --resume {folder} starts it again"
    return f"the last checkpoint is {newest}; continue with: python train.py --resume {folder}"


if __name__ == "__main__":
    sys.exit(main())
