"""Tests for meml/sampler.py.

The sampling primitives are checked against their definitions on fixed logits vectors (and a
brute-force nucleus oracle); `generate` is checked against full recomputation without a cache,
against each prompt generated alone, and against transformers' greedy `generate` on the same
random-weight checkpoint.
"""
import math

import numpy as np
import pytest
import torch

from meml.sampler import (draw_from, generate, int64_bits, is_stop, keyed_uniforms, sample_next_token,
                          scale_by_temperature, stream_key,
                          top_k_filter, top_p_filter)

# ---------------------------------------------------------------------------------------------
# Sampling primitives on fixed logits


def test_temperature_divides_logits():
    logits = torch.tensor([[2.0, -4.0, 1.0]])
    assert torch.equal(scale_by_temperature(logits, 2.0), torch.tensor([[1.0, -2.0, 0.5]]))
    with pytest.raises(ValueError, match="temperature"):
        scale_by_temperature(logits, 0.0)


def test_top_k_never_emits_outside_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0, 0.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    ids, _ = sample_next_token(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(ids.tolist()) == {1, 4}
    # the two kept ids keep their relative odds: p(1)/p(4) = e^(5-4)
    ratio = (ids == 1).sum().item() / (ids == 4).sum().item()
    assert abs(ratio - math.e) < 0.3


def test_top_k_keeps_exactly_k_with_ties():
    kept = torch.isfinite(top_k_filter(torch.zeros(3, 10), 4))
    assert kept.sum(-1).tolist() == [4, 4, 4]
    assert torch.equal(top_k_filter(torch.arange(5.0)[None], 0), torch.arange(5.0)[None])


def test_top_p_keeps_the_smallest_set_with_mass_at_least_p_hand_worked():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
    logits = probs.log()[None]
    kept = lambda p: set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())
    assert kept(0.3) == {1}              # 0.5 alone already >= 0.3
    assert kept(0.6) == {1, 3}           # 0.5 < 0.6 <= 0.7
    assert kept(0.8) == {1, 3, 4}        # 0.7 < 0.8 <= 0.85
    assert kept(0.9) == {1, 3, 4, 0}     # 0.85 < 0.9 <= 0.95
    assert kept(1.0) == {0, 1, 2, 3, 4}


