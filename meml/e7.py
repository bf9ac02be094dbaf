"""E7 for one RIEL step: which rows each part sees, the whole step's denominators, the parts,
E7 on the whole batch in one expression (`e7`) and its memory-bounded equal (`backward_e7`).

    L = L_GRPO + β·L_ref + λ1·L_KL + λ2·L_SFT                                            (E7)

The parts, named in meml.losses.E7_PARTS, computed by three passes over rows:
  L_GRPO  `policy_part`: `policy_loss` on the rollouts whose advantage is not 0         (E3)
          and L_ref, `reference_kl_loss` on the same rows, when β > 0                   (E4)
  L_KL    `inter_expert_part`: each O+ row of an active question scored under E+'s prompt
          (detached) and under E−'s                                                    (E5)
  L_SFT   `sft_part`: the NLL of the buffer's targets when it filled this step          (E6)

Memory. Every part is a sum over its units (tokens, rows, questions) divided by a denominator.
The denominators of the whole step are known before any backward (`Denominators`, from the
gathered grid of the step's rows), so a micro-batch's share of each part is exact, and
`backward_e7` calls backward on one micro-batch at a time: the accumulated gradient is that of
`e7` on the whole batch (tests/test_riel.py compares the two, and `e7` with E7 written out by
hand). Rows whose advantage is 0 add exactly nothing to E3, so they are not scored unless E4
needs them.

Temperature. E3-E5 score the rollouts at the sampling temperature T (D2): they are about the
distribution the rollouts came from. E6, like MEF's E1, is the likelihood of a target nobody
sampled, so it is scored at T = 1, the model's own distribution.

π_old (E3', D21) is one list of per-row log-probs: the sampler's, or `recomputed_old_logprobs`,
a pass of the training forward without a graph before the first update.

A new term of E7 computed on rows a pass already scores (an entropy bonus on the policy rows)
is three edits: its value in that pass's function, its line in meml.losses.E7_PARTS and its
weight's option in meml/config.py (tests/test_riel.py fails when a part is in one place and not
the others). A term on rows of its own also needs a pass: its function in `PASSES`, its
micro-batches in `micro_batches`, its rows in `e7_batch` and its line in `_IDLE_PASSES`.
"""
from collections import Counter
from dataclasses import dataclass

import torch

from meml import distributed
from meml.config import RielConfig, clip_bounds
from meml.kl import inter_expert_kl, inter_expert_kl_full_vocab, plus_rollouts, reference_kl_loss, select_expert_pairs
from meml.losses import (E7_PARTS, aggregation_denominator, clip_fraction, e7_weights, nll_loss, overlong_penalty,
                         policy_loss, total_loss, truncated_is_weights)
from meml.policy import completion_hidden, completion_logprobs, pack
from meml.rewards import Verifier, verifier_for


@dataclass
class Experts:
    """The experts RIEL trains and what they share: the tokenizer and the task's verifier."""
    tokenizer: object
    system_prompts: list[str]          # P_i, one per expert taking part
    dataset: str                       # data set name (how a question is put to the experts)
    verified_answers: dict | None = None  # (example_id, expert) -> reference answer the verifier accepts
    verifier: Verifier | None = None   # the reward; default: the data set's built-in verifier

    def reward(self, completion: str, example) -> float:
        return verifier_for(self.dataset, self.verifier)(completion, example)


