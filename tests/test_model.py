"""meml/model.py (and the checkpoint layout in meml/hf_checkpoint.py, through from_pretrained /
save_pretrained) against `transformers` as the oracle, on tiny random-weight checkpoints that
transformers itself writes (hidden 64, 2 layers, GQA 4 query / 2 key-value heads).

Facts checked: logits equal HF's in fp32 (Qwen2, and Llama with llama3 RoPE scaling on a sequence
longer than original_max_position_embeddings), bf16 argmax agrees; the KV cache and left padding
change nothing for real tokens and never give NaN; HF checkpoints load (single file, sharded,
tied/untied) and ours load in transformers; every user-caused error names what is wrong.
"""
import json
import math

import pytest
import torch

from conftest import require_shared
from meml.hf_checkpoint import fuse_projections
from meml.model import ModelConfig, Transformer, rope_inv_freq

transformers = pytest.importorskip("transformers")

VOCAB = 96
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
SEQ_LEN = 80  # > original_max_position_embeddings, so the llama3 scaling matters


def hf_checkpoint(path, family, tied, max_shard_size=None):
    """Write a tiny random HF checkpoint with transformers' own save_pretrained; return its folder."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, initializer_range=0.1)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=1e6, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE), **common))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module", params=[("qwen2", True), ("qwen2", False), ("llama", False), ("llama", True)],
                ids=["qwen2-tied", "qwen2-untied", "llama3-untied", "llama3-tied"])
def checkpoint(request, tmp_path_factory):
    family, tied = request.param
    return hf_checkpoint(tmp_path_factory.mktemp(f"{family}-{tied}"), family, tied)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tied=False)


def hf_logits(path, ids, dtype=torch.float32):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        return hf(ids).logits


def random_ids(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- parity with transformers -----------------------------------------------------------------

@torch.no_grad()
def test_fp32_logits_match_transformers(checkpoint):
    ids = random_ids(2, SEQ_LEN)
    ours = Transformer.from_pretrained(checkpoint)(ids)
    assert (ours - hf_logits(checkpoint, ids)).abs().max().item() <= 1e-4


def test_fp32_parameter_gradients_match_transformers(checkpoint):
    """Training runs through our backward: every parameter's gradient of a next-token loss,
    with a left-padded row, equals transformers' (the padded positions are left out of the loss)."""
    ids = random_ids(3, 24)
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, :7] = 0
    targets = random_ids(3, 24, seed=2)
    ours = Transformer.from_pretrained(checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for model, logits in ((ours, lambda: ours(ids, attention_mask=mask)),
                          (theirs, lambda: theirs(ids, attention_mask=mask).logits)):
        loss = torch.nn.functional.cross_entropy(logits()[:, 7:].flatten(0, 1), targets[:, 7:].flatten())
        loss.backward()
    # their q/k/v_proj gradients, stacked as our qkv_proj stacks the weights
    theirs_grads = fuse_projections({n: p.grad for n, p in theirs.named_parameters()})
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, theirs_grads[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_activation_checkpointing_gives_the_plain_forwards_gradients(llama_dir, autocast):
    """Each layer recomputed in the backward (use_reentrant=False replays autocast too): the
    same loss and the same gradient for every parameter, with a left-padded row."""
    ids, mask = random_ids(3, 24), torch.ones(3, 24, dtype=torch.long)
    mask[0, :7] = 0
    targets = random_ids(3, 24, seed=2)
    grads = []
    for checkpointing in (False, True):
        model = Transformer.from_pretrained(llama_dir)
        model.activation_checkpointing = checkpointing
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, attention_mask=mask)
        torch.nn.functional.cross_entropy(logits[:, 7:].float().flatten(0, 1), targets[:, 7:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-6), name


@torch.no_grad()
def test_bf16_argmax_agrees_with_transformers(llama_dir):
    # we rotate RoPE in fp32, HF in bf16, so bf16 logits differ in the last bits; measured 99.4 %
    ids = random_ids(4, SEQ_LEN)
    ours = Transformer.from_pretrained(llama_dir, dtype=torch.bfloat16)(ids)
    assert ours.dtype == torch.bfloat16
    agree = (ours.argmax(-1) == hf_logits(llama_dir, ids, torch.bfloat16).argmax(-1)).float().mean()
    assert agree >= 0.95


def test_llama3_rope_has_three_bands():
    # head_dim 16, theta 1e4: wavelengths 2*pi*10^(k/2) = 6.3, 19.9, 62.8, 199, ...; with
    # original context 64, low factor 1, high factor 4 the bands are (<16 kept, 16..64 blended, >64 / 8)
    config = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE)))
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    scaled = rope_inv_freq(config)
    assert scaled[0] == plain[0]                                   # short wave: unchanged
    assert torch.allclose(scaled[3:], plain[3:] / 8)               # long waves: slowed down 8x
    smooth = (64 / (2 * math.pi / plain[1]) - 1) / (4 - 1)  # (old_ctx / wavelength - low) / (high - low)
    assert torch.isclose(scaled[1], (1 - smooth) * plain[1] / 8 + smooth * plain[1])  # blended


