"""RIEL's step: which rows each part of E7 sees, and that micro-batching changes nothing.

The oracle is E7 written out on the whole batch in one expression: full logits of each unpadded
sequence, log_softmax, every part computed once over all its rows, one backward. The step under
test scores rows in micro-batches and calls backward on each; the gradients must agree.
"""
import pytest
import torch

from meml import synthetic_assets
from meml.advantage import group_advantages
from meml.config import RielConfig
from meml.data import Example
from meml.kl import inter_expert_kl, reference_kl_loss
from meml.losses import E7_PARTS, e7_weights, nll_loss, policy_loss, total_loss
from meml.model import ModelConfig, Transformer
from meml.prompts import expert_prompt, response_ids
from meml.e7 import (Experts, Grid, Rollouts, _whole_questions, backward_e7, e7, e7_batch, e7_metrics, micro_batches,
                     recomputed_old_logprobs)
from meml.riel import buffer_targets, score_rollouts
from meml.tokenizer import Tokenizer

G = 3


def tiny_model(config, seed):
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(std=0.2)  # wide enough that log-probs differ visibly between prompts
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = synthetic_assets.write_synthetic_assets(tmp_path_factory.mktemp("assets"))
    tok = Tokenizer.from_pretrained(folder)
    config = ModelConfig.from_json(folder / "config.json")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 32, 64
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 8
    assert tok.vocab_size < config.vocab_size  # a padded vocabulary, as Qwen's
    return tiny_model(config, 0), Experts(tok, ["Expert zero.", "Expert one says more.", "Two"], "synthetic"), config


EXAMPLES = [Example("q0", "Mia has 3 apples and gets 4 more. How many?", "7", "3 + 4 = 7 #### 7"),
            Example("q1", "Leo has 9 coins and loses 2. How many?", "7", "9 - 2 = 7 #### 7")]
BY_ID = {ex.id: ex for ex in EXAMPLES}


def make_rollouts(world, examples=EXAMPLES):
    """Rollouts for examples x 3 experts x G with made-up completions of different lengths."""
    tok = world.tokenizer
    prompts, completions = [], []
    for q, ex in enumerate(examples):
        for i, p in enumerate(world.system_prompts):
            for g in range(G):
                prompts.append(expert_prompt(tok, p, "synthetic", ex))
                completions.append(tok.encode(f"{q + i + g} + {g} = {q + i + 2 * g}" + " ok" * g) + [tok.eot_id])
    old = [torch.zeros(len(c)) for c in completions]
    rows = torch.arange(len(prompts)).view(len(examples), len(world.system_prompts), G)
    return Rollouts(rows, prompts, completions, old, [True] * len(prompts), [""] * len(prompts),
                    [torch.zeros(len(c)) for c in completions])


def step_batch(w, ro, rewards, advantages, sft_items, cfg):
    """The step's E7Batch for these rollouts (one process: every question is this rank's)."""
    grid = Grid.of(ro, rewards, cfg)
    prompts, targets, _, _ = buffer_targets(w, sft_items, BY_ID, cfg)
    return e7_batch(ro, grid, advantages, slice(None), (prompts, targets), cfg)


def step_e7(model, w, ro, rewards, advantages, sft_items, cfg, ref_model=None, old_logprobs=None):
    """`backward_e7` as riel_step calls it in one process; returns (the step's E7 metrics, its batch)."""
    b = step_batch(w, ro, rewards, advantages, sft_items, cfg)
    batches = micro_batches(b, cfg)
    if old_logprobs is not None:
        b.old_logprobs = old_logprobs
    elif cfg.recompute_old_logprobs:
        b.old_logprobs = recomputed_old_logprobs(model, w, ro, batches["policy"], cfg)
    values, stats = backward_e7(model, w, b, batches, cfg, ref_model)
    return e7_metrics(values, stats, b.d, cfg), b


