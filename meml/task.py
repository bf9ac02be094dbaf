"""What a run trains on, built once from train.py's arguments: the model, its tokenizer, the
training, held-out and dev questions, every expert's verified answers (`build_task` -> `Task`);
the precision it runs in; the weights it starts from (`init_weights`, --init-from); and the
run information evaluate.py reads back (`write_run_info`).

The built-in synthetic world writes its tokenizer and config into the run folder and trains a
model from scratch; a real checkpoint brings its own, and its data set file is split into
training questions, dev questions (--dev-size, just before the held-out ones) and held-out ones
(the last --eval-size, or --eval-data).
"""
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from meml import data, distributed, synthetic, synthetic_assets
from meml.checkpoint import RUN_INFO, latest_checkpoint
from meml.config import TrainConfig
from meml.data import Example, ExpertAnswer
from meml.errors import InputError
from meml.hf_checkpoint import write_json
from meml.inference import load
from meml.mef import generate_expert_data, verified_answers
from meml.model import ModelConfig, Transformer
from meml.prompts import EXPERT_SYSTEM_PROMPTS, read_system_prompts
from meml.tokenizer import Tokenizer


@dataclass
class Task:
    """Everything a run trains and evaluates on, built once from its arguments."""
    model_dir: Path                 # where the tokenizer and config come from
    model: Transformer
    tokenizer: Tokenizer
    dataset: str                    # verifier name (meml.rewards)
    train: list[Example]
    evals: list[Example]
    devs: list[Example]             # dev questions (--dev-size): choose the best expert on these
    eval_source: str                # the file the held-out questions come from ("synthetic" for the world)
    answers: list[ExpertAnswer]     # verified reference answers of every expert (D1)
    dropped: dict[int, int]         # expert -> answers dropped as wrong
    system_prompts: list[str]       # P_i of the experts taking part
    experts: list[int]              # experts[k]: the expert whose answers train prompt k


def split_questions(examples: list[Example], path: Path, eval_size: int) -> tuple[list, list]:
    """(train, held out): the last eval_size questions of the file are held out. A file that
    would leave nothing to train on is an error naming it and the numbers."""
    if not examples:
        raise InputError(f"{path} holds no questions")
    if eval_size >= len(examples):
        raise InputError(f"{path} holds {len(examples)} questions and --eval-size {eval_size} holds out "
                         f"the last {eval_size} for evaluation, leaving none to train on; pass a smaller "
                         "--eval-size or the held-out questions as --eval-data")
    return examples[:len(examples) - eval_size], examples[len(examples) - eval_size:]


@dataclass
class Precision:
    """--dtype and --bf16-weights: what the weights are stored in, what matmuls run in, what
    checkpoints' HF files hold."""
    weights: torch.dtype
    compute: torch.dtype
    save: torch.dtype


def precision_of(args) -> Precision:
    compute = getattr(torch, args.dtype)
    if args.bf16_weights and compute != torch.bfloat16:
        raise InputError("--bf16-weights needs --dtype bfloat16")
    return Precision(compute if args.bf16_weights else torch.float32, compute, compute)


def build_task(args, cfg: TrainConfig, run_dir: Path, device, precision: Precision) -> Task:
    """The model, tokenizer, questions and expert answers of this run."""
    if args.model is None:  # the built-in synthetic world: assets written once into the run folder
        model_dir = synthetic_assets.write_synthetic_assets(run_dir / "synthetic", seed=cfg.seed)
        pool_size = synthetic_eval_pool(cfg)
        train, pool, answers = synthetic.load_synthetic(n_eval=pool_size, seed=cfg.seed)
        evals, eval_source = pool[:cfg.eval_size], "synthetic"
        devs = pool[cfg.eval_size:cfg.eval_size + cfg.dev_size]
        prompts, dataset = list(synthetic.EXPERT_PROMPTS), "synthetic"
        torch.manual_seed(cfg.seed)
        model = Transformer(ModelConfig.from_json(model_dir / "config.json"))
        model.init_weights()
        model = model.to(device=device, dtype=precision.weights)
        tokenizer = Tokenizer.from_pretrained(model_dir)
        tokenizer.fit_to_model(model.config.vocab_size, source=str(model_dir))
    else:
        if args.dataset is None or args.data is None:
            raise InputError("--model needs --dataset and --data")
        model_dir, dataset = args.model, args.dataset
        model, tokenizer = load(model_dir, device=device, dtype=precision.weights)
        examples = data.LOADERS[dataset](args.data)
        if args.eval_data:
            train, evals, eval_source = examples, data.LOADERS[dataset](args.eval_data)[:cfg.eval_size], args.eval_data
        else:
            train, evals = split_questions(examples, args.data, cfg.eval_size)
            eval_source = args.data
        if not train:
            raise InputError(f"{args.data} holds no questions")
        devs = train[len(train) - cfg.dev_size:] if cfg.dev_size else []  # just before the held-out ones
        train = train[:len(train) - len(devs)]
        if not train:
            raise InputError(f"--dev-size {cfg.dev_size} leaves no question of {args.data} to train on")
        prompts = read_system_prompts(args.system_prompts) if args.system_prompts else list(EXPERT_SYSTEM_PROMPTS)
        answers = [ExpertAnswer(ex.id, 0, ex.solution) for ex in train]  # Expert0: the gold solutions
        known = {ex.id for ex in examples}
        for path in args.expert_data:
            loaded = data.load_expert_jsonl(path)
            unknown = [a.id for a in loaded if a.id not in known]
            if unknown:
                raise InputError(f"{path}: {len(unknown)} answers name questions that are not in {args.data} "
                                 f"(first: {unknown[0]!r}); ids are those meml.data gives the questions of "
                                 f"--data: {examples[0].id!r} for its first")
            answers += loaded
    if args.train_size is not None:
        train = train[:args.train_size]
        if not train:
            raise InputError(f"--train-size {args.train_size} leaves no question to train on")
    in_train = {ex.id for ex in train}
    answers = [a for a in answers if a.id in in_train]  # answers to held-out questions never train
    answers += teacher_answers(args, cfg, run_dir, train, prompts, dataset, device, precision.compute)
    answers, dropped = verified_answers(answers, train, dataset)
    experts = [cfg.expert] if cfg.single_expert else list(range(len(prompts)))
    if max(experts) >= len(prompts):
        raise InputError(f"--expert {cfg.expert}: there are only {len(prompts)} expert prompts")
    return Task(model_dir, model, tokenizer, dataset, train, evals, devs, str(eval_source), answers, dropped,
                [prompts[i] for i in experts], experts)