def nucleus_oracle(logits: np.ndarray, p: float) -> set | None:
    """The smallest most-likely prefix with mass >= p, in float64; None too close to a boundary."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    csum = np.cumsum(probs[order])
    if np.min(np.abs(csum - p)) < 1e-5:
        return None  # too close to a boundary for float32
    return set(order[:int(np.argmax(csum >= p)) + 1].tolist())


def test_top_p_matches_brute_force_oracle():
    rng = np.random.default_rng(0)
    for _ in range(200):
        logits = rng.normal(size=12) * 2
        p = rng.uniform(0.05, 0.99)
        expected = nucleus_oracle(logits, p)
        if expected is None:
            continue
        got = torch.isfinite(top_p_filter(torch.tensor(logits, dtype=torch.float32)[None], p))
        assert set(got[0].nonzero().flatten().tolist()) == expected


def test_top_p_from_a_few_candidates_keeps_the_same_set_as_a_full_sort():
    """The CPU shortcut (rank only the 16 most likely of 300 ids) against the oracle, on batches
    where the candidates hold mass p in every row and on batches where some row needs more."""
    rng = np.random.default_rng(1)
    seen = {"shortcut": 0, "full sort": 0}
    for _ in range(100):
        logits = rng.normal(size=(4, 300)) * rng.choice([0.5, 3.0, 6.0])
        p = rng.uniform(0.05, 0.99)
        expected = [nucleus_oracle(row, p) for row in logits]
        if None in expected:
            continue
        logits32 = torch.tensor(logits, dtype=torch.float32)
        top16 = torch.softmax(logits32, -1).topk(16, dim=-1).values.sum(-1)
        seen["shortcut" if bool((top16 >= p).all()) else "full sort"] += 1
        got = torch.isfinite(top_p_filter(logits32, p, candidates=16))
        assert [set(row.nonzero().flatten().tolist()) for row in got] == expected
    assert seen["shortcut"] >= 10 and seen["full sort"] >= 10, seen


def test_sampling_follows_softmax_at_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    temperature = 2.0
    gen = torch.Generator().manual_seed(1)
    ids, logprobs = sample_next_token(logits.repeat(30000, 1), temperature=temperature,
                                      generator=gen)
    expected = torch.softmax(logits[0] / temperature, -1)
    freq = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert torch.allclose(freq, expected, atol=0.01)
    # reported log-prob of each draw is log softmax(logits / T) at that id
    assert torch.allclose(logprobs, expected.log()[ids])


def test_draw_from_follows_probs_across_blocks_and_never_draws_zero_mass_ids():
    # blocks of 4 ids, the last one partial (14 ids); whole blocks and single ids have mass 0
    probs = torch.tensor([0.1, 0.0, 0.05, 0.05, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.2, 0.1, 0.0, 0.2])
    rows = torch.stack([probs, 3 * probs])  # the second row is not normalised: same distribution
    ids = draw_from(rows.repeat(20000, 1), torch.Generator().manual_seed(0), block=4)
    freq = torch.bincount(ids, minlength=14).float() / ids.numel()
    assert torch.allclose(freq, probs, atol=0.01)
    assert (probs[ids] > 0).all()
    one_hot = torch.zeros(3, 14).index_fill(1, torch.tensor([13]), 1.0)  # only the last, padded block
    assert draw_from(one_hot, block=4).tolist() == [13, 13, 13]


def test_logprobs_ignore_top_k_and_top_p_renormalisation():
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0]])
    gen = torch.Generator().manual_seed(0)
    ids, logprobs = sample_next_token(logits.repeat(50, 1), temperature=0.7, top_k=2, top_p=0.9,
                                      generator=gen)
    full = torch.log_softmax(logits[0] / 0.7, -1)
    assert torch.allclose(logprobs, full[ids])


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(3))
    draw = lambda seed: sample_next_token(logits, temperature=1.3, top_k=10, top_p=0.8,
                                          generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_greedy_is_argmax_with_logprob_at_temperature_one():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, -1.0, 4.0]])
    ids, logprobs = sample_next_token(logits, temperature=0.0)
    assert ids.tolist() == [1, 0]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_is_stop_uses_the_whole_stop_set():
    stop = torch.tensor([7, 9])
    assert is_stop(torch.tensor([7, 8, 9, 0]), stop).tolist() == [True, False, True, False]


# ---------------------------------------------------------------------------------------------
# generate() on a tiny random-weight Qwen2 checkpoint

VOCAB = 96
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24], [30]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers model, our model, directory) with the same random weights.

    initializer_range 0.3 (not 0.02) so greedy outputs vary from token to token; with the
    default init a tiny model repeats one id and the comparisons below would prove little.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from meml.model import Transformer
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rope_theta=10000.0,
                         tie_word_embeddings=True, initializer_range=0.3)
    hf = Qwen2ForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("tiny_qwen2")
    hf.save_pretrained(directory)
    return hf, Transformer.from_pretrained(directory), directory


def full_recompute_logits(model, prompt, completion):
    """Logits [len(completion), V] predicting each completion token, no cache, no padding."""
    ids = torch.tensor([prompt + completion])
    with torch.inference_mode():
        logits = model(ids)[0].float()  # [T, V]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(completion)]


def greedy_by_recompute(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        with torch.inference_mode():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def row(generation, r):
    """Row r's completion ids, mask applied."""
    return generation.completion_ids[r][generation.completion_mask[r]].tolist()


def test_greedy_with_cache_equals_greedy_recomputing_everything(checkpoint):
    _, model, _ = checkpoint
    out = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[], pad_id=0, temperature=0.0)
    assert out.completion_ids.shape == (len(PROMPTS), 12)
    for r, prompt in enumerate(PROMPTS):
        expected = greedy_by_recompute(model, prompt, 12)
        assert len(set(expected)) > 3  # the model does not just repeat one id
        assert row(out, r) == expected


def test_ragged_batch_equals_each_prompt_alone(checkpoint):
    _, model, _ = checkpoint
    kwargs = dict(max_new_tokens=10, stop_ids=[], pad_id=0, temperature=0.0)
    batch = generate(model, PROMPTS, **kwargs)
    for r, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], **kwargs)
        assert row(batch, r) == row(alone, 0)
        assert torch.allclose(batch.logprobs[r], alone.logprobs[0], atol=1e-5)


def test_greedy_equals_transformers_generate(checkpoint):
    hf, model, _ = checkpoint
    out = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[], pad_id=0, temperature=0.0)
    for r, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=12, min_new_tokens=12, pad_token_id=0,
                              eos_token_id=None)
        assert row(out, r) == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 5, 0.9)])
def test_logprobs_equal_log_softmax_of_recomputed_logits_at_temperature(checkpoint, temperature,
                                                                        top_k, top_p):
    _, model, _ = checkpoint
    limit = VOCAB - 6
    out = generate(model, PROMPTS, max_new_tokens=10, stop_ids=[], pad_id=0, vocab_limit=limit,
                   temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=torch.Generator().manual_seed(0))
    for r, prompt in enumerate(PROMPTS):
        completion = row(out, r)
        logits = full_recompute_logits(model, prompt, completion)[:, :limit]  # [T, limit]
        expected = torch.log_softmax(logits / temperature, -1)[torch.arange(len(completion)),
                                                                completion]
        assert torch.allclose(out.logprobs[r], expected, atol=1e-5)
        if top_k:  # every draw lies in the top-k of the recomputed logits
            top = logits.topk(top_k, dim=-1).indices
            assert all(c in t for c, t in zip(completion, top.tolist()))