def seq_logprob(model, prompt, completion, vocab_limit, temperature=1.0):
    """Oracle: log π(completion | prompt) per token from full logits of the unpadded sequence,
    over the ids the tokenizer knows (the synthetic model pads its vocabulary, as Qwen does)."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(ids)[0, :, :vocab_limit].float() / temperature, dim=-1)  # [T, V]
    return torch.stack([logp[len(prompt) - 1 + t, c] for t, c in enumerate(completion)])


def padded(per_row):
    """[rows] of 1-D tensors -> ([rows, T] right-padded with 0, [rows, T] mask)."""
    width = max(len(x) for x in per_row)
    values = torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in per_row])
    mask = torch.stack([torch.arange(width) < len(x) for x in per_row])
    return values, mask


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    """Equal up to fp32 rounding: rtol 1e-4, and an absolute 1e-6 on the scale of the tensor's
    largest entry (an embedding's gradient sums many rows; where it nearly cancels, summing in
    another order leaves ~1e-6 of a gradient whose largest entry is ~5)."""
    assert a.keys() == b.keys()
    for name in a:
        scale = max(1.0, b[name].abs().max().item())
        assert torch.allclose(a[name], b[name], atol=1e-6 * scale, rtol=1e-4), name


# Question 0: expert 0 right twice, expert 2 never: E+ = 0, E- = 2, active.
# Question 1: expert 1 right twice, expert 2 once: E+ = 1, E- = 0 (all wrong), active.
TWO_ACTIVE = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 0]],
                           [[0, 0, 0], [1, 0, 1], [0, 1, 0]]], dtype=torch.float)
# Question 0 as above; question 1: every expert right once: a tie, skipped.
ONE_ACTIVE = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 0]],
                           [[1, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.float)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_the_accumulated_gradient_is_the_gradient_of_e7_written_out_on_the_whole_batch(world, aggregation):
    """All four parts active: clipped E3 with nonzero advantages and π_old ≠ π_θ (some tokens
    clipped), E4 with β > 0 against another model, E5 on two questions, and a buffer SFT; rows
    scored in micro-batches of 3, E5 in two micro-batches that each hold one whole question.
    backward_e7 (micro-batches) = meml.riel.e7 (the whole batch at once) = E7 written out here."""
    model, w, config = world
    ref_model = tiny_model(config, 1)
    ro = make_rollouts(w)
    V = w.tokenizer.vocab_size
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():  # π_old: the current policy, shifted by up to ±0.4 per token
        ro.sampler_logprobs = [seq_logprob(model, p, c, V, 0.8) + 0.8 * (torch.rand(len(c), generator=noise) - 0.5)
                           for p, c in zip(ro.prompts, ro.completions)]
    advantages = group_advantages(TWO_ACTIVE, scale="group_std")
    sft_items = [("q0", 2), ("q1", 0), ("q1", 1), ("q0", 0)]  # two micro-batches of 3 and 1
    cfg = RielConfig(group_size=G, aggregation=aggregation, loss="clipped", clip_eps=0.1, beta=0.3,
                     lambda1=0.5, lambda2=2.0, micro_batch_size=3, temperature=0.8, max_new_tokens=14)
    model.zero_grad()
    out, batch = step_e7(model, w, ro, TWO_ACTIVE, advantages, sft_items, cfg, ref_model)
    got = grads(model)
    assert out["inter_expert/active_questions"] == 2 and 0 < out["clip_ratio"] < 1
    assert [len(m) for m in micro_batches(batch, cfg).values()] == [6, 2, 2]  # several of each kind

    # E7 in one call in the package (meml.e7.e7), one backward: the same gradient
    model.zero_grad()
    e7_value, parts = e7(model, w, batch, cfg, ref_model)
    assert parts.keys() == E7_PARTS.keys()  # every part computed is in the one table, and the other way
    assert e7_value.item() == pytest.approx(total_loss(parts, e7_weights(cfg)).item())
    e7_value.backward()
    assert_same_grads(got, grads(model))
    for name, part in E7_PARTS.items():
        assert out[part.metric] == pytest.approx(parts[name].item(), rel=1e-5, abs=1e-7), name

    model.zero_grad()
    logp, mask = padded([seq_logprob(model, p, c, V, 0.8) for p, c in zip(ro.prompts, ro.completions)])
    with torch.no_grad():
        ref_logp, _ = padded([seq_logprob(ref_model, p, c, V, 0.8) for p, c in zip(ro.prompts, ro.completions)])
    old, _ = padded(ro.sampler_logprobs)
    # E5's O+ by hand: q0 -> expert 0's rollouts 0, 1 against expert 2; q1 -> expert 1's 0, 2 against expert 0.
    o_plus = [(0, 0, 0, 2), (0, 0, 1, 2), (1, 1, 0, 0), (1, 1, 2, 0)]  # (q, E+, g, E-)
    plus = torch.stack([seq_logprob(model, ro.prompts[ro.rows[q, e, g]], ro.completions[ro.rows[q, e, g]], V, 0.8).sum()
                        for q, e, g, _ in o_plus])
    minus = torch.stack([seq_logprob(model, ro.prompts[ro.rows[q, m, 0]], ro.completions[ro.rows[q, e, g]], V, 0.8).sum()
                         for q, e, g, m in o_plus])
    sft_logp, sft_mask = padded([seq_logprob(model, expert_prompt(w.tokenizer, w.system_prompts[i], "synthetic", BY_ID[q]),
                                             response_ids(w.tokenizer, BY_ID[q].solution), V) for q, i in sft_items])
    max_len = 14 if aggregation == "dr_grpo" else None
    by_hand = {"policy": policy_loss(logp, mask, advantages.flatten(), old, clip_eps=0.1, aggregation=aggregation,
                                     max_len=max_len),
               "reference_kl": reference_kl_loss(logp, ref_logp, mask, "k3", aggregation, max_len),
               "inter_expert_kl": inter_expert_kl(plus, minus, torch.tensor([0, 0, 1, 1])),
               "sft": nll_loss(sft_logp, sft_mask)}
    e7_by_hand = by_hand["policy"] + 0.3 * by_hand["reference_kl"] + 0.5 * by_hand["inter_expert_kl"] + 2.0 * by_hand["sft"]
    e7_by_hand.backward()
    assert out["loss/total"] == pytest.approx(e7_by_hand.item(), rel=1e-4, abs=1e-6)
    assert_same_grads(got, grads(model))
    for name, value in by_hand.items():  # each part on its own, against meml.riel.e7's
        assert parts[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_rows_with_zero_advantage_are_skipped_without_changing_the_gradient(world, aggregation):
    model, w, _ = world
    ro = make_rollouts(w)
    advantages = torch.randn(2, 3, G, generator=torch.Generator().manual_seed(1))
    advantages[0, 2] = 0.0  # rows with A = 0 are not scored: the result must not change
    cfg = RielConfig(group_size=G, aggregation=aggregation, micro_batch_size=4, temperature=0.8,
                     max_new_tokens=12, lambda1=0.0)
    model.zero_grad()
    out, _ = step_e7(model, w, ro, ONE_ACTIVE, advantages, [], cfg)
    got = grads(model)

    model.zero_grad()
    V = w.tokenizer.vocab_size
    logp, mask = padded([seq_logprob(model, p, c, V, temperature=0.8) for p, c in zip(ro.prompts, ro.completions)])
    expected = policy_loss(logp, mask, advantages.flatten(), aggregation=aggregation,
                           max_len=12 if aggregation == "dr_grpo" else None)
    expected.backward()
    assert out["loss/policy"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert_same_grads(got, grads(model))


def test_inter_expert_term_is_zero_when_experts_tie(world):
    model, w, _ = world
    rewards = torch.tensor([[[1, 0, 0]] * 3, [[0, 0, 0]] * 3], dtype=torch.float)
    model.zero_grad()
    out, _ = step_e7(model, w, make_rollouts(w), rewards, torch.zeros(2, 3, G), [], RielConfig(group_size=G))
    assert out["loss/inter_expert_kl"] == 0.0 and out["inter_expert/active_questions"] == 0
    assert grads(model) == {}


def test_full_vocab_inter_expert_term_is_the_exact_kl_along_the_plus_rollouts(world):
    model, w, _ = world
    ro = make_rollouts(w)
    model.zero_grad()
    cfg = RielConfig(group_size=G, inter_expert_variant="full_vocab", micro_batch_size=1)
    out, _ = step_e7(model, w, ro, ONE_ACTIVE, torch.zeros(2, 3, G), [], cfg)
    got = grads(model)

    model.zero_grad()
    V = w.tokenizer.vocab_size
    total = []
    for r in (0, 1):  # question 0's O+: expert 0's correct rollouts; E- = expert 2
        c = ro.completions[r]
        p_plus = torch.log_softmax(model(torch.tensor([ro.prompts[r] + c]))[0, :, :V], -1).detach()
        p_minus = torch.log_softmax(model(torch.tensor([ro.prompts[2 * G] + c]))[0, :, :V], -1)
        lp, lm = p_plus[len(ro.prompts[r]) - 1:-1], p_minus[len(ro.prompts[2 * G]) - 1:-1]  # [|c|, V]
        total.append((lp.exp() * (lp - lm)).sum())  # Σ_t KL(p+ ‖ p−) along O+
    expected = torch.stack(total).mean()
    (0.1 * expected).backward()
    assert out["loss/inter_expert_kl"] == pytest.approx(expected.item(), rel=1e-4)
    assert_same_grads(got, grads(model))


def test_token_mean_inter_expert_term_divides_each_plus_rollout_by_its_length(world):
    """E5 per token (D8): per O+, (sg(log π(O+|P+)) − log π(O+|P−)) / |O+|, then the mean."""
    model, w, _ = world
    ro = make_rollouts(w)
    model.zero_grad()
    cfg = RielConfig(group_size=G, inter_expert_variant="token_mean", micro_batch_size=1, lambda1=0.3)
    out, _ = step_e7(model, w, ro, ONE_ACTIVE, torch.zeros(2, 3, G), [], cfg)
    got = grads(model)

    model.zero_grad()
    V = w.tokenizer.vocab_size
    terms = []
    for r in (0, 1):  # question 0's O+: expert 0's correct rollouts 0 and 1; E- = expert 2
        c = ro.completions[r]
        plus = seq_logprob(model, ro.prompts[r], c, V).sum().detach()
        minus = seq_logprob(model, ro.prompts[2 * G], c, V).sum()
        terms.append((plus - minus) / len(c))
    assert len(ro.completions[0]) != len(ro.completions[1])  # the division is visible
    expected = torch.stack(terms).mean()
    (0.3 * expected).backward()
    # The two terms nearly cancel here (+0.2287 and -0.2281, from log-prob sums near -50 whose fp32
    # ulp is 4e-6), so the tolerance is absolute, on the terms' scale; dividing by the wrong
    # length would move the mean by ~0.02.
    assert out["loss/inter_expert_kl"] == pytest.approx(expected.item(), abs=1e-5)
    assert_same_grads(got, grads(model))


def test_buffer_targets_are_verified_expert_answers_with_the_gold_solution_when_there_is_none(world):
    """--buffer-target expert: expert 1 has a verified answer to q0 only; its q1 item falls back
    to q1's gold solution, and the fallback is counted."""
    _, w, _ = world
    tok = w.tokenizer
    answered = Experts(tok, w.system_prompts, "synthetic", {("q0", 1): "4 + 3 = 7 #### 7"})
    items = [("q0", 1), ("q1", 1), ("q1", 2)]
    cfg = RielConfig(group_size=G, buffer_target="expert")
    prompts, targets, fallbacks, _ = buffer_targets(answered, items, BY_ID, cfg)
    assert targets == [response_ids(tok, "4 + 3 = 7 #### 7"), response_ids(tok, BY_ID["q1"].solution),
                                 response_ids(tok, BY_ID["q1"].solution)]
    assert prompts[1] == expert_prompt(tok, w.system_prompts[1], "synthetic", BY_ID["q1"])
    assert fallbacks == 2
    _, gold, fallbacks, _ = buffer_targets(answered, items, BY_ID, RielConfig(group_size=G))
    assert gold[0] == response_ids(tok, BY_ID["q0"].solution) and fallbacks == 0


