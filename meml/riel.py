"""Stage 2, RIEL (Reinforced Inter-Expert Learning): one step of E2-E7, top to bottom.

    L = L_GRPO + β·L_ref + λ1·L_KL + λ2·L_SFT                                            (E7)

A step, in the order `riel_step` runs it:

  2a  rollouts     every expert i samples G completions of every question under its own
                   system prompt P_i: Q x N x G rows, addressed as rows[q, i, g]
  2b  rewards      the verifier scores each completion 0/1: rewards [Q, N, G]
  2c  advantages   per (question, expert) group                                        (E2)
  2d  buffer       groups with more than K wrong may enter the hard-example buffer     (E6)
  2e  loss         which rows each part of E7 sees, each part's denominator over the whole
                   step, then one path: micro-batch -> its share of each part -> E7 ->
                   backward                                                         (E3-E7)

The parts (each computed by one function that names its equation):
  L_GRPO  `policy_loss` over the rollouts whose advantage is not 0                     (E3)
  L_ref   `reference_kl_loss` over the same rows, only when β > 0                      (E4)
  L_KL    `inter_expert_kl` over the O+ rows of the active questions: each O+ scored under
          E+'s prompt (detached) and under E−'s                                        (E5)
  L_SFT   `nll_loss` of the buffer's targets when it filled this step                  (E6)

Memory: rows are scored in micro-batches and each calls backward at once. Every part is a sum
over its units (tokens, rows, questions) divided by a denominator; the denominators of the whole
step are computed before any backward (`Denominators`) and handed to the part functions, so a
micro-batch returns exactly its share and the accumulated gradient is that of E7 on the whole
batch (tests/test_riel.py checks this against E7 written out in one expression). Rows whose
advantage is 0 (all-equal groups, and every row at or below its group's mean under the paper's
max(A, 0)) add exactly nothing to E3, so they are not scored unless E4 needs them.

Updates: one optimizer step per rollout batch by default (the paper's setting and TRL's), where
the clipped objective E3' matters only through its value at ρ = 1; with cfg.num_iterations = μ
the step yields after each of μ backward passes on the same rollouts and the caller steps the
optimizer in between, π_old staying the first update's (decision D21 says which π_old).
The decisions this step makes where the paper is silent are D3-D13, D21 and the GRPO variants
D23-D25 in README.md.
"""
import itertools
import math
import time
from dataclasses import dataclass

import torch

from meml import distributed
from meml.advantage import group_advantages, reward_stats
from meml.buffer import HardExampleBuffer
from meml.config import RielConfig, clip_bounds
from meml.inference import complete
from meml.kl import inter_expert_kl, inter_expert_kl_full_vocab, plus_rollouts, reference_kl_loss, select_expert_pairs
from meml.losses import (E7_PARTS, aggregation_denominator, clip_fraction, e7_weights, nll_loss, overlong_penalty,
                         policy_loss, total_loss, truncated_is_weights)
from meml.policy import completion_hidden, completion_logprobs, pack
from meml.prompts import expert_grid, expert_prompt, response_ids
from meml.rewards import reward
from meml.sampler import stream_key


@dataclass
class World:
    """What RIEL needs to know about the task: the tokenizer, experts and verifier."""
    tokenizer: object
    system_prompts: list[str]          # P_i, one per expert taking part
    dataset: str                       # verifier name for meml.rewards.reward
    verified_answers: dict | None = None  # (example_id, expert) -> reference answer the verifier accepts


