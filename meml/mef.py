"""Stage 1, MEF (Multi-Expert Fine-tuning): E1, and where its expert data comes from.

    L_MEF = − Σ_j Σ_i log π_θ( A_j^(i) | Q_j, P_i )                                       (E1)

One model learns every expert's reference answers, each under that expert's system prompt, so
that later the prompt alone selects a reasoning style. The loss is the token-mean NLL of the
answer tokens (end-of-turn token included, prompt excluded): the literal E1 divided by the
number of answer tokens in the batch, so the learning rate does not depend on batch size.

Decision D1 (README.md, "Decisions"): a teacher answer whose final answer the verifier rejects
is dropped, for MEF and for the buffer's `--buffer-target expert` alike.

Expert data is JSONL `{"id", "expert", "response"}` (meml/data.py). `generate_expert_data`
writes it from any local teacher checkpoint under an expert's system prompt, keeping only
verified-correct answers: how a user without the paper's teachers (DeepSeek-R1,
Doubao-1.5-thinking) brings two other models.
"""
from dataclasses import dataclass

import torch

from meml.data import Example, ExpertAnswer
from meml.errors import InputError
from meml.inference import complete
from meml.losses import nll_loss
from meml.policy import completion_logprobs, pack
from meml.prompts import expert_grid, expert_prompt, response_ids
from meml.rewards import verifier_for
from meml.sampler import stream_key


@dataclass
class SFTItem:
    prompt: list[int]      # P_i + Q_j, chat-formatted, ending with the assistant header
    completion: list[int]  # A_j^(i) + end-of-turn token
    expert: int


def verified_answers(answers: list[ExpertAnswer], examples: list[Example], dataset: str,
                     source: str = "expert data", verifier=None) -> tuple[list[ExpertAnswer], dict[int, int]]:
    """The answers whose final answer the verifier accepts (decision D1), and how many were
    dropped per expert. An answer naming a question that is not in `examples` is an error."""
    by_id = {ex.id: ex for ex in examples}
    verifier = verifier_for(dataset, verifier)
    kept, dropped = [], {}
    for ans in answers:
        if ans.id not in by_id:
            raise InputError(f"{source}: answer of expert {ans.expert} names question {ans.id!r}, "
                             "which is not among the training questions")
        if verifier(ans.response, by_id[ans.id]) == 1.0:
            kept.append(ans)
        else:
            dropped[ans.expert] = dropped.get(ans.expert, 0) + 1
    return kept, dropped


def mef_items(tokenizer, examples: list[Example], answers: list[ExpertAnswer], system_prompts: list[str],
              dataset: str, experts: list[int]) -> list[SFTItem]:
    """(Q_j, P_i, A_j^(i)) for the experts taking part, from verified answers. `experts[k]` is
    the expert whose answers train system prompt k (ExpertX-SFT: experts = [X], one prompt)."""
    by_id = {ex.id: ex for ex in examples}
    return [SFTItem(expert_prompt(tokenizer, system_prompts[experts.index(a.expert)], dataset, by_id[a.id]),
                    response_ids(tokenizer, a.response), experts.index(a.expert))
            for a in answers if a.expert in experts]


def sft_loss(model, tokenizer, items: list[SFTItem], micro_batch_size: int,
             total_tokens: int | None = None) -> tuple[float, int]:
    """E1 over `items`, token-mean, with backward per micro-batch. Returns (loss, tokens).
    total_tokens: the answer tokens of the whole batch when `items` is this process's share of
    it (meml/distributed.py); the returned loss is then this share's part of the batch's."""
    total_tokens = total_tokens or sum(len(it.completion) for it in items)
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


def generate_expert_data(teacher, teacher_tokenizer, examples: list[Example], system_prompt: str,
                         expert: int, dataset: str, *, samples_per_question: int = 1,
                         max_new_tokens: int = 512, temperature: float = 0.7, batch_size: int = 16,
                         generator: torch.Generator | None = None, key: int | None = None,
                         first: int = 0, verifier=None) -> list[ExpertAnswer]:
    """Sample the teacher under `system_prompt`; keep the first verified-correct answer per question.

    Draws come from `generator`, or, given `key`, from the keys (key, question, 0, sample) with
    `first` the index of examples[0] in the whole data set: a question then gets the same sample
    whichever process and batch it is generated in (train.py shards teachers across ranks)."""
    teacher.eval()
    verifier = verifier_for(dataset, verifier)
    kept = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        conversations, rows = expert_grid(chunk, [system_prompt], dataset, samples_per_question)  # rows [q, 1, s]
        keys = None if key is None else [stream_key(key, first + start + q, 0, s)
                                         for q in range(len(chunk)) for s in range(samples_per_question)]
        out = complete(teacher, teacher_tokenizer, conversations, max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=len(conversations), generator=generator, row_keys=keys)
        for q, ex in enumerate(chunk):
            for row in rows[q, 0].tolist():
                if out.finished[row] and verifier(out.texts[row], ex) == 1.0:
                    kept.append(ExpertAnswer(ex.id, expert, out.texts[row]))
                    break
    return kept
