"""Experts are system prompts: how a question becomes expert i's prompt P_i (METHOD.md, Notation).

One model, N experts: expert i sees the same user message (the question) under its own system
prompt, rendered with the checkpoint's real chat template in the *system* role. MEF (E1) teaches
each system prompt one teacher's reasoning style; RIEL samples from each; inference (E8) picks
one.

The default prompts below describe the paper's three teachers (Expert0 = the data set's gold
solution, Expert1 and Expert2 = two reasoning models); `--system-prompts FILE` replaces them.
The built-in synthetic world ships its own (meml/synthetic.py).
"""
from meml.data import Example

EXPERT_SYSTEM_PROMPTS = (
    "You are Expert 0. Solve the problem the way a textbook's worked solution does: "
    "short steps, one computation each, then the final answer.",
    "You are Expert 1. Reason through the problem carefully and at length, checking each "
    "intermediate result before moving on, then state the final answer.",
    "You are Expert 2. Plan the solution first, then carry it out concisely and state the "
    "final answer.",
)


def user_message(dataset: str, example: Example) -> str:
    """The user turn: the question, plus what the verifier needs to read the answer."""
    if dataset == "mathqa":
        options = " , ".join(f"{k} ) {v}" for k, v in (example.options or {}).items())
        return f"{example.question}\nOptions: {options}\nAnswer with the option letter."
    if dataset == "strategyqa":
        return f"{example.question}\nAnswer yes or no."
    return example.question


def expert_prompt(tokenizer, system_prompt: str, dataset: str, example: Example) -> list[int]:
    """Token ids of P_i + Q_j, ending with the assistant header so the model answers next."""
    messages = [{"role": "system", "content": system_prompt},
                {"role": "user", "content": user_message(dataset, example)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def response_ids(tokenizer, response: str) -> list[int]:
    """A reference answer as a completion: its tokens and the end-of-turn token (E1, E6).
    Stripped, as the Llama 3 template strips message contents: a leading newline would
    otherwise tokenize differently after the assistant header than in a rendered chat."""
    return tokenizer.encode(response.strip()) + [tokenizer.eot_id]