@dataclass
class Rollouts:
    """This rank's samples as flat rows; rows[q, i, g] is the row of (question q, expert i, rollout g)."""
    rows: torch.Tensor                 # [Q, N, G] long
    prompts: list[list[int]]           # per row: P_i + Q_q, chat-formatted
    completions: list[list[int]]       # per row: sampled ids, stop token included
    sampler_logprobs: list[torch.Tensor]  # per row: the sampler's log-prob of each completion token
    finished: list[bool]               # per row: stopped (True) or cut at max_new_tokens
    texts: list[str]                   # per row: decoded completion
    entropy: list[torch.Tensor]        # per row: entropy of each step's sampling distribution

    def per_row(self, grid: torch.Tensor) -> torch.Tensor:
        """[Q, N, G] -> [rows]: the value of each row's (question, expert, rollout)."""
        out = grid.new_empty(self.rows.numel())
        out[self.rows.flatten()] = grid.flatten()
        return out

    @staticmethod
    def joined(parts: list["Rollouts"]) -> "Rollouts":
        """Several batches' rollouts as one, their questions in order."""
        offsets = torch.tensor([0] + [len(p.prompts) for p in parts]).cumsum(0)
        rows = torch.cat([p.rows + o for p, o in zip(parts, offsets.tolist())])
        return Rollouts(rows, *(sum((getattr(p, f) for p in parts), []) for f in
                                ("prompts", "completions", "sampler_logprobs", "finished", "texts", "entropy")))

    def of_questions(self, questions: list[int]) -> "Rollouts":
        """The rollouts of these questions (by position), in that order, rows numbered afresh."""
        old = self.rows[questions].flatten().tolist()
        pick = lambda values: [values[r] for r in old]  # noqa: E731
        return Rollouts(torch.arange(len(old)).view(len(questions), *self.rows.shape[1:]), pick(self.prompts),
                        pick(self.completions), pick(self.sampler_logprobs), pick(self.finished), pick(self.texts),
                        pick(self.entropy))

    def question_of_row(self) -> torch.Tensor:
        """[rows] long: the question each row answers."""
        questions = torch.arange(self.rows.shape[0])[:, None, None].expand_as(self.rows)
        return self.per_row(questions)


@dataclass
class Grid:
    """Per-rollout figures of a step, [Q, N, G] each: the verifier's reward, D25's overlong
    penalty (which only E2 sees), and what the metrics and denominators need."""
    reward: torch.Tensor
    penalty: torch.Tensor
    length: torch.Tensor      # completion tokens
    finished: torch.Tensor    # 1: stopped, 0: cut at max_new_tokens
    entropy: torch.Tensor     # mean entropy of the row's sampling distributions

    @classmethod
    def of(cls, ro: "Rollouts", rewards: torch.Tensor, cfg: RielConfig) -> "Grid":
        """The grid of these rollouts with these rewards [Q, N, G]."""
        per_row = torch.stack([torch.tensor([float(len(c)) for c in ro.completions]),
                               torch.tensor([float(f) for f in ro.finished]),
                               torch.tensor([e.mean().item() if len(e) else 0.0 for e in ro.entropy])])  # [3, rows]
        length, finished, entropy = per_row[:, ro.rows]                                          # [Q, N, G] each
        return cls(rewards, overlong_penalty(length.long(), cfg.max_new_tokens, cfg.overlong_penalty), length,
                   finished, entropy)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.reward, self.penalty, self.length, self.finished, self.entropy], dim=-1)

    def __getitem__(self, questions) -> "Grid":
        return Grid(*self.stacked()[questions].unbind(-1))

    @staticmethod
    def joined(parts: list["Grid"]) -> "Grid":
        return Grid(*torch.cat([p.stacked() for p in parts]).unbind(-1))


# ---------------------------------------------------------------------------------------------
# 2e: which rows each part of E7 sees, and the denominators

@dataclass
class Denominators:
    """Each part's denominator over the whole step (every rank's rows), known before any backward."""
    policy: torch.Tensor     # E3, E4: completion tokens (token_mean), rows, or rows x max_len (dr_grpo)
    inter_expert: int        # E5: active questions
    sft: torch.Tensor        # E6: target tokens of the buffer items popped this step


@dataclass
class E7Batch:
    """This rank's share of a step as E7 reads it: the rows of each part and the denominators."""
    ro: Rollouts
    advantage: torch.Tensor          # [rows] E2's advantage of each row
    old_logprobs: list[torch.Tensor]  # [rows] π_old per token: the sampler's, or recomputed (D21)
    policy_rows: list[int]           # E3 (+E4): rows with a nonzero advantage (every row if β > 0)
    plus_rows: torch.Tensor          # E5 [M]: the O+ rows, E+'s correct rollouts of active questions
    minus_rows: torch.Tensor         # E5 [M]: a row of E− on the same question (for its prompt)
    plus_question: torch.Tensor      # E5 [M]: the question of each O+ row
    sft_prompts: list[list[int]]     # E6: P_i + Q of each buffer item this rank trains on
    sft_targets: list[list[int]]     # E6: its target S, end-of-turn included
    d: Denominators


