"""Tests for meml/synthetic_assets.py: the synthetic world's tokenizer and checkpoint folder.

Oracles: exact round trips of the world's own text, jinja2 rendering the chat template, and
transformers loading the tokenizer and building a Qwen2 model from the config.
"""
import json

import pytest

from meml.synthetic_assets import SPECIAL_TOKENS, build_tokenizer, world_text, write_synthetic_assets


def test_tokenizer_round_trips_world_text_and_keeps_specials_whole():
    tok = build_tokenizer()
    texts = world_text(seed=5, n=200) + ["Ünïcode ✓ and tabs\t and  double  spaces\n\n"]
    for text in texts:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    chat = "<|im_start|>system\nSolve.<|im_end|>\n<|im_start|>user\nMia has 12 pens.<|im_end|>\n"
    ids = tok.encode(chat).ids
    assert tok.decode(ids, skip_special_tokens=False) == chat
    vocab = tok.get_vocab_size()
    for k, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special).ids == [tok.token_to_id(special)] == [vocab - len(SPECIAL_TOKENS) + k]
    assert ids.count(tok.token_to_id("<|im_start|>")) == 2 and ids.count(tok.token_to_id("<|im_end|>")) == 2
    # digits one per token: "12345" is five tokens
    assert [t.strip() for t in tok.encode("x=12345").tokens if t.strip("Ġ").isdigit()] == list("12345")


def test_assets_load_in_transformers_with_a_plain_chatml_template(tmp_path):
    jinja2 = pytest.importorskip("jinja2")
    transformers = pytest.importorskip("transformers")
    out = write_synthetic_assets(tmp_path / "syn")
    tc = json.loads((out / "tokenizer_config.json").read_text())
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    rendered = jinja2.Template(tc["chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    # no default system prompt: without a system message none appears
    no_system = jinja2.Template(tc["chat_template"]).render(messages=messages[1:], add_generation_prompt=False)
    assert no_system == "<|im_start|>user\nQ<|im_end|>\n"
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert hf.decode(hf.encode(rendered, add_special_tokens=False)) == rendered

    config = json.loads((out / "config.json").read_text())
    needed = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
              "attention_bias", "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id"]
    assert not [k for k in needed if k not in config]
    assert config["model_type"] == "qwen2" and config["attention_bias"] is True
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert config["vocab_size"] >= len(hf) and config["vocab_size"] % 64 == 0
    assert config["eos_token_id"] == hf.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] in gen["eos_token_id"]
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_pretrained(out))
    assert model.lm_head.weight.shape == (config["vocab_size"], config["hidden_size"])
