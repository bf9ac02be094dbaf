"""log π_θ(completion | prompt), token by token: the one quantity every loss here needs.

MEF (E1), the policy loss (E3), the KL terms (E4, E5) and the buffer's SFT (E6) all score some
completions given some prompts. This module packs such pairs into one padded batch and returns
the per-token log-probs of the completion tokens only (prompt excluded, stop token included),
without ever materialising [tokens x vocab] logits: the decoder returns final hidden states and
`token_logprobs` (meml/logprob.py) folds the output projection and the log-softmax together.

Layout of a packed batch (the same as the sampler's: prompts left-padded, completions after):

    [pad pad p0 p1 p2 | c0 c1 c2 pad]      prompt_width = 5 columns, completion_width = 4
    [p0 p1 p2 p3 p4   | c0 c1 pad pad]

so the hidden state at column prompt_width-1+t predicts completion token t in every row.
"""
from dataclasses import dataclass

import torch

from meml.logprob import token_logprobs


@dataclass
class PackedBatch:
    input_ids: torch.Tensor        # [B, P+T] prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor   # [B, P+T] 1 for real tokens
    completion_ids: torch.Tensor   # [B, T]
    completion_mask: torch.Tensor  # [B, T] bool, True on completion tokens (stop token included)
    prompt_width: int              # P


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         device: torch.device | str = "cpu") -> PackedBatch:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the chat template gives several)")
    width_p = max(len(p) for p in prompts)
    width_c = max(1, max(len(c) for c in completions))
    batch = len(prompts)
    input_ids = torch.full((batch, width_p + width_c), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width_p + width_c), dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[row, width_p - len(p):width_p] = torch.tensor(p, dtype=torch.long)
        input_ids[row, width_p:width_p + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[row, width_p - len(p):width_p + len(c)] = 1
    completion_ids = input_ids[:, width_p:].clone()
    completion_mask = attention_mask[:, width_p:].bool()
    return PackedBatch(input_ids.to(device), attention_mask.to(device), completion_ids.to(device),
                       completion_mask.to(device), width_p)


def completion_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0,
                        vocab_limit: int | None = None) -> torch.Tensor:
    """Per-token log π_θ(c_t | prompt, c_<t) at the given temperature: [B, T], 0 off the mask.

    vocab_limit drops the padded vocabulary rows (ids the tokenizer does not know), exactly as
    the sampler does, so the sampler's π_old and these log-probs describe the same distribution.
    Under torch.autocast (mixed precision) the output projection runs in the autocast dtype, as
    the sampler's does; the log-softmax is fp32 either way.
    """
    hidden = model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)  # [B, P+T, H]
    width_c = batch.completion_ids.shape[1]
    start = batch.prompt_width - 1
    hidden = hidden[:, start:start + width_c]  # [B, T, H]: column t predicts completion token t
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
