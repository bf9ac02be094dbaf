"""meml.inference.complete under mixed precision: one bf16 copy of the weights per call, a bf16
KV cache, fp32 log-probs, and the same completions as a model stored in bf16."""
import copy
import gc
import weakref

import pytest
import torch

from meml import synthetic_assets
from meml.inference import complete
from meml.model import ModelConfig, Transformer
from meml.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    folder = synthetic_assets.write_synthetic_assets(tmp_path_factory.mktemp("assets"))
    config = ModelConfig.from_json(folder / "config.json")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 32, 64
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 8
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(std=0.2)
    tokenizer = Tokenizer.from_pretrained(folder)
    tokenizer.fit_to_model(config.vocab_size, source=str(folder))
    return model.eval(), tokenizer


QUESTIONS = ["What is 3 + 4?", "Mia has 5 apples and eats 2. How many are left?", "What is 6 * 7?"]


def test_mixed_precision_generation_runs_on_one_bf16_copy_of_the_weights(model_and_tokenizer, monkeypatch):
    """Under autocast with fp32 weights every decode step used to cast every weight to bf16
    again (inference_mode keeps no autocast cache) and the KV cache was fp32. Now: each forward
    of the call sees the same bf16 module, whose KV cache is bf16, and the copy is freed after."""
    model, tokenizer = model_and_tokenizer
    seen, caches = [], []
    real_cache = Transformer.new_kv_cache

    def recording_cache(self, *args):
        cache = real_cache(self, *args)
        caches.append(cache)
        return cache
    monkeypatch.setattr(Transformer, "new_kv_cache", recording_cache)
    hook = Transformer.forward

    def recording_forward(self, *args, **kwargs):
        seen.append((weakref.ref(self), self.model.layers[0].self_attn.qkv_proj.weight.dtype,
                     torch.is_autocast_enabled("cpu")))
        return hook(self, *args, **kwargs)
    monkeypatch.setattr(Transformer, "forward", recording_forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = complete(model, tokenizer, QUESTIONS, max_new_tokens=6, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert len(seen) >= 6  # prefill and decode steps
    assert len({ref() for ref, _, _ in seen}) == 1  # one module for the whole call ...
    assert all(dtype == torch.bfloat16 and not autocast for _, dtype, autocast in seen)  # ... in bf16
    assert caches and all(k.dtype == torch.bfloat16 for c in caches for k in c.keys + c.values)
    assert all(lp.dtype == torch.float32 for lp in out.logprobs)
    gc.collect()
    assert seen[0][0]() is None, "the bf16 copy outlived the call"
    assert model.output_weight.dtype == torch.float32  # the trained weights are untouched


def test_the_copy_generates_what_a_model_stored_in_bf16_generates(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    stored = copy.deepcopy(model).to(torch.bfloat16)
    keys = [11, 12, 13]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = complete(model, tokenizer, QUESTIONS, max_new_tokens=8, temperature=1.0, row_keys=keys)
    theirs = complete(stored, tokenizer, QUESTIONS, max_new_tokens=8, temperature=1.0, row_keys=keys)
    assert ours.completion_ids == theirs.completion_ids
    assert all(torch.equal(a, b) for a, b in zip(ours.logprobs, theirs.logprobs))