@dataclass
class Rollouts:
    """One step's samples as flat rows; rows[q, i, g] is the row of (question q, expert i, rollout g)."""
    rows: torch.Tensor                 # [Q, N, G] long
    prompts: list[list[int]]           # per row: P_i + Q_q, chat-formatted
    completions: list[list[int]]       # per row: sampled ids, stop token included
    old_logprobs: list[torch.Tensor]   # per row: π_old of each completion token, from the sampler
    finished: list[bool]               # per row: stopped (True) or cut at max_new_tokens
    texts: list[str]                   # per row: decoded completion
    entropy: list[torch.Tensor]        # per row: entropy of each step's sampling distribution

    def per_row(self, grid: torch.Tensor) -> torch.Tensor:
        """[Q, N, G] -> [rows]: the value of each row's (question, expert, rollout)."""
        out = grid.new_empty(self.rows.numel())
        out[self.rows.flatten()] = grid.flatten()
        return out

    def question_of_row(self) -> torch.Tensor:
        """[rows] long: the question each row answers."""
        questions = torch.arange(self.rows.shape[0])[:, None, None].expand_as(self.rows)
        return self.per_row(questions)


# ---------------------------------------------------------------------------------------------
# 2a, 2b, 2d

def sample_rollouts(model, world: World, examples, cfg: RielConfig, step_key: int, first_question: int = 0) -> Rollouts:
    """2a: N x G completions per question, each expert under its own system prompt. Rollout
    (q, i, g) draws from its own key, stream_key(step_key, first_question + q, i, g): it is the
    same whichever process samples it and whatever else is in its batch (D22)."""
    conversations, rows = expert_grid(examples, world.system_prompts, world.dataset, cfg.group_size)
    keys = [0] * len(conversations)
    for (q, i, g), row in zip(itertools.product(*map(range, rows.shape)), rows.flatten().tolist()):
        keys[row] = stream_key(step_key, first_question + q, i, g)
    out = complete(model, world.tokenizer, conversations, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   batch_size=cfg.rollout_batch_size, row_keys=keys, return_entropy=True)
    return Rollouts(rows, out.prompt_ids, out.completion_ids, out.logprobs, out.finished, out.texts, out.entropy)


def score_rollouts(ro: Rollouts, world: World, examples) -> torch.Tensor:
    """2b: the verifier's 0/1 reward of every completion -> rewards [Q, N, G]."""
    flat = torch.tensor([reward(world.dataset, text, examples[q])
                         for text, q in zip(ro.texts, ro.question_of_row().tolist())])
    return flat[ro.rows]


def fill_buffer(buffer: HardExampleBuffer, examples, rewards: torch.Tensor) -> tuple[list, int]:
    """2d, E6's insertions: every (question, expert) group with more than K wrong may enter, in
    question order. Returns the items popped when the buffer filled (possibly several fills,
    possibly none) and the number of insertions."""
    wrong = (rewards == 0).sum(-1)  # [Q, N]
    popped, inserted = [], 0
    for q, ex in enumerate(examples):
        for i in range(wrong.shape[1]):
            inserted += buffer.maybe_add((ex.id, i), int(wrong[q, i]))
            if buffer.is_full:
                popped.extend(buffer.pop_batch())
    return popped, inserted


def sft_target(world: World, example, expert: int, buffer_target: str) -> tuple[str, bool]:
    """E6's target S for (Q, P_i), decision D11: the gold worked solution, or with
    buffer_target "expert" expert i's own verified answer, falling back to the gold solution
    when expert i has none for this question. Returns (text, fell_back)."""
    if buffer_target == "gold":
        return example.solution, False
    answer = (world.verified_answers or {}).get((example.id, expert))
    return (example.solution, True) if answer is None else (answer, False)


# ---------------------------------------------------------------------------------------------
# 2e: E7 over micro-batches

@dataclass
class Denominators:
    """Each part's denominator over the whole step, known before any backward."""
    policy: torch.Tensor     # E3, E4: completion tokens (token_mean), rows, or rows x max_len (dr_grpo)
    inter_expert: int        # E5: active questions
    sft: torch.Tensor        # E6: target tokens of the buffer items popped this step


@dataclass
class PartRows:
    """Which rows each part of E7 sees this step."""
    policy_rows: list[int]         # E3 (+E4): rows with a nonzero advantage (every row if β > 0)
    plus_rows: torch.Tensor        # E5 [M]: the O+ rows, E+'s correct rollouts of active questions
    minus_rows: torch.Tensor       # E5 [M]: a row of E− on the same question (for its prompt)
    plus_question: torch.Tensor    # E5 [M]: the question of each O+ row
    sft_prompts: list[list[int]]   # E6: P_i + Q of each popped buffer item
    sft_targets: list[list[int]]   # E6: its target S, end-of-turn included