def test_rollouts_are_addressed_by_question_expert_and_rollout(world):
    """score_rollouts reads the text of rows[q, i, g] against question q, and returns [Q, N, G]."""
    _, w, _ = world
    ro = make_rollouts(w)
    right = {(0, 2, 1), (1, 0, 2), (1, 1, 0)}
    ro.texts = ["#### 7" if (q, i, g) in right else "#### 8"
                for q in range(2) for i in range(3) for g in range(G)]
    ro.rows = ro.rows.flip(2)  # a different layout: rows[q, i, g] is now (q, i, G-1-g) of the text order
    rewards = score_rollouts(ro, w, EXAMPLES)
    assert rewards.shape == (2, 3, G)
    assert {tuple(x) for x in rewards.nonzero().tolist()} == {(q, i, G - 1 - g) for q, i, g in right}
    assert torch.equal(ro.per_row(rewards), torch.tensor([float(t == "#### 7") for t in ro.texts]))
    assert ro.question_of_row().tolist() == [0] * 9 + [1] * 9


def test_e5_micro_batches_hold_whole_questions():
    question = torch.tensor([0, 0, 0, 2, 2, 5, 5, 5, 5, 7])
    for size in (1, 2, 4, 100):
        batches = _whole_questions(question, size)
        assert torch.equal(torch.cat(batches), torch.arange(10))
        for b in batches:  # no question is split, and a batch is over `size` only if it is one question
            assert all(set((question == q).nonzero().flatten().tolist()) <= set(b.tolist()) for q in question[b])
            assert len(b) <= size or len(question[b].unique()) == 1


