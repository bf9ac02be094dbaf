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
from meml.data import Example, ExpertAnswer, question_key
from meml.errors import InputError
from meml.hf_checkpoint import write_json
from meml.inference import load
from meml.mef import generate_expert_data, verified_answers
from meml.model import ModelConfig, Transformer
from meml.prompts import EXPERT_SYSTEM_PROMPTS, expert_prompt, read_system_prompts, response_ids
from meml.rewards import Verifier, load_verifier, verifier_for
from meml.sampler import stream_key
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
    train_source: str               # the file of the training questions ("synthetic" for the world)
    longest_prompt: int = 0         # tokens of the longest expert prompt (the memory plan's)
    longest_answer: int = 0         # tokens of the longest MEF answer
    verifier: Verifier | None = None  # the reward (--reward; default: the data set's built-in verifier)


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
    checkpoints' HF files hold; tf32: fp32 matmuls on CUDA may use TF32 tensor cores."""
    weights: torch.dtype
    compute: torch.dtype
    save: torch.dtype
    tf32: bool = False

    def describe(self, device: torch.device) -> str:
        if self.compute == torch.float32:
            return f"float32 on {device}" + (" (TF32 matmuls)" if self.tf32 else "")
        masters = "bf16 weights and AdamW states" if self.weights == self.compute else "fp32 master weights"
        return f"bfloat16 autocast on {device}, {masters}"


def precision_of(args, device: torch.device, bf16_supported: bool | None = None) -> Precision:
    """--dtype auto (the default) picks what a GPU user expects: bf16 mixed precision on a CUDA
    device that supports bf16 (Ampere and later), else fp32 with TF32 matmuls on CUDA; fp32 on the
    CPU (where bf16 matmuls are slower and the reference runs were made). An explicit --dtype is
    taken as it is (float32 then means true fp32: no TF32). bf16_supported: for tests (default:
    ask torch.cuda)."""
    dtype, tf32 = args.dtype, False
    if dtype == "auto":
        if device.type == "cuda":
            supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
            dtype, tf32 = ("bfloat16", False) if supported else ("float32", True)
        else:
            dtype = "float32"
    compute = getattr(torch, dtype)
    bf16_weights = getattr(args, "bf16_weights", False)
    if bf16_weights and compute != torch.bfloat16:
        raise InputError("--bf16-weights needs --dtype bfloat16 (or --dtype auto on a GPU with bf16)")
    return Precision(compute if bf16_weights else torch.float32, compute, compute, tf32)


def build_task(args, cfg: TrainConfig, run_dir: Path, device, precision: Precision, *,
               shapes_only: bool = False) -> Task:
    """The model, tokenizer, questions and expert answers of this run. shapes_only: the model
    on the meta device (no weight read, no memory) and no teacher run: what --plan needs."""
    if args.model is None:  # the built-in synthetic world: assets written once into the run folder
        model_dir = synthetic_assets.write_synthetic_assets(run_dir / "synthetic", seed=cfg.seed)
        pool_size = synthetic_eval_pool(cfg)
        train, pool, answers = synthetic.load_synthetic(n_eval=pool_size, seed=cfg.seed,
                                                            teachers=cfg.synthetic_teachers)
        evals, eval_source = pool[:cfg.eval_size], "synthetic"
        devs = pool[cfg.eval_size:cfg.eval_size + cfg.dev_size]
        prompts, dataset = list(synthetic.EXPERT_PROMPTS), "synthetic"
        verifier = reward_of(args, dataset)
        torch.manual_seed(cfg.seed)
        with torch.device("meta" if shapes_only else "cpu"):
            model = Transformer(ModelConfig.from_json(model_dir / "config.json"))
        if not shapes_only:
            model.init_weights()
            model = model.to(device=device, dtype=precision.weights)
        tokenizer = Tokenizer.from_pretrained(model_dir)
        tokenizer.fit_to_model(model.config.vocab_size, source=str(model_dir))
    else:
        if args.dataset is None or args.data is None:
            raise InputError("--model needs --dataset and --data")
        model_dir, dataset = args.model, args.dataset
        verifier = reward_of(args, dataset)  # before anything loads: a JSONL task must name its reward
        if shapes_only:
            with torch.device("meta"):
                model = Transformer(ModelConfig.from_json(Path(model_dir) / "config.json"))
            tokenizer = Tokenizer.from_pretrained(model_dir)
            tokenizer.fit_to_model(model.config.vocab_size, source=str(model_dir))
        else:
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
        answers = expert_file_answers(args, examples, len(prompts))
        given_for_0 = {a.id for a in answers if a.expert == 0}
        # Expert0: the gold solutions, where the expert files give none
        answers = [ExpertAnswer(ex.id, 0, ex.solution) for ex in train
                   if ex.id not in given_for_0 and ex.solution] + answers  # a JSONL record may have none
    if args.train_size is not None:
        train = train[:args.train_size]
        if not train:
            raise InputError(f"--train-size {args.train_size} leaves no question to train on")
    in_train = {ex.id for ex in train}
    answers = [a for a in answers if a.id in in_train]  # answers to held-out questions never train
    if not shapes_only:
        answers += teacher_answers(args, cfg, run_dir, train, prompts, dataset, device, precision.compute)
    answers, dropped = verified_answers(answers, train, dataset, verifier=verifier)
    experts = [cfg.expert] if cfg.single_expert else list(range(len(prompts)))
    if max(experts) >= len(prompts):
        raise InputError(f"--expert {cfg.expert}: there are only {len(prompts)} expert prompts")
    if len(experts) == 1 and cfg.run_riel and cfg.riel.lambda1 > 0:
        raise InputError(f"{args.system_prompts or 'the expert prompts'}: one expert prompt, but the inter-expert "
                         f"KL (E5, --lambda1 {cfg.riel.lambda1}) needs two experts or more; give more prompts, "
                         "or --lambda1 0")
    task = Task(model_dir, model, tokenizer, dataset, train, evals, devs, str(eval_source), answers, dropped,
                [prompts[i] for i in experts], experts, "synthetic" if args.model is None else str(args.data))
    task.verifier = verifier
    task.longest_prompt, task.longest_answer = check_lengths(task, cfg, model.config.max_position_embeddings)
    return task