def select_parts(world: World, ro: Rollouts, rewards, advantages, sft_items, examples_by_id,
                 cfg: RielConfig) -> tuple[PartRows, int]:
    """The rows of each part of E7; also how many buffer targets fell back to gold (D11)."""
    advantage = ro.per_row(advantages)  # [rows]
    policy_rows = [r for r in range(len(advantage)) if (advantage[r] != 0 or cfg.beta > 0)
                   and (ro.finished[r] or not cfg.mask_truncated)]  # D25: a cut completion adds nothing
    plus_rows = minus_rows = plus_question = torch.zeros(0, dtype=torch.long)
    if cfg.lambda1 > 0 and rewards.shape[1] > 1:
        e_plus, e_minus, active = select_expert_pairs(rewards)            # [Q] each
        plus_question, g = (plus_rollouts(rewards, e_plus) & active[:, None]).nonzero(as_tuple=True)  # [M]
        plus_rows = ro.rows[plus_question, e_plus[plus_question], g]
        minus_rows = ro.rows[plus_question, e_minus[plus_question], 0]
    sft_prompts, sft_targets, fallbacks = [], [], 0
    for example_id, i in sft_items:
        example = examples_by_id[example_id]
        text, fell_back = sft_target(world, example, i, cfg.buffer_target)
        sft_prompts.append(expert_prompt(world.tokenizer, world.system_prompts[i], world.dataset, example))
        sft_targets.append(response_ids(world.tokenizer, text))
        fallbacks += fell_back
    return PartRows(policy_rows, plus_rows, minus_rows, plus_question, sft_prompts, sft_targets), fallbacks


def denominators(ro: Rollouts, parts: PartRows, cfg: RielConfig) -> Denominators:
    """The whole step's denominators, over every rank's rows (meml/distributed.py): what each
    part's sum is divided by."""
    lengths = distributed.all_gather_tensor(torch.tensor([len(c) if finished or not cfg.mask_truncated else -1
                                                          for c, finished in zip(ro.completions, ro.finished)]))
    lengths = lengths[lengths >= 0]  # [all rows], less those --mask-truncated leaves out (D25)
    return Denominators(
        policy=aggregation_denominator(lengths, cfg.aggregation, cfg.max_new_tokens),
        inter_expert=int(distributed.all_reduce_sum(len(set(parts.plus_question.tolist())))),
        sft=distributed.all_reduce_sum(sum(len(t) for t in parts.sft_targets)).float().clamp(min=1))