def test_first_update_with_recomputed_old_logprobs_has_e3s_gradient(world):
    """μ = 1: with π_old taken from the training forward, ρ = 1 and the clipped surrogate's
    gradient is the paper's E3 gradient, whatever the sampler reported."""
    model, w, _ = world
    ro = make_rollouts(w)
    with torch.no_grad():  # a sampler that reports every log-prob 3 nats too low
        ro.sampler_logprobs = [seq_logprob(model, p, c, w.tokenizer.vocab_size) - 3.0
                           for p, c in zip(ro.prompts, ro.completions)]
    advantages = group_advantages(TWO_ACTIVE, scale="group_std")
    base = dict(group_size=G, lambda1=0.0, micro_batch_size=4, max_new_tokens=14)
    model.zero_grad()
    out, b = step_e7(model, w, ro, TWO_ACTIVE, advantages, [],
                     RielConfig(**base, loss="clipped", recompute_old_logprobs=True))
    clipped = grads(model)
    assert out["clip_ratio"] == 0.0 and out["logprobs/sampler_trainer_gap"] == pytest.approx(3.0, abs=1e-4)
    model.zero_grad()
    step_e7(model, w, ro, TWO_ACTIVE, advantages, [], RielConfig(**base, loss="paper"))
    assert_same_grads(clipped, grads(model))
    # π_old is one list of per-row log-probs: recomputed on the rows E3 scores, the sampler's elsewhere
    recomputed = [r for r in range(len(ro.prompts)) if not torch.equal(b.old_logprobs[r], ro.sampler_logprobs[r])]
    assert recomputed == b.policy_rows == [r for r in range(len(ro.prompts)) if ro.per_row(advantages)[r] != 0]


