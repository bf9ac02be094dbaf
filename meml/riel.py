"""Stage 2, RIEL (Reinforced Inter-Expert Learning): one step, top to bottom (`riel_step`).

    L = L_GRPO + β·L_ref + λ1·L_KL + λ2·L_SFT                                            (E7)

  2a  rollouts     every expert i samples G completions of every question under its own
                   system prompt P_i: Q x N x G rows, addressed as rows[q, i, g]
  2b  rewards      the verifier scores each completion: rewards [Q, N, G]
  2c  advantages   per (question, expert) group                        (E2, meml/advantage.py)
  2d  buffer       groups with more than K wrong may enter the hard-example buffer     (E6)
  2e  E7           which rows each part sees and the step's denominators, then E7's gradient
                   one micro-batch at a time                          (E3-E7, meml/e7.py)

Updates. One optimizer step per rollout batch by default (the paper's, TRL's); with
cfg.num_iterations = μ the step yields after each of μ backward passes on the same rollouts and
the caller (meml/trainer.py) steps the optimizer in between. π_old is the sampler's log-probs,
or under cfg.recompute_old_logprobs a pass of the training forward before the first update (D21).

Several processes (meml/distributed.py): each rank samples its share of the questions; the
step's body makes three collective calls, each marked `# across ranks:`. In one process each is
the identity. The gradients are summed over ranks by the trainer (`distributed.sum_gradients`).
"""
import itertools
import time
from dataclasses import dataclass

import torch

from meml import distributed
from meml.advantage import group_advantages, reward_stats
from meml.buffer import HardExampleBuffer
from meml.config import RielConfig
from meml.e7 import (STATISTICS, Experts, Grid, Rollouts, backward_e7, e7_batch, e7_metrics, micro_batches,
                     recomputed_old_logprobs)
from meml.inference import complete
from meml.prompts import expert_grid, expert_prompt, response_ids
from meml.sampler import stream_key


# ---------------------------------------------------------------------------------------------
# 2a, 2b, 2d

def sample_rollouts(model, experts: Experts, examples, cfg: RielConfig, step_key: int,
                    first_question: int = 0) -> Rollouts:
    """2a: N x G completions per question, each expert under its own system prompt. Rollout
    (q, i, g) draws from its own key, stream_key(step_key, first_question + q, i, g): it is the
    same whichever process samples it and whatever else is in its batch (D22)."""
    conversations, rows = expert_grid(examples, experts.system_prompts, experts.dataset, cfg.group_size)
    keys = [0] * len(conversations)
    for (q, i, g), row in zip(itertools.product(*map(range, rows.shape)), rows.flatten().tolist()):
        keys[row] = stream_key(step_key, first_question + q, i, g)
    out = complete(model, experts.tokenizer, conversations, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   batch_size=cfg.rollout_batch_size, row_keys=keys, return_entropy=True)
    return Rollouts(rows, out.prompt_ids, out.completion_ids, out.logprobs, out.finished, out.texts, out.entropy)


def score_rollouts(ro: Rollouts, experts: Experts, examples) -> torch.Tensor:
    """2b: the verifier's reward of every completion -> rewards [Q, N, G]."""
    flat = torch.tensor([experts.reward(text, examples[q])
                         for text, q in zip(ro.texts, ro.question_of_row().tolist())])
    return flat[ro.rows]


def fill_buffer(buffer: HardExampleBuffer, examples, rewards: torch.Tensor,
                wrong_below: float = 1.0) -> tuple[list, int]:
    """2d, E6's insertions: every (question, expert) group with more than K wrong (reward below
    `wrong_below`) may enter, in question order. Returns the items popped when the buffer filled
    (possibly several fills, possibly none) and the number of insertions. A control buffer
    (--buffer-control) takes, instead, as many random (question, expert) of the step as the
    matched run's buffer took at this step."""
    wrong = (rewards < wrong_below).sum(-1)  # [Q, N]
    popped, inserted = [], 0
    if buffer.quota is not None:  # the control: random items, as many as the matched run took
        for item in buffer.control_draws([(ex.id, i) for ex in examples for i in range(wrong.shape[1])]):
            inserted += buffer.add(item)
            if buffer.is_full:
                popped.extend(buffer.pop_batch())
        return popped, inserted
    for q, ex in enumerate(examples):
        for i in range(wrong.shape[1]):
            inserted += buffer.maybe_add((ex.id, i), int(wrong[q, i]))
            if buffer.is_full:
                popped.extend(buffer.pop_batch())
    return popped, inserted