def policy_micro_batches(model, world, ro: Rollouts, advantages, parts: PartRows, d: Denominators,
                         cfg: RielConfig, ref_model, old_logprobs, stats: dict):
    """E3 (and E4 when β > 0) on micro-batches of the policy rows: yields each one's share.

    old_logprobs: π_old per row, the sampler's or recomputed ones (D21); None means this
    forward's own log-probs (the first update of a recomputing step: ρ = 1), which are then
    recorded in stats["recomputed"] for the step's later updates."""
    tok, advantage = world.tokenizer, ro.per_row(advantages)
    low, high = clip_bounds(cfg)  # each objective's own defaults (D23)
    for start in range(0, len(parts.policy_rows), cfg.micro_batch_size):
        rows = parts.policy_rows[start:start + cfg.micro_batch_size]
        batch = pack([ro.prompts[r] for r in rows], [ro.completions[r] for r in rows], tok.pad_id,
                     device=model.output_weight.device)
        mask = batch.completion_mask                                                              # [b, T]
        logp = completion_logprobs(model, batch, temperature=cfg.temperature, vocab_limit=tok.vocab_size)  # [b, T]
        sampled = _padded([ro.old_logprobs[r] for r in rows], logp.shape[1]).to(logp.device)       # [b, T]
        stats["gap_sum"] += (logp.detach() - sampled).abs()[mask].sum().item()  # sampler vs trainer
        stats["gap_tokens"] += mask.sum().item()
        if old_logprobs is None:
            old = logp.detach()
            stats["recomputed"].update({r: old[j, :len(ro.completions[r])].cpu() for j, r in enumerate(rows)})
        else:
            old = _padded([old_logprobs[r] for r in rows], logp.shape[1]).to(logp.device)
        a = advantage[rows].to(logp.device)                                                       # [b]
        weights = None
        if cfg.tis_cap is not None:  # D24: π_old / π_sampler, capped (1 when π_old is the sampler's)
            weights = truncated_is_weights(old, sampled, mask, cfg.tis_cap)
            stats["tis_sum"] += weights[mask].sum().item()
            stats["tis_capped"] += ((old - sampled).exp() > cfg.tis_cap)[mask].sum().item()
        share = {"policy": policy_loss(logp, mask, a, old_logprobs=None if cfg.loss == "paper" else old,
                                       clip_eps=low, clip_eps_high=high, kind=cfg.loss,
                                       level=cfg.importance_sampling_level, token_weights=weights,
                                       aggregation=cfg.aggregation, max_len=cfg.max_new_tokens,
                                       denominator=d.policy)}
        if cfg.beta > 0:
            with torch.no_grad():
                ref_logp = completion_logprobs(ref_model, batch, temperature=cfg.temperature,
                                               vocab_limit=tok.vocab_size)
            share["reference_kl"] = reference_kl_loss(logp, ref_logp, mask, cfg.kl_estimator,
                                                      cfg.aggregation, cfg.max_new_tokens, d.policy)
        if cfg.loss != "paper":
            tokens = mask.sum().item()
            stats["clip_ratio"] += tokens * clip_fraction(logp, old, mask, a, low, high, kind=cfg.loss,
                                                          level=cfg.importance_sampling_level).item()
            stats["clip_tokens"] += tokens
        yield share


def inter_expert_micro_batches(model, world, ro: Rollouts, parts: PartRows, d: Denominators, cfg: RielConfig):
    """E5 on micro-batches of whole questions' O+ rows: yields each one's share of L_KL."""
    tok, device = world.tokenizer, model.output_weight.device
    for positions in _whole_questions(parts.plus_question, cfg.micro_batch_size):
        plus_rows, minus_rows = parts.plus_rows[positions].tolist(), parts.minus_rows[positions].tolist()
        completions = [ro.completions[r] for r in plus_rows]      # O+, scored under both prompts
        plus = pack([ro.prompts[r] for r in plus_rows], completions, tok.pad_id, device=device)
        minus = pack([ro.prompts[r] for r in minus_rows], completions, tok.pad_id, device=device)
        question = parts.plus_question[positions].to(device)     # [m]
        if cfg.inter_expert_variant == "full_vocab":
            with torch.no_grad():  # the teacher side is detached: no graph needed
                plus_logits = _completion_logits(model, plus, cfg, tok)
            kl = inter_expert_kl_full_vocab(plus_logits, _completion_logits(model, minus, cfg, tok),
                                            minus.completion_mask, question, d.inter_expert)
        else:
            with torch.no_grad():
                lp_plus = completion_logprobs(model, plus, temperature=cfg.temperature, vocab_limit=tok.vocab_size)
            lp_minus = completion_logprobs(model, minus, temperature=cfg.temperature, vocab_limit=tok.vocab_size)
            per_token = cfg.inter_expert_variant == "token_mean"  # else the sum over O+'s tokens (D8)
            kl = inter_expert_kl(lp_plus.sum(1), lp_minus.sum(1), question, d.inter_expert,
                                 num_tokens=minus.completion_mask.sum(1) if per_token else None)
        yield {"inter_expert_kl": kl}