def test_second_update_uses_the_first_updates_log_probs_as_pi_old_and_clips(world, tmp_path):
    """μ = 2: after one (large) optimizer step on the same rollouts, the gradient is that of E3'
    with π_old = the first update's log-probs, and tokens past the clip contribute nothing."""
    _, w, config = world
    model = tiny_model(config, 5)
    ro = make_rollouts(w)
    advantages = group_advantages(TWO_ACTIVE, scale="group_std")
    cfg = RielConfig(group_size=G, lambda1=0.0, micro_batch_size=4, max_new_tokens=14, loss="clipped",
                     recompute_old_logprobs=True, clip_eps=0.05)
    model.zero_grad()
    _, first = step_e7(model, w, ro, TWO_ACTIVE, advantages, [], cfg)
    old = first.old_logprobs
    torch.optim.SGD(model.parameters(), lr=3.0).step()
    model.zero_grad()
    out, _ = step_e7(model, w, ro, TWO_ACTIVE, advantages, [], cfg, old_logprobs=old)
    got = grads(model)
    assert 0 < out["clip_ratio"] < 1

    model.zero_grad()
    V = w.tokenizer.vocab_size
    logp, mask = padded([seq_logprob(model, p, c, V) for p, c in zip(ro.prompts, ro.completions)])
    old_all, _ = padded(old)
    expected = policy_loss(logp, mask, advantages.flatten(), old_all, clip_eps=0.05)
    expected.backward()
    assert out["loss/policy"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert_same_grads(got, grads(model))


# ---- pins on the step's wiring that a plausible slip would break (issue 24) ----

def test_every_expert_draws_its_own_rollouts(world):
    """D22 keys rollout (q, i, g) by (step, question, expert, rollout). With the expert left out
    of the key, two experts with the same prompt would sample the same completions, and experts
    in general the same random numbers (correlated samples, against the diversity the method
    relies on). Here experts 0 and 1 share a prompt: their rollouts must still differ."""
    from meml.riel import sample_rollouts
    model, w, _ = world
    twins = Experts(w.tokenizer, ["Same prompt.", "Same prompt.", "Other."], "synthetic")
    cfg = RielConfig(group_size=G, max_new_tokens=10, temperature=1.0)
    ro = sample_rollouts(model, twins, EXAMPLES, cfg, step_key=1234)
    for q in range(len(EXAMPLES)):
        expert0 = [ro.completions[r] for r in ro.rows[q, 0].tolist()]
        expert1 = [ro.completions[r] for r in ro.rows[q, 1].tolist()]
        assert ro.prompts[ro.rows[q, 0, 0]] == ro.prompts[ro.rows[q, 1, 0]]
        assert expert0 != expert1
    # ... and rollout g of expert i is the same in another batch (only its own key decides)
    alone = sample_rollouts(model, twins, EXAMPLES[1:], cfg, step_key=1234, first_question=1)
    assert alone.completions[alone.rows[0, 1, 2]] == ro.completions[ro.rows[1, 1, 2]]


@pytest.mark.parametrize("wrong, eligible", [(2, False), (3, True)])
def test_a_group_enters_the_buffer_only_with_more_than_k_wrong(wrong, eligible):
    """D10: more than K of G wrong. G = 3, K = 2: a group with exactly 2 wrong never enters, over
    many coins; one with 3 wrong enters with probability K/G = 2/3."""
    from meml.buffer import HardExampleBuffer
    from meml.riel import fill_buffer
    rewards = torch.ones(2, 3, G)
    rewards[..., :wrong] = 0.0  # every (question, expert) group: `wrong` of its G rollouts wrong
    inserted = 0
    for seed in range(20):
        buffer = HardExampleBuffer(capacity=100, k=2, g=G, seed=seed)
        inserted += fill_buffer(buffer, EXAMPLES, rewards)[1]
    assert (inserted > 0) == eligible
    if eligible:
        assert inserted == pytest.approx(20 * 6 * 2 / 3, rel=0.25)  # 120 offers at 2/3


def test_the_buffers_sft_is_scored_at_temperature_1(world):
    """E6, like MEF's E1, is the likelihood of a target nobody sampled: at T = 1, the model's own
    distribution (D2), while E3-E5 use the sampling temperature of the rollouts they score."""
    model, w, _ = world
    ro = make_rollouts(w)
    items = [("q0", 1), ("q1", 2)]
    cfg = RielConfig(group_size=G, temperature=0.5, lambda1=0.0, micro_batch_size=4)
    model.zero_grad()
    out, _ = step_e7(model, w, ro, ONE_ACTIVE, torch.zeros(2, 3, G), items, cfg)
    V = w.tokenizer.vocab_size

    def nll(temperature):
        logp, mask = padded([seq_logprob(model, expert_prompt(w.tokenizer, w.system_prompts[i], "synthetic", BY_ID[q]),
                                         response_ids(w.tokenizer, BY_ID[q].solution), V, temperature)
                             for q, i in items])
        return nll_loss(logp, mask).item()
    assert out["loss/sft"] == pytest.approx(nll(1.0), rel=1e-5)
    assert abs(out["loss/sft"] - nll(0.5)) > 1e-2


def test_the_steps_metrics_and_total_read_every_part_of_e7(world):
    """Every part in E7_PARTS is logged under its metric, and loss/total is Σ weight x value over
    the table (worked here from the logged values): a part computed but left out of the table, or
    logged but left out of the total, fails."""
    from meml.losses import E7_PARTS, e7_weights
    model, w, config = world
    ro = make_rollouts(w)
    cfg = RielConfig(group_size=G, beta=0.3, lambda1=0.5, lambda2=2.0, micro_batch_size=4, loss="clipped")
    model.zero_grad()
    out, _ = step_e7(model, w, ro, TWO_ACTIVE, group_advantages(TWO_ACTIVE, scale="group_std"), [("q0", 2)], cfg,
                     tiny_model(config, 1))
    weights = e7_weights(cfg)
    assert all(out[part.metric] != 0.0 for part in E7_PARTS.values())  # all four parts active
    assert out["loss/total"] == pytest.approx(sum(weights[n] * out[p.metric] for n, p in E7_PARTS.items()), rel=1e-6)
    assert weights == {"policy": 1.0, "inter_expert_kl": 0.5, "sft": 2.0, "reference_kl": 0.3}


def test_a_part_whose_weight_is_0_is_not_scored(world):
    """--lambda2 0 with the buffer on: the buffer still fills and pops, but E6 weighs nothing, so
    its items are not scored (a micro-batch whose every part weighs 0 has no graph to backward:
    it stopped the run). The gradient is the one without buffer items."""
    model, w, _ = world
    ro = make_rollouts(w)
    advantages = group_advantages(TWO_ACTIVE, scale="group_std")
    cfg = RielConfig(group_size=G, lambda1=0.5, lambda2=0.0, micro_batch_size=4)
    model.zero_grad()
    out, _ = step_e7(model, w, ro, TWO_ACTIVE, advantages, [("q0", 1), ("q1", 2)], cfg)
    with_items = grads(model)
    model.zero_grad()
    step_e7(model, w, ro, TWO_ACTIVE, advantages, [], cfg)
    assert out["loss/sft"] == 0.0
    assert_same_grads(with_items, grads(model))


def test_the_step_logs_the_share_of_questions_the_experts_can_rescue():
    """MEML's premise, counted by hand: q0 expert 2 all wrong while expert 0 is right (rescuable);
    q1 every expert has a right rollout (nothing to rescue); q2 all 9 wrong."""
    from meml.riel import premise
    rewards = torch.tensor([[[1, 1, 0], [0, 1, 0], [0, 0, 0]],
                            [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                            [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], dtype=torch.float)
    zeros = torch.zeros_like(rewards)
    out = premise(Grid(rewards, zeros, zeros + 5, zeros + 1, zeros))
    assert out["premise/rescuable"] == pytest.approx(1 / 3) and out["premise/all_wrong"] == pytest.approx(1 / 3)
    partial = rewards.clone()
    partial[1] = 0.5  # partial credit is not "correct": q1 joins the all-wrong questions
    out = premise(Grid(partial, zeros, zeros + 5, zeros + 1, zeros))
    assert out["premise/all_wrong"] == pytest.approx(2 / 3)

