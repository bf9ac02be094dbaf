"""One config for a training run, and the presets for MEML-GRPO, its baselines and ablations.

Every preset is the same two stages with some parts switched off or swapped (METHOD.md,
"Baselines"), so a preset is only a handful of overrides on `TrainConfig`:

  preset               MEF experts   RIEL loss                             E5   E6   E4 β
  expert-sft           one (X)       -                                     -    -    -
  moe-sft              all           -                                     -    -    -
  expert-sft-grpo      one (X)       clipped, group-std A, seq-mean        off  off  0.04
  expert-sft-dr-grpo   one (X)       clipped, A = r - mean, Dr.GRPO sum    off  off  0
  moe-sft-grpo         all           clipped, group-std A, seq-mean        off  off  0.04
  moe-sft-dr-grpo      all           clipped, A = r - mean, Dr.GRPO sum    off  off  0
  meml-grpo            all           paper E3: max(A, 0), A = r - mean     on   on   0
  meml-no-buffer       all           as meml-grpo                          on   off  0
  meml-no-iml          all           as meml-grpo                          off  on   0
  meml-no-mef          none          as meml-grpo                          on   on   0

The dataclass defaults are the paper's settings (lr 1e-5 MEF, 1e-6 RIEL, G = 8, K = 6, B = 64,
one epoch each). The built-in synthetic world trains a tiny model from scratch, which needs
larger learning rates and fewer, shorter rollouts to fit a 2-core CPU: SYNTHETIC_SETTINGS.
"""
from dataclasses import dataclass, field, fields, replace

from meml.riel import RielConfig


@dataclass
class TrainConfig:
    preset: str = "meml-grpo"
    expert: int = 0                   # ExpertX presets: which expert's data and prompt
    run_mef: bool = True
    run_riel: bool = True
    single_expert: bool = False       # ExpertX presets
    seed: int = 0
    threads: int | None = None        # torch CPU threads (None: torch's default)
    # Stage 1, MEF (E1)
    mef_lr: float = 1e-5
    mef_epochs: float = 1.0
    mef_batch_size: int = 16
    mef_steps: int | None = None      # overrides mef_epochs
    mef_schedule: str = "constant"    # "constant" | "cosine"
    # Stage 2, RIEL (E2-E7)
    riel_lr: float = 1e-6
    riel_epochs: float = 1.0
    riel_steps: int | None = None     # overrides riel_epochs
    riel: RielConfig = field(default_factory=RielConfig)
    # optimisation
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # evaluation (E8)
    eval_size: int = 200
    eval_max_new_tokens: int = 256
    pass_k: int = 4                   # samples per question for pass@k (0: skip)
    # run
    save_every: int = 50
    log_every: int = 1
    sample_every: int = 10


_GRPO = {"riel.loss": "clipped", "riel.advantage_scale": "group_std", "riel.positive_only": False,
         "riel.aggregation": "seq_mean_token_mean", "riel.inter_expert_weight": 0.0,
         "riel.use_buffer": False, "riel.beta": 0.04}
_DR_GRPO = {**_GRPO, "riel.advantage_scale": "none", "riel.aggregation": "dr_grpo", "riel.beta": 0.0}
_ONE = {"single_expert": True}

PRESETS: dict[str, dict] = {
    "expert-sft": {**_ONE, "run_riel": False},
    "moe-sft": {"run_riel": False},
    "expert-sft-grpo": {**_ONE, **_GRPO},
    "expert-sft-dr-grpo": {**_ONE, **_DR_GRPO},
    "moe-sft-grpo": _GRPO,
    "moe-sft-dr-grpo": _DR_GRPO,
    "meml-grpo": {},
    "meml-no-buffer": {"riel.use_buffer": False},
    "meml-no-iml": {"riel.inter_expert_weight": 0.0},
    "meml-no-mef": {"run_mef": False},
}

# Measured in reference_runs/LOG.md ("synthetic world"): a 0.38M model learns 1-step problems
# in ~2400 MEF steps of 16 at lr 3e-3 with cosine decay, while 3-step ones stay mostly wrong, so
# RIEL meets real reward sparsity. One thread: two threads on two busy cores stall for seconds.
SYNTHETIC_SETTINGS = {
    "threads": 1, "mef_lr": 3e-3, "mef_batch_size": 16, "mef_steps": 2400, "mef_schedule": "cosine",
    "warmup_steps": 30, "riel_lr": 1e-4, "riel_steps": 200, "eval_size": 300, "eval_max_new_tokens": 96,
    "riel.questions_per_step": 8, "riel.group_size": 8, "riel.max_new_tokens": 96,
    "riel.buffer_capacity": 16, "riel.micro_batch_size": 256, "save_every": 200, "sample_every": 25,
}


def with_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """Apply {"name": value} or {"riel.name": value} overrides; unknown names are an error."""
    top, riel = {}, {}
    names = {f.name for f in fields(TrainConfig)}
    riel_names = {f.name for f in fields(RielConfig)}
    for key, value in overrides.items():
        if key.startswith("riel."):
            if key[5:] not in riel_names:
                raise ValueError(f"unknown RIEL option {key!r}")
            riel[key[5:]] = value
        elif key in names:
            top[key] = value
        else:
            raise ValueError(f"unknown option {key!r}")
    return replace(cfg, **top, riel=replace(cfg.riel, **riel))


def make_config(preset: str, synthetic: bool, overrides: dict) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = TrainConfig(preset=preset)
    if synthetic:
        cfg = with_overrides(cfg, SYNTHETIC_SETTINGS)
    cfg = with_overrides(cfg, PRESETS[preset])
    cfg = with_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Settings that cannot work together, named by their command-line options."""
    r = cfg.riel
    if cfg.mef_schedule not in ("constant", "cosine"):
        raise ValueError(f"--mef-schedule {cfg.mef_schedule!r}: expected 'constant' or 'cosine'")
    if not 0 <= r.buffer_k <= r.group_size:
        raise ValueError(f"--buffer-k {r.buffer_k} must be between 0 and --group-size {r.group_size} "
                         f"(a group with more than K of its G rollouts wrong enters the buffer)")
    if r.group_size < 2 and cfg.run_riel:
        raise ValueError(f"--group-size {r.group_size}: group advantages (E2) need at least 2 rollouts")
    choices = {"advantage_scale": ("none", "group_std", "batch_std"), "loss": ("paper", "clipped"),
               "aggregation": ("token_mean", "seq_mean_token_mean", "dr_grpo"),
               "inter_expert_variant": ("sequence", "full_vocab"), "buffer_target": ("gold", "expert"),
               "kl_estimator": ("k1", "k2", "k3")}
    for name, allowed in choices.items():
        if getattr(r, name) not in allowed:
            raise ValueError(f"riel.{name}={getattr(r, name)!r}: expected one of {allowed}")
