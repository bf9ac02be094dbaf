"""`python -m meml.walkthrough` prints one RIEL step: its numbers must be the step's own.

The oracle is `riel_step` itself, run on the same model, questions, key and buffer: the parts of
E7, the total, E5's active questions, the buffer's insertions and SFT items, and the norm of the
gradient `riel_step` accumulates. The verifier is replaced by a fixed grid of rewards (a random
model answers nothing right), the same for both.
"""
import pytest
import torch

from meml import riel, walkthrough
from meml.buffer import HardExampleBuffer
from meml.config import RielConfig
from meml.losses import E7_PARTS
from test_riel import BY_ID, EXAMPLES, G, TWO_ACTIVE

world = __import__("test_riel").world  # the RIEL tests' tiny model and experts (a module-scoped fixture)


def test_the_printed_step_is_the_steps_own(world, monkeypatch):
    model, experts, _ = world
    fixed = lambda ro, experts, examples: TWO_ACTIVE.clone()  # noqa: E731
    monkeypatch.setattr(riel, "score_rollouts", fixed)
    monkeypatch.setattr(walkthrough, "score_rollouts", fixed)
    cfg = RielConfig(group_size=G, lambda1=0.5, lambda2=2.0, beta=0.0, micro_batch_size=4, max_new_tokens=10,
                     temperature=0.9)
    lines = []
    model.zero_grad()
    shown = walkthrough.walk(model, experts, EXAMPLES, cfg, 77, HardExampleBuffer(1, k=2, g=G, seed=0), BY_ID,
                             print_fn=lines.append)
    text = "\n".join(lines)

    model.zero_grad()
    metrics = next(riel.riel_step(model, experts, EXAMPLES, cfg, 77, HardExampleBuffer(1, k=2, g=G, seed=0), BY_ID))
    step_grad_norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()

    assert torch.equal(shown["rewards"], TWO_ACTIVE) and metrics["reward"] == pytest.approx(TWO_ACTIVE.mean().item())
    assert shown["active_questions"] == metrics["inter_expert/active_questions"] == 2
    assert shown["inserted"] == metrics["buffer/insertions"] and shown["sft_items"] == metrics["buffer/sft_items"] > 0
    for name, part in E7_PARTS.items():
        assert shown["parts"][name]["value"] == pytest.approx(metrics[part.metric], rel=1e-5, abs=1e-7), name
        assert f"{shown['parts'][name]['value']:.4f}" in text
    assert shown["total"] == pytest.approx(metrics["loss/total"], rel=1e-5)
    assert f"{shown['total']:.4f}" in text
    # the shares are projections on the step's gradient: they add up to 1, and |g| is the step's
    assert sum(p["share"] for p in shown["parts"].values()) == pytest.approx(1.0, abs=1e-5)
    printed_norm = float(lines[[k for k, line in enumerate(lines) if "E7 (total)" in line][0]].split()[-1])
    assert printed_norm == pytest.approx(step_grad_norm, rel=1e-3)
    # the grid is printed as the verifier scored it: q1, expert 1 was right on rollouts 0 and 2
    assert "expert 1: rewards 1 0 1" in text.split("q1 ")[1]
    # and the buffer's reasons: K = 2 of G = 3, so a group with 2 wrong is not offered
    assert "2 wrong <= K: not offered" in text and "3 wrong > K" in text


def test_the_walkthrough_runs_from_the_command_line_on_a_run_folder(tmp_path, capsys):
    """The command itself, on a run folder holding a checkpoint of the built-in world."""
    from meml import synthetic_assets
    from meml.model import ModelConfig, Transformer
    folder = synthetic_assets.write_synthetic_assets(tmp_path / "run" / "checkpoint-000001")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_json(folder / "config.json"))
    model.init_weights()
    model.save_pretrained(folder)
    walkthrough.main(["--run", str(tmp_path / "run"), "--questions", "1"])
    out = capsys.readouterr().out
    for stage in ("2a, 2b", "E2 ", "E6 ", "E5 ", "E7 "):
        assert f"\n{stage}" in "\n" + out, stage