def sft_target(experts: Experts, example, expert: int, buffer_target: str) -> tuple[str | None, bool]:
    """E6's target S for (Q, P_i), decision D11: the gold worked solution, or with
    buffer_target "expert" expert i's own verified answer, falling back to the gold solution
    when expert i has none for this question. Returns (text, fell_back). A question with no gold
    solution (a JSONL record may have none) takes expert i's answer; with neither, None."""
    answer = (experts.verified_answers or {}).get((example.id, expert))
    if buffer_target == "gold" or answer is None:
        if example.solution:
            return example.solution, buffer_target != "gold"
        return answer, False
    return answer, False

def buffer_targets(experts: Experts, items, examples_by_id, cfg: RielConfig) -> tuple[list, list, int, int]:
    """(prompts, targets, how many fell back to gold (D11), how many had no target at all and
    were skipped) of the popped buffer items."""
    prompts, targets, fallbacks, missing = [], [], 0, 0
    for example_id, i in items:
        example = examples_by_id[example_id]
        text, fell_back = sft_target(experts, example, i, cfg.buffer_target)
        if text is None:
            missing += 1
            continue
        prompts.append(expert_prompt(experts.tokenizer, experts.system_prompts[i], experts.dataset, example))
        targets.append(response_ids(experts.tokenizer, text))
        fallbacks += fell_back
    return prompts, targets, fallbacks, missing


# ---------------------------------------------------------------------------------------------
# 2a and 2b together, and DAPO's dynamic sampling

@dataclass
class Sampled:
    """A batch of questions sampled and scored: this rank's rollouts and every rank's grid."""
    examples: list        # the batch's questions, in the grid's order
    ro: Rollouts          # this rank's rollouts
    grid: Grid            # [Q, N, G], every rank's questions
    mine: list[int]       # where this rank's questions (ro's, in order) sit in the grid


def sample(model, experts: Experts, examples, cfg: RielConfig, step_key: int, first_question: int = 0) -> Sampled:
    """2a, 2b: each rank samples and scores its contiguous share of the questions; the grid of
    rewards and figures is gathered, so every rank sees the whole batch's."""
    questions, share = distributed.my_share(examples, "--questions-per-step")
    ro = sample_rollouts(model, experts, questions, cfg, step_key, first_question=first_question + share.start)
    my_grid = Grid.of(ro, score_rollouts(ro, experts, questions), cfg)
    # across ranks: the whole batch's grid, every rank's questions in order
    grid = Grid(*distributed.all_gather_tensor(my_grid.stacked()).unbind(-1))
    return Sampled(examples, ro, grid, list(range(share.start, share.stop)))


def dynamic_sampling(model, experts: Experts, batch: Sampled, more, cfg: RielConfig,
                     step_key: int) -> tuple[Sampled, Sampled]:
    """DAPO's dynamic sampling (D27): a question whose N x G shaped rewards are all equal gives
    E2 nothing (and E5 no pair), so it is dropped, and new questions, `more(k)` in round k, are
    sampled until the batch has as many questions with a signal as it started with, or
    cfg.dynamic_sampling rounds have been made. Round k's rollouts draw from keys of question
    numbers k·Q + q (D22), never those of another round. Returns (the batch E2-E7 train on, the
    kept questions in the order found, or the first batch if none has a signal; everything
    sampled, which the buffer sees)."""
    size, rounds = len(batch.examples), [batch]
    signal = lambda s: [q for q in range(len(s.examples))  # noqa: E731
                        if (s.grid.reward[q] + s.grid.penalty[q]).unique().numel() > 1]
    kept = [q for q in signal(batch)]
    while len(kept) < size and len(rounds) <= cfg.dynamic_sampling:
        extra = sample(model, experts, more(len(rounds)), cfg, step_key, first_question=len(rounds) * size)
        kept += [len(rounds) * size + q for q in signal(extra)]
        rounds.append(extra)
    kept = kept[:size] or list(range(size))  # no signal found at all: the first batch, as sampled
    everything = Sampled(sum((r.examples for r in rounds), []), Rollouts.joined([r.ro for r in rounds]),
                         Grid.joined([r.grid for r in rounds]),
                         [k * size + q for k, r in enumerate(rounds) for q in r.mine])
    at = {q: j for j, q in enumerate(everything.mine)}  # a question of this rank -> its place in ro
    mine = [j for j, q in enumerate(kept) if q in at]
    return Sampled([everything.examples[q] for q in kept], everything.ro.of_questions([at[kept[j]] for j in mine]),
                   everything.grid[kept], mine), everything