@pytest.mark.parametrize("temperature, top_k", [(0.7, 0), (1.3, 5)])
def test_entropy_is_that_of_the_unfiltered_distribution_at_temperature(checkpoint, temperature, top_k):
    """return_entropy: -Σ p log p of softmax(logits[:limit] / T) at each step, recomputed without
    a cache; top-k does not change it (it is the distribution π_old is reported under)."""
    _, model, _ = checkpoint
    limit = VOCAB - 6
    out = generate(model, PROMPTS, max_new_tokens=10, stop_ids=[], pad_id=0, vocab_limit=limit,
                   temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(1),
                   return_entropy=True)
    for r, prompt in enumerate(PROMPTS):
        logp = torch.log_softmax(full_recompute_logits(model, prompt, row(out, r))[:, :limit] / temperature, -1)
        expected = -(logp.exp() * logp).sum(-1)  # [T]
        assert torch.allclose(out.entropy[r], expected, atol=1e-5)
    assert generate(model, PROMPTS, max_new_tokens=2, stop_ids=[], pad_id=0).entropy is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_that_share_a_prompt_share_its_prefill_and_sample_the_same(checkpoint, temperature):
    """G copies of each prompt (consecutive, as RIEL lays them out, and interleaved): prefilling
    each distinct prompt once and copying its cache gives what prefilling every row gives."""
    _, model, _ = checkpoint
    prompts = [p for p in PROMPTS for _ in range(4)] + PROMPTS[::-1]
    outs = [generate(model, prompts, max_new_tokens=10, stop_ids=[3], pad_id=0, temperature=temperature,
                     generator=torch.Generator().manual_seed(2), return_entropy=True, share_prefill=share)
            for share in (True, False)]
    assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)
    assert torch.equal(outs[0].completion_mask, outs[1].completion_mask)
    assert torch.allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-6)
    assert torch.allclose(outs[0].entropy, outs[1].entropy, atol=1e-5)
    if temperature:  # the copies of one prompt sample different completions
        assert len({tuple(row(outs[0], r)) for r in range(4)}) > 1


