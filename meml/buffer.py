"""The hard-example buffer of E6: questions an expert mostly fails are replayed as SFT.

For every (question, expert i) group of G rollouts, if more than K are wrong (decision D10 in
README.md: strictly more than K), the item is added with probability K/G.
When the buffer holds `capacity` items, the trainer pops them all, adds
L_SFT = −mean log π_θ(S | Q, P) (`meml.losses.nll_loss`) to that step's loss (E7), and the
buffer starts empty again (decision D12: cleared, not a sliding window).

The buffer does not know what an item is: the trainer stores whatever lets it rebuild the
(Q, P_i, S) triple later, e.g. (example_id, expert). Which target S to use (the gold worked
solution by default, or expert i's own reference answer) is the trainer's option.
The coin flips come from the buffer's own seeded torch.Generator, saved in `state_dict()`,
so a resumed run makes the same choices as an uninterrupted one.
"""
import json
from pathlib import Path
from typing import Any

import torch

from meml.errors import InputError

TARGETS = ("gold", "expert")  # the SFT target S: gold worked solution, or expert i's verified answer


class HardExampleBuffer:
    """E6 buffer. capacity = B (64), k = K (6), g = G (8): insertion probability k / g."""

    def __init__(self, capacity: int = 64, k: int = 6, g: int = 8, seed: int = 0, quota: list[int] | None = None):
        if not 0 <= k <= g:
            raise ValueError(f"need 0 <= k <= g for an insertion probability k/g; got k={k}, g={g}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1; got {capacity}")
        self.capacity, self.k, self.g = capacity, k, g
        self.items: list[Any] = []
        self.num_dropped = 0  # selected while full (the trainer should pop before adding more)
        self.generator = torch.Generator().manual_seed(seed)
        # The buffer control (--buffer-control): `quota` holds, per step, how many items another
        # run's buffer took; this buffer takes that many random (question, expert) of its own
        # step instead of hard ones, drawn from a stream of its own.
        self.quota, self.steps = quota, 0
        self.control = torch.Generator().manual_seed(1_000_003 + seed) if quota is not None else None

    @property
    def insert_probability(self) -> float:
        return self.k / self.g

    def __len__(self) -> int:
        return len(self.items)

    @property
    def is_full(self) -> bool:
        return len(self.items) >= self.capacity

    def maybe_add(self, item: Any, num_wrong: int) -> bool:
        """Add `item` if num_wrong > k, with probability k/g. Returns whether it was added.

        The coin is flipped only for eligible groups, so ineligible calls leave the random
        stream untouched. An item selected while the buffer is full is dropped and counted.
        """
        if num_wrong <= self.k:
            return False
        if torch.rand((), generator=self.generator).item() >= self.insert_probability:
            return False
        return self.add(item)

    def add(self, item: Any) -> bool:
        if self.is_full:
            self.num_dropped += 1
            return False
        self.items.append(item)
        return True

    def control_draws(self, pool: list) -> list:
        """The control's items for this step: as many as the matched run's buffer took at the
        same step (none past its last step), each drawn uniformly from `pool`."""
        n = self.quota[self.steps] if self.steps < len(self.quota) else 0
        self.steps += 1
        return [pool[int(torch.randint(len(pool), (), generator=self.control))] for _ in range(n)]

    def pop_batch(self) -> list[Any]:
        """Return every stored item (the L_SFT batch) and empty the buffer."""
        items, self.items = self.items, []
        return items

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "k": self.k,
            "g": self.g,
            "items": list(self.items),
            "num_dropped": self.num_dropped,
            "generator_state": self.generator.get_state(),
            **({"control_state": self.control.get_state(), "control_steps": self.steps}
               if self.control is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.control is None) != ("control_state" not in state):
            raise InputError("the buffer checkpoint was written with" + (" " if self.control is None else "out ")
                             + "--buffer-control; resume with the same setting")
        for name in ("capacity", "k", "g"):
            if state[name] != getattr(self, name):
                raise InputError(f"buffer checkpoint has {name}={state[name]} but this buffer "
                                 f"was built with {name}={getattr(self, name)}; build it with "
                                 f"the checkpoint's settings to resume")
        self.items = list(state["items"])
        self.num_dropped = state["num_dropped"]
        self.generator.set_state(state["generator_state"])
        if self.control is not None:
            self.control.set_state(state["control_state"])
            self.steps = state["control_steps"]


def quota_from_metrics(path: str) -> list[int]:
    """--buffer-control: per RIEL step, how many items the matched run's buffer took."""
    taken = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--buffer-control {path}: cannot read it ({err.__class__.__name__})") from None
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            raise InputError(f"{path}:{n}: not a JSON line of a metrics.jsonl") from None
        if row.get("stage") == "riel" and "buffer/insertions" in row:
            taken.setdefault(row["step"], row["buffer/insertions"])  # the first line of a step (μ > 1)
    if not taken:
        raise InputError(f"--buffer-control {path}: no RIEL step with buffer/insertions in it (name the "
                         "metrics.jsonl of a run with the hard-example buffer)")
    return [taken.get(step, 0) for step in range(min(taken), max(taken) + 1)]
