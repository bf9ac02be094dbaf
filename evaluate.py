"""Evaluate a checkpoint the way E8 says: one model, one expert prompt at a time, greedy.

Prints greedy accuracy per expert prompt, the majority vote over experts, the oracle (any
expert right), pass@k from sampling, and the error-overlap table; `--json FILE` writes them.

    python evaluate.py --model runs/default/checkpoint-000400 --dataset synthetic
    python evaluate.py --model DIR --dataset gsm8k --data test.jsonl --json results.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from meml import synthetic
from meml.data import LOADERS
from meml.evaluation import evaluate_experts, format_results
from meml.model import Transformer
from meml.prompts import EXPERT_SYSTEM_PROMPTS
from meml.tokenizer import Tokenizer



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (weights + tokenizer)")
    p.add_argument("--dataset", required=True, choices=sorted(LOADERS) + ["synthetic"])
    p.add_argument("--data", type=Path, help="questions in the data set's original format (not for synthetic)")
    p.add_argument("--system-prompts", type=Path, help="JSON list of the experts' system prompts")
    p.add_argument("--limit", type=int, default=200, help="evaluate the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--pass-k", type=int, default=4, help="samples per question for pass@k (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic eval split and of sampling")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dataset == "synthetic":
        examples = synthetic.load_synthetic(seed=args.seed)[1]
        prompts = list(synthetic.EXPERT_PROMPTS)
    else:
        if args.data is None:
            sys.exit(f"evaluate.py: --dataset {args.dataset} needs --data")
        examples = LOADERS[args.dataset](args.data)
        prompts = list(EXPERT_SYSTEM_PROMPTS)
    if args.system_prompts:
        prompts = json.loads(args.system_prompts.read_text())
    model = Transformer.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    tokenizer = Tokenizer.from_pretrained(args.model)
    tokenizer.fit_to_model(model.config.vocab_size, source=str(args.model))
    r = evaluate_experts(model, tokenizer, examples[:args.limit], prompts, args.dataset,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         pass_k=args.pass_k, seed=args.seed)
    print(f"{r['num_questions']} questions, {len(prompts)} expert prompts")
    print(format_results({"greedy": r}))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