def sft_micro_batches(model, world, parts: PartRows, d: Denominators, cfg: RielConfig):
    """E6 on micro-batches of the popped buffer items: yields each one's share of L_SFT. Scored
    at temperature 1, as MEF's E1 (D2): a target nobody sampled is trained under the model's own
    distribution, not the sampling one that E3-E5's rollouts came from."""
    tok = world.tokenizer
    for start in range(0, len(parts.sft_targets), cfg.micro_batch_size):
        batch = pack(parts.sft_prompts[start:start + cfg.micro_batch_size],
                     parts.sft_targets[start:start + cfg.micro_batch_size], tok.pad_id,
                     device=model.output_weight.device)
        logp = completion_logprobs(model, batch, temperature=1.0, vocab_limit=tok.vocab_size)
        yield {"sft": nll_loss(logp, batch.completion_mask, denominator=d.sft)}


def backward_e7(model, world: World, ro: Rollouts, rewards, advantages, sft_items, examples_by_id,
                cfg: RielConfig, ref_model=None, old_logprobs=None) -> tuple[dict, dict]:
    """2e: L = L_GRPO + β·L_ref + λ1·L_KL + λ2·L_SFT (E7), backward one micro-batch at a time.

    old_logprobs: π_old per row for E3' (default: the sampler's); None together with
    cfg.recompute_old_logprobs takes this forward's own. Returns the metrics (each part's value
    over the whole step, unweighted, and E7's) and the π_old rows it recomputed, if any."""
    if old_logprobs is None and not cfg.recompute_old_logprobs:
        old_logprobs = ro.old_logprobs
    parts, fallbacks = select_parts(world, ro, rewards, advantages, sft_items, examples_by_id, cfg)
    d = denominators(ro, parts, cfg)
    stats = {"clip_ratio": 0.0, "clip_tokens": 0, "gap_sum": 0.0, "gap_tokens": 0, "tis_sum": 0.0, "tis_capped": 0,
             "recomputed": {}}
    weights, values = e7_weights(cfg), dict.fromkeys(E7_PARTS, 0.0)
    micro_batches = [policy_micro_batches(model, world, ro, advantages, parts, d, cfg, ref_model, old_logprobs, stats),
                     inter_expert_micro_batches(model, world, ro, parts, d, cfg),
                     sft_micro_batches(model, world, parts, d, cfg)]
    idle = _idle_micro_batches(model, parts, cfg)  # a sharded model: every rank makes as many passes
    for generator, missing, forwards_without_grad in zip(micro_batches, idle, (0, 1, 0)):
        for share in generator:
            total_loss(share, weights).backward()  # E7
            for name, value in share.items():
                values[name] += value.item()
        for _ in range(missing):
            _idle_pass(model, world.tokenizer, forwards_without_grad)
    # every rank holds its share of each part and statistic: their sums are the step's
    sums = {**values, **{k: stats[k] for k in ("clip_ratio", "clip_tokens", "gap_sum", "gap_tokens", "tis_sum",
                                               "tis_capped")}}
    sums = dict(zip(sums, distributed.all_reduce_sum(list(sums.values())).tolist()))  # one all-reduce
    values, stats = {k: sums[k] for k in values}, {**stats, **sums}
    e7 = total_loss({name: torch.tensor(value) for name, value in values.items()}, weights).item()
    metrics = {**{part.metric: values[name] for name, part in E7_PARTS.items()}, "loss/total": e7,
               "clip_ratio": stats["clip_ratio"] / max(stats["clip_tokens"], 1),
               "logprobs/sampler_trainer_gap": stats["gap_sum"] / max(stats["gap_tokens"], 1),
               "inter_expert/active_questions": d.inter_expert,
               **({"tis/mean_weight": stats["tis_sum"] / max(stats["gap_tokens"], 1),
                   "tis/capped_ratio": stats["tis_capped"] / max(stats["gap_tokens"], 1)}
                  if cfg.tis_cap is not None else {}),
               "buffer/gold_fallbacks": int(distributed.all_reduce_sum(fallbacks))}
    return metrics, stats["recomputed"]


