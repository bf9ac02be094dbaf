"""Stage 2, RIEL (Reinforced Inter-Expert Learning): one step of E2-E7.

A step, in the order the code runs (METHOD.md's equations in brackets):

  Stage 2a  rollouts   every expert i samples G completions of every question under its own
                       system prompt P_i: Q x N x G rows
  Stage 2b  rewards    the verifier scores each completion 0/1: rewards [Q, N, G]
  Stage 2c  advantages per (question, expert) group                                      [E2]
  Stage 2d  buffer     groups with more than K wrong enter the hard-example buffer      [E6]
  Stage 2e  loss       policy loss                                                       [E3]
                       + λ1 · inter-expert KL toward the best expert's correct answers  [E5]
                       + λ2 · SFT on the buffer's (Q, P, S) when it fills                [E6]
                       + β · reference KL (baselines only)                              [E4]
                       = L                                                              [E7]

One optimizer step per rollout batch (the paper's setting and TRL's default), so π_old is the
policy that sampled and the clipped objective E3' matters only through its value at ratio 1;
it is kept so the baselines are the textbook objective.

Memory: rows are scored in micro-batches and each micro-batch calls backward at once, its loss
scaled by its share of the aggregation's denominator, so the gradient equals that of the
whole-batch loss (gradient accumulation). Rows whose advantage is 0 (all-equal groups, and every
row at or below its group's mean under the paper's max(A, 0)) contribute exactly nothing to E3,
so they are not scored unless the E4 term needs them.

The pieces know nothing of this file: the sampler, verifier, advantage, loss, KL and buffer
functions are each one small function in their own module.
"""
import time
from dataclasses import dataclass

import torch

from meml.advantage import group_advantages, reward_stats
from meml.buffer import HardExampleBuffer
from meml.kl import inter_expert_kl, inter_expert_kl_full_vocab, plus_rollouts, reference_kl_loss, select_expert_pairs
from meml.losses import clip_fraction, nll_loss, policy_loss, total_loss
from meml.policy import completion_logprobs, pack
from meml.prompts import expert_prompt, response_ids
from meml.rewards import reward
from meml.sampler import generate


@dataclass
class RielConfig:
    questions_per_step: int = 8
    group_size: int = 8                  # G
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    advantage_scale: str = "none"        # E2: "none" | "group_std" | "batch_std"
    positive_only: bool = True           # E3: the paper's max(A, 0)
    loss: str = "paper"                  # "paper" (E3) | "clipped" (E3', with π_old)
    clip_eps: float = 0.2
    aggregation: str = "seq_mean_token_mean"  # | "token_mean" | "dr_grpo"
    beta: float = 0.0                    # E4 weight (0 in MEML; 0.04 typical for GRPO baselines)
    kl_estimator: str = "k3"
    inter_expert_weight: float = 0.1     # λ1 (E5); 0 turns the term off
    inter_expert_variant: str = "sequence"  # | "full_vocab"
    use_buffer: bool = True              # E6
    buffer_k: int = 6                    # K
    buffer_capacity: int = 64            # B
    buffer_target: str = "gold"          # "gold" worked solution S | "expert" i's reference answer
    sft_weight: float = 1.0              # λ2
    micro_batch_size: int = 64           # rows scored per forward/backward
    rollout_batch_size: int = 256        # rows generated per sampler call


@dataclass
class Rollouts:
    """One step's samples; row r is (question r // (N*G), expert (r // G) % N, rollout r % G)."""
    prompts: list[list[int]]
    completions: list[list[int]]       # sampled ids, stop token included
    old_logprobs: list[torch.Tensor]   # π_old per completion token, from the sampler
    finished: list[bool]
    texts: list[str]
    rewards: torch.Tensor | None = None  # [Q, N, G], filled in by score_rollouts


@dataclass
class World:
    """What RIEL needs to know about the task: the tokenizer, experts and verifier."""
    tokenizer: object
    system_prompts: list[str]          # P_i, one per expert taking part
    dataset: str                       # verifier name for meml.rewards.reward
    expert_answers: dict | None = None  # (example_id, expert) -> reference answer text