def synthetic_eval_pool(cfg: TrainConfig) -> int:
    """How many of the synthetic world's eval-split problems a run draws: the held-out and dev
    questions are its first ones (300 at least, so a smaller --eval-size takes a prefix of the
    same 300)."""
    return max(300, cfg.eval_size + cfg.dev_size)


def teacher_answers(args, cfg, run_dir, train, prompts, dataset, device, dtype) -> list[ExpertAnswer]:
    """--teacher DIR (repeatable): expert n's answers written by a local checkpoint (loaded in
    the compute dtype: it only generates), verified, saved as run_dir/expert<n>.jsonl (and read
    back from there on --resume)."""
    answers = []
    for n, teacher_dir in enumerate(args.teacher, start=1):
        if n >= len(prompts):
            raise InputError(f"--teacher {teacher_dir}: teacher {n} would write expert {n}'s data, "
                             f"but there are only {len(prompts)} expert prompts")
        path = run_dir / f"expert{n}.jsonl"
        # written once, by rank 0 (or by an earlier start of this run, e.g. before a --resume)
        if distributed.is_main() and not path.exists():
            teacher, teacher_tokenizer = load(teacher_dir, device=device, dtype=dtype)
            generated = generate_expert_data(teacher, teacher_tokenizer, train, prompts[n], n, dataset,
                                             max_new_tokens=cfg.riel.max_new_tokens,
                                             generator=torch.Generator(device=device).manual_seed(cfg.seed))
            data.write_expert_jsonl(path, generated)
            print(f"teacher {teacher_dir}: {len(generated)}/{len(train)} verified answers -> {path}")
        distributed.barrier()
        answers += data.load_expert_jsonl(path)
    return answers


def write_run_info(run_dir: Path, task: Task, cfg: TrainConfig) -> None:
    """What evaluate.py needs to score this run's checkpoints on this run's terms (RUN_INFO).
    Written by rank 0."""
    if not distributed.is_main():
        return
    info = {"dataset": task.dataset, "seed": cfg.seed, "system_prompts": task.system_prompts,
            "eval_source": task.eval_source, "eval_ids": [ex.id for ex in task.evals],
            "dev_ids": [ex.id for ex in task.devs], "eval_max_new_tokens": cfg.eval_max_new_tokens,
            "commit": git_commit()}
    if task.dataset == "synthetic":
        info["eval_pool"] = synthetic_eval_pool(cfg)
    write_json(run_dir / RUN_INFO, info)  # atomically


def init_weights(task: Task, source: Path, device, precision: Precision) -> None:
    """--init-from: the weights of another run's checkpoint (its newest, given a run folder).
    Its tokenizer must be this run's: ids mean the same tokens (a synthetic world's tokenizer
    depends on its seed)."""
    checkpoint = source if (source / "config.json").exists() else latest_checkpoint(source)
    if checkpoint is None:
        raise InputError(f"--init-from {source}: no checkpoint there (a checkpoint folder or a run folder)")
    theirs = Tokenizer.from_pretrained(checkpoint)
    if theirs.vocab_size != task.tokenizer.vocab_size or any(
            theirs.encode(t) != task.tokenizer.encode(t) for t in (task.train[0].question, task.train[0].solution)):
        raise InputError(f"--init-from {checkpoint}: its tokenizer is not this run's (for the synthetic world: "
                         "another --seed)")
    weights = Transformer.from_pretrained(checkpoint, dtype=precision.weights, device=device).state_dict()
    try:
        task.model.load_state_dict(weights)
    except RuntimeError as err:
        raise InputError(f"--init-from {checkpoint}: its weights do not fit this run's model ({str(err)[:200]})")
    print(f"RIEL starts from {checkpoint}")


def git_commit() -> str | None:
    """The commit of this code (with "+changes" when the work tree differs), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