def _idle_micro_batches(model, parts: PartRows, cfg: RielConfig) -> list[int]:
    """Per part (E3/E4, E5, E6): how many micro-batches fewer than the busiest rank's this rank
    has. FSDP2 (--fsdp) makes every forward and backward a collective, so a rank with fewer
    (no row with a nonzero advantage, no E5 question, fewer SFT items) must still make that many
    passes, with zero weight. Zeros for a replicated model, which waits only at the gradient sum."""
    if not distributed.is_sharded(model):
        return [0, 0, 0]
    mine = [math.ceil(len(parts.policy_rows) / cfg.micro_batch_size),
            len(_whole_questions(parts.plus_question, cfg.micro_batch_size)),
            math.ceil(len(parts.sft_targets) / cfg.micro_batch_size)]
    return [most - n for most, n in zip(distributed.all_reduce_max(mine), mine)]


def _idle_pass(model, tok, forwards_without_grad: int) -> None:
    """The passes of one micro-batch, on one token and with weight 0: the same collectives as a
    real one (E5's micro-batches score O+ under P+ without a graph first), a zero gradient."""
    batch = pack([[tok.eot_id]], [[tok.eot_id]], tok.pad_id, device=model.output_weight.device)
    with torch.no_grad():
        for _ in range(forwards_without_grad):
            completion_logprobs(model, batch, vocab_limit=tok.vocab_size)
    (0.0 * completion_logprobs(model, batch, vocab_limit=tok.vocab_size).sum()).backward()