# --- KV cache and padding ---------------------------------------------------------------------

@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(llama_dir):
    model = Transformer.from_pretrained(llama_dir)
    ids = random_ids(2, 20)
    full = model(ids)
    cache = model.new_kv_cache(batch_size=2, max_len=20)
    steps = [model(ids[:, :12], kv_cache=cache)]
    for t in range(12, 20):
        steps.append(model(ids[:, t:t + 1], kv_cache=cache))
    assert cache.length == 20
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone_and_has_no_nan(checkpoint):
    model = Transformer.from_pretrained(checkpoint)
    prompts = [random_ids(1, n, seed=n)[0] for n in (9, 4, 1)]
    continuation = random_ids(3, 5, seed=7)  # decoded one token at a time after the prompts
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1

    cache = model.new_kv_cache(batch_size=3, max_len=width + 5)
    steps = [model(ids, attention_mask=mask, kv_cache=cache)]
    for t in range(5):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        steps.append(model(continuation[:, t:t + 1], attention_mask=mask, kv_cache=cache))
    batched = torch.cat(steps, dim=1)  # [3, width + 5, V]
    assert not batched.isnan().any()  # padded query rows included

    for row, p in enumerate(prompts):
        alone = model(torch.cat([p, continuation[row]])[None])[0]
        assert (batched[row, width - len(p):] - alone).abs().max().item() <= 1e-5


@torch.no_grad()
def test_padding_in_a_full_forward_gives_no_nan(llama_dir):
    model = Transformer.from_pretrained(llama_dir)
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])  # last row: all padding
    assert not model(random_ids(3, 5), attention_mask=mask).isnan().any()


@torch.no_grad()
def test_hidden_states_times_output_weight_are_the_logits(checkpoint):
    model = Transformer.from_pretrained(checkpoint)
    ids = random_ids(2, 7)
    hidden = model(ids, return_hidden=True)  # [2, 7, 64]
    assert hidden.shape == (2, 7, 64)
    assert torch.allclose(hidden @ model.output_weight.T, model(ids), atol=1e-6)


# --- checkpoints ------------------------------------------------------------------------------

@torch.no_grad()
def test_save_load_round_trip_loads_in_transformers(checkpoint, tmp_path):
    model = Transformer.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path / "ours")
    ids = random_ids(2, SEQ_LEN)
    expected = model(ids)
    assert (hf_logits(tmp_path / "ours", ids) - expected).abs().max().item() <= 1e-5
    assert torch.equal(Transformer.from_pretrained(tmp_path / "ours")(ids), expected)
    assert ModelConfig.from_json(tmp_path / "ours" / "config.json") == model.config
    # qkv_proj is split back: the very tensors, under the names, that transformers wrote
    from safetensors.torch import load_file
    stored, original = load_file(tmp_path / "ours" / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert stored.keys() == original.keys()
    assert all(torch.equal(stored[name], original[name]) for name in original)
    assert ("lm_head.weight" in stored) == (not model.config.tie_word_embeddings)
    assert not [p.name for p in (tmp_path / "ours").iterdir() if "tmp" in p.name]


def test_tied_head_is_the_embedding_parameter(checkpoint):
    model = Transformer.from_pretrained(checkpoint)
    shared = model.output_weight is model.model.embed_tokens.weight
    assert shared == model.config.tie_word_embeddings
    assert len(list(model.parameters())) == len(model.state_dict()) - shared


def test_loaded_model_trains_every_parameter(checkpoint):
    model = Transformer.from_pretrained(checkpoint)
    model(random_ids(2, 6)).logsumexp(-1).sum().backward()
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@torch.no_grad()
def test_sharded_checkpoint_loads(tmp_path):
    path = hf_checkpoint(tmp_path, "qwen2", tied=False, max_shard_size="40KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1
    ids = random_ids(1, 10)
    assert (Transformer.from_pretrained(path)(ids) - hf_logits(path, ids)).abs().max().item() <= 1e-4


def test_real_configs_parse():
    qwen = ModelConfig.from_json(require_shared("configs", "Qwen2.5-0.5B-Instruct", "config.json"))
    assert (qwen.model_type, qwen.rope_theta, qwen.attention_bias, qwen.tie_word_embeddings) == \
        ("qwen2", 1e6, True, True)
    assert (qwen.head_dim, qwen.num_key_value_heads, qwen.rope_scaling) == (64, 2, None)
    llama = ModelConfig.from_json(require_shared("configs", "Llama-3.2-1B-Instruct", "config.json"))
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_scaling["factor"] == 32.0
    assert llama.eos_token_id == [128001, 128008, 128009]


def test_transformers_v5_rope_parameters_read_like_v4_keys(llama_dir):
    v5 = json.loads((llama_dir / "config.json").read_text())  # written by transformers 5.x
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE))
    assert ModelConfig.from_hf_dict(v5) == ModelConfig.from_hf_dict(v4)


