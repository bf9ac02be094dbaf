"""Packing (prompt, completion) pairs and scoring completions token by token."""
import pytest
import torch

from meml.model import ModelConfig, Transformer
from meml.policy import completion_logprobs, pack


def tiny_model(seed=0, vocab=50):
    torch.manual_seed(seed)
    config = ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, max_position_embeddings=128, hidden_act="silu"))
    model = Transformer(config)
    model.init_weights()
    return model.eval()


def test_pack_keeps_each_distinct_prompt_once():
    batch = pack([[5, 6, 7], [8], [5, 6, 7]], [[1], [2, 3, 4], [9, 9]], pad_id=0)
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.prompt_of.tolist() == [0, 1, 0]
    assert batch.completion_ids.tolist() == [[1, 0, 0], [2, 3, 4], [9, 9, 0]]
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 0, 0], [0, 0, 8, 2, 3, 4], [5, 6, 7, 9, 9, 0]]


def test_pack_left_pads_prompts_and_right_pads_completions():
    batch = pack([[5, 6, 7], [8]], [[1], [2, 3, 4]], pad_id=0)
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 0, 0], [0, 0, 8, 2, 3, 4]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.completion_ids.tolist() == [[1, 0, 0], [2, 3, 4]]
    assert batch.completion_mask.tolist() == [[True, False, False], [True, True, True]]


def test_completion_logprobs_equal_full_softmax_of_each_sequence_alone():
    model = tiny_model()
    prompts = [[3, 4, 5, 6], [7, 8], [9]]
    completions = [[10, 11], [12, 13, 14, 15], [16]]
    temperature, vocab_limit = 0.7, 40  # ids >= 40 are "padded vocabulary": excluded
    got = completion_logprobs(model, pack(prompts, completions, pad_id=0),
                              temperature=temperature, vocab_limit=vocab_limit)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([p + c])
        logits = model(ids)[0, :, :vocab_limit].double() / temperature  # no padding, full logits
        logp = torch.log_softmax(logits, dim=-1)
        expected = [logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(c)]
        assert torch.allclose(got[row, :len(c)].double(), torch.tensor(expected, dtype=torch.double), atol=1e-5)
        assert (got[row, len(c):] == 0).all()  # off the mask: exactly 0


def _alone(model, prompts, completions, weights):
    """The oracle: each (prompt, completion) run alone, unpadded, through full logits;
    returns sum_t weights[row, t] * log p(c_t) over every row."""
    total = 0.0
    for row, (p, c) in enumerate(zip(prompts, completions)):
        logp = torch.log_softmax(model(torch.tensor([p + c]))[0], dim=-1)
        total = total + sum(weights[row, t] * logp[len(p) - 1 + t, tok] for t, tok in enumerate(c))
    return total


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompts_give_each_sequence_alone_values_and_gradients(checkpointing):
    """Rows that share a prompt run it once (two passes): log-probs and every weight's gradient
    equal those of each sequence run alone, also when the layers are recomputed in the backward
    (a prompt's keys then carry the gradient of three rows through a recomputed layer)."""
    model = tiny_model().double().train()
    model.activation_checkpointing = checkpointing
    prompts = [[3, 4, 5, 6], [7, 8], [3, 4, 5, 6], [9], [3, 4, 5, 6]]
    completions = [[10, 11], [12, 13, 14, 15], [16], [17, 18, 19], [20, 21, 22]]
    batch = pack(prompts, completions, pad_id=0)
    assert len(batch.prompt_ids) == 3  # three distinct prompts for five rows
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.double)
    got = completion_logprobs(model, batch)
    (got * weights).sum().backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = False
    _alone(model, prompts, completions, weights).backward()
    for name, param in model.named_parameters():
        # fp32 is the log-prob function's accumulation (meml/logprob.py), the model is fp64
        assert torch.allclose(got_grads[name], param.grad, atol=1e-5), name
    with torch.no_grad():
        for row, (p, c) in enumerate(zip(prompts, completions)):
            logp = torch.log_softmax(model(torch.tensor([p + c]))[0], dim=-1)
            expected = torch.stack([logp[len(p) - 1 + t, tok] for t, tok in enumerate(c)])
            assert torch.allclose(got[row, :len(c)].double(), expected, atol=1e-5)
