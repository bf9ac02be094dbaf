"""One RIEL step on the built-in world, printed stage by stage with its own numbers.

    python -m meml.walkthrough                  # the last checkpoint of runs/default (python train.py)
    python -m meml.walkthrough --run DIR        # another run of the built-in world

Each stage runs the function `riel_step` runs (meml/riel.py, meml/e7.py), in its order, and
prints what it computed next to the equation and the function: the grid of rewards rows[q, i, g],
E2's advantages, which groups the buffer takes and why (more than K of G wrong, then a coin of
K/G), E5's E+ and E− per question and its O+ rows, and each part of E7 with its value, weight,
denominator and share of the gradient. tests/test_walkthrough.py checks that these are the
step's own numbers. Without a trained run it first trains MEF briefly, so that some answers are
right (a random model's are all wrong, and E5 then has nothing to do).
"""
import argparse
import time
from pathlib import Path

import torch

from meml import synthetic
from meml.advantage import group_advantages
from meml.buffer import HardExampleBuffer
from meml.config import RielConfig, make_config
from meml.errors import count_at_least
from meml.e7 import Experts, Grid, backward_e7, e7, e7_batch, micro_batches
from meml.inference import load
from meml.kl import select_expert_pairs
from meml.losses import E7_PARTS, e7_weights
from meml.riel import buffer_targets, fill_buffer, sample_rollouts, score_rollouts
from meml.sampler import stream_key


class _WatchedBuffer:
    """The hard-example buffer, recording each offer fill_buffer makes and its outcome."""

    def __init__(self, buffer: HardExampleBuffer):
        self.buffer, self.offers = buffer, []

    def maybe_add(self, item, num_wrong: int) -> bool:
        taken = self.buffer.maybe_add(item, num_wrong)
        self.offers.append((item, num_wrong, taken))
        return taken

    def __getattr__(self, name):
        return getattr(self.buffer, name)