# ---------------------------------------------------------------------------------------------
# Metrics

def rollout_metrics(grid: Grid, advantages: torch.Tensor) -> dict:
    """Per-step statistics of the whole step's rollouts, with names a TRL user recognises."""
    rewards, stats = grid.reward, reward_stats(grid.reward)
    out = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "frac_reward_zero_std": stats["zero_signal"].mean().item(),
        "completions/mean_length": grid.length.mean().item(),
        "completions/max_length": grid.length.max().item(),
        "completions/clipped_ratio": 1.0 - grid.finished.mean().item(),
        "advantages/nonzero_frac": (advantages != 0).float().mean().item(),
    }
    by_expert = grid.entropy.mean(dim=(0, 2))  # [N]: mean over rows of each row's mean token entropy
    out["entropy"] = by_expert.mean().item()
    for i in range(rewards.shape[1]):
        out[f"entropy/expert_{i}"] = by_expert[i].item()
        out[f"rewards/expert_{i}/mean"] = stats["mean_reward"][i].item()
        out[f"frac_reward_zero_std/expert_{i}"] = stats["zero_signal"][i].item()
        out[f"rewards/expert_{i}/all_wrong"] = stats["all_wrong"][i].item()
    return out

def premise(grid: Grid) -> dict:
    """MEML's premise, per question of everything sampled: some expert's G rollouts are all wrong
    while another expert has a correct one (what E5 and the buffer can rescue), or all N x G are."""
    right = (grid.reward == 1.0).any(-1)                                # [Q, N]: a correct rollout
    return {"premise/rescuable": ((~right).any(-1) & right.any(-1)).float().mean().item(),
            "premise/all_wrong": (~right.any(-1)).float().mean().item()}


def buffer_metrics(buffer: HardExampleBuffer | None, inserted: int, sft_items: list, fallbacks: int,
                   missing: int) -> dict:
    """The hard-example buffer's figures after this step's insertions and pops (E6)."""
    if buffer is None:
        return {"buffer/fill": 0, "buffer/insertions": 0, "buffer/sft_triggers": 0, "buffer/sft_items": 0,
                "buffer/gold_fallbacks": 0}
    return {"buffer/fill": len(buffer), "buffer/capacity": buffer.capacity, "buffer/insertions": inserted,
            "buffer/sft_triggers": len(sft_items) // buffer.capacity, "buffer/sft_items": len(sft_items),
            "buffer/gold_fallbacks": fallbacks, **({"buffer/no_target": missing} if missing else {})}


# ---------------------------------------------------------------------------------------------
# The step

