"""Shared prompts in the training forward: a RIEL update when a group's prompt runs once.

E3/E4 score G rollouts of every (question, expert) prompt. `meml.policy.completion_logprobs`
runs each distinct prompt through the model once and every completion against its prompt's keys
and values (two passes); this script times that forward + backward against the one-pass layout
in which every row carries its own copy of the prompt (what meml did before, and what TRL does),
on batches laid out as RIEL lays them (`--groups` distinct prompts x `--group-size` rows, random
ids), both interleaved in one process. It prints the largest log-prob difference between the two.

    python -m bench.bench_prompt_forward                      # tiny + Qwen2.5-0.5B shape
    python -m bench.bench_prompt_forward --models tiny --prompt-tokens 150 --new-tokens 32
"""
import statistics
import time

import torch

from bench.bench_prefill import layout_arguments, model_of
from meml.logprob import token_logprobs
from meml.policy import completion_logprobs, pack


def one_pass_logprobs(model, batch) -> torch.Tensor:
    """Every row's prompt and completion in one sequence: the layout without sharing."""
    hidden = model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)
    width = batch.completion_ids.shape[1]
    hidden = hidden[:, batch.prompt_width - 1:batch.prompt_width - 1 + width]
    targets = batch.completion_ids.masked_fill(~batch.completion_mask, -100)
    logp = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.output_weight, targets.reshape(-1))
    return logp.view(targets.shape)


def main():
    args = layout_arguments(__doc__.split("\n")[0])
    print(f"{'model':<14}{'rows':>6}{'prompt':>8}{'new':>6}{'shared s':>11}{'one-pass s':>12}{'ratio':>8}"
          f"{'max |Δ logp|':>14}")
    for name in args.models:
        model = model_of(name).train()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 500, (args.groups, args.prompt_tokens), generator=g)
        prompts = [ids[i].tolist() for i in range(args.groups) for _ in range(args.group_size)]
        completions = torch.randint(0, 500, (len(prompts), args.new_tokens), generator=g).tolist()
        batch = pack(prompts, completions, pad_id=0)
        weights = torch.randn(len(prompts), args.new_tokens, generator=g)
        times, outs = {"shared": [], "one-pass": []}, {}
        for _ in range(args.repeats):
            for layout, forward in (("shared", completion_logprobs), ("one-pass", one_pass_logprobs)):
                start = time.perf_counter()
                logp = forward(model, batch)
                (logp * weights).sum().backward()
                times[layout].append(time.perf_counter() - start)
                outs[layout] = logp.detach()
                model.zero_grad(set_to_none=True)
        shared, one_pass = statistics.median(times["shared"]), statistics.median(times["one-pass"])
        gap = (outs["shared"] - outs["one-pass"]).abs().max().item()
        print(f"{name:<14}{len(prompts):>6}{args.prompt_tokens:>8}{args.new_tokens:>6}{shared:>11.3f}"
              f"{one_pass:>12.3f}{one_pass / shared:>7.2f}x{gap:>14.2e}")


if __name__ == "__main__":
    main()