# --- errors a user can cause ------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("model_type", "mistral", r"model_type='mistral' is not supported"),
    ("hidden_act", "gelu", r"hidden_act='gelu' is not supported"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
     r"rope_parameters=.* rope type 'yarn'"),
    ("use_sliding_window", True, r"use_sliding_window=True is not supported"),
    ("mlp_bias", True, r"mlp_bias=True is not supported"),
])
def test_unsupported_config_value_is_named(llama_dir, tmp_path, field, value, message):
    config = json.loads((llama_dir / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        ModelConfig.from_json(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(err.value)


def test_missing_files_are_named(llama_dir, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/config.json: not valid JSON"):
        Transformer.from_pretrained(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match=r"config.json not found"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"neither model.safetensors nor model.safetensors.index.json"):
        Transformer.from_pretrained(tmp_path)
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"lists shard model-00001-of-00002.safetensors"):
        Transformer.from_pretrained(tmp_path)


def rewrite_tensors(src, dst, edit):
    from safetensors.torch import load_file, save_file
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_unexpected_and_misshapen_tensors_are_named(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = rewrite_tensors(llama_dir, tmp_path / "missing", lambda s: s.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensor\(s\) {name}; do config.json and"):
        Transformer.from_pretrained(path)
    path = rewrite_tensors(llama_dir, tmp_path / "extra", lambda s: s.update(extra=torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'extra'"):
        Transformer.from_pretrained(path)
    path = rewrite_tensors(llama_dir, tmp_path / "shape", lambda s: s.update({name: torch.zeros(128, 32)}))
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(128, 32\) but config.json implies \(128, 64\)"):
        Transformer.from_pretrained(path)


def test_attention_bias_worked_by_hand():
    """Row 0 is left-padded by one slot. Prefill of 3 tokens, then one decode step at slot 3."""
    from meml.model import attention_bias
    inf = float("-inf")
    prefill = attention_bias(torch.tensor([[0, 1, 1], [1, 1, 1]]), past=0, T=3, dtype=torch.float32)
    assert prefill.shape == (2, 1, 3, 3)
    assert prefill[0, 0].tolist() == [[0, inf, inf],   # the pad query sees only its own slot
                                      [inf, 0, inf],   # real keys at or before the query
                                      [inf, 0, 0]]
    assert prefill[1, 0].tolist() == [[0, inf, inf], [0, 0, inf], [0, 0, 0]]
    decode = attention_bias(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]), past=3, T=1, dtype=torch.bfloat16)
    assert decode.dtype == torch.bfloat16
    assert decode[:, 0, 0].tolist() == [[inf, 0, 0, 0],
                                        [0, 0, 0, 0]]  # own slot even when the mask calls it pad


@pytest.mark.parametrize("T", [1, 5])  # a decode step and a prompt
def test_grouped_query_attention_equals_the_formula_with_repeated_heads(T):
    from meml.model import attention_bias, grouped_query_attention
    g = torch.Generator().manual_seed(0)
    B, h, kv, d, S = 3, 6, 2, 8, 7
    q, k, v = (torch.randn(shape, generator=g) for shape in ((B, h, T, d), (B, kv, S, d), (B, kv, S, d)))
    real = torch.ones(B, S, dtype=torch.long)
    real[0, :3] = 0
    mask = attention_bias(real, past=S - T, T=T, dtype=torch.float32)
    # query head i reads key/value head i // (h / kv)
    k_rep, v_rep = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    expected = torch.softmax(q @ k_rep.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1) @ v_rep
    assert torch.allclose(grouped_query_attention(q, k, v, mask), expected, atol=1e-6)


def test_cache_overflow_and_mask_shape_are_explained(llama_dir):
    model = Transformer.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match=r"KV cache holds 4 slots; 0 used, 5 more do not fit"):
        model(random_ids(1, 5), kv_cache=model.new_kv_cache(1, 4))
    with pytest.raises(ValueError, match=r"KV cache was made for batch size 2, input_ids has 1 rows"):
        model(random_ids(1, 5), kv_cache=model.new_kv_cache(2, 8))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\), expected \(1, 5\)"):
        model(random_ids(1, 5), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 1, 5, 4\), expected \(1, 1, 5, 5\)"):
        model(random_ids(1, 5), attention_mask=torch.zeros(1, 1, 5, 4), position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match=r"position_ids are required with an additive"):
        model(random_ids(1, 5), attention_mask=torch.zeros(1, 1, 5, 5))


@torch.no_grad()
def test_an_additive_mask_is_the_same_as_the_01_mask_it_encodes(checkpoint):
    """The sampler's decode path: one additive row, sliced, instead of the 0/1 mask."""
    model = Transformer.from_pretrained(checkpoint)
    ids = random_ids(2, 9)
    real = torch.ones(2, 9, dtype=torch.long)
    real[0, :4] = 0  # row 0 is left-padded
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    expected = model(ids, attention_mask=real, position_ids=positions)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril().repeat(2, 1, 1)  # causal, [2, 9, 9]
    allowed[0, :, :4] = False                 # nobody sees row 0's pads...
    allowed[0, range(4), range(4)] = True     # ...but a pad query sees its own slot (as attention_bias)
    additive = torch.zeros(2, 1, 9, 9).masked_fill(~allowed[:, None], float("-inf"))
    assert torch.equal(model(ids, attention_mask=additive, position_ids=positions), expected)
    # decoding: prefill 5 with the 0/1 mask, then 4 steps with slices of one additive row
    cache = model.new_kv_cache(2, 9)
    steps = [model(ids[:, :5], attention_mask=real[:, :5], position_ids=positions[:, :5], kv_cache=cache)]
    row = torch.zeros(2, 1, 1, 9).masked_fill((real == 0)[:, None, None, :], float("-inf"))
    for t in range(5, 9):
        steps.append(model(ids[:, t:t + 1], attention_mask=row[..., :t + 1], position_ids=positions[:, t:t + 1],
                           kv_cache=cache))
    assert (torch.cat(steps, dim=1) - expected)[:, 4:].abs().max().item() <= 1e-5


@torch.no_grad()
def test_tied_checkpoint_that_stores_the_head_too(tmp_path):
    # an identical stored copy is harmless; a different one means config.json is wrong (transformers
    # 5.23 then silently unties, with a warning), so we stop and say which field to change
    src = hf_checkpoint(tmp_path / "hf", "qwen2", tied=True)
    copy = rewrite_tensors(src, tmp_path / "copy", lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    ids = random_ids(1, 10)
    assert (Transformer.from_pretrained(copy)(ids) - hf_logits(src, ids)).abs().max().item() <= 1e-4
    other = rewrite_tensors(src, tmp_path / "other", lambda s: s.update({"lm_head.weight": torch.zeros(VOCAB, 64)}))
    with pytest.raises(ValueError, match=r"lm_head.weight differs .* tie_word_embeddings=true; set it to false"):
        Transformer.from_pretrained(other)


def test_init_weights_matches_the_hf_initialisation_scale():
    config = ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(std=0.02)
    embed = model.model.embed_tokens.weight
    assert abs(embed.std().item() - 0.02) < 0.001 and abs(embed.mean().item()) < 0.001
    assert model.lm_head.weight is embed  # still tied
    attn = model.model.layers[0].self_attn
    assert (attn.qkv_proj.bias == 0).all() and (model.model.norm.weight == 1).all()


@pytest.mark.parametrize("bias", [False, True])
def test_a_decode_step_product_equals_the_written_out_sum_values_and_gradients(bias):
    """In fp32 on CPU a [B, 1, in] input takes decode_linear's weight-first product, a
    [B, T, in] input F.linear's. Both must be sum_j x_j W_kj + b_k, written out elementwise in
    fp64 from the same numbers, and so must their gradients."""
    from meml.model import Linear
    torch.manual_seed(0)
    layer = Linear(6, 5, bias=bias)
    params64 = [p.detach().double().requires_grad_() for p in layer.parameters()]  # weight[, bias]
    for T in (1, 3):
        x = torch.randn(4, T, 6, requires_grad=True)
        x64 = x.detach().double().requires_grad_()
        written = (x64[..., None, :] * params64[0]).sum(-1) + (params64[1] if bias else 0.0)  # [4, T, 5]
        out = layer(x)
        assert out.shape == (4, T, 5) and torch.allclose(out.double(), written, rtol=0, atol=1e-6)
        upstream = torch.randn(4, T, 5)
        grads = torch.autograd.grad(out, [x, *layer.parameters()], upstream)
        expected = torch.autograd.grad(written, [x64, *params64], upstream.double())
        for got, want in zip(grads, expected):
            assert torch.allclose(got.double(), want, rtol=0, atol=1e-5)