def riel_step(model, experts: Experts, examples, cfg: RielConfig, step_key: int,
              buffer: HardExampleBuffer | None, examples_by_id: dict, ref_model=None, more_examples=None):
    """Stages 2a-2e for one batch of questions. Yields the metrics (E7's value as "loss/total")
    after each of the cfg.num_iterations backward passes on the same rollouts: the caller takes
    an optimizer step (meml/trainer.py) before the next one. step_key: the step's random key
    (`stream_key(seed, step)`), from which every rollout of the step draws (`sample_rollouts`).

    Across processes every rank gets the whole batch and samples its contiguous share of the
    questions (`mine`): all N x G rollouts of a question stay on one rank, so its groups (E2) and
    its E+/E− pair (E5) are local. The grid of rewards is gathered, so E2 with batch_std, the
    buffer (E6), the denominators and the metrics see the whole step on every rank.
    more_examples(k): round k's new questions for --dynamic-sampling (D27)."""
    t0 = time.time()
    model.eval()
    batch = sampled = sample(model, experts, examples, cfg, step_key)                              # 2a, 2b
    if cfg.dynamic_sampling:  # D27: questions with no signal dropped, new ones sampled in their place
        batch, sampled = dynamic_sampling(model, experts, batch, more_examples, cfg, step_key)
    t1 = time.time()
    ro, grid, mine = batch.ro, batch.grid, batch.mine  # this rank's rollouts, the whole batch, where ro's sit
    advantages = group_advantages(grid.reward + grid.penalty, scale=cfg.advantage_scale, eps=cfg.advantage_eps,
                                  positive_only=cfg.positive_only)                       # 2c, E2 [Q, N, G]
    sft_items, inserted = (fill_buffer(buffer, sampled.examples, sampled.grid.reward, cfg.buffer_wrong_below)  # 2d
                           if buffer is not None else ([], 0))
    sft_prompts, sft_targets, fallbacks, missing = buffer_targets(experts, sft_items, examples_by_id, cfg)
    t2 = time.time()
    model.train()
    b = e7_batch(ro, grid, advantages, mine, (sft_prompts, sft_targets), cfg)                    # 2e
    # across ranks: as many passes of each kind as the busiest rank makes (a sharded model only)
    batches = distributed.equal_passes(model, micro_batches(b, cfg))
    if cfg.recompute_old_logprobs and (cfg.loss != "paper" or cfg.tis_cap is not None):  # who reads π_old
        b.old_logprobs = recomputed_old_logprobs(model, experts, ro, batches["policy"], cfg)        # D21
    metrics = {**rollout_metrics(grid, advantages), **premise(sampled.grid),
               **buffer_metrics(buffer, inserted, sft_items, fallbacks, missing),
               **({"rewards/overlong_penalty": grid.penalty.mean().item()} if cfg.overlong_penalty else {}),
               **({"dynamic/kept_questions": len(batch.examples),
                   "dynamic/extra_rollouts": (len(sampled.examples) - len(examples)) * grid.reward[0].numel()}
                  if cfg.dynamic_sampling else {}),
               # what the step cost: every rollout sampled (dynamic sampling's extra ones too), its
               # tokens, and the tokens of the buffer's SFT targets (reference_runs' compute table)
               "compute/rollouts": sampled.grid.reward.numel(), "compute/sampled_tokens": int(sampled.grid.length.sum()),
               "compute/sft_tokens": sum(len(t) for t in sft_targets),
               "time/generation": t1 - t0, "time/scoring": t2 - t1,
               "tokens_per_second": int(sampled.grid.length.sum()) / max(t1 - t0, 1e-9),
               "samples": [{"expert": i, "text": ro.texts[ro.rows[q, i, 0]],
                            "reward": grid.reward[mine[q], i, 0].item()}
                           for q in range(len(mine)) for i in range(len(experts.system_prompts))]}
    gap = None  # the sampling weights' gap, from the first update
    for _ in range(cfg.num_iterations):                                                       # μ updates
        values, stats = backward_e7(model, experts, b, batches, cfg, ref_model)
        # across ranks: each part's value and each statistic, summed over the ranks' shares
        sums = distributed.all_reduce_sum(list(values.values()) + [stats[k] for k in STATISTICS]).tolist()
        e7_figures = e7_metrics(dict(zip(values, sums)), dict(zip(STATISTICS, sums[len(values):])), b.d, cfg)
        gap = e7_figures["logprobs/sampler_trainer_gap"] if gap is None else gap
        yield {**metrics, **e7_figures, "time/update": time.time() - t2, "logprobs/sampler_trainer_gap": gap}