def test_seeded_sampling_is_reproducible_through_generate(checkpoint):
    _, model, _ = checkpoint
    draw = lambda seed: generate(model, PROMPTS, max_new_tokens=8, stop_ids=[3], pad_id=0,
                                 temperature=1.0, top_p=0.95,
                                 generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(11), draw(11), draw(12)
    for field in ("completion_ids", "completion_mask", "finished", "logprobs"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.completion_ids, c.completion_ids)


def _splitmix64_reference(state):
    """splitmix64 as Steele, Lea and Flood publish it (Java's SplittableRandom), on Python ints:
    advance the state by the golden gamma, then mix. Returns (new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) % 2 ** 64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    return state, z ^ (z >> 31)


def test_keyed_uniforms_are_splitmix64_worked_in_python_integers():
    """Row b's t-th number is output t+1 of splitmix64 started at key b (keys with the top bit
    set included), its top 53 bits as 1 - k / 2^53: computed with torch's int64 arithmetic,
    which must wrap exactly as unsigned 64-bit arithmetic does."""
    keys = [0, 1, 12345, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, stream_key(7, 3, 2, 1)]
    as_tensor = torch.tensor([int64_bits(k) for k in keys], dtype=torch.long)
    states = list(keys)
    for t in range(4):
        got = keyed_uniforms(as_tensor, t)
        for b, key in enumerate(keys):
            states[b], out = _splitmix64_reference(states[b])
            assert got[b].item() == 1.0 - (out >> 11) / 2 ** 53, (key, t)
    many = keyed_uniforms(torch.arange(200_000, dtype=torch.long) * 7919, 3)
    assert 0 < many.min() and many.max() <= 1
    assert abs(many.mean().item() - 0.5) < 0.003 and abs(many.var().item() - 1 / 12) < 0.002


def test_keyed_rows_sample_the_same_in_any_batch(checkpoint):
    """With row keys a row's completion depends on its key and prompt only: alone, in a batch,
    in another order, the same ids; different keys, different samples."""
    _, model, _ = checkpoint
    kwargs = dict(max_new_tokens=10, stop_ids=[], pad_id=0, temperature=1.0, top_k=50)
    keys = torch.tensor([int64_bits(stream_key(5, r)) for r in range(len(PROMPTS))], dtype=torch.long)
    batch = generate(model, PROMPTS, row_keys=keys, **kwargs)
    backwards = generate(model, PROMPTS[::-1], row_keys=keys.flip(0), **kwargs)
    for r, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], row_keys=keys[r:r + 1], **kwargs)
        assert row(batch, r) == row(alone, 0) == row(backwards, len(PROMPTS) - 1 - r)
    other = generate(model, PROMPTS, row_keys=keys + 1, **kwargs)
    assert not torch.equal(batch.completion_ids, other.completion_ids)


def test_never_samples_ids_beyond_vocab_limit(checkpoint):
    _, model, _ = checkpoint
    limit = VOCAB - 16
    prompts = [[1 + i % 50, 2 + i % 40] for i in range(32)]
    kwargs = dict(max_new_tokens=12, stop_ids=[], pad_id=0, temperature=5.0)
    free = generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert (free.completion_ids >= limit).any()  # without the limit, these ids do come up
    capped = generate(model, prompts, vocab_limit=limit,
                      generator=torch.Generator().manual_seed(0), **kwargs)
    assert (capped.completion_ids < limit).all()
    greedy = generate(model, prompts, max_new_tokens=12, stop_ids=[], pad_id=0,
                      temperature=0.0, vocab_limit=limit)
    assert (greedy.completion_ids < limit).all()


@pytest.mark.parametrize("pad_is_a_stop_id", [False, True])
def test_stops_at_any_stop_id_and_keeps_finished_rows_inert(checkpoint, pad_is_a_stop_id):
    _, model, _ = checkpoint
    free = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[], pad_id=0, temperature=0.0)
    stops = {row(free, 0)[3], row(free, 1)[5]}  # a union of two stop ids
    # Qwen's pad token is also one of its EOS ids: finished rows then emit a stop id as pad
    pad = min(stops) if pad_is_a_stop_id else VOCAB - 1
    out = generate(model, PROMPTS, max_new_tokens=12, stop_ids=sorted(stops), pad_id=pad,
                   temperature=0.0)
    for r in range(len(PROMPTS)):
        reference = row(free, r)
        hits = [i for i, t in enumerate(reference) if t in stops]
        if hits:  # stops at the first stop id, which is kept and masked in
            n = hits[0] + 1
            assert out.finished[r]
        else:     # truncated at max_new_tokens
            n = 12
            assert not out.finished[r]
        assert out.completion_mask[r].sum() == n
        assert out.completion_ids[r, :n].tolist() == reference[:n]
        assert (out.completion_ids[r, n:] == pad).all()
        assert (out.logprobs[r, n:] == 0).all()
        assert torch.allclose(out.logprobs[r, :n], free.logprobs[r, :n])
    assert torch.isfinite(out.logprobs).all()


def test_eos_inside_the_prompt_is_not_a_stop(checkpoint):
    _, model, _ = checkpoint
    eos = 3
    prompts = [[eos, 40, 41, eos, 42], [eos]]
    free = generate(model, prompts, max_new_tokens=6, stop_ids=[], pad_id=0, temperature=0.0)
    out = generate(model, prompts, max_new_tokens=6, stop_ids=[eos], pad_id=0, temperature=0.0)
    for r in range(len(prompts)):
        reference = row(free, r)
        n = reference.index(eos) + 1 if eos in reference else 6
        assert row(out, r) == reference[:n]
        assert bool(out.finished[r]) == (eos in reference)


def test_loop_ends_when_every_row_is_done(checkpoint):
    _, model, _ = checkpoint
    free = generate(model, PROMPTS, max_new_tokens=4, stop_ids=[], pad_id=0, temperature=0.0)
    first_tokens = sorted({row(free, r)[0] for r in range(len(PROMPTS))})
    out = generate(model, PROMPTS, max_new_tokens=50, stop_ids=first_tokens, pad_id=0,
                   temperature=0.0)
    assert out.completion_ids.shape == (len(PROMPTS), 1)
    assert out.finished.all() and out.completion_mask.all()


def test_restores_training_mode(checkpoint):
    _, model, _ = checkpoint
    model.train()
    generate(model, [[1, 2]], max_new_tokens=2, stop_ids=[], pad_id=0, temperature=0.0)
    assert model.training
    model.eval()


def test_edge_cases_and_user_errors(checkpoint):
    _, model, _ = checkpoint
    none = generate(model, PROMPTS, max_new_tokens=0, stop_ids=[3], pad_id=0)
    assert none.completion_ids.shape == (len(PROMPTS), 0) and not none.finished.any()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2, stop_ids=[], pad_id=0)
    with pytest.raises(ValueError, match="vocab_limit"):
        generate(model, [[1]], max_new_tokens=2, stop_ids=[], pad_id=0, vocab_limit=VOCAB + 1)
