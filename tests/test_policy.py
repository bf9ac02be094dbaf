"""Packing (prompt, completion) pairs and scoring completions token by token."""
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
