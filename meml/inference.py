"""The front door: load a checkpoint with its tokenizer, and turn conversations into completions.

    from meml.inference import load, complete
    model, tokenizer = load("runs/default/checkpoint-004400")
    out = complete(model, tokenizer, ["What is 17 + 25?"])             # greedy
    print(out.texts[0])
    out = complete(model, tokenizer, [[{"role": "system", "content": "You are Expert 1."},
                                       {"role": "user", "content": "What is 17 + 25?"}]],
                   temperature=1.0, max_new_tokens=64)

`load` fits the tokenizer to the model (ids past the model's vocabulary dropped, stop / pad ids
checked) and `complete` hands the sampler the tokenizer's stop ids, pad id and vocabulary
limit, so a caller never copies them by hand. RIEL's rollouts (meml/riel.py), MEF's teacher data
(meml/mef.py) and evaluation (meml/evaluation.py) all generate through `complete`.
"""
import contextlib
from dataclasses import dataclass

import torch

from meml import distributed
from meml.model import Transformer
from meml.sampler import generate, int64_bits
from meml.tokenizer import Tokenizer


def load(path, *, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """A Hugging Face-layout checkpoint folder -> (model, tokenizer fitted to the model)."""
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_pretrained(path)
    tokenizer.fit_to_model(model.config.vocab_size, source=str(path))
    return model, tokenizer


@dataclass
class Completions:
    texts: list[str]                  # decoded completions, special tokens dropped
    prompt_ids: list[list[int]]       # the rendered prompts
    completion_ids: list[list[int]]   # generated ids, stop token included
    logprobs: list[torch.Tensor]      # [len] float32 on CPU: log π of each generated token
    finished: list[bool]              # True: stopped at a stop id; False: cut at max_new_tokens
    entropy: list[torch.Tensor] | None = None  # [len] float32: entropy of each step (return_entropy)


@torch.no_grad()
def complete(model, tokenizer, conversations: list, *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64,
             generator: torch.Generator | None = None, return_entropy: bool = False,
             row_keys: list[int] | None = None) -> Completions:
    """Generate one completion per conversation, `batch_size` rows per sampler call.

    conversations: each a list of {"role", "content"} messages, or a string (one user message).
    temperature 0 is greedy; otherwise draws follow temperature -> top-k -> top-p from
    `generator` (meml/sampler.py), which is also where the reported log-probs are defined;
    or, given row_keys (one 64-bit integer per conversation, `meml.sampler.stream_key`), from
    those keys, so that each completion is the same in any batch.
    """
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c}] if isinstance(c, str) else c,
                                             add_generation_prompt=True) for c in conversations]
    out = Completions([], prompts, [], [], [], [] if return_entropy else None)
    with distributed.gathered(model), low_precision_copy(model) as generating:
        # a sharded model: weights gathered once, not per token; under mixed precision: cast once
        _generate_into(out, generating, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, batch_size,
                       generator, return_entropy, row_keys)
    out.texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out.completion_ids]
    return out


@contextlib.contextmanager
def low_precision_copy(model):
    """The model to generate with: under torch.autocast to bf16 with fp32 weights (mixed
    precision), a bf16 copy made once for the whole call and freed after, run with autocast off;
    otherwise the model itself.

    Why: generation runs under inference_mode, where autocast caches no cast weight, so every
    decode step would cast every fp32 weight to bf16 again (~9 GB of traffic per token at 1.5B),
    and the KV cache would take the weights' fp32 (twice the memory). The copy's KV cache is
    bf16; the sampler's log-probs are computed in fp32 either way. A sharded model's gathered
    weights are already in the compute dtype (FSDP2's MixedPrecisionPolicy): it is used as is."""
    device = model.output_weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if dtype is None or model.output_weight.dtype == dtype or distributed.is_sharded(model):
        yield model
        return
    cast, weights = {}, {}  # one copy per storage, so tied weights are cast once and stay one tensor
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in cast:
            cast[key] = t.detach().to(dtype)
        weights[name] = cast[key]
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(weights, assign=True)
    copy.tie_weights()
    copy.eval()
    del weights, cast
    with torch.autocast(device, enabled=False):
        yield copy


def _generate_into(out: Completions, model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p,
                   batch_size, generator, return_entropy, row_keys) -> None:
    device = model.output_weight.device
    for start in range(0, len(prompts), batch_size):
        keys = None if row_keys is None else \
            torch.tensor([int64_bits(k) for k in row_keys[start:start + batch_size]], dtype=torch.long, device=device)
        gen = generate(model, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                       stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size,
                       temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                       return_entropy=return_entropy, row_keys=keys)
        for row, (ids, mask) in enumerate(zip(gen.completion_ids, gen.completion_mask)):
            out.completion_ids.append(ids[mask].tolist())
            out.logprobs.append(gen.logprobs[row][mask].float().cpu())
            out.finished.append(bool(gen.finished[row]))
            if return_entropy:
                out.entropy.append(gen.entropy[row][mask].cpu())