def reward_of(args, dataset: str) -> Verifier:
    """--reward, or the data set's built-in verifier; a JSONL task of one's own needs --reward."""
    spec = getattr(args, "reward", None)
    if spec is None:
        if dataset == "jsonl":
            raise InputError("--dataset jsonl needs --reward: PATH.py:function, module:function or a built-in "
                             "verifier (gsm8k, mathqa, strategyqa)")
        return verifier_for(dataset)
    return load_verifier(spec)


def expert_file_answers(args, examples: list[Example], num_prompts: int) -> list[ExpertAnswer]:
    """Every --expert-data file's answers, checked: each names a question of --data and an expert
    that has a prompt; the same line twice is kept once (with a note), and two different answers
    of one expert to one question are an error (E1 takes one answer per question and expert)."""
    known, answers, seen = {ex.id for ex in examples}, [], {}
    for path in args.expert_data:
        loaded = data.load_expert_jsonl(path)
        unknown = [a.id for a in loaded if a.id not in known]
        if unknown:
            raise InputError(f"{path}: {len(unknown)} answers name questions that are not in {args.data} "
                             f"(first: {unknown[0]!r}); ids are those meml.data gives the questions of "
                             f"--data: {examples[0].id!r} for its first")
        beyond = [a for a in loaded if a.expert >= num_prompts]
        if beyond:
            raise InputError(f"{path}: {len(beyond)} answers are for expert {beyond[0].expert} or later, but there "
                             f"are only {num_prompts} expert prompts (experts 0-{num_prompts - 1}); give one "
                             "system prompt per expert with --system-prompts")
        repeats = 0
        for a in loaded:
            earlier = seen.get((a.id, a.expert))
            if earlier is None:
                seen[(a.id, a.expert)] = (a, path)
                answers.append(a)
            elif earlier[0].response == a.response:
                repeats += 1
            else:
                raise InputError(f"{path}: two different answers of expert {a.expert} to question {a.id!r} (the "
                                 f"other in {earlier[1]}); MEF (E1) takes one answer per question and expert")
        if repeats:
            print(f"{path}: {repeats} repeated answers (same question, expert and text) counted once")
    return answers


