"""Batched rollout generation on the decoder's KV cache: the sampler behind GRPO and evaluation.

GRPO spends most of its time here: MEML-GRPO samples N experts x G rollouts per question, and the
experts' system prompts make the prompts different lengths. So the batch is left-padded (every
row's last prompt token sits in the same column, and one shared cache index serves all rows),
the prompts are prefilled once, each distinct prompt once (the G rollouts of a group share
theirs), and each step feeds one token per row.

What a caller gets back (`Generation`) is what the losses need: completion ids, a mask that
includes the stop token, whether each row stopped or was truncated, and the log-prob of every
sampled token under the *unfiltered* distribution at the sampling temperature,
log softmax(logits[:vocab_limit] / T). These are pi_old for the clipped objective (E3') and
must be the numbers the trainer recomputes from the same weights; the trainer scores tokens
with a plain temperature softmax (decision D2 in README.md), so top-k / top-p only choose which
token is drawn and never renormalise the reported log-prob. Greedy decoding (temperature 0)
reports log-probs at T = 1.

Random numbers come from one torch.Generator for the whole batch, or, given `row_keys`, from a
key per row (`keyed_uniforms`, splitmix64 of the key and the decode step): then a row samples
the same completion in any batch and at any position, which is how a RIEL rollout is the same
at any world size (decision D22).

Departures from `transformers.generate`: stop ids are a set checked only on generated tokens
(chat templates put EOS inside prompts), padded-vocabulary ids (>= vocab_limit) are never
sampled, and the loop checks "all rows done" every few steps on CUDA to avoid a host sync per
token (rows that finished emit pad and are masked out, so the extra steps change nothing).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meml.model import attention_bias, decode_linear


@dataclass
class Generation:
    completion_ids: torch.Tensor   # [B, T] long, pad_id past each row's end
    completion_mask: torch.Tensor  # [B, T] bool, generated tokens (stop token included)
    finished: torch.Tensor         # [B] bool, True: hit a stop id; False: truncated
    logprobs: torch.Tensor         # [B, T] float32, log pi_old of each sampled token, 0 off mask
    entropy: torch.Tensor | None = None  # [B, T] float32, entropy of the distribution sampled from


# ---------------------------------------------------------------------------------------------
# Sampling primitives, applied in this order: temperature, top-k, top-p (as transformers does).
# Each takes and returns logits [B, V]; filtered-out ids get -inf.


def scale_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T, in float32 (softmax of bf16 logits loses the tail)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}; "
                         "temperature 0 means greedy and is handled by sample_next_token")
    return logits.float() / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (k <= 0 or k >= V: keep all).

    Exactly k even with ties (topk picks among tied values), so a sample can never fall outside
    a set of k ids.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)  # [B, k]
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float, candidates: int = 1024) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely ids whose probability mass is >= p.

    Ranked by probability, id i is kept while the mass strictly before it is < p; the top id is
    always kept. p >= 1 keeps everything. Sorting all of Qwen's 151,665 ids costs ~50 ms per 8
    rows on CPU, so there the ranking starts with the `candidates` most likely ids (topk, ~3 ms):
    if they hold mass >= p in every row, every id outside them has mass >= p before it and is
    dropped anyway; otherwise the whole vocabulary is sorted. (On CUDA the sort is cheap, and
    checking the candidates' mass would cost a host sync per token.)
    """
    if p >= 1.0:
        return logits
    if p <= 0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    probs = torch.softmax(logits.float(), dim=-1)  # [B, V]
    ranked = None
    if probs.device.type == "cpu" and candidates < probs.shape[-1]:
        ranked, ids = torch.topk(probs, candidates, dim=-1)  # [B, candidates], most likely first
        if bool((ranked.sum(dim=-1) < p).any()):  # some row's nucleus reaches past the candidates
            ranked = None
    if ranked is None:
        ranked, ids = torch.sort(probs, dim=-1, descending=True)  # [B, V]
    mass_before = torch.cumsum(ranked, dim=-1) - ranked  # exclusive cumsum
    keep_ranked = mass_before < p
    keep_ranked[..., 0] = True
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, ids, keep_ranked)
    return logits.masked_fill(~keep, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Keyed draws: a row's random numbers from its own key, whatever batch it is in

_MASK64 = (1 << 64) - 1
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64


def _splitmix64(x: int) -> int:
    """Steele, Lea and Flood's splitmix64 output function on Python integers (exact)."""
    z = (x + _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def stream_key(*parts: int) -> int:
    """One 64-bit key from integers such as (seed, step, question, expert, rollout)."""
    key = 0
    for part in parts:
        key = _splitmix64(key ^ (part & _MASK64))
    return key


def int64_bits(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def keyed_uniforms(keys: torch.Tensor, counter: int) -> torch.Tensor:
    """U(0, 1] float64 [B], row b's from (keys[b], counter) alone: splitmix64 of
    keys[b] + counter·γ, in int64 arithmetic (which wraps modulo 2^64; a right shift is made
    logical with a mask). Row b's numbers are the same in any batch, at any position.

    Decision D22 keys every rollout this way. The same numbers give the same token only while
    the probabilities they are compared with are the same bits, i.e. while a row's products do
    not depend on how many rows share the matmul. With MKL on both CPUs measured that holds from
    16 rows per process in an fp32 decode step (whose products run weight-first,
    `meml.model.decode_linear`) and from 4 rows in other forwards (`bench/bench_decode_layout.py`
    prints which row counts keep their bits; reference_runs/LOG.md, 2026-12-03 and 2026-12-06):
    a process with fewer rows can flip a sample where two tokens' cumulative probabilities meet
    in the last bit. Cost: ~47 µs per decode step for 192 rows (`bench/bench_rollout_keys.py`)."""
    z = keys + int64_bits((counter + 1) * _GAMMA)
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * int64_bits(_MIX1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * int64_bits(_MIX2)
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    top53 = (z >> 11) & ((1 << 53) - 1)
    return 1.0 - top53.double() * 2.0 ** -53


def draw_from(probs: torch.Tensor, generator: torch.Generator | None = None,
              block: int = 1024, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One id per row of probs [B, V] (rows sum to > 0), by inverse-CDF sampling: ids [B] long.

    Draw u ~ U(0, total mass] and return the first id whose cumulative mass reaches u, so id i
    comes out with probability p_i / total (ids with p_i = 0 never do). The cumulative sums are
    float64, so the distribution is exact up to float64 rounding. The search runs in two steps,
    first over blocks of `block` ids, then inside the chosen block, because one float64 cumsum
    over all 151,665 ids of Qwen's vocabulary is slow on CPU. `torch.multinomial(probs, 1)` gives
    the same distribution but draws one exponential per vocabulary id (~20 ms per 8 rows there,
    vs < 1 ms here). uniforms [B] in (0, 1]: use these instead of drawing from `generator`.
    """
    B, V = probs.shape
    n_blocks = -(-V // block)
    blocks = F.pad(probs, (0, n_blocks * block - V)).view(B, n_blocks, block)  # zero-padded ids
    block_cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)                 # [B, n_blocks]
    total = block_cdf[:, -1:]                                                   # [B, 1]
    # 1 - U[0, 1) lies in (0, 1]: u > 0, so the first id whose cumsum reaches u has p > 0
    if uniforms is None:
        uniforms = 1 - torch.rand(B, dtype=torch.float64, device=probs.device, generator=generator)
    u = uniforms.to(device=probs.device, dtype=torch.float64)[:, None] * total
    chosen = torch.searchsorted(block_cdf, u).clamp(max=n_blocks - 1)         # [B, 1]
    mass_before = torch.where(chosen > 0, block_cdf.gather(-1, (chosen - 1).clamp(min=0)), 0.0)
    in_block = blocks.gather(1, chosen[:, :, None].expand(B, 1, block)).squeeze(1)  # [B, block]
    in_block_cdf = in_block.cumsum(-1, dtype=torch.float64)                    # [B, block]
    # the block's two sums may differ in the last bit: keep u inside the block's own cumsum
    rest = torch.minimum(u - mass_before, in_block_cdf[:, -1:])
    return (chosen * block + torch.searchsorted(in_block_cdf, rest)).squeeze(-1)


def sample_next_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, generator: torch.Generator | None = None,
                      return_entropy: bool = False, uniforms: torch.Tensor | None = None):
    """Draw one id per row from logits [B, V]; return (ids [B] long, logprobs [B] float32), and
    with return_entropy the entropy [B] float32 of log softmax(logits / T).

    temperature 0 is greedy (argmax; ties go to the lowest id). The log-prob is of the drawn id
    under log softmax(logits / T) before any top-k / top-p filtering (T = 1 when greedy): see the
    module docstring for why. The entropy is of that same unfiltered distribution.
    """
    if temperature == 0:
        ids = torch.argmax(logits, dim=-1)  # [B]
        scaled = logits.float()
    else:
        scaled = scale_by_temperature(logits, temperature)  # [B, V] float32
        filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
        probs = torch.softmax(filtered, dim=-1)
        ids = draw_from(probs, generator, uniforms=uniforms)  # [B]
    log_probs = torch.log_softmax(scaled, dim=-1)  # [B, V]
    logprobs = log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if return_entropy:
        return ids, logprobs, -(log_probs.exp() * log_probs).sum(-1)
    return ids, logprobs


def is_stop(ids: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Bool, shaped like ids: which ids are in the stop set (stop_ids: a 1-D long tensor)."""
    return torch.isin(ids, stop_ids)


# ---------------------------------------------------------------------------------------------
# The generation loop


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align ragged prompts: (ids [B, P] long, prompt lengths [B] long)."""
    if not prompts:
        raise ValueError("generate: prompts is empty; pass at least one list of token ids")
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"generate: prompt {row} is empty; every prompt needs >= 1 token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), lengths.to(device)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int],
             pad_id: int, vocab_limit: int | None = None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, return_entropy: bool = False,
             share_prefill: bool = True, row_keys: torch.Tensor | None = None) -> Generation:
    """Generate up to max_new_tokens for each prompt (token id lists of any lengths).

    temperature 0 is greedy; otherwise draws follow temperature -> top-k -> top-p from
    `generator` (on the model's device; same seed, same batch: same samples). A row stops at the
    first generated id in stop_ids (ids inside the prompt never count) and then emits pad_id,
    masked out. Only ids < vocab_limit (default: all of the model's vocabulary) can be drawn.
    return_entropy: also the entropy of each step's distribution (the policy's health check).
    share_prefill: prefill each distinct prompt once (False: every row, for the equality test
    and bench/bench_prefill.py).
    row_keys [B] int64: instead of `generator`, row b's t-th draw is keyed_uniforms(row_keys[b], t),
    so a row's samples depend on its key and prompt, not on the batch it is in (RIEL keys a
    rollout by seed, step, question, expert and rollout index: the same at any world size).

    Three phases: the slots of the batch (`_Slots`), the prefill of the prompts (`_prefill`),
    the decode loop (`_decode`), then each row's completion cut at its first stop id (`_finish`).
    """
    weight = model.output_weight  # [V, H]
    vocab_limit = weight.shape[0] if vocab_limit is None else vocab_limit
    if not 0 < vocab_limit <= weight.shape[0]:
        raise ValueError(f"generate: vocab_limit={vocab_limit} must be in 1..{weight.shape[0]} "
                         "(the model's output vocabulary)")
    weight = weight[:vocab_limit]  # padded-vocab ids get no logit at all, so are never drawn
    slots = _Slots.of(prompts, pad_id, max_new_tokens, weight.device, weight.dtype)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=weight.device)
    was_training = model.training
    model.eval()
    try:
        cache, hidden = _prefill(model, prompts, slots, share_prefill)
        drawn, steps = _decode(model, weight, cache, hidden, slots, stop, pad_id, temperature, top_k, top_p,
                               generator, return_entropy, row_keys)
    finally:
        model.train(was_training)
    return _finish(*drawn, steps, stop, pad_id)


@dataclass
class _Slots:
    """Where every token of the batch sits: left-padded prompts [B, P], then max_new_tokens
    completion slots; which slots are real, each slot's position, each decode step's mask."""
    prompt_ids: torch.Tensor        # [B, P]
    real: torch.Tensor              # [B, P + T] 1 on real slots (only the prompts' left pads are not)
    decode_mask: torch.Tensor       # [B, 1, 1, P + T] additive: the last slot's row, cut per step
    prompt_positions: torch.Tensor  # [B, P]
    new_positions: torch.Tensor     # [B, T]
    max_new_tokens: int

    @property
    def width(self) -> int:  # P
        return self.prompt_ids.shape[1]

    @classmethod
    def of(cls, prompts, pad_id, max_new_tokens, device, dtype) -> "_Slots":
        prompt_ids, lengths = _left_pad(prompts, pad_id, device)  # [B, P], [B]
        batch, width = prompt_ids.shape
        real = torch.ones(batch, width + max_new_tokens, dtype=torch.long, device=device)
        real[:, :width] = torch.arange(width, device=device) >= (width - lengths)[:, None]
        # A decode step's query sees every real slot up to its own, so the additive mask row of
        # the last slot, cut to its first width + t columns, serves step t: built once here
        # instead of by the model at every token.
        decode_mask = attention_bias(real, past=width + max_new_tokens - 1, T=1, dtype=dtype)  # [B, 1, 1, S]
        # Left padding shifts each row; positions count real tokens only (pads sit at 0, masked).
        prompt_positions = (torch.arange(width, device=device) - (width - lengths)[:, None]).clamp(min=0)
        new_positions = lengths[:, None] + torch.arange(max_new_tokens, device=device)
        return cls(prompt_ids, real, decode_mask, prompt_positions, new_positions, max_new_tokens)


def _prefill(model, prompts, slots: _Slots, share_prefill: bool):
    """The prompts through the model: (KV cache, hidden states [B, P, H]). Rows that share a
    prompt (RIEL's G rollouts of one expert and question) share its prefill: each distinct prompt
    runs once, and its keys, values and hidden states are copied to every row that has it."""
    device = slots.prompt_ids.device
    first_row = {}                                        # prompt -> the first row holding it
    for row, prompt in enumerate(prompts):
        first_row.setdefault(tuple(prompt) if share_prefill else row, row)
    distinct = torch.tensor(list(first_row.values()), device=device)                   # [U]
    position = {prompt: u for u, prompt in enumerate(first_row)}
    source = torch.tensor([position[tuple(p) if share_prefill else row] for row, p in enumerate(prompts)],
                          device=device)                                                # [B] in 0..U-1
    cache = model.new_kv_cache(len(distinct), slots.width + slots.max_new_tokens)
    hidden = model(slots.prompt_ids[distinct], attention_mask=slots.real[distinct, :slots.width],
                   position_ids=slots.prompt_positions[distinct], kv_cache=cache,
                   return_hidden=True)  # [U, P, H]
    if len(distinct) < len(prompts):
        cache, hidden = cache.select_rows(source), hidden[source]  # [B, ...]
    return cache, hidden


def _decode(model, weight, cache, hidden, slots: _Slots, stop, pad_id, temperature, top_k, top_p, generator,
            return_entropy, row_keys):
    """The decode loop: draw a token per row from the last hidden state, feed it back. Returns
    ((ids, log-probs, entropy or None), each [B, T]; the number of steps taken)."""
    batch, device = hidden.shape[0], hidden.device
    completion_ids = torch.full((batch, slots.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, slots.max_new_tokens, dtype=torch.float32, device=device)
    entropy = torch.zeros(batch, slots.max_new_tokens, dtype=torch.float32, device=device) if return_entropy else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    # "All rows done?" costs a host sync; on CUDA ask every few steps (extra steps are inert).
    check_every = 1 if device.type == "cpu" else 8
    steps = 0
    while steps < slots.max_new_tokens:
        logits = decode_linear(hidden[:, -1], weight)  # [B, vocab_limit]
        uniforms = None if row_keys is None else keyed_uniforms(row_keys, steps)
        drawn = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator, return_entropy=return_entropy,
                                  uniforms=uniforms)  # [B] each
        ids = torch.where(done, pad_id, drawn[0])  # finished rows emit pad (masked out below)
        completion_ids[:, steps] = ids
        logprobs[:, steps] = drawn[1]
        if return_entropy:
            entropy[:, steps] = drawn[2]
        done = done | is_stop(ids, stop)
        steps += 1
        if steps == slots.max_new_tokens or (steps % check_every == 0 and bool(done.all())):
            break
        hidden = model(ids[:, None], attention_mask=slots.decode_mask[..., :slots.width + steps],
                       position_ids=slots.new_positions[:, steps - 1:steps], kv_cache=cache,
                       return_hidden=True)  # [B, 1, H]
    return (completion_ids, logprobs, entropy), steps


def _finish(completion_ids, logprobs, entropy, steps: int, stop, pad_id) -> Generation:
    """Each row's completion runs up to and including its first stop id (pad may itself be a
    stop id, which is why this looks for the first one rather than at the loop's `done`),
    trimmed to the longest, so the result does not depend on how often the loop checked."""
    stop_hit = is_stop(completion_ids[:, :steps], stop)                  # [B, steps]
    completion_mask = (stop_hit.cumsum(dim=1) - stop_hit.long()) == 0     # nothing stopped before
    length = int(completion_mask.sum(dim=1).max())
    completion_mask = completion_mask[:, :length]
    completion_ids = completion_ids[:, :length].masked_fill(~completion_mask, pad_id)
    return Generation(completion_ids=completion_ids,
                      completion_mask=completion_mask,
                      finished=stop_hit.any(dim=1),
                      logprobs=logprobs[:, :length].masked_fill(~completion_mask, 0.0),
                      entropy=None if entropy is None else entropy[:, :length].masked_fill(~completion_mask, 0.0))
