"""LoRA (meml/lora.py): W x + (α/r)·B A x on meml's own Linear, only A and B training.

Oracles: autograd of the same model whose weights are W + (α/r)·B A written out (for the
adapters' gradients); the merged checkpoint reloaded (for merging); `peft` loading meml's adapter
files onto the `transformers` model of the same checkpoint (for the files' layout and meaning).
"""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from meml import lora
from meml.errors import InputError
from meml.model import ModelConfig, Transformer

sys.path.insert(0, str(REPO_ROOT))
import train  # noqa: E402
from test_distributed import REWARDS, SFT_ITEMS, _e7_step, _train, _world, run_ranks  # noqa: E402
from test_train import TINY, _tiny_hf_checkpoint  # noqa: E402


def _model(seed=0):
    from meml import synthetic_assets
    folder = synthetic_assets.write_synthetic_assets(f"/tmp/meml_lora_assets_{seed}")
    config = ModelConfig.from_json(folder / "config.json")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 32, 64
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 8
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(std=0.2)
    return model


def _random_adapters(model, seed=1):
    """B starts at 0 (no change); give every B values, so the adapters change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            for b in m.B.values():
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def _loss(logits, ids):
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).sum()


def test_only_the_adapters_train_and_their_gradient_is_that_of_the_merged_weight_written_out():
    model = _model()
    adapted = lora.add_lora(model, rank=3, alpha=5.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    assert adapted == [f"model.layers.{i}.{p}" for i in range(2)
                       for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.down_proj")]
    _random_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    assert not any("k_proj" in n for n in trainable)  # k is not a target: qkv_proj has q and v adapters only
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(2))
    _loss(model(ids), ids).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # the oracle: a plain copy of the model whose weights are W + (α/r)·B A, as differentiable
    # functions of leaf copies of every A and B (k's block of qkv_proj gets no update)
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    plain = {n: p.detach() for n, p in model.named_parameters() if ".lora." not in n}
    c = model.config
    rows = {"q_proj": c.num_attention_heads * c.head_dim, "k_proj": c.num_key_value_heads * c.head_dim,
            "v_proj": c.num_key_value_heads * c.head_dim}
    for name, m in lora.adapters(model).items():
        blocks = []
        for part, n in (rows.items() if name.endswith("qkv_proj") else [(name.rsplit(".", 1)[1], None)]):
            if part in m.A:
                blocks.append(leaves[f"{name}.lora.B.{part}"] @ leaves[f"{name}.lora.A.{part}"])
            else:
                blocks.append(torch.zeros(n, m.A[next(iter(m.A))].shape[1]))
        plain[f"{name}.weight"] = plain[f"{name}.weight"] + (5.0 / 3) * torch.cat(blocks)
    reference = _model()  # same shapes, no adapters; its own weights are replaced below
    _loss(torch.func.functional_call(reference, plain, (ids,)), ids).backward()
    for n, leaf in leaves.items():
        assert torch.allclose(got[n], leaf.grad, atol=1e-5, rtol=1e-4), n


def test_the_merged_checkpoint_gives_the_adapted_models_logits_and_adapters_off_the_base(tmp_path):
    model = _model()
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    base = model(ids).detach()
    lora.add_lora(model, rank=4, alpha=8.0)
    assert torch.equal(model(ids), base)  # B = 0: the adapters start as no change
    _random_adapters(model)
    adapted = model(ids).detach()
    assert (adapted - base).abs().max() > 1e-2
    with lora.adapters_off(model):
        assert torch.equal(model(ids), base)
    assert torch.equal(lora.WithoutAdapters(model)(ids), base)  # E4's reference, no second copy
    model.save_pretrained(tmp_path)
    merged = Transformer.from_pretrained(tmp_path)
    assert not any("lora" in k for k in load_file(str(tmp_path / "model.safetensors")))
    assert torch.allclose(merged(ids), adapted, atol=1e-5, rtol=1e-5)


def test_peft_loads_the_adapter_files_onto_the_transformers_model_and_gives_meml_s_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from conftest import require_shared
    folder = _tiny_hf_checkpoint(tmp_path / "base", require_shared("tokenizers", "qwen2.5"), "qwen2", 151936)
    model = Transformer.from_pretrained(folder)
    lora.add_lora(model, rank=4, alpha=6.0, targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))
    model.lora_settings["base"] = str(folder)
    _random_adapters(model)
    (tmp_path / "adapter").mkdir()
    lora.save_adapters(model, tmp_path / "adapter", **model.lora_settings)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 6.0, "LORA")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    with_adapters = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 151665, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = with_adapters(input_ids=ids).logits
        ours = model(ids)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_a_lora_run_checkpoints_both_layouts_and_resumes_exactly(tmp_path):
    args = ["--lora-rank", "4", "--mef-steps", "2", "--train-size", "16", "--save-every", "1", "--beta", "0.1",
            "--buffer-capacity", "3"] + [a for a in TINY if a not in ("--train-size", "16")]
    whole, half = tmp_path / "whole", tmp_path / "half"
    assert train.main(args + ["--riel-steps", "3", "--output", str(whole)]) == 0
    assert train.main(args + ["--riel-steps", "1", "--output", str(half)]) == 0
    assert train.main(["--resume", str(half), "--riel-steps", "3"]) == 0
    end = "checkpoint-000005"
    for name in ("adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(str(whole / end / name)), load_file(str(half / end / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    adapters = load_file(str(whole / end / "adapter_model.safetensors"))
    assert any(k.endswith("q_proj.lora_B.weight") for k in adapters) and all(v.dtype == torch.float32
                                                                             for v in adapters.values())
    # the adapters trained, the frozen weights did not: merged - base = (α/r)·B A, B ≠ 0 now
    assert any(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)


def test_lora_with_fsdp_or_alpha_without_rank_is_refused_in_one_line():
    from meml.config import make_config
    with pytest.raises(InputError, match="--lora-rank with --fsdp"):
        make_config("meml-grpo", synthetic=True, overrides={"lora_rank": 8, "fsdp": True})
    with pytest.raises(InputError, match="--lora-targets q_proj,w_proj: w_proj is not one of"):
        make_config("meml-grpo", synthetic=True, overrides={"lora_rank": 8, "lora_targets": "q_proj,w_proj"})
    with pytest.raises(InputError, match="--lora-alpha applies to adapters: add --lora-rank"):
        make_config("meml-grpo", synthetic=True, overrides={"lora_alpha": 16.0})


@pytest.mark.parametrize("targets", [lora.TARGETS, ("q_proj", "v_proj"), ("o_proj", "down_proj", "k_proj")])
def test_the_memory_plan_counts_the_adapters_a_model_holds(targets):
    """--plan's LoRA terms: the adapters' parameters (counted by hand from the shapes) are the
    ones add_lora creates, and only they have gradients and AdamW states."""
    from meml.memory import Settings, lora_parameter_count, parameter_count, plan
    model = _model()
    lora.add_lora(model, rank=3, alpha=6.0, targets=targets)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameter_count(model.config, 3, targets) == adapters
    terms = plan(model.config, Settings(lora_rank=3, lora_targets=targets, reference=True))
    full = plan(model.config, Settings(reference=True))
    assert terms["gradients"] == 4 * adapters and terms["AdamW states"] == 8 * adapters
    assert terms["weights"] == 4 * (parameter_count(model.config) + adapters) and terms["reference model"] == 0
    assert full["gradients"] == 4 * parameter_count(model.config) > terms["gradients"]


def test_a_lora_run_from_init_from_resumes_on_the_same_frozen_weights(tmp_path):
    """--init-from with --lora-rank: the frozen weights are the --init-from checkpoint's, on the
    first start and on --resume (which once took them from --model instead: every merged tensor
    differed), and peft's adapter_config.json names that checkpoint as the base."""
    small = [a for a in TINY if a not in ("--train-size", "16")] + ["--train-size", "16"]
    source = tmp_path / "source"
    assert train.main(small + ["--preset", "moe-sft", "--mef-steps", "2", "--output", str(source)]) == 0
    args = small + ["--init-from", str(source), "--lora-rank", "4", "--save-every", "1", "--beta", "0.1"]
    whole, half = tmp_path / "whole", tmp_path / "half"
    assert train.main(args + ["--riel-steps", "3", "--output", str(whole)]) == 0
    assert train.main(args + ["--riel-steps", "1", "--output", str(half)]) == 0
    assert train.main(["--resume", str(half), "--riel-steps", "3"]) == 0
    for name in ("adapter_model.safetensors", "model.safetensors"):
        a, b = load_file(str(whole / "checkpoint-000003" / name)), load_file(str(half / "checkpoint-000003" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    config = json.loads((whole / "checkpoint-000003" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(source / "checkpoint-000002")


def test_a_bf16_lora_run_trains_fp32_adapters_and_saves_the_merged_model_in_fp32(tmp_path):
    """Under bf16 the frozen weights are bf16, the adapters fp32; the merged HF files are fp32, so
    merged − base is exactly what (α/r)·B A adds (rounded to bf16, 54 % of such elements were
    left unchanged after 2 steps). --bf16-weights beside --lora-rank is refused."""
    run = tmp_path / "run"
    assert train.main(TINY + ["--lora-rank", "4", "--lora-alpha", "4", "--mef-steps", "2", "--riel-steps", "1",
                              "--dtype", "bfloat16", "--output", str(run)]) == 0
    merged = load_file(str(run / "checkpoint-000003" / "model.safetensors"))
    adapters = load_file(str(run / "checkpoint-000003" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in [*merged.values(), *adapters.values()])
    torch.manual_seed(0)  # the synthetic world's base, as meml.task.build_task makes it (--seed 0)
    base = Transformer(ModelConfig.from_json(run / "synthetic" / "config.json"))
    base.init_weights()
    name = "model.layers.0.mlp.down_proj"
    delta = adapters[f"base_model.model.{name}.lora_B.weight"] @ adapters[f"base_model.model.{name}.lora_A.weight"]
    assert delta.abs().max() > 0  # the adapters trained (α / r = 1)
    frozen = base.state_dict()[f"{name}.weight"].to(torch.bfloat16).float()
    assert torch.allclose(merged[f"{name}.weight"] - frozen, delta, atol=1e-6)
    assert train.main(TINY + ["--lora-rank", "4", "--bf16-weights", "--dtype", "bfloat16",
                              "--output", str(tmp_path / "refused")]) == 2


# ---- several processes (replicated; --fsdp is refused) ----

def _lora_worker(rank, tmp):
    from meml import distributed, lora
    model, world, _ = _world(tmp)
    lora.add_lora(model, rank=2, alpha=4.0)
    _lora_b(model)
    metrics = _e7_step(model, world, lora.WithoutAdapters(model), REWARDS, SFT_ITEMS, "token_mean")
    distributed.sum_gradients(model)  # what the trainer does: the adapters' gradients, summed
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, "metrics": metrics},
               os.path.join(tmp, f"rank{rank}.pt"))


def _lora_b(model):
    from meml import lora
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            for b in m.B.values():
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def test_lora_gradients_at_world_size_2_equal_world_size_1(tmp_path):
    """LoRA replicated over 2 processes (what torchrun runs): the adapters' summed gradients and
    E7's figures are one process's, with β > 0 against the same model with its adapters off."""
    from meml import lora
    run_ranks(_lora_worker, tmp_path)
    model, world, _ = _world(str(tmp_path))
    lora.add_lora(model, rank=2, alpha=4.0)
    _lora_b(model)
    single = _e7_step(model, world, lora.WithoutAdapters(model), REWARDS, SFT_ITEMS, "token_mean")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert got["grads"].keys() == grads.keys() and all(".lora." in n for n in grads)
        for name, g in grads.items():
            assert torch.allclose(got["grads"][name], g, atol=1e-6, rtol=1e-4), (rank, name)
        assert got["metrics"]["loss/total"] == pytest.approx(single["loss/total"], rel=2e-5)
        assert got["metrics"]["loss/ref_kl"] > 0  # the adapters moved the policy off its reference


def test_lora_under_torchrun_equals_one_process(tmp_path):
    """--lora-rank under torchrun, replicated: 2 processes train the same adapters as one (up to
    the order of the gradient sum, bounded as above), and every checkpoint holds peft's files."""
    from safetensors.torch import load_file
    one, two = (_train(tmp_path, name, n, ["--lora-rank", "4"]) for name, n in (("one", 1), ("two", 2)))
    a, b = (load_file(str(d / "checkpoint-000003" / "adapter_model.safetensors")) for d in (one, two))
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    adam_bound = 2 * sum(r["lr"] for r in lines)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for name in a:
        assert (a[name] - b[name]).abs().max() <= adam_bound, name
        assert (~torch.isclose(a[name], b[name], atol=1e-6, rtol=1e-5)).sum() <= a[name].numel() // 1000 + 1, name
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)  # the adapters trained
    single = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/nll"] for r in lines] == pytest.approx([r["loss/nll"] for r in single], rel=1e-5)
