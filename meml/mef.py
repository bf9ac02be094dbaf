"""Stage 1, MEF (Multi-Expert Fine-tuning): E1, and where its expert data comes from.

    L_MEF = − Σ_j Σ_i log π_θ( A_j^(i) | Q_j, P_i )                                       (E1)

One model learns every expert's reference answers, each under that expert's system prompt, so
that later the prompt alone selects a reasoning style. The loss is the token-mean NLL of the
answer tokens (end-of-turn token included, prompt excluded): the literal E1 divided by the
number of answer tokens in the batch, so the learning rate does not depend on batch size.

[decision] (METHOD.md) a teacher answer whose final answer the verifier rejects is dropped.

Expert data is JSONL `{"id", "expert", "response"}` (meml/data.py). `generate_expert_data`
writes it from any local teacher checkpoint under an expert's system prompt, keeping only
verified-correct answers: how a user without the paper's teachers (DeepSeek-R1,
Doubao-1.5-thinking) brings two other models.
"""
from dataclasses import dataclass

import torch

from meml.data import Example, ExpertAnswer
from meml.losses import nll_loss
from meml.policy import completion_logprobs, pack
from meml.prompts import expert_prompt, response_ids
from meml.rewards import reward
from meml.sampler import generate


@dataclass
class SFTItem:
    prompt: list[int]      # P_i + Q_j, chat-formatted, ending with the assistant header
    completion: list[int]  # A_j^(i) + end-of-turn token
    expert: int


def mef_items(tokenizer, examples: list[Example], answers: list[ExpertAnswer], system_prompts: list[str],
              dataset: str, experts: list[int]) -> tuple[list[SFTItem], dict[int, int]]:
    """(Q_j, P_i, A_j^(i)) triples for the experts taking part, and how many were dropped per
    expert because their final answer is wrong. `experts[k]` is the expert whose answers
    train system prompt k (ExpertX-SFT: experts = [X], one prompt)."""
    by_id = {ex.id: ex for ex in examples}
    items, dropped = [], {i: 0 for i in experts}
    for ans in answers:
        if ans.expert not in experts:
            continue
        if ans.id not in by_id:
            raise ValueError(f"expert data names example id {ans.id!r}, which is not in the data set")
        example = by_id[ans.id]
        if reward(dataset, ans.response, example) != 1.0:
            dropped[ans.expert] += 1
            continue
        k = experts.index(ans.expert)
        items.append(SFTItem(expert_prompt(tokenizer, system_prompts[k], dataset, example),
                             response_ids(tokenizer, ans.response), k))
    return items, dropped


def sft_loss(model, tokenizer, items: list[SFTItem], micro_batch_size: int) -> tuple[float, int]:
    """E1 over `items`, token-mean, with backward per micro-batch. Returns (loss, tokens)."""
    total_tokens = sum(len(it.completion) for it in items)
    value = 0.0
    for start in range(0, len(items), micro_batch_size):
        chunk = items[start:start + micro_batch_size]
        batch = pack([it.prompt for it in chunk], [it.completion for it in chunk], tokenizer.pad_id,
                     device=model.output_weight.device)
        logp = completion_logprobs(model, batch, vocab_limit=tokenizer.vocab_size)  # [b, T]
        loss = batch.completion_mask.sum().item() / total_tokens * nll_loss(logp, batch.completion_mask)
        loss.backward()
        value += loss.item()
    return value, total_tokens


@torch.no_grad()
def generate_expert_data(teacher, teacher_tokenizer, examples: list[Example], system_prompt: str,
                         expert: int, dataset: str, *, samples_per_question: int = 1,
                         max_new_tokens: int = 512, temperature: float = 0.7, batch_size: int = 16,
                         generator: torch.Generator | None = None) -> list[ExpertAnswer]:
    """Sample the teacher under `system_prompt`; keep the first verified-correct answer per question."""
    teacher.eval()
    kept = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [expert_prompt(teacher_tokenizer, system_prompt, dataset, ex)
                   for ex in chunk for _ in range(samples_per_question)]
        gen = generate(teacher, prompts, max_new_tokens=max_new_tokens, stop_ids=teacher_tokenizer.stop_ids,
                       pad_id=teacher_tokenizer.pad_id, vocab_limit=teacher_tokenizer.vocab_size,
                       temperature=temperature, generator=generator)
        for q, ex in enumerate(chunk):
            for s in range(samples_per_question):
                row = q * samples_per_question + s
                ids = gen.completion_ids[row][gen.completion_mask[row]].tolist()
                text = teacher_tokenizer.decode(ids, skip_special_tokens=True)
                if gen.finished[row] and reward(dataset, text, ex) == 1.0:
                    kept.append(ExpertAnswer(ex.id, expert, text))
                    break
    return kept
