"""Evaluate a checkpoint the way E8 says: one model, one expert prompt at a time, greedy.

Prints greedy accuracy per expert prompt, the majority vote over experts, the oracle (any
expert right), pass@k from sampling, and the error-overlap table; `--json FILE` writes them.

    python evaluate.py --model runs/default/checkpoint-002600
    python evaluate.py --model DIR --dataset gsm8k --data test.jsonl --json results.json

A checkpoint written by train.py carries its run's data set, expert prompts and held-out
questions (meml_run.json): by default it is scored on exactly those, as train.py scored it.
`--data` with another file, `--system-prompts` or `--dataset` override them; `--data` naming the
run's own training file still scores only its held-out questions, never the ones it trained on.
Under `torchrun --nproc_per_node N evaluate.py ...` each process answers a share of the questions
and rank 0 prints the table of all of them (the greedy figures are one process's).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from meml import distributed, synthetic
from meml.checkpoint import read_run_info
from meml.data import LOADERS, question_key
from meml.errors import ArgumentParser, InputError, count_at_least
from meml.evaluation import evaluate_experts, format_results
from meml.inference import load
from meml.prompts import EXPERT_SYSTEM_PROMPTS, read_system_prompts
from meml.task import precision_of, reward_of


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (weights + tokenizer)")
    p.add_argument("--dataset", choices=sorted(LOADERS) + ["synthetic"],
                   help="verifier and loader (default: the run's, for a train.py checkpoint)")
    p.add_argument("--data", type=Path, help="questions in the data set's original format (not for synthetic)")
    p.add_argument("--reward", help="the verifier, as train.py's --reward (default: the run's, else --dataset's own)")
    p.add_argument("--system-prompts", type=Path, help="JSON list of the experts' system prompts "
                   "(default: the run's, else the built-in ones)")
    p.add_argument("--limit", type=count_at_least(1), help="evaluate at most N questions (default: the run's held-out "
                   "questions, else 200)")
    p.add_argument("--max-new-tokens", type=count_at_least(1), help="completion length limit (default: the run's, else 256)")
    p.add_argument("--pass-k", type=count_at_least(0), default=4, help="samples per question for pass@k (0: skip)")
    p.add_argument("--seed", type=int, help="seed of sampling and of the synthetic eval split (default: the run's, else 0)")
    p.add_argument("--batch-size", type=count_at_least(1), default=64, help="rows per sampler call (memory only)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on a CUDA GPU that has it (else float32 with TF32), float32 on the CPU")
    return p.parse_args(argv)


def questions(args, info: dict | None, dataset: str, seed: int) -> tuple[list, str]:
    """The questions to score and a line saying where they come from."""
    run_eval = info is not None and info["dataset"] == dataset
    if dataset == "synthetic":
        pool = synthetic.load_synthetic(n_eval=info.get("eval_pool", 300) if run_eval else 300, seed=seed)[1]
        if run_eval:
            by_id = {ex.id: ex for ex in pool}
            return [by_id[i] for i in info["eval_ids"] if i in by_id], "the run's held-out synthetic questions"
        return pool, "the synthetic world's evaluation questions"
    if args.data is None and not run_eval:
        raise InputError(f"--dataset {dataset} needs --data")
    path = args.data if args.data is not None else Path(info["eval_source"])
    examples = LOADERS[dataset](path)
    if run_eval and path.resolve() == Path(info["eval_source"]).resolve():
        held_out = set(info["eval_ids"])
        return [ex for ex in examples if ex.id in held_out], f"the run's held-out questions of {path}"
    trained = set(info.get("train_questions", [])) if info else set()
    seen = [ex for ex in examples if question_key(ex) in trained]
    if seen:
        raise InputError(f"--data {path}: {len(seen)} of its {len(examples)} questions are ones the run trained on "
                         f"(first: {seen[0].id!r}; the run's training file was {info.get('train_source')}); scoring "
                         "them would overstate accuracy: evaluate on questions the run did not see")
    return examples, f"{path}"


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.json is not None and not args.json.parent.is_dir():
        raise InputError(f"--json {args.json}: folder {args.json.parent} does not exist (checked before the "
                         "evaluation, so that its results are not lost)")
    device = distributed.init(args.device)  # under torchrun: a share of the questions per process
    info = read_run_info(args.model)
    dataset = args.dataset or (info["dataset"] if info else None)
    if dataset is None:
        raise InputError(f"{args.model} is not a train.py checkpoint (no meml_run.json): pass --dataset")
    seed = args.seed if args.seed is not None else (info["seed"] if info else 0)
    spec = args.reward or (info.get("reward") if info and info["dataset"] == dataset else None)
    verifier = reward_of(argparse.Namespace(reward=spec), dataset)
    examples, source = questions(args, info, dataset, seed)
    if args.system_prompts:
        prompts = read_system_prompts(args.system_prompts)
    elif info is not None:
        prompts = info["system_prompts"]
    else:
        prompts = list(synthetic.EXPERT_PROMPTS if dataset == "synthetic" else EXPERT_SYSTEM_PROMPTS)
    limit = args.limit if args.limit is not None else (len(examples) if info else 200)
    max_new_tokens = args.max_new_tokens or (info["eval_max_new_tokens"] if info else 256)
    precision = precision_of(args, device)  # evaluation only generates: weights in the compute dtype
    if precision.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model, tokenizer = load(args.model, device=device, dtype=precision.compute)
    r = evaluate_experts(model, tokenizer, examples[:limit], prompts, dataset, verifier=verifier,
                         max_new_tokens=max_new_tokens,
                         batch_size=args.batch_size, pass_k=args.pass_k, seed=seed,
                         family=synthetic.family_of if dataset == "synthetic" else None)
    print(f"{r['num_questions']} questions ({source}), {len(prompts)} expert prompts")
    print(format_results({"greedy": r}))
    if args.json and distributed.is_main():
        args.json.write_text(json.dumps(r, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    """`run`, with a user's mistake printed as one line and exit status 2. Under torchrun the
    process ends here (`distributed.finish`)."""
    try:
        code = run(argv)
    except (InputError, OSError) as err:
        print(f"evaluate.py: {err}", file=sys.stderr)
        code = 2
    return distributed.finish(code)


if __name__ == "__main__":
    sys.exit(main())