def _whole_questions(question: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Positions of `question` [M] (sorted) in batches of about `size` that never split a
    question: a batch closes before the question that would take it past `size`."""
    batches, current, count = [], [], 0
    for q in torch.unique_consecutive(question):
        positions = (question == q).nonzero().flatten()
        if current and count + len(positions) > size:
            batches.append(torch.cat(current))
            current, count = [], 0
        current.append(positions)
        count += len(positions)
    return batches + ([torch.cat(current)] if current else [])


def _padded(values: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(values), width)
    for row, v in enumerate(values):
        out[row, :len(v)] = v
    return out


def _completion_logits(model, batch, cfg: RielConfig, tok) -> torch.Tensor:
    """Full next-token logits at the completion positions, [M, T, V]: the full-vocab E5 only."""
    hidden = completion_hidden(model, batch)  # [M, T, H]
    return hidden.float() @ model.output_weight[:tok.vocab_size].float().T / cfg.temperature


# ---------------------------------------------------------------------------------------------
# The step

def riel_metrics(ro: Rollouts, rewards: torch.Tensor, advantages: torch.Tensor) -> dict:
    """Per-step statistics with names a TRL user recognises, over every rank's rollouts.
    rewards, advantages: [Q, N, G] of the whole step (all ranks)."""
    stats = reward_stats(rewards)
    per_row = torch.stack([torch.tensor([float(len(c)) for c in ro.completions]),             # [3, rows]
                           torch.tensor([float(f) for f in ro.finished]),
                           torch.tensor([e.mean().item() if len(e) else 0.0 for e in ro.entropy])])
    lengths, finished, entropy = distributed.all_gather_tensor(per_row[:, ro.rows].movedim(0, 1)).movedim(1, 0)  # [Q, N, G] each
    out = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "frac_reward_zero_std": stats["zero_signal"].mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - finished.mean().item(),
        "advantages/nonzero_frac": (advantages != 0).float().mean().item(),
    }
    by_expert = entropy.mean(dim=(0, 2))  # [N]: mean over rows of each row's mean token entropy
    out["entropy"] = by_expert.mean().item()
    for i in range(rewards.shape[1]):
        out[f"entropy/expert_{i}"] = by_expert[i].item()
        out[f"rewards/expert_{i}/mean"] = stats["mean_reward"][i].item()
        out[f"frac_reward_zero_std/expert_{i}"] = stats["zero_signal"][i].item()
        out[f"rewards/expert_{i}/all_wrong"] = stats["all_wrong"][i].item()
    return out


def riel_step(model, world: World, examples, cfg: RielConfig, step_key: int,
              buffer: HardExampleBuffer | None, examples_by_id: dict, ref_model=None):
    """Stages 2a-2e for one batch of questions. Yields (E7's value, metrics) after each of the
    cfg.num_iterations backward passes on the same rollouts: the caller takes an optimizer step
    (meml/trainer.py) before the next one. step_key: the step's random key (`stream_key(seed,
    step)`), from which every rollout of the step draws (`sample_rollouts`).

    Across processes (meml/distributed.py) every rank gets the whole batch and works on its
    contiguous share of the questions: all N x G rollouts of a question stay on one rank, so its
    groups (E2) and its E+/E− pair (E5) are local; rewards are gathered, so advantages with
    batch_std, the buffer (E6) and the metrics see the whole step on every rank."""
    t0 = time.time()
    model.eval()
    mine = distributed.shard(examples, "--questions-per-step")
    first = distributed.rank() * len(mine)                  # this rank's questions in the step
    ro = sample_rollouts(model, world, mine, cfg, step_key, first)                       # 2a
    t1 = time.time()
    # 2b [Q, N, G]: the verifier's rewards, and D25's overlong penalty, which only E2 sees
    penalty = overlong_penalty(torch.tensor([len(c) for c in ro.completions])[ro.rows], cfg.max_new_tokens,
                               cfg.overlong_penalty)
    rewards, penalty = distributed.all_gather_tensor(torch.stack([score_rollouts(ro, world, mine), penalty])
                                                     .movedim(0, -1)).unbind(-1)
    advantages = group_advantages(rewards + penalty, scale=cfg.advantage_scale, eps=cfg.advantage_eps,
                                  positive_only=cfg.positive_only)                        # 2c [Q, N, G]
    sft_items, inserted = fill_buffer(buffer, examples, rewards) if buffer is not None else ([], 0)  # 2d
    t2 = time.time()
    model.train()
    rollout_metrics = riel_metrics(ro, rewards, advantages)
    if cfg.overlong_penalty:
        rollout_metrics["rewards/overlong_penalty"] = penalty.mean().item()
    rewards, advantages = rewards[first:first + len(mine)], advantages[first:first + len(mine)]
    my_items = sft_items[distributed.rank()::distributed.world_size()]  # the buffer's SFT, split
    generated = int(distributed.all_reduce_sum(sum(len(c) for c in ro.completions)))
    rollout_metrics.update({
        "buffer/fill": len(buffer) if buffer is not None else 0,
        **({"buffer/capacity": buffer.capacity} if buffer is not None else {}),
        "buffer/insertions": inserted,
        "buffer/sft_triggers": len(sft_items) // buffer.capacity if buffer is not None else 0,
        "buffer/sft_items": len(sft_items),
        "time/generation": t1 - t0, "time/scoring": t2 - t1,
        "tokens_per_second": generated / max(t1 - t0, 1e-9),
        "samples": [{"expert": i, "text": ro.texts[ro.rows[q, i, 0]], "reward": rewards[q, i, 0].item()}
                    for q in range(rewards.shape[0]) for i in range(rewards.shape[1])],
    })
    old_logprobs, gap = None, None  # π_old: the sampler's, or the first update's own (D21)
    for _ in range(cfg.num_iterations):                                                   # μ updates
        metrics, recomputed = backward_e7(model, world, ro, rewards, advantages, my_items, examples_by_id,
                                          cfg, ref_model, old_logprobs)                   # 2e
        old_logprobs = old_logprobs or recomputed or None
        gap = metrics["logprobs/sampler_trainer_gap"] if gap is None else gap  # the sampling weights' gap
        yield torch.tensor(metrics["loss/total"]), {**rollout_metrics, **metrics, "time/update": time.time() - t2,
                                                    "logprobs/sampler_trainer_gap": gap}
