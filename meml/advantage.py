"""Intra-expert advantages (E2 in README.md) and the reward statistics a trainer logs.

A "group" is the G rollouts one expert produced for one question, so rewards arrive as a tensor
[Q, N, G] (questions x experts x rollouts) and every statistic is taken over the last axis.
This is GRPO's group baseline applied per expert: experts never share a baseline, which is what
makes each expert's advantage "intra-expert".

Departures from textbook GRPO, each a named option (decisions D3 and D4 in README.md):
- std scaling is optional (`scale="none" | "group_std" | "batch_std"`); the std uses ddof=0
  (population std, as GRPO's paper writes it) and eps=1e-6 is added to the denominator;
- a group whose rewards are all equal carries no signal and gets advantage exactly 0, whatever
  the scaling (floating-point `r - mean` could otherwise leave a 1e-17 residue);
- the paper's positive-part clamp max(A, 0) of E3 is `positive_only=True`.
"""
import torch

SCALES = ("none", "group_std", "batch_std")


def group_advantages(
    rewards: torch.Tensor,
    scale: str = "none",
    eps: float = 1e-6,
    positive_only: bool = False,
) -> torch.Tensor:
    """E2: A_g^i = r(O_g^i) - mean_g' r(O_g'^i), optionally divided by a std, optionally clamped.

    rewards: [..., G] float; the last axis is one group (one question, one expert).
    scale:
      "none"      A = r - mean                                   (the paper's E2 as printed)
      "group_std" A = (r - mean) / (std_group + eps)             (GRPO; std over the G rollouts)
      "batch_std" A = (r - mean) / (std_batch + eps)             (std over every reward in
                                                                  `rewards`, all groups at once)
      Both stds use ddof=0. The group mean is always the group's own.
    positive_only: return max(A, 0), the clamp E3 applies (only above-mean rollouts reinforced).
    Returns advantages with the shape of `rewards`; all-equal groups are exactly 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {SCALES}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=-1, keepdim=True)  # [..., G]
    if scale == "group_std":
        centred = centred / (rewards.std(dim=-1, correction=0, keepdim=True) + eps)
    elif scale == "batch_std":
        centred = centred / (rewards.std(correction=0) + eps)
    # An all-equal group has no signal: force exactly 0 rather than trusting float cancellation.
    no_signal = all_equal_groups(rewards).unsqueeze(-1)  # [..., 1]
    advantages = centred.masked_fill(no_signal, 0.0)
    if positive_only:
        advantages = advantages.clamp(min=0.0)
    return advantages


def all_equal_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[..., G] -> [...] bool: True where every rollout of the group got the same reward."""
    return rewards.amax(dim=-1) == rewards.amin(dim=-1)


def zero_signal_fraction(rewards: torch.Tensor) -> torch.Tensor:
    """[Q, N, G] -> [N]: per expert, the fraction of questions whose G rewards are all equal.

    Such groups have advantage 0 under E2, so they contribute nothing to the policy gradient.
    """
    return all_equal_groups(rewards).float().mean(dim=0)


def reward_stats(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """[Q, N, G] -> per-expert statistics a trainer logs, each a tensor [N]:

    mean_reward   mean reward (accuracy for 0/1 rewards) over questions and rollouts
    zero_signal   fraction of groups with all rewards equal (= all_correct + all_wrong for 0/1)
    all_correct   fraction of groups where every rollout got reward 1
    all_wrong     fraction of groups where every rollout got reward 0
    """
    rewards = rewards.float()
    return {
        "mean_reward": rewards.mean(dim=(0, 2)),
        "zero_signal": zero_signal_fraction(rewards),
        "all_correct": (rewards == 1).all(dim=-1).float().mean(dim=0),
        "all_wrong": (rewards == 0).all(dim=-1).float().mean(dim=0),
    }
