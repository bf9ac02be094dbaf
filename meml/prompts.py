"""Experts are system prompts: how a question becomes expert i's conversation P_i + Q_j.

One model, N experts: expert i sees the same user message (the question) under its own system
prompt, rendered with the checkpoint's real chat template in the *system* role. MEF (E1) teaches
each system prompt one teacher's reasoning style; RIEL samples from each; inference (E8) picks
one.

Every batch of expert prompts here is a grid: question q x expert i x copy c (the G rollouts of
RIEL, the pass@k samples of evaluation), laid out as flat rows for the sampler. `expert_grid`
returns the rows and an index tensor `rows[q, i, c]` giving each one's position: the one place
that knows the layout, so no caller does `(q * N + i) * G + c` arithmetic.

The default prompts below describe the paper's three teachers (Expert0 = the data set's gold
solution, Expert1 and Expert2 = two reasoning models); `--system-prompts FILE` replaces them.
The built-in synthetic world ships its own (meml/synthetic.py).
"""
import json
from pathlib import Path

import torch

from meml.data import Example
from meml.errors import InputError

EXPERT_SYSTEM_PROMPTS = (
    "You are Expert 0. Solve the problem the way a textbook's worked solution does: "
    "short steps, one computation each, then the final answer.",
    "You are Expert 1. Reason through the problem carefully and at length, checking each "
    "intermediate result before moving on, then state the final answer.",
    "You are Expert 2. Plan the solution first, then carry it out concisely and state the "
    "final answer.",
)


def read_system_prompts(path: Path) -> list[str]:
    """`--system-prompts FILE`: a JSON list of strings, one system prompt per expert."""
    try:
        prompts = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise InputError(f"{path}: expected a JSON list of system prompt strings, one per expert")
    for i, prompt in enumerate(prompts):
        if prompt in prompts[:i]:
            raise InputError(f"{path}: prompts {prompts.index(prompt)} and {i} are the same text; an expert is its "
                             "system prompt, so two identical prompts are one expert")
    return prompts


def user_message(dataset: str, example: Example) -> str:
    """The user turn: the question, plus what the verifier needs to read the answer."""
    if dataset == "mathqa":
        options = " , ".join(f"{k} ) {v}" for k, v in (example.options or {}).items())
        return f"{example.question}\nOptions: {options}\nAnswer with the option letter."
    if dataset == "strategyqa":
        return f"{example.question}\nAnswer yes or no."
    return example.question


def expert_messages(system_prompt: str, dataset: str, example: Example) -> list[dict]:
    """The conversation expert i is asked: its system prompt, then the question (a plain string
    is the user message; a JSONL conversation is kept turn for turn)."""
    if example.messages is not None:
        return [{"role": "system", "content": system_prompt}, *example.messages]
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": user_message(dataset, example)}]


def expert_prompt(tokenizer, system_prompt: str, dataset: str, example: Example) -> list[int]:
    """Token ids of P_i + Q_j, ending with the assistant header so the model answers next."""
    return tokenizer.apply_chat_template(expert_messages(system_prompt, dataset, example),
                                         add_generation_prompt=True)


def expert_grid(examples: list[Example], system_prompts: list[str], dataset: str,
                copies: int) -> tuple[list[list[dict]], torch.Tensor]:
    """Conversations for every (question q, expert i, copy c) as flat rows, and
    rows [Q, N, copies] long: the flat position of (q, i, c)."""
    conversations = [expert_messages(p, dataset, ex) for ex in examples for p in system_prompts
                     for _ in range(copies)]
    rows = torch.arange(len(conversations)).view(len(examples), len(system_prompts), copies)
    return conversations, rows


def response_ids(tokenizer, response: str) -> list[int]:
    """A reference answer as a completion: its tokens and the end-of-turn token (E1, E6).
    Stripped, as the Llama 3 template strips message contents: a leading newline would
    otherwise tokenize differently after the assistant header than in a rendered chat."""
    return tokenizer.encode(response.strip()) + [tokenizer.eot_id]