def sample_rollouts(model, world: World, examples, cfg: RielConfig, generator) -> Rollouts:
    """Stage 2a: N x G completions per question, each expert under its own system prompt."""
    tok, G = world.tokenizer, cfg.group_size
    prompts = [expert_prompt(tok, p, world.dataset, ex)
               for ex in examples for p in world.system_prompts for _ in range(G)]
    completions, old_logprobs, finished = [], [], []
    for start in range(0, len(prompts), cfg.rollout_batch_size):
        gen = generate(model, prompts[start:start + cfg.rollout_batch_size],
                       max_new_tokens=cfg.max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                       vocab_limit=tok.vocab_size, temperature=cfg.temperature, top_k=cfg.top_k,
                       top_p=cfg.top_p, generator=generator)
        for ids, mask, lp, done in zip(gen.completion_ids, gen.completion_mask, gen.logprobs, gen.finished):
            completions.append(ids[mask].tolist())
            old_logprobs.append(lp[mask].float().cpu())
            finished.append(bool(done))
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    return Rollouts(prompts, completions, old_logprobs, finished, texts)


def score_rollouts(ro: Rollouts, world: World, examples) -> None:
    """Stage 2b: the verifier's 0/1 reward for every completion, as a tensor [Q, N, G]."""
    num_experts = len(world.system_prompts)
    per_question = len(ro.texts) // len(examples)  # N * G
    flat = [reward(world.dataset, text, examples[row // per_question]) for row, text in enumerate(ro.texts)]
    ro.rewards = torch.tensor(flat).view(len(examples), num_experts, per_question // num_experts)


def _share(mask: torch.Tensor, total_rows: int, total_tokens: int, aggregation: str) -> float:
    """This micro-batch's fraction of the whole batch's aggregation denominator."""
    if aggregation == "token_mean":
        return mask.sum().item() / max(total_tokens, 1)
    return mask.shape[0] / total_rows  # seq_mean_token_mean and dr_grpo: per-row denominators


def _padded(values: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(values), width)
    for row, v in enumerate(values):
        out[row, :len(v)] = v
    return out


def policy_step(model, world: World, ro: Rollouts, advantages: torch.Tensor, cfg: RielConfig,
                ref_model=None) -> dict:
    """E3 (+ β·E4): backward over micro-batches of rows; returns the loss parts and statistics."""
    tok = world.tokenizer
    adv = advantages.flatten()  # [Q*N*G], rows ordered as in Rollouts
    rows = [r for r in range(len(adv)) if adv[r] != 0 or cfg.beta > 0]
    total_rows = len(adv)
    total_tokens = sum(len(c) for c in ro.completions)
    max_len = cfg.max_new_tokens if cfg.aggregation == "dr_grpo" else None
    out = {"loss/policy": 0.0, "loss/ref_kl": 0.0, "clip_ratio": 0.0}
    for start in range(0, len(rows), cfg.micro_batch_size):
        idx = rows[start:start + cfg.micro_batch_size]
        batch = pack([ro.prompts[r] for r in idx], [ro.completions[r] for r in idx], tok.pad_id,
                     device=model.output_weight.device)
        logp = completion_logprobs(model, batch, temperature=cfg.temperature, vocab_limit=tok.vocab_size)  # [b, T]
        old = _padded([ro.old_logprobs[r] for r in idx], logp.shape[1]).to(logp.device)
        share = _share(batch.completion_mask, total_rows, total_tokens, cfg.aggregation)
        a = adv[idx].to(logp.device)
        loss = share * policy_loss(logp, batch.completion_mask, a,
                                   old_logprobs=old if cfg.loss == "clipped" else None,
                                   clip_eps=cfg.clip_eps, aggregation=cfg.aggregation, max_len=max_len)
        out["loss/policy"] += loss.item()
        if cfg.loss == "clipped":
            out["clip_ratio"] += share * clip_fraction(logp, old, batch.completion_mask, a, cfg.clip_eps).item()
        if cfg.beta > 0:
            with torch.no_grad():
                ref_logp = completion_logprobs(ref_model, batch, temperature=cfg.temperature,
                                               vocab_limit=tok.vocab_size)
            kl = share * reference_kl_loss(logp, ref_logp, batch.completion_mask, cfg.kl_estimator,
                                           cfg.aggregation, max_len)
            out["loss/ref_kl"] += kl.item()
            loss = loss + cfg.beta * kl
        loss.backward()
    return out


def inter_expert_step(model, world: World, ro: Rollouts, cfg: RielConfig) -> dict:
    """E5: per active question, pull E− toward E+'s correct rollouts O+ (E+ side detached)."""
    tok, rewards = world.tokenizer, ro.rewards
    num_experts, G = rewards.shape[1], rewards.shape[2]
    e_plus, e_minus, active = select_expert_pairs(rewards)
    correct = plus_rollouts(rewards, e_plus) & active[:, None]  # [Q, G] the O+ rows
    questions = active.nonzero().flatten().tolist()
    total = 0.0
    for q in questions:
        rows = [(q * num_experts + e_plus[q].item()) * G + g for g in range(G) if correct[q, g]]
        completions = [ro.completions[r] for r in rows]
        minus_prompt = ro.prompts[(q * num_experts + e_minus[q].item()) * G]
        plus = pack([ro.prompts[r] for r in rows], completions, tok.pad_id, device=model.output_weight.device)
        minus = pack([minus_prompt] * len(rows), completions, tok.pad_id, device=model.output_weight.device)
        if cfg.inter_expert_variant == "full_vocab":
            with torch.no_grad():  # the teacher side is detached: no graph needed
                plus_logits = _logits(model, plus, cfg, tok)
            loss = inter_expert_kl_full_vocab(plus_logits, _logits(model, minus, cfg, tok), minus.completion_mask)
        else:
            with torch.no_grad():
                lp_plus = completion_logprobs(model, plus, temperature=cfg.temperature, vocab_limit=tok.vocab_size)
            lp_minus = completion_logprobs(model, minus, temperature=cfg.temperature, vocab_limit=tok.vocab_size)
            loss = inter_expert_kl(lp_plus.sum(1), lp_minus.sum(1))  # sequence log-probs, [M] each
        loss = loss / len(questions)  # mean over active questions
        (cfg.inter_expert_weight * loss).backward()
        total += loss.item()
    return {"loss/inter_expert_kl": total, "inter_expert/active_questions": len(questions)}


def _logits(model, batch, cfg: RielConfig, tok) -> torch.Tensor:
    """Full next-token logits at the completion positions, [M, T, V]: the full-vocab E5 only."""
    hidden = model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)
    start, width = batch.prompt_width - 1, batch.completion_ids.shape[1]
    return hidden[:, start:start + width].float() @ model.output_weight[:tok.vocab_size].float().T / cfg.temperature


def buffer_step(buffer: HardExampleBuffer, examples, ro: Rollouts) -> tuple[list, int]:
    """E6 insertions: every (question, expert) group with more than K wrong may enter.
    Returns the items popped when the buffer filled (possibly several fills, possibly none)
    and the number of insertions."""
    wrong = (ro.rewards == 0).sum(-1)  # [Q, N]
    popped, inserted = [], 0
    for q, ex in enumerate(examples):
        for i in range(wrong.shape[1]):
            inserted += buffer.maybe_add((ex.id, i), int(wrong[q, i]))
            if buffer.is_full:
                popped.extend(buffer.pop_batch())
    return popped, inserted


def sft_step(model, world: World, items: list, examples_by_id: dict, cfg: RielConfig) -> float:
    """E6's L_SFT = −mean log π_θ(S | Q, P_i) over the popped items, times λ2; backward."""
    tok = world.tokenizer
    prompts, targets = [], []
    for example_id, i in items:
        ex = examples_by_id[example_id]
        target = ex.solution if cfg.buffer_target == "gold" else world.expert_answers[(example_id, i)]
        prompts.append(expert_prompt(tok, world.system_prompts[i], world.dataset, ex))
        targets.append(response_ids(tok, target))
    total_tokens = sum(len(t) for t in targets)
    value = 0.0
    for start in range(0, len(items), cfg.micro_batch_size):
        batch = pack(prompts[start:start + cfg.micro_batch_size], targets[start:start + cfg.micro_batch_size],
                     tok.pad_id, device=model.output_weight.device)
        logp = completion_logprobs(model, batch, temperature=1.0, vocab_limit=tok.vocab_size)
        loss = batch.completion_mask.sum().item() / total_tokens * nll_loss(logp, batch.completion_mask)
        (cfg.sft_weight * loss).backward()
        value += loss.item()
    return value


def riel_metrics(ro: Rollouts, advantages: torch.Tensor) -> dict:
    """Per-step statistics with names a TRL user recognises."""
    stats = reward_stats(ro.rewards)
    lengths = torch.tensor([len(c) for c in ro.completions], dtype=torch.float)
    out = {
        "reward": ro.rewards.mean().item(),
        "reward_std": ro.rewards.std().item(),
        "frac_reward_zero_std": stats["zero_signal"].mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - sum(ro.finished) / len(ro.finished),
        "advantages/nonzero_frac": (advantages != 0).float().mean().item(),
    }
    for i in range(ro.rewards.shape[1]):
        out[f"rewards/expert_{i}/mean"] = stats["mean_reward"][i].item()
        out[f"frac_reward_zero_std/expert_{i}"] = stats["zero_signal"][i].item()
        out[f"rewards/expert_{i}/all_wrong"] = stats["all_wrong"][i].item()
    return out


def riel_step(model, world: World, examples, cfg: RielConfig, generator: torch.Generator,
              buffer: HardExampleBuffer | None, examples_by_id: dict, ref_model=None):
    """Stages 2a-2e for one batch of questions. Returns (loss, metrics); gradients are in .grad."""
    t0 = time.time()
    model.eval()
    ro = sample_rollouts(model, world, examples, cfg, generator)                   # 2a
    t1 = time.time()
    score_rollouts(ro, world, examples)                                             # 2b
    advantages = group_advantages(ro.rewards, scale=cfg.advantage_scale,
                                  positive_only=cfg.positive_only)                  # 2c [Q, N, G]
    popped, inserted = buffer_step(buffer, examples, ro) if buffer is not None else ([], 0)  # 2d
    t2 = time.time()
    model.train()
    metrics = riel_metrics(ro, advantages)
    metrics.update(policy_step(model, world, ro, advantages, cfg, ref_model))       # 2e: E3 (+E4)
    if cfg.inter_expert_weight > 0 and ro.rewards.shape[1] > 1:
        metrics.update(inter_expert_step(model, world, ro, cfg))                     # E5
    metrics["loss/sft"] = sft_step(model, world, popped, examples_by_id, cfg) if popped else 0.0  # E6
    # E7, the value of the loss whose parts were back-propagated above, one part at a time.
    loss = total_loss(metrics["loss/policy"], metrics.get("loss/inter_expert_kl"), metrics["loss/sft"],
                      metrics["loss/ref_kl"], cfg.inter_expert_weight, cfg.sft_weight, cfg.beta)
    t3 = time.time()
    generated = sum(len(c) for c in ro.completions)
    metrics.update({
        "loss/total": loss,
        "buffer/fill": len(buffer) if buffer is not None else 0,
        "buffer/insertions": inserted,
        "buffer/sft_triggers": len(popped) // buffer.capacity if buffer is not None else 0,
        "buffer/sft_items": len(popped),
        "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
        "tokens_per_second": generated / max(t1 - t0, 1e-9),
        "samples": [{"expert": (r // cfg.group_size) % ro.rewards.shape[1], "text": ro.texts[r],
                     "reward": ro.rewards.flatten()[r].item()} for r in range(0, len(ro.texts), cfg.group_size)],
    })
    return torch.tensor(loss), metrics
