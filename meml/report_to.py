"""--report-to tensorboard: what a run logs, also as TensorBoard scalars (an optional extra).

metrics.jsonl stays the record; this mirrors every numeric figure of each of its lines as a
scalar named `<stage>/<key>` (e.g. `riel/reward`, `riel/loss/inter_expert_kl`) at the run's
global step (MEF's steps, then RIEL's), and every logged completion as text. It needs the
`tensorboard` package (`pip install tensorboard`, like matplotlib for the plots); without it
the run stops at start with one line saying so. View with `tensorboard --logdir RUN/tensorboard`.
"""
import importlib
import math
from pathlib import Path

from meml.errors import InputError

CHOICES = ("none", "tensorboard")


def require(choice: str) -> None:
    """Stop at start, in one line, when the chosen reporter cannot be used (every rank checks)."""
    if choice != "tensorboard":
        return
    try:
        importlib.import_module("torch.utils.tensorboard")  # raises without the tensorboard package
    except ImportError:
        raise InputError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                         "(an optional extra; metrics.jsonl has every figure without it)") from None


class TensorBoardReport:
    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run drops the events it is about to log again, as metrics.jsonl does
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def __call__(self, stage: str, global_step: int, metrics: dict, samples: list | None) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "stage") \
                    and math.isfinite(value):
                self.writer.add_scalar(f"{stage}/{key}", value, global_step)
        for i, sample in enumerate(samples or []):
            self.writer.add_text(f"{stage}/sample_{i}", f"expert {sample['expert']}, reward {sample['reward']}: "
                                 f"{sample['text']}", global_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_report(choice: str, run_dir: Path, resumed_at: int | None = None):
    """The --report-to choice as a callable (stage, global step, metrics, samples), or None.
    resumed_at: the global step of the checkpoint a resumed run continues from."""
    if choice != "tensorboard":
        return None
    return TensorBoardReport(Path(run_dir) / "tensorboard", None if resumed_at is None else resumed_at + 1)
