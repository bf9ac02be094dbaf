"""The training loop: its learning-rate schedule worked by hand, and what each update sees."""
import math

import pytest
import torch

from meml.trainer import Stage, lr_at


def test_cosine_decay_starts_where_warm_up_ends():
    stage = Stage("mef", total_steps=110, lr=1.0, save_every=10, warmup_steps=10, schedule="cosine")
    assert [lr_at(s, stage) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(10, stage) == pytest.approx(1.0)        # first step after warm-up: no decay yet
    middle = 10 + 99 / 2                                  # progress 1/2 over steps 10 .. 109
    assert lr_at(int(middle), stage) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 49 / 99)))
    assert lr_at(109, stage) == pytest.approx(0.1)        # the last step: 10% of lr


def test_constant_schedule_after_warm_up():
    stage = Stage("riel", total_steps=5, lr=2.0, save_every=1, warmup_steps=2)
    assert [lr_at(s, stage) for s in range(5)] == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0])


def _tiny_model():
    from meml.model import ModelConfig, Transformer
    config = ModelConfig("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                         rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(std=0.2)
    return model


def test_a_second_update_under_bf16_autocast_sees_the_weights_the_first_one_made(tmp_path):
    """Two updates in one step (--num-iterations 2) under bf16 mixed precision: the second
    update's forward must be a forward of the updated weights. When the whole step, optimizer
    step included, ran in one autocast region, autocast's cache of bf16 weight copies returned
    the output from before the first update (so π / π_old = 1 and the clip never acted)."""
    import copy

    from meml.trainer import make_optimizer, run_stage
    model = _tiny_model()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    seen = {}

    def step_fn(step):
        for update in range(2):
            if update == 1:  # the weights the first update left
                seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            logits = model(ids)
            seen[update] = logits.detach().float()
            logits.float().logsumexp(-1).mean().backward()
            yield {"loss/total": 0.0}

    stage = Stage("riel", total_steps=1, lr=1e-2, save_every=100, compute_dtype=torch.bfloat16)
    run_stage(stage, model, make_optimizer(model, stage), step_fn, run_dir=tmp_path, tokenizer_dir=tmp_path,
              print_fn=lambda *_: None)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(seen["weights"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = fresh(ids).float()
    assert not torch.equal(seen[1], seen[0])  # the first update moved the output ...
    assert torch.equal(seen[1], expected)     # ... and the second forward is the updated weights'
