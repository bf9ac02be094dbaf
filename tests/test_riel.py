"""RIEL's glue: which rows each loss part sees, and that micro-batching changes nothing.

The oracle is the same quantity computed the plain way: full logits of each unpadded sequence,
log_softmax, one loss over the whole batch, one backward.
"""
import pytest
import torch

from meml import synthetic_assets
from meml.data import Example
from meml.kl import inter_expert_kl
from meml.losses import nll_loss, policy_loss
from meml.model import ModelConfig, Transformer
from meml.prompts import expert_prompt, response_ids
from meml.riel import RielConfig, Rollouts, World, inter_expert_step, policy_step, sft_step
from meml.tokenizer import Tokenizer

G = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = synthetic_assets.write_synthetic_assets(tmp_path_factory.mktemp("assets"))
    tok = Tokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = ModelConfig.from_json(folder / "config.json")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 32, 64
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 8
    model = Transformer(config)
    model.init_weights(std=0.2)  # wide enough that log-probs differ visibly between prompts
    assert tok.vocab_size < config.vocab_size  # a padded vocabulary, as Qwen's
    return model, World(tok, ["Expert zero.", "Expert one says more.", "Two"], "synthetic")


EXAMPLES = [Example("q0", "Mia has 3 apples and gets 4 more. How many?", "7", "3 + 4 = 7 #### 7"),
            Example("q1", "Leo has 9 coins and loses 2. How many?", "7", "9 - 2 = 7 #### 7")]


def make_rollouts(world, rewards):
    """Rollouts for EXAMPLES x 3 experts x G with made-up completions and the given rewards."""
    tok = world.tokenizer
    prompts, completions = [], []
    for q, ex in enumerate(EXAMPLES):
        for i, p in enumerate(world.system_prompts):
            for g in range(G):
                prompts.append(expert_prompt(tok, p, "synthetic", ex))
                completions.append(tok.encode(f"{q + i + g} + {g} = {q + i + 2 * g}") + [tok.eot_id])
    old = [torch.zeros(len(c)) for c in completions]
    return Rollouts(prompts, completions, old, [True] * len(prompts), [""] * len(prompts),
                    torch.tensor(rewards, dtype=torch.float))


def seq_logprob(model, prompt, completion, vocab_limit, temperature=1.0):
    """Oracle: log π(completion | prompt) per token from full logits of the unpadded sequence,
    over the ids the tokenizer knows (the synthetic model pads its vocabulary, as Qwen does)."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(ids)[0, :, :vocab_limit].float() / temperature, dim=-1)  # [T, V]
    return torch.stack([logp[len(prompt) - 1 + t, c] for t, c in enumerate(completion)])


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name


# Question 0: expert 0 right twice, expert 2 never: E+ = 0, E- = 2, active.
# Question 1: every expert right once: a tie, skipped.
DISAGREE = [[[1, 1, 0], [1, 0, 0], [0, 0, 0]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]]]


def test_inter_expert_term_pulls_the_worst_expert_toward_the_best_experts_correct_rollouts(world):
    model, w = world
    ro = make_rollouts(w, DISAGREE)
    cfg = RielConfig(group_size=G, inter_expert_weight=0.5)
    model.zero_grad()
    out = inter_expert_step(model, w, ro, cfg)
    got = grads(model)
    assert out["inter_expert/active_questions"] == 1 and out["loss/inter_expert_kl"] != 0.0

    model.zero_grad()
    V = w.tokenizer.vocab_size
    rows = [0, 1]  # question 0, expert 0, rollouts 0 and 1 (the correct ones)
    minus_prompt = ro.prompts[2 * G]  # question 0, expert 2
    plus = torch.stack([seq_logprob(model, ro.prompts[r], ro.completions[r], V).sum() for r in rows])
    minus = torch.stack([seq_logprob(model, minus_prompt, ro.completions[r], V).sum() for r in rows])
    expected = inter_expert_kl(plus, minus)
    (0.5 * expected).backward()
    assert out["loss/inter_expert_kl"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    assert_same_grads(got, grads(model))


def test_inter_expert_term_is_zero_when_experts_tie(world):
    model, w = world
    ro = make_rollouts(w, [[[1, 0, 0]] * 3, [[0, 0, 0]] * 3])
    model.zero_grad()
    out = inter_expert_step(model, w, ro, RielConfig(group_size=G))
    assert out == {"loss/inter_expert_kl": 0.0, "inter_expert/active_questions": 0}
    assert grads(model) == {}


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_micro_batched_policy_gradient_equals_the_whole_batch_gradient(world, aggregation):
    model, w = world
    ro = make_rollouts(w, DISAGREE)
    advantages = torch.randn(2, 3, G, generator=torch.Generator().manual_seed(1))
    advantages[0, 2] = 0.0  # rows with A = 0 are skipped: the result must not change
    cfg = RielConfig(group_size=G, aggregation=aggregation, micro_batch_size=4, temperature=0.8,
                     max_new_tokens=12)
    model.zero_grad()
    out = policy_step(model, w, ro, advantages, cfg)
    got = grads(model)

    model.zero_grad()
    V = w.tokenizer.vocab_size
    logps = [seq_logprob(model, p, c, V, temperature=0.8) for p, c in zip(ro.prompts, ro.completions)]
    width = max(len(lp) for lp in logps)
    logp = torch.stack([torch.nn.functional.pad(lp, (0, width - len(lp))) for lp in logps])
    mask = torch.stack([torch.arange(width) < len(lp) for lp in logps])
    expected = policy_loss(logp, mask, advantages.flatten(), aggregation=aggregation,
                           max_len=12 if aggregation == "dr_grpo" else None)
    expected.backward()
    assert out["loss/policy"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert_same_grads(got, grads(model))


def test_buffer_sft_is_the_nll_of_the_gold_solutions_under_each_experts_prompt(world):
    model, w = world
    items = [("q0", 2), ("q1", 0), ("q1", 1)]
    by_id = {ex.id: ex for ex in EXAMPLES}
    model.zero_grad()
    value = sft_step(model, w, items, by_id, RielConfig(micro_batch_size=2, sft_weight=2.0))
    got = grads(model)

    model.zero_grad()
    tok, V = w.tokenizer, w.tokenizer.vocab_size
    per_item = [seq_logprob(model, expert_prompt(tok, w.system_prompts[i], "synthetic", by_id[q]),
                            response_ids(tok, by_id[q].solution), V) for q, i in items]
    width = max(len(lp) for lp in per_item)
    logp = torch.stack([torch.nn.functional.pad(lp, (0, width - len(lp))) for lp in per_item])
    mask = torch.stack([torch.arange(width) < len(lp) for lp in per_item])
    expected = nll_loss(logp, mask)  # token mean over all answer tokens
    (2.0 * expected).backward()
    assert value == pytest.approx(expected.item(), rel=1e-5)
    assert_same_grads(got, grads(model))


def test_full_vocab_inter_expert_term_is_the_exact_kl_along_the_plus_rollouts(world):
    model, w = world
    ro = make_rollouts(w, DISAGREE)
    model.zero_grad()
    out = inter_expert_step(model, w, ro, RielConfig(group_size=G, inter_expert_variant="full_vocab"))
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
