"""log π_θ(completion | prompt), token by token: the one quantity every loss here needs.

MEF (E1), the policy loss (E3), the KL terms (E4, E5) and the buffer's SFT (E6) all score some
completions given some prompts. This module packs such pairs into one batch and returns the
per-token log-probs of the completion tokens only (prompt excluded, stop token included),
without ever materialising [tokens x vocab] logits: the decoder returns final hidden states and
`token_logprobs` (meml/logprob.py) folds the output projection and the log-softmax together.

A batch keeps each distinct prompt once (left-padded) and every row's completion (right-padded):

    prompt_ids  [pad pad p0 p1 p2]      completion_ids [c0 c1 c2 pad]   prompt_of [0]
                [q0  q1  q2 q3 q4]                     [d0 d1 pad pad]            [1]
                                                       [e0 e1 e2 e3]              [1]

and the model runs in two passes: the U distinct prompts, keeping their keys and values
(`PromptKV`, meml/model.py), then the B completions, each attending to its own prompt's. RIEL
scores G rollouts of every (question, expert) prompt, so the prompt's share of the work is paid
once instead of G times; the result is the one-pass forward's (tests/test_policy.py). The hidden
state of a prompt's last token predicts completion token 0, completion token t-1's predicts t.
"""
from dataclasses import dataclass

import torch

from meml.logprob import token_logprobs
from meml.model import PromptKV


@dataclass
class PackedBatch:
    prompt_ids: torch.Tensor       # [U, P] each distinct prompt once, left-padded
    prompt_mask: torch.Tensor      # [U, P] 1 on real tokens
    prompt_of: torch.Tensor        # [B] the row's prompt, an index into prompt_ids
    completion_ids: torch.Tensor   # [B, T] right-padded
    completion_mask: torch.Tensor  # [B, T] bool, True on completion tokens (stop token included)

    @property
    def prompt_width(self) -> int:  # P
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, P+T] every row's prompt then its completion: the one-pass layout."""
        return torch.cat((self.prompt_ids[self.prompt_of], self.completion_ids), 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P+T] 1 on real tokens of input_ids."""
        return torch.cat((self.prompt_mask[self.prompt_of], self.completion_mask.long()), 1)


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         device: torch.device | str = "cpu") -> PackedBatch:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the chat template gives several)")
    distinct = {}  # prompt -> its index, in order of first appearance
    prompt_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    width_p = max(len(p) for p in distinct)
    width_c = max(1, max(len(c) for c in completions))
    prompt_ids = torch.full((len(distinct), width_p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(distinct), width_p), dtype=torch.long)
    for row, p in enumerate(distinct):
        prompt_ids[row, width_p - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[row, width_p - len(p):] = 1
    completion_ids = torch.full((len(completions), width_c), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), width_c), dtype=torch.bool)
    for row, c in enumerate(completions):
        completion_ids[row, :len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[row, :len(c)] = True
    return PackedBatch(prompt_ids.to(device), prompt_mask.to(device), torch.tensor(prompt_of, device=device),
                       completion_ids.to(device), completion_mask.to(device))


def completion_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """The final hidden states that predict the completion tokens, [B, T, H] (see the module's
    docstring). Always two passes, even when no prompt is shared: under FSDP every rank must run
    as many forwards as every other."""
    prompts = PromptKV(model.config.num_hidden_layers, len(batch.prompt_ids))
    hidden = model(batch.prompt_ids, attention_mask=batch.prompt_mask, kv_cache=prompts, return_hidden=True)
    first = hidden[:, -1:][batch.prompt_of]                  # [B, 1, H] predicts completion token 0
    width = batch.completion_ids.shape[1]
    fed = max(width - 1, 1)  # the last completion token predicts nothing (one column stays fed)
    mask = torch.cat((batch.prompt_mask[batch.prompt_of], batch.completion_mask[:, :fed].long()), 1)
    rest = model(batch.completion_ids[:, :fed], attention_mask=mask, kv_cache=prompts.select_rows(batch.prompt_of),
                 return_hidden=True)                         # [B, fed, H]: token t-1 predicts token t
    return torch.cat((first, rest[:, :width - 1]), 1)


def completion_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0,
                        vocab_limit: int | None = None) -> torch.Tensor:
    """Per-token log π_θ(c_t | prompt, c_<t) at the given temperature: [B, T], 0 off the mask.

    vocab_limit drops the padded vocabulary rows (ids the tokenizer does not know), exactly as
    the sampler does, so the sampler's π_old and these log-probs describe the same distribution.
    Under torch.autocast (mixed precision) the output projection runs in the autocast dtype, as
    the sampler's does; the log-softmax is fp32 either way.
    """
    hidden = completion_hidden(model, batch)  # [B, T, H]: row t predicts completion token t
    targets = batch.completion_ids.masked_fill(~batch.completion_mask, -100)  # -100: ignored row
    weight = model.output_weight if vocab_limit is None else model.output_weight[:vocab_limit]
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # mixed precision: the output matmul in bf16, as the sampler's
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):  # token_logprobs takes its dtype from its inputs
        logp = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                              temperature=temperature)
    return logp.view(targets.shape)