def walk(model, experts: Experts, examples, cfg: RielConfig, step_key: int, buffer: HardExampleBuffer,
         examples_by_id: dict, print_fn=print) -> dict:
    """Stages 2a-2e of one RIEL step in one process, printed; returns the numbers printed."""
    N, G = len(experts.system_prompts), cfg.group_size
    out = {}
    model.eval()
    ro = sample_rollouts(model, experts, examples, cfg, step_key)
    rewards = score_rollouts(ro, experts, examples)                                     # [Q, N, G]
    print_fn(f"2a, 2b  rollouts and rewards: {len(examples)} questions x {N} experts x G = {G} "
             "(riel.sample_rollouts, riel.score_rollouts)")
    for q, ex in enumerate(examples):
        print_fn(f"  q{q} {ex.question[:70]!r}  (answer {ex.answer})")
        for i in range(N):
            print_fn(f"    expert {i}: rewards {' '.join(f'{r:g}' for r in rewards[q, i].tolist())}"
                     f"   e.g. {ro.texts[ro.rows[q, i, 0]][:60]!r}")
    out["rewards"] = rewards

    grid = Grid.of(ro, rewards, cfg)
    advantages = group_advantages(grid.reward + grid.penalty, scale=cfg.advantage_scale, eps=cfg.advantage_eps,
                                  positive_only=cfg.positive_only)
    print_fn(f"\nE2  advantages, per (question, expert) group: scale {cfg.advantage_scale!r}, "
             f"max(A, 0): {cfg.positive_only} (advantage.group_advantages)")
    for q in range(len(examples)):
        for i in range(N):
            print_fn(f"  q{q} expert {i}: mean reward {rewards[q, i].mean():.3f}  A = "
                     + " ".join(f"{a:+.3f}" for a in advantages[q, i].tolist()))
    out["advantages"] = advantages

    watched = _WatchedBuffer(buffer)
    sft_items, inserted = fill_buffer(watched, examples, grid.reward, cfg.buffer_wrong_below)
    print_fn(f"\nE6  the buffer's offers: a group enters with probability K/G = {buffer.k}/{G} when more than "
             f"K = {buffer.k} of its G are wrong, reward below 1 (riel.fill_buffer)")
    for (example_id, i), wrong, taken in watched.offers:
        why = (f"{wrong} wrong > K: {'entered' if taken else 'coin said no'}" if wrong > buffer.k
               else f"{wrong} wrong <= K: not offered")
        print_fn(f"  q{[ex.id for ex in examples].index(example_id)} expert {i}: {why}")
    print_fn(f"  {inserted} entered; the buffer holds {len(buffer)}/{buffer.capacity}; "
             f"{len(sft_items)} items popped for SFT this step")
    out.update(inserted=inserted, sft_items=len(sft_items))

    prompts, targets, _, _ = buffer_targets(experts, sft_items, examples_by_id, cfg)
    model.train()
    b = e7_batch(ro, grid, advantages, slice(None), (prompts, targets), cfg)
    e_plus, e_minus, active = select_expert_pairs(rewards)
    print_fn("\nE5  per question: E+ (best mean reward), E− (worst), active when E+ beats E− and has a "
             "correct rollout (kl.select_expert_pairs)")
    for q in range(len(examples)):
        o_plus = [ro.rows[q, e_plus[q]].tolist().index(r) for r, qq in zip(b.plus_rows.tolist(),
                                                                            b.plus_question.tolist()) if qq == q]
        print_fn(f"  q{q}: E+ = expert {e_plus[q]}, E− = expert {e_minus[q]}, "
                 + (f"active: O+ = rollouts {o_plus} of E+, scored under P+ and P−" if active[q] else "inactive"))
    out["active_questions"] = b.d.inter_expert

    weights, (total, parts) = e7_weights(cfg), e7(model, experts, b, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {name: torch.autograd.grad(weights[name] * value, params, retain_graph=True, allow_unused=True)
             for name, value in parts.items() if weights[name] != 0}
    flat = {name: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
            for name, gs in grads.items()}
    whole = sum(flat.values()) if flat else torch.zeros(1)
    policy_unit = {"token_mean": "tokens", "seq_mean_token_mean": "rows", "dr_grpo": "rows x max"}[cfg.aggregation]
    denominators = {"policy": (b.d.policy, policy_unit), "reference_kl": (b.d.policy, policy_unit),
                    "inter_expert_kl": (b.d.inter_expert, "questions"), "sft": (b.d.sft, "tokens")}
    equations = {"policy": "E3", "inter_expert_kl": "E5", "sft": "E6", "reference_kl": "E4"}
    print_fn("\nE7  L = Σ weight x part (e7.e7, losses.total_loss); share of the gradient g = <g_part, g> / |g|²")
    print_fn(f"  {'part':<16}{'eq.':<5}{'value':>9}{'weight':>8}{'denominator':>22}{'|g_part|':>10}{'share':>8}")
    out["parts"] = {}
    for name in E7_PARTS:
        value = parts[name].item() if name in parts else 0.0
        g = flat.get(name)
        norm = g.norm().item() if g is not None else 0.0
        share = (g @ whole / whole.dot(whole)).item() if g is not None and whole.dot(whole) > 0 else 0.0
        denominator, unit = float(denominators[name][0]), denominators[name][1]
        out["parts"][name] = {"value": value, "weight": weights[name], "denominator": denominator,
                              "grad_norm": norm, "share": share}
        print_fn(f"  {name:<16}{equations[name]:<5}{value:>9.4f}{weights[name]:>8g}{f'{denominator:g} {unit}':>22}"
                 f"{norm:>10.4f}{share:>8.3f}")
    out["total"] = total.item()
    print_fn(f"  {'E7 (total)':<21}{out['total']:>9.4f}{'':>30}{whole.norm().item():>10.4f}")
    model.zero_grad(set_to_none=True)
    backward_e7(model, experts, b, micro_batches(b, cfg), cfg)
    print_fn("\nbackward_e7 computes the same gradient one micro-batch at a time; the trainer then clips "
             "it and takes an AdamW step (trainer.run_stage).")
    return out


def quick_mef(model, tokenizer, train, answers, steps: int, lr: float, print_fn=print) -> None:
    """A short stage 1 (E1) when no trained run is at hand, so that some rollouts are right."""
    from meml.mef import mef_items, sft_loss
    items = mef_items(tokenizer, train, answers, list(synthetic.EXPERT_PROMPTS), "synthetic", [0, 1, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    start = time.time()
    model.train()
    for _ in range(steps):
        batch = [items[k] for k in torch.randint(len(items), (32,), generator=generator).tolist()]
        sft_loss(model, tokenizer, batch, micro_batch_size=32)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print_fn(f"(MEF: {steps} steps in {time.time() - start:.0f} s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/default"),
                        help="a run of the built-in world (python train.py); its last checkpoint is used")
    parser.add_argument("--questions", type=count_at_least(1), default=2, help="questions in the step")
    parser.add_argument("--step", type=int, default=0, help="which step's questions and random key")
    parser.add_argument("--buffer-capacity", type=int, default=3,
                        help="B, small so that the buffer fills within the one step and E6 shows")
    parser.add_argument("--mef-steps", type=int, default=400, help="MEF steps first when --run holds no checkpoint")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = make_config("meml-grpo", synthetic=True, overrides={})
    checkpoints = sorted(args.run.glob("checkpoint-*")) if args.run.is_dir() else []
    train, _, answers = synthetic.load_synthetic(seed=cfg.seed)
    if checkpoints:
        print(f"model: {checkpoints[-1]}")
        model, tokenizer = load(checkpoints[-1])
    else:
        from meml import synthetic_assets
        from meml.model import ModelConfig, Transformer
        from meml.tokenizer import Tokenizer
        print(f"no checkpoint in {args.run} (python train.py makes one): a fresh model, trained by MEF first")
        folder = synthetic_assets.write_synthetic_assets(Path("/tmp/meml_walkthrough_assets"), seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        model = Transformer(ModelConfig.from_json(folder / "config.json"))
        model.init_weights()
        tokenizer = Tokenizer.from_pretrained(folder)
        tokenizer.fit_to_model(model.config.vocab_size, source=str(folder))
        quick_mef(model, tokenizer, train, answers, args.mef_steps, cfg.mef_lr)
    examples = train[args.step * args.questions:(args.step + 1) * args.questions]
    experts = Experts(tokenizer, list(synthetic.EXPERT_PROMPTS), "synthetic")
    buffer = HardExampleBuffer(args.buffer_capacity, cfg.riel.buffer_k, cfg.riel.group_size, cfg.seed)
    print(f"one RIEL step, preset meml-grpo: λ1 = {cfg.riel.lambda1}, λ2 = {cfg.riel.lambda2}, β = {cfg.riel.beta}, "
          f"T = {cfg.riel.temperature}, G = {cfg.riel.group_size}\n")
    walk(model, experts, examples, cfg.riel, stream_key(cfg.seed, args.step), buffer,
         {ex.id: ex for ex in train})


if __name__ == "__main__":
    main()
