"""The memory plan (meml/memory.py) against what a step really holds.

Oracles: the tensors of a real model, its gradients and AdamW's states (exact byte counts); a
real KV cache; the storages autograd keeps during a real training forward (saved_tensors_hooks)
at the tiny shape, and during a whole forward on fake tensors at the Qwen2.5-0.5B and 1.5B
shapes (the plan itself measures one layer only, at two lengths). The plan must be within 15 %.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from meml.memory import Settings, fitting_micro_batch, parameter_count, plan
from meml.model import KVCache, ModelConfig, Transformer
from meml.policy import completion_hidden, completion_logprobs, pack

TINY = ModelConfig("qwen2", 512, 96, 256, 3, 4, 2, 24, 1e-6, 10000.0, None, True, True, 512)
QWEN_05B = ModelConfig("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 1e-6, 1e6, None, True, True, 32768)
QWEN_15B = ModelConfig("qwen2", 151936, 1536, 8960, 28, 12, 2, 128, 1e-6, 1e6, None, True, True, 32768)
LLAMA = ModelConfig("llama", 300, 64, 128, 2, 4, 1, 16, 1e-5, 5e5, None, False, False, 256)


@pytest.mark.parametrize("config", [TINY, LLAMA, QWEN_15B], ids=["qwen-tiny", "llama-untied", "qwen-1.5b"])
def test_parameter_count_is_the_models(config):
    with FakeTensorMode():
        model = Transformer(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    if config is QWEN_15B:
        assert round(parameter_count(config) / 1e6) == 1544  # Qwen2.5-1.5B's published 1.54B


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_weights_gradients_and_adamw_states_are_the_bytes_they_take(weights):
    torch.manual_seed(0)
    model = Transformer(TINY).to(weights)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.tensor([[1, 2, 3]])).float().sum().backward()
    optimizer.step()
    terms = plan(TINY, Settings(weights=weights, compute=weights))
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    assert terms["weights"] == nbytes(model.parameters())
    assert terms["gradients"] == nbytes(p.grad for p in model.parameters())
    assert terms["AdamW states"] == nbytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")
    sharded = plan(TINY, Settings(weights=weights, compute=weights, shards=4))
    assert sharded["AdamW states"] == terms["AdamW states"] // 4


def test_the_kv_cache_term_is_a_real_caches_bytes():
    s = Settings(compute=torch.bfloat16, rollout_rows=24, prompt_tokens=40, completion_tokens=96)
    cache = KVCache(TINY, 24, 136, torch.bfloat16, "cpu")
    assert plan(TINY, s)["rollouts: KV cache"] == sum(t.numel() * t.element_size() for t in cache.keys + cache.values)


def _saved_bytes(model, batch, compute, whole: bool) -> int:
    """Bytes of every storage autograd keeps in a training forward (weights themselves not)."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    found = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            found[storage._cdata] = storage.nbytes()
        return t
    with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32), \
            torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        if whole:
            completion_logprobs(model, batch)
        else:
            completion_hidden(model, batch)
    return sum(found.values())


def _batch(rows, prompt, completion, vocab):
    """Every row its own prompt (the plan counts each row's prompt in full)."""
    return pack([[(r * 7 + i) % (vocab - 1) + 1 for i in range(prompt)] for r in range(rows)],
                [[(r + i) % (vocab - 1) + 1 for i in range(completion)] for r in range(rows)], 0)


def _planned(config, s):
    terms = plan(config, s)
    return terms["update: saved activations"] + terms["update: autocast weight casts"]


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_saved_activations_of_a_real_micro_batch_at_the_tiny_shape(compute):
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    measured = _saved_bytes(model, _batch(8, 30, 90, TINY.vocab_size), compute, whole=True)
    planned = _planned(TINY, Settings(compute=compute, micro_batch_size=8, prompt_tokens=30, completion_tokens=90))
    assert planned == pytest.approx(measured, rel=0.15), (planned, measured)


@pytest.mark.parametrize("config", [QWEN_05B, QWEN_15B], ids=["qwen2.5-0.5b", "qwen2.5-1.5b"])
def test_saved_activations_of_a_whole_forward_on_fake_tensors_at_real_shapes(config):
    """The plan measures one layer at two lengths; this runs the whole two-pass training forward
    (prompts, then completions against their keys and values) of the real shape on fake tensors."""
    s = Settings(compute=torch.bfloat16, micro_batch_size=8, prompt_tokens=200, completion_tokens=300)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = Transformer(config)
        batch = _batch(8, 200, 300, 1000)
        batch = type(batch)(*[mode.from_tensor(t) for t in (batch.prompt_ids, batch.prompt_mask, batch.prompt_of,
                                                            batch.completion_ids, batch.completion_mask)])
        measured = _saved_bytes(model, batch, torch.bfloat16, whole=False)
    assert _planned(config, s) == pytest.approx(measured, rel=0.15), (_planned(config, s), measured)


