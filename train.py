"""Train with MEML-GRPO: Stage 1 MEF (E1), Stage 2 RIEL (E2-E7), then evaluation (E8).

With no arguments it runs the whole method on the built-in synthetic arithmetic world (a tiny
model of the same decoder class, trained from scratch on a 2-core CPU in minutes) and prints
per-expert accuracy after each stage and the reward-sparsity figures:

    python train.py

On a real checkpoint and data set (Qwen2.5 or Llama 3.x in Hugging Face layout):

    python train.py --model DIR --dataset gsm8k --data train.jsonl --expert-data experts.jsonl

`--preset` picks MEML-GRPO, a baseline or an ablation (meml/config.py lists them);
`--resume RUN_DIR` continues a run from its newest checkpoint exactly where it stopped.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from meml import data, synthetic, synthetic_assets
from meml.buffer import HardExampleBuffer
from meml.checkpoint import TRAINER_STATE, latest_checkpoint, load_trainer_state
from meml.config import PRESETS, make_config
from meml.evaluation import evaluate_experts, format_results
from meml.mef import generate_expert_data, mef_items, sft_loss
from meml.model import ModelConfig, Transformer
from meml.prompts import EXPERT_SYSTEM_PROMPTS
from meml.riel import World, riel_step
from meml.tokenizer import Tokenizer
from meml.trainer import LossNotFinite, Stage, batch_indices, make_optimizer, restore, run_stage, truncate_metrics



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train (default: the built-in synthetic world)")
    g.add_argument("--model", type=Path, help="checkpoint folder (config.json, model.safetensors, tokenizer)")
    g.add_argument("--dataset", choices=sorted(data.LOADERS), help="verifier and loader for --data")
    g.add_argument("--data", type=Path, help="training questions in the data set's original format")
    g.add_argument("--eval-data", type=Path, help="held-out questions (default: the last --eval-size of --data)")
    g.add_argument("--expert-data", type=Path, action="append", default=[],
                   help='JSONL {"id", "expert", "response"} (repeatable); expert 0 defaults to the gold solutions')
    g.add_argument("--teacher", type=Path, action="append", default=[],
                   help="a local teacher checkpoint that writes expert 1, 2, ... data (repeatable)")
    g.add_argument("--system-prompts", type=Path, help="JSON list of the experts' system prompts")
    g.add_argument("--train-size", type=int, help="use only the first N training questions")
    g = p.add_argument_group("method")
    g.add_argument("--preset", default="meml-grpo", choices=list(PRESETS), help="method, baseline or ablation")
    g.add_argument("--expert", type=int, help="ExpertX presets: which expert (default 0)")
    g = p.add_argument_group("stage 1, MEF (E1)")
    g.add_argument("--mef-lr", type=float, help="learning rate (paper: 1e-5)")
    g.add_argument("--mef-epochs", type=float, help="epochs over the expert data (paper: 1)")
    g.add_argument("--mef-steps", type=int, help="number of steps (overrides --mef-epochs)")
    g.add_argument("--mef-schedule", choices=["constant", "cosine"], help="learning-rate decay after warm-up")
    g.add_argument("--mef-batch-size", type=int, help="(question, expert) answers per step")
    g = p.add_argument_group("stage 2, RIEL (E2-E7)")
    g.add_argument("--riel-lr", type=float, help="learning rate (paper: 1e-6)")
    g.add_argument("--riel-epochs", type=float, help="epochs over the training questions (paper: 1)")
    g.add_argument("--riel-steps", type=int, help="number of steps (overrides --riel-epochs)")
    g.add_argument("--questions-per-step", type=int, help="questions per RIEL step")
    g.add_argument("--group-size", type=int, help="G: rollouts per expert per question (paper: 8)")
    g.add_argument("--max-new-tokens", type=int, help="rollout length limit")
    g.add_argument("--temperature", type=float, help="sampling temperature (log-probs use it too)")
    g.add_argument("--buffer-k", type=int, help="K: a group with more than K wrong may enter the buffer (paper: 6)")
    g.add_argument("--buffer-capacity", type=int, help="B: buffer size that triggers SFT (paper: 64)")
    g.add_argument("--buffer-target", choices=["gold", "expert"], help="SFT target S: gold solution or the expert's answer")
    g.add_argument("--lambda1", type=float, help="weight of the inter-expert KL (E5, default 0.1)")
    g.add_argument("--lambda2", type=float, help="weight of the buffer's SFT loss (E6, default 1.0)")
    g.add_argument("--beta", type=float, help="weight of the reference-model KL (E4)")
    g.add_argument("--inter-expert-variant", choices=["sequence", "full_vocab"], help="E5 estimator")
    g.add_argument("--micro-batch-size", type=int, help="rows per forward/backward (memory)")
    g = p.add_argument_group("evaluation (E8)")
    g.add_argument("--eval-size", type=int, help="questions to evaluate on")
    g.add_argument("--pass-k", type=int, help="samples per question for pass@k (0: skip)")
    g.add_argument("--eval-max-new-tokens", type=int, help="completion length limit when evaluating")
    g = p.add_argument_group("run")
    g.add_argument("--output", type=Path, default=Path("runs/default"), help="run folder (checkpoints, logs)")
    g.add_argument("--resume", type=Path, help="run folder (or checkpoint folder) to continue from")
    g.add_argument("--seed", type=int, help="seed for data order, sampling and the buffer")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps")
    g.add_argument("--sample-every", type=int, help="log a completion every N RIEL steps")
    g.add_argument("--threads", type=int, help="torch CPU threads (synthetic default: 1)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model lives (default: cuda when available)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter dtype (bfloat16 halves memory on GPU; optimizer states follow it)")
    return p.parse_args(argv)


def overrides_from(args) -> dict:
    names = {"expert": "expert", "mef_lr": "mef_lr", "mef_epochs": "mef_epochs", "mef_steps": "mef_steps",
             "mef_schedule": "mef_schedule", "riel_steps": "riel_steps", "threads": "threads", "mef_batch_size": "mef_batch_size",
             "riel_lr": "riel_lr", "riel_epochs": "riel_epochs", "eval_size": "eval_size", "pass_k": "pass_k",
             "eval_max_new_tokens": "eval_max_new_tokens",
             "seed": "seed", "save_every": "save_every", "sample_every": "sample_every",
             "questions_per_step": "riel.questions_per_step", "group_size": "riel.group_size",
             "max_new_tokens": "riel.max_new_tokens", "temperature": "riel.temperature",
             "buffer_k": "riel.buffer_k", "buffer_capacity": "riel.buffer_capacity",
             "buffer_target": "riel.buffer_target", "lambda1": "riel.inter_expert_weight",
             "lambda2": "riel.sft_weight", "beta": "riel.beta",
             "inter_expert_variant": "riel.inter_expert_variant", "micro_batch_size": "riel.micro_batch_size"}
    return {key: getattr(args, arg) for arg, key in names.items() if getattr(args, arg) is not None}


def build_world(args, cfg, run_dir: Path, device, dtype):
    """(model_dir, fresh-or-loaded model, tokenizer, train, eval, expert answers, prompts, dataset)."""
    if args.model is None:  # the built-in synthetic world: assets written once into the run folder
        model_dir = synthetic_assets.write_synthetic_assets(run_dir / "synthetic", seed=cfg.seed)
        train, evals, answers = synthetic.load_synthetic(seed=cfg.seed)
        prompts, dataset = list(synthetic.EXPERT_PROMPTS), "synthetic"
        torch.manual_seed(cfg.seed)
        model = Transformer(ModelConfig.from_json(model_dir / "config.json"))
        model.init_weights()
        model = model.to(device=device, dtype=dtype)
    else:
        if args.dataset is None or args.data is None:
            sys.exit("train.py: --model needs --dataset and --data")
        model_dir = args.model
        model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
        examples = data.LOADERS[args.dataset](args.data)
        if args.eval_data:
            train, evals = examples, data.LOADERS[args.dataset](args.eval_data)[:cfg.eval_size]
        else:
            train, evals = examples[:-cfg.eval_size], examples[-cfg.eval_size:]
        dataset = args.dataset
        prompts = json.loads(args.system_prompts.read_text()) if args.system_prompts else list(EXPERT_SYSTEM_PROMPTS)
        answers = [data.ExpertAnswer(ex.id, 0, ex.solution) for ex in train]  # Expert0: gold (METHOD.md)
        known = {ex.id for ex in examples}
        for path in args.expert_data:
            loaded = data.load_expert_jsonl(path)
            unknown = [a.id for a in loaded if a.id not in known]
            if unknown:
                sys.exit(f"train.py: {path}: {len(unknown)} answers name questions that are not in {args.data} "
                         f"(first: {unknown[0]!r}); ids are <dataset>-<file stem>-<line or record number>")
            answers += loaded
    if args.train_size:
        train = train[:args.train_size]
    in_train = {ex.id for ex in train}
    answers = [a for a in answers if a.id in in_train]  # answers to held-out questions never train
    tokenizer = Tokenizer.from_pretrained(model_dir)
    tokenizer.fit_to_model(model.config.vocab_size, source=str(model_dir))
    for n, teacher_dir in enumerate(args.teacher, start=1):
        path = run_dir / f"expert{n}.jsonl"
        if path.exists():  # written by an earlier start of this run (e.g. before a --resume)
            answers += data.load_expert_jsonl(path)
            continue
        teacher = Transformer.from_pretrained(teacher_dir, dtype=dtype, device=device)
        teacher_tokenizer = Tokenizer.from_pretrained(teacher_dir)
        teacher_tokenizer.fit_to_model(teacher.config.vocab_size, source=str(teacher_dir))
        generated = generate_expert_data(teacher, teacher_tokenizer, train, prompts[n], n, dataset,
                                         max_new_tokens=cfg.riel.max_new_tokens,
                                         generator=torch.Generator(device=device).manual_seed(cfg.seed))
        data.write_expert_jsonl(path, generated)
        print(f"teacher {teacher_dir}: {len(generated)}/{len(train)} verified answers -> {path}")
        answers += generated
    if cfg.single_expert:
        prompts = [prompts[cfg.expert]]
    return model_dir, model, tokenizer, train, evals[:cfg.eval_size], answers, prompts, dataset


def resume_stage(state: dict | None, stage: Stage, optimizer, checkpoint: Path | None) -> int:
    """The step to start `stage` at: the checkpoint's step if it was written during this stage
    (optimizer, generators and buffer restored from it), else 0. Only once that worked are the
    metric lines of steps after the checkpoint dropped (they will be run again)."""
    if checkpoint is None or state["stage"] != stage.name:
        return 0
    try:
        step = restore(state, stage, optimizer)
    except ValueError as err:
        sys.exit(f"train.py: cannot resume from {checkpoint / TRAINER_STATE}: {err}")
    truncate_metrics(checkpoint.parent / "metrics.jsonl", state["stage"], state["step"])
    return step


def evaluate(model, tokenizer, evals, prompts, dataset, cfg) -> dict:
    return evaluate_experts(model, tokenizer, evals, prompts, dataset, max_new_tokens=cfg.eval_max_new_tokens,
                            pass_k=cfg.pass_k, seed=cfg.seed)


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
        print(f"  buffer insertions {riel_summary['insertions']}, SFT triggers {riel_summary['sft_triggers']}, "
              f"inter-expert KL active on {riel_summary['active_questions']} questions")
    print(f"\ntotal time {elapsed / 60:.1f} min")


def summarise_riel(metrics_path: Path, num_experts: int) -> dict | None:
    if not metrics_path.exists():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if r.get("stage") == "riel"]
    if not rows:
        return None
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"frac_reward_zero_std": [mean(f"frac_reward_zero_std/expert_{i}") for i in range(num_experts)],
            "all_wrong": [mean(f"rewards/expert_{i}/all_wrong") for i in range(num_experts)],
            "insertions": sum(r["buffer/insertions"] for r in rows),
            "sft_triggers": sum(r["buffer/sft_triggers"] for r in rows),
            "active_questions": sum(r.get("inter_expert/active_questions", 0) for r in rows)}


def main(argv=None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.resume:  # a resumed run is the same run: its own arguments, read back from its folder
        saved = args.resume / "args.json"
        if not saved.exists():
            sys.exit(f"train.py: {saved} not found: --resume takes the run folder of an earlier train.py run")
        args = parse_args(json.loads(saved.read_text()) + ["--resume", str(args.resume)])
    else:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "args.json").write_text(json.dumps(sys.argv[1:] if argv is None else list(argv)))
    try:
        cfg = make_config(args.preset, synthetic=args.model is None, overrides=overrides_from(args))
    except ValueError as err:
        sys.exit(f"train.py: {err}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = args.resume if args.resume else args.output
    resume_from, state = None, None
    if args.resume:
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            sys.exit(f"train.py: no complete checkpoint in {run_dir} to resume from")
        state = load_trainer_state(resume_from)
        print(f"resuming from {resume_from} (stage {state['stage']}, step {state['step']})")
    model_dir, model, tok, train, evals, answers, prompts, dataset = build_world(args, cfg, run_dir, device, dtype)
    if resume_from is not None:
        model.load_state_dict(Transformer.from_pretrained(resume_from, dtype=dtype, device=device).state_dict())
    stage_of_resume = state["stage"] if resume_from is not None else None
    results = {"after MEF": None, "after RIEL": None}
    mef_steps = 0
    try:
        # ---- Stage 1: MEF (E1) ----
        if cfg.run_mef:
            experts = [cfg.expert] if cfg.single_expert else list(range(len(prompts)))
            items, dropped = mef_items(tok, train, answers, prompts, dataset, experts)
            mef_steps = cfg.mef_steps if cfg.mef_steps is not None else math.ceil(len(items) * cfg.mef_epochs / cfg.mef_batch_size)
            if stage_of_resume != "riel":
                print(f"MEF: {len(items)} answers from experts {experts} (dropped as wrong: {dropped}), {mef_steps} steps")
                stage = Stage("mef", mef_steps, cfg.mef_lr, cfg.save_every, cfg.grad_clip, cfg.weight_decay,
                              cfg.warmup_steps, cfg.mef_schedule)
                optimizer = make_optimizer(model, stage)
                start = resume_stage(state, stage, optimizer, resume_from)

                def mef_step(step):
                    batch = [items[i] for i in batch_indices(len(items), cfg.mef_batch_size, step, cfg.seed)]
                    t0 = time.time()
                    loss, tokens = sft_loss(model, tok, batch, cfg.riel.micro_batch_size)
                    return torch.tensor(loss), {"loss/nll": loss, "tokens_per_second": tokens / (time.time() - t0)}

                model.train()
                run_stage(stage, model, optimizer, mef_step, run_dir=run_dir, tokenizer_dir=model_dir,
                          start_step=start, log_every=max(1, mef_steps // 20))
                del optimizer
            results["after MEF"] = (state["carry"]["after MEF"] if stage_of_resume == "riel"
                                    else evaluate(model, tok, evals, prompts, dataset, cfg))
        # ---- Stage 2: RIEL (E2-E7) ----
        if cfg.run_riel:
            riel_steps = cfg.riel_steps if cfg.riel_steps is not None else math.ceil(len(train) * cfg.riel_epochs / cfg.riel.questions_per_step)
            print(f"RIEL ({cfg.preset}): {riel_steps} steps x {cfg.riel.questions_per_step} questions x "
                  f"{len(prompts)} experts x G={cfg.riel.group_size}")
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
            buffer = (HardExampleBuffer(cfg.riel.buffer_capacity, cfg.riel.buffer_k, cfg.riel.group_size, cfg.seed)
                      if cfg.riel.use_buffer else None)
            stage = Stage("riel", riel_steps, cfg.riel_lr, cfg.save_every, cfg.grad_clip, cfg.weight_decay, 0,
                          step_offset=mef_steps, generators={"sampling": generator},
                          extra_state={"buffer": buffer} if buffer is not None else {},
                          hidden_losses=tuple(name for name, off in [("loss/ref_kl", cfg.riel.beta == 0),
                                                                     ("loss/inter_expert_kl", cfg.riel.inter_expert_weight == 0),
                                                                     ("loss/sft", buffer is None)] if off))
            ref_model = None
            if cfg.riel.beta > 0:  # E4's reference: the policy as RIEL starts, kept on disk for resume
                ref_dir = run_dir / "reference"
                if stage_of_resume != "riel":
                    model.save_pretrained(ref_dir)
                ref_model = Transformer.from_pretrained(ref_dir, dtype=dtype, device=device).eval()
                ref_model.requires_grad_(False)
            optimizer = make_optimizer(model, stage)
            start = resume_stage(state, stage, optimizer, resume_from)
            by_id = {ex.id: ex for ex in train}
            expert_of = [cfg.expert] if cfg.single_expert else list(range(len(prompts)))
            world = World(tok, prompts, dataset,
                          {(a.id, expert_of.index(a.expert)): a.response for a in answers if a.expert in expert_of})
            steps_per_epoch = max(1, len(train) // cfg.riel.questions_per_step)

            def step_fn(step):
                idx = batch_indices(len(train), cfg.riel.questions_per_step, step, cfg.seed + 1)
                return riel_step(model, world, [train[i] for i in idx], cfg.riel, generator, buffer, by_id, ref_model)

            run_stage(stage, model, optimizer, step_fn, run_dir=run_dir, tokenizer_dir=model_dir, start_step=start,
                      carry={"after MEF": results["after MEF"]}, sample_every=cfg.sample_every,
                      log_every=max(1, min(steps_per_epoch, riel_steps) // 20))
            results["after RIEL"] = evaluate(model, tok, evals, prompts, dataset, cfg)
    except LossNotFinite as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 1
    if not cfg.run_mef and not cfg.run_riel:
        return 0
    riel_summary = summarise_riel(run_dir / "metrics.jsonl", len(prompts)) if cfg.run_riel else None
    (run_dir / "results.json").write_text(json.dumps({"preset": cfg.preset, "results": results,
                                                      "riel_summary": riel_summary}, indent=1))
    print_table(results, riel_summary, time.time() - started)
    print(f"results: {run_dir / 'results.json'}; metrics: {run_dir / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