def e7_batch(ro: Rollouts, grid: Grid, advantages: torch.Tensor, mine: slice, sft: tuple[list, list],
             cfg: RielConfig) -> E7Batch:
    """Which rows each part of E7 sees on this rank, and the whole step's denominators.
    grid, advantages: the whole step's [Q, N, G]; mine: this rank's questions in them; sft: the
    prompts and targets of every buffer item popped this step (each rank trains on a deal)."""
    rewards, advantage = grid.reward[mine], ro.per_row(advantages[mine])
    policy_rows = [r for r in range(len(advantage)) if (advantage[r] != 0 or cfg.beta > 0)
                   and (ro.finished[r] or not cfg.mask_truncated)]  # D25: a cut completion adds nothing
    plus_rows = minus_rows = plus_question = torch.zeros(0, dtype=torch.long)
    active_questions = 0
    if cfg.lambda1 > 0 and rewards.shape[1] > 1:
        e_plus, e_minus, active = select_expert_pairs(grid.reward)          # [Q] each, the whole step's
        active_questions = int(active.sum())
        e_plus, e_minus, active = e_plus[mine], e_minus[mine], active[mine]  # this rank's questions
        plus_question, g = (plus_rollouts(rewards, e_plus) & active[:, None]).nonzero(as_tuple=True)  # [M]
        plus_rows = ro.rows[plus_question, e_plus[plus_question], g]
        minus_rows = ro.rows[plus_question, e_minus[plus_question], 0]
    if cfg.lambda2 == 0:  # E6 weighs nothing: its items are not scored (as E5's rows with λ1 = 0)
        sft = ([], [])
    counted = grid.finished.bool() | (not cfg.mask_truncated)  # D25: --mask-truncated leaves cut rows out
    d = Denominators(policy=aggregation_denominator(grid.length[counted].long(), cfg.aggregation, cfg.max_new_tokens),
                     inter_expert=active_questions,
                     sft=torch.tensor(float(sum(len(t) for t in sft[1]))).clamp(min=1))
    sft_prompts, sft_targets = distributed.dealt(sft[0]), distributed.dealt(sft[1])
    return E7Batch(ro, advantage, ro.sampler_logprobs, policy_rows, plus_rows, minus_rows, plus_question,
                   sft_prompts, sft_targets, d)


# ---------------------------------------------------------------------------------------------
# 2e: the parts of E7. Each takes some of its rows (a micro-batch, or all of them) and returns
# their share of its values (tensors with a graph) and of its statistics (sums of numbers).

def policy_part(model, experts: Experts, b: E7Batch, rows: list[int], cfg: RielConfig, ref_model=None):
    """L_GRPO (E3, E3' or CISPO; GSPO's ratio, truncated IS: D23-D24) and, when β > 0, L_ref (E4)."""
    tok, ro = experts.tokenizer, b.ro
    low, high = clip_bounds(cfg)  # each objective's own defaults (D23)
    batch = pack([ro.prompts[r] for r in rows], [ro.completions[r] for r in rows], tok.pad_id,
                 device=model.output_weight.device)
    mask = batch.completion_mask                                                              # [b, T]
    logp = completion_logprobs(model, batch, temperature=cfg.temperature, vocab_limit=tok.vocab_size)  # [b, T]
    sampled = _padded([ro.sampler_logprobs[r] for r in rows], logp.shape[1]).to(logp.device)       # [b, T]
    old = _padded([b.old_logprobs[r] for r in rows], logp.shape[1]).to(logp.device)            # [b, T] π_old
    a = b.advantage[rows].to(logp.device)                                                     # [b]
    tokens = mask.sum().item()
    stats = {"gap_sum": (logp.detach() - sampled).abs()[mask].sum().item(), "gap_tokens": tokens}  # sampler vs trainer
    weights = None
    if cfg.tis_cap is not None:  # D24: π_old / π_sampler, capped (1 when π_old is the sampler's)
        weights = truncated_is_weights(old, sampled, mask, cfg.tis_cap)
        stats.update(tis_sum=weights[mask].sum().item(),
                     tis_capped=((old - sampled).exp() > cfg.tis_cap)[mask].sum().item())
    values = {"policy": policy_loss(logp, mask, a, old_logprobs=None if cfg.loss == "paper" else old,
                                    clip_eps=low, clip_eps_high=high, kind=cfg.loss,
                                    level=cfg.importance_sampling_level, token_weights=weights,
                                    aggregation=cfg.aggregation, max_len=cfg.max_new_tokens,
                                    denominator=b.d.policy)}
    if cfg.beta > 0:
        with torch.no_grad():
            ref_logp = completion_logprobs(ref_model, batch, temperature=cfg.temperature, vocab_limit=tok.vocab_size)
        values["reference_kl"] = reference_kl_loss(logp, ref_logp, mask, cfg.kl_estimator, cfg.aggregation,
                                                   cfg.max_new_tokens, b.d.policy)
    if cfg.loss != "paper":
        stats.update(clip_ratio=tokens * clip_fraction(logp, old, mask, a, low, high, kind=cfg.loss,
                                                       level=cfg.importance_sampling_level).item(),
                     clip_tokens=tokens)
    return values, stats