def test_the_paper_settings_fit_an_80gb_gpu_at_the_chosen_micro_batch():
    """Qwen2.5-1.5B, bf16 mixed precision, 64 rows of 256 + 256 tokens: ~110 GB of activations at
    the default micro-batch of 64, so a CUDA run takes the largest that fits (micro-batching
    changes memory only)."""
    paper = Settings(compute=torch.bfloat16, micro_batch_size=64, prompt_tokens=256, completion_tokens=256)
    budget = 80 * 10**9
    assert plan(QWEN_15B, paper)["total"] > budget
    chosen = fitting_micro_batch(QWEN_15B, paper, budget)
    assert chosen is not None and chosen < 64
    assert plan(QWEN_15B, Settings(**{**paper.__dict__, "micro_batch_size": chosen}))["total"] <= 0.9 * budget
    assert plan(QWEN_15B, Settings(**{**paper.__dict__, "micro_batch_size": 2 * chosen}))["total"] > 0.9 * budget


def test_plan_prints_the_terms_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import sys

    from conftest import REPO_ROOT
    sys.path.insert(0, str(REPO_ROOT))
    import train
    monkeypatch.chdir(tmp_path)
    assert train.main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan per device (0.38M parameters") and "update: saved activations" in out
    assert list(tmp_path.iterdir()) == []  # no run folder, no lock, no assets


def test_plan_of_a_real_config_reads_no_weights(tmp_path, capsys):
    """Qwen2.5-1.5B's real config.json and tokenizer, no weights at all: the plan needs neither."""
    import shutil
    import sys

    from conftest import REPO_ROOT, require_shared
    sys.path.insert(0, str(REPO_ROOT))
    import train
    folder = tmp_path / "qwen2.5-1.5b"
    shutil.copytree(require_shared("tokenizers", "qwen2.5"), folder)
    shutil.copyfile(require_shared("configs", "Qwen2.5-1.5B-Instruct", "config.json"), folder / "config.json")
    data = tmp_path / "train.jsonl"
    data.write_text("".join('{"question": "What is %d + %d?", "answer": "#### %d"}\n' % (n, n, 2 * n) for n in range(9)))
    assert train.main(["--plan", "80", "--model", str(folder), "--dataset", "gsm8k", "--data", str(data),
                       "--dtype", "bfloat16", "--eval-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "1543.71M parameters" in out and "weights                              6.17 GB" in out
    assert "of 80.00 GB (the size asked for)" in out


def test_a_gpu_run_takes_the_largest_micro_batch_that_fits_unless_one_is_given(capsys, monkeypatch):
    import sys
    from types import SimpleNamespace

    from conftest import REPO_ROOT
    sys.path.insert(0, str(REPO_ROOT))
    import train
    from meml import memory
    from meml.config import make_config
    from meml.task import Precision
    monkeypatch.setattr(memory, "device_bytes", lambda device: 80 * 10**9)  # an 80 GB GPU
    task = SimpleNamespace(model=SimpleNamespace(config=QWEN_15B), system_prompts=["a", "b", "c"],
                           longest_prompt=256, longest_answer=300)
    bf16 = Precision(torch.float32, torch.bfloat16, torch.bfloat16)
    cfg = make_config("meml-grpo", synthetic=False, overrides={})
    assert cfg.riel.micro_batch_size == 64
    given = train.parse_args([])
    fitted = memory.fit(task, cfg, bf16, torch.device("cuda"), given)
    assert fitted.riel.micro_batch_size < 64
    assert memory.plan(QWEN_15B, memory.settings_for(task, fitted, bf16))["total"] <= 0.9 * 80 * 10**9
    assert f"took --micro-batch-size {fitted.riel.micro_batch_size} to fit" in capsys.readouterr().out
    asked = train.parse_args(["--micro-batch-size", "64"])  # the user's own choice is kept, with a warning
    kept = memory.fit(task, cfg, bf16, torch.device("cuda"), asked)
    assert kept.riel.micro_batch_size == 64 and "may not fit" in capsys.readouterr().err
    on_cpu = memory.fit(task, cfg, bf16, torch.device("cpu"), given)  # RAM: reported, never changed
    assert on_cpu.riel.micro_batch_size == 64


def test_when_nothing_fits_the_run_is_left_as_asked_and_says_so(capsys, monkeypatch):
    """A 1.5B model on a 10 GB GPU: its weights and AdamW states alone exceed it, so no
    micro-batch and no activation checkpointing helps; the run keeps its settings (it used to
    keep checkpointing switched on without saying so) and prints what would."""
    import sys
    from types import SimpleNamespace

    from conftest import REPO_ROOT
    sys.path.insert(0, str(REPO_ROOT))
    import train
    from meml import memory
    from meml.config import make_config
    from meml.task import Precision
    monkeypatch.setattr(memory, "device_bytes", lambda device: 10 * 10**9)
    task = SimpleNamespace(model=SimpleNamespace(config=QWEN_15B), system_prompts=["a", "b", "c"],
                           longest_prompt=256, longest_answer=300)
    cfg = make_config("meml-grpo", synthetic=False, overrides={})
    kept = memory.fit(task, cfg, Precision(torch.float32, torch.bfloat16, torch.bfloat16),
                            torch.device("cuda"), train.parse_args([]))
    assert kept.riel.micro_batch_size == 64 and not kept.activation_checkpointing
    assert "this run may not fit" in capsys.readouterr().err and "--fsdp" in "".join(memory.advice(
        QWEN_15B, memory.settings_for(task, kept, Precision(torch.float32, torch.bfloat16, torch.bfloat16)),
        10 * 10**9))