def check_lengths(task: Task, cfg: TrainConfig, context: int) -> tuple[int, int]:
    """Every prompt, with the longest completion the run may generate for it (and every MEF
    answer with its prompt), fits the model's context, max_position_embeddings; the first that
    does not is named. (A 5 MB question would otherwise ask for the memory of a million-token
    attention.) Returns the longest prompt's and MEF answer's tokens."""
    longest = max(task.system_prompts, key=lambda prompt: len(task.tokenizer.encode(prompt)))  # in tokens
    generated = max(cfg.eval_max_new_tokens, cfg.riel.max_new_tokens if cfg.run_riel else 0)
    prompt_len = {}
    for source, questions in (("training", task.train), ("held-out", task.evals), ("dev", task.devs)):
        for ex in questions:
            prompt_len[ex.id] = len(expert_prompt(task.tokenizer, longest, task.dataset, ex))
            if prompt_len[ex.id] + generated > context:
                raise InputError(f"{source} question {ex.id!r}: its prompt is {prompt_len[ex.id]} tokens, and with "
                                 f"{generated} generated tokens (--max-new-tokens / --eval-max-new-tokens) it "
                                 f"exceeds the model's context of {context} (max_position_embeddings); shorten "
                                 "or drop it, or generate fewer tokens")
    longest_answer = 0
    for a in task.answers if cfg.run_mef else []:
        if a.expert not in task.experts:
            continue
        answer = len(response_ids(task.tokenizer, a.response))
        longest_answer = max(longest_answer, answer)
        if prompt_len.get(a.id, 0) + answer > context:
            raise InputError(f"expert {a.expert}'s answer to question {a.id!r}: with its prompt it is longer than "
                             f"the model's context of {context} tokens (max_position_embeddings)")
    return max(prompt_len.values(), default=0), longest_answer


def synthetic_eval_pool(cfg: TrainConfig) -> int:
    """How many of the synthetic world's eval-split problems a run draws: the held-out and dev
    questions are its first ones (300 at least, so a smaller --eval-size takes a prefix of the
    same 300)."""
    return max(300, cfg.eval_size + cfg.dev_size)


def teacher_answers(args, cfg, run_dir, train, prompts, dataset, device, dtype) -> list[ExpertAnswer]:
    """--teacher DIR (repeatable): expert n's answers written by a local checkpoint (loaded in
    the compute dtype: it only generates), verified, saved as run_dir/expert<n>.jsonl (and read
    back from there on --resume).

    Under torchrun every rank generates a contiguous share of the questions (rank 0 alone took
    all of them once, while the others waited at a barrier past NCCL's timeout at GSM8K's size);
    draws are keyed by question, so the file is the same at any world size. Rank 0 writes it."""
    answers = []
    for n, teacher_dir in enumerate(args.teacher, start=1):
        if n >= len(prompts):
            raise InputError(f"--teacher {teacher_dir}: teacher {n} would write expert {n}'s data, "
                             f"but there are only {len(prompts)} expert prompts")
        path = run_dir / f"expert{n}.jsonl"
        # written once (or by an earlier start of this run, e.g. before a --resume): rank 0 decides
        if not distributed.all_gather_objects(path.exists())[0]:
            teacher, teacher_tokenizer = load(teacher_dir, device=device, dtype=dtype)
            w, r = distributed.world_size(), distributed.rank()
            first, end = r * len(train) // w, (r + 1) * len(train) // w
            mine = generate_expert_data(teacher, teacher_tokenizer, train[first:end], prompts[n], n, dataset,
                                        max_new_tokens=cfg.riel.max_new_tokens, key=stream_key(cfg.seed, n),
                                        first=first, verifier=reward_of(args, dataset))
            del teacher
            generated = [a for part in distributed.all_gather_objects(mine) for a in part]
            if distributed.is_main():
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
    info = {"dataset": task.dataset, "reward": task.verifier.spec if task.verifier else task.dataset,
            "seed": cfg.seed, "system_prompts": task.system_prompts,
            "eval_source": task.eval_source, "eval_ids": [ex.id for ex in task.evals],
            "dev_ids": [ex.id for ex in task.devs], "eval_max_new_tokens": cfg.eval_max_new_tokens,
            "train_source": task.train_source, "train_questions": [question_key(ex) for ex in task.train],
            "commit": git_commit()}
    if task.dataset == "synthetic":
        info["eval_pool"] = synthetic_eval_pool(cfg)
    write_json(run_dir / RUN_INFO, info)  # atomically


def init_weights(task: Task, source: Path, device, precision: Precision) -> Path:
    """--init-from: the weights of another run's checkpoint (its newest, given a run folder);
    returns that checkpoint. Its tokenizer must be this run's: ids mean the same tokens (a
    synthetic world's tokenizer depends on its seed)."""
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
    return checkpoint


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