def inter_expert_part(model, experts: Experts, b: E7Batch, positions: torch.Tensor, cfg: RielConfig, ref_model=None):
    """L_KL (E5) on these O+ rows (positions into b.plus_rows; whole questions only)."""
    tok, ro, device = experts.tokenizer, b.ro, model.output_weight.device
    plus_rows, minus_rows = b.plus_rows[positions].tolist(), b.minus_rows[positions].tolist()
    completions = [ro.completions[r] for r in plus_rows]      # O+, scored under both prompts
    plus = pack([ro.prompts[r] for r in plus_rows], completions, tok.pad_id, device=device)
    minus = pack([ro.prompts[r] for r in minus_rows], completions, tok.pad_id, device=device)
    question = b.plus_question[positions].to(device)         # [m]
    if cfg.inter_expert_variant == "full_vocab":
        with torch.no_grad():  # the teacher side is detached: no graph needed
            plus_logits = _completion_logits(model, plus, cfg, tok)
        kl = inter_expert_kl_full_vocab(plus_logits, _completion_logits(model, minus, cfg, tok),
                                        minus.completion_mask, question, b.d.inter_expert)
    else:
        with torch.no_grad():
            lp_plus = completion_logprobs(model, plus, temperature=cfg.temperature, vocab_limit=tok.vocab_size)
        lp_minus = completion_logprobs(model, minus, temperature=cfg.temperature, vocab_limit=tok.vocab_size)
        per_token = cfg.inter_expert_variant == "token_mean"  # else the sum over O+'s tokens (D8)
        # log π(O+ | P) summed over O+'s tokens: completion_logprobs is 0 off the completion mask
        kl = inter_expert_kl(lp_plus.sum(1), lp_minus.sum(1), question, b.d.inter_expert,
                             num_tokens=minus.completion_mask.sum(1) if per_token else None)
    return {"inter_expert_kl": kl}, {}


def sft_part(model, experts: Experts, b: E7Batch, items: range, cfg: RielConfig, ref_model=None):
    """L_SFT (E6) on these buffer items (indices into b.sft_targets), at T = 1."""
    tok = experts.tokenizer
    batch = pack([b.sft_prompts[k] for k in items], [b.sft_targets[k] for k in items], tok.pad_id,
                 device=model.output_weight.device)
    logp = completion_logprobs(model, batch, temperature=1.0, vocab_limit=tok.vocab_size)
    return {"sft": nll_loss(logp, batch.completion_mask, denominator=b.d.sft)}, {}


PASSES = {"policy": policy_part, "inter_expert": inter_expert_part, "sft": sft_part}


def e7(model, experts: Experts, b: E7Batch, cfg: RielConfig, ref_model=None) -> tuple[torch.Tensor, dict]:
    """E7 on the whole step at once: (L, each part's value by name). Each part over all its rows,
    then L = L_GRPO + β·L_ref + λ1·L_KL + λ2·L_SFT (`total_loss` with the weights of
    meml.losses.E7_PARTS). `backward_e7` computes the same gradient in micro-batches."""
    values = {}
    if b.policy_rows:
        values.update(policy_part(model, experts, b, b.policy_rows, cfg, ref_model)[0])       # E3, E4
    if len(b.plus_rows):
        values.update(inter_expert_part(model, experts, b, torch.arange(len(b.plus_rows)), cfg)[0])  # E5
    if b.sft_targets:
        values.update(sft_part(model, experts, b, range(len(b.sft_targets)), cfg)[0])          # E6
    return total_loss(values, e7_weights(cfg)), values                                           # E7


def micro_batches(b: E7Batch, cfg: RielConfig) -> dict[str, list]:
    """The micro-batches of each pass of `PASSES`: policy rows, whole questions' O+ rows, buffer items."""
    size = cfg.micro_batch_size
    return {"policy": [b.policy_rows[s:s + size] for s in range(0, len(b.policy_rows), size)],
            "inter_expert": _whole_questions(b.plus_question, size),
            "sft": [range(s, min(s + size, len(b.sft_targets))) for s in range(0, len(b.sft_targets), size)]}


def backward_e7(model, experts: Experts, b: E7Batch, batches: dict[str, list], cfg: RielConfig,
                ref_model=None) -> tuple[dict, dict]:
    """E7's gradient, one micro-batch at a time: each micro-batch's share of the parts, weighted
    and summed (`total_loss`), then backward. Returns this rank's sums of the parts' values and
    of the statistics. A None micro-batch (`distributed.equal_passes`) is a pass with weight 0."""
    weights, values, stats = e7_weights(cfg), dict.fromkeys(E7_PARTS, 0.0), Counter()
    for kind, selections in batches.items():
        for selection in selections:
            if selection is None:
                _idle_pass(model, experts.tokenizer, kind)
                continue
            share, counts = PASSES[kind](model, experts, b, selection, cfg, ref_model)
            total_loss(share, weights).backward()                                         # E7
            for name, value in share.items():
                values[name] += value.item()
            stats.update(counts)
    return values, stats


@torch.no_grad()
def recomputed_old_logprobs(model, experts: Experts, ro: Rollouts, batches: list, cfg: RielConfig) -> list:
    """D21: π_old from the training forward, a pass without a graph over the policy rows in the
    micro-batches the updates use (so the first update's ratio is exactly 1). Rows outside them
    keep the sampler's (nothing reads them)."""
    tok, old = experts.tokenizer, list(ro.sampler_logprobs)
    for rows in batches:
        if rows is None:
            _idle_pass(model, tok, "recompute")
            continue
        batch = pack([ro.prompts[r] for r in rows], [ro.completions[r] for r in rows], tok.pad_id,
                     device=model.output_weight.device)
        logp = completion_logprobs(model, batch, temperature=cfg.temperature, vocab_limit=tok.vocab_size)
        for j, r in enumerate(rows):
            old[r] = logp[j, :len(ro.completions[r])].cpu()
    return old


# The passes one micro-batch of each kind makes: forwards without a graph, then (True) a forward
# with a graph and its backward. E5 scores O+ under P+ without a graph first.
_IDLE_PASSES = {"recompute": (1, False), "policy": (0, True), "inter_expert": (1, True), "sft": (0, True)}


def _idle_pass(model, tok, kind: str) -> None:
    """A micro-batch of `kind` on one token with weight 0: the same collectives as a real one
    under FSDP2, a zero gradient."""
    batch = pack([[tok.eot_id]], [[tok.eot_id]], tok.pad_id, device=model.output_weight.device)
    without_graph, with_graph = _IDLE_PASSES[kind]
    with torch.no_grad():
        for _ in range(without_graph):
            completion_logprobs(model, batch, vocab_limit=tok.vocab_size)
    if with_graph:
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
# The step's E7 figures

STATISTICS = ("clip_ratio", "clip_tokens", "gap_sum", "gap_tokens", "tis_sum", "tis_capped")

def e7_metrics(values: dict, stats: dict, d: Denominators, cfg: RielConfig) -> dict:
    """The step's E7 figures from the sums over ranks: each part's value (unweighted), E7's, and
    the statistics as ratios."""
    e7_value = total_loss({name: torch.tensor(value) for name, value in values.items()}, e7_weights(cfg)).item()
    tokens = max(stats["gap_tokens"], 1)
    return {**{part.metric: values[name] for name, part in E7_PARTS.items()}, "loss/total": e7_value,
            "clip_ratio": stats["clip_ratio"] / max(stats["clip_tokens"], 1),
            "logprobs/sampler_trainer_gap": stats["gap_sum"] / tokens,
            "inter_expert/active_questions": d.inter_expert,
            **({"tis/mean_weight": stats["tis_sum"] / tokens, "tis/capped_ratio": stats["tis_capped"] / tokens}
               if cfg.tis_cap is not None else {})}
