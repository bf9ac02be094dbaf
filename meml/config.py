"""Every training option, defined once; the presets for MEML-GRPO, its baselines and ablations.

An option is a dataclass field whose metadata carries its command-line help, its allowed values
and its bounds (`option` below). From that one definition come the `train.py` flag (the field
name with dashes: `clip_eps` -> `--clip-eps`), its default, its help text and its validation,
so nothing is written twice. Allowed values are the tuples of the modules that implement them
(`meml.losses.AGGREGATIONS`, `meml.advantage.SCALES`, ...).

Every preset is the same two stages with some parts switched off or swapped, so a preset is
only a handful of overrides on `TrainConfig`:

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
one epoch each) and the decisions of README.md "Decisions" (D1..). The built-in synthetic world
trains a tiny model from scratch, which needs larger learning rates and fewer, shorter rollouts
to fit a 2-core CPU: SYNTHETIC_SETTINGS. Precedence: dataclass default < synthetic settings <
preset < flags given on the command line.
"""
import argparse
import math
import typing
from dataclasses import dataclass, field, fields, replace

from meml.advantage import SCALES
from meml.buffer import TARGETS
from meml.errors import InputError
from meml.kl import ESTIMATORS, INTER_EXPERT_VARIANTS
from meml.lora import TARGETS as LORA_TARGETS
from meml.losses import AGGREGATIONS, IMPORTANCE_LEVELS, POLICY_LOSSES

SCHEDULES = ("constant", "cosine")


def option(default, help: str, *, choices: tuple | None = None, at_least: float | None = None,
           above: float | None = None, at_most: float | None = None, section: str | None = None):
    """A config field that is also a command-line flag: its help, allowed values and bounds."""
    return field(default=default, metadata={"help": help, "choices": choices, "at_least": at_least,
                                            "above": above, "at_most": at_most, "section": section})


@dataclass
class RielConfig:
    """Stage 2 (E2-E7): how rollouts are sampled and which loss parts a step minimises."""
    # sampling (Stage 2a)
    questions_per_step: int = option(8, "questions per RIEL step", at_least=1,
                                     section="RIEL rollouts (stage 2a)")
    group_size: int = option(8, "G: rollouts per expert per question (paper: 8)", at_least=2)
    max_new_tokens: int = option(256, "rollout length limit, in tokens", at_least=1)
    temperature: float = option(1.0, "sampling temperature; log-probs use the same one", above=0)
    top_k: int = option(0, "sample among the k most likely ids (0: all)", at_least=0)
    top_p: float = option(1.0, "nucleus sampling: the smallest set of ids holding mass p (1: all)",
                          above=0, at_most=1)
    # E2, E3 / E3'
    advantage_scale: str = option("none", "E2: divide r - mean by nothing (paper), the group's std "
                                  "(GRPO) or the batch's std [D3]", choices=SCALES,
                                  section="RIEL loss (E2-E7; [Dn]: README.md, Decisions)")
    advantage_eps: float = option(1e-6, "E2: eps added to the std [D3]", at_least=0)
    positive_only: bool = option(True, "E3: reinforce only above-mean rollouts, max(A, 0) (paper) [D4]")
    loss: str = option("paper", "policy loss: the paper's E3, the clipped surrogate E3', or CISPO (the ratio "
                       "capped and detached as a weight of -A log π, so capped tokens keep a gradient) [D5, D23]",
                       choices=POLICY_LOSSES)
    clip_eps: float | None = option(None, "E3': the ratio is clipped to [1 - eps, 1 + eps_high] (default 0.2; "
                                    "GSPO's 3e-4 at --importance-sampling-level sequence) [D23]", above=0, at_most=1)
    clip_eps_high: float | None = option(None, "E3': the upper bound's eps (DAPO's clip-higher; default --clip-eps, "
                                         "GSPO's 4e-4 at sequence level); CISPO: its weight's cap is 1 + this "
                                         "(default 4) [D23]", above=0)
    num_iterations: int = option(1, "μ: optimizer steps on each rollout batch (TRL's num_iterations, verl's "
                                 "ppo_epochs); the clip of E3' only bites when μ > 1 [D5]", at_least=1)
    recompute_old_logprobs: bool | None = option(None, "π_old from the training forward instead of the sampler's "
                                                 "(default: on unless --dtype float32) [D21]")
    aggregation: str = option("seq_mean_token_mean", "how per-token terms of E3/E4 become one number [D6]",
                              choices=AGGREGATIONS)
    # the GRPO variants a comparison needs (D23-D25)
    importance_sampling_level: str = option("token", "E3'/CISPO's ratio per token (GRPO) or per sequence: the "
                                            "geometric mean of its tokens' ratios, clipped per sequence (GSPO) "
                                            "[D23]", choices=IMPORTANCE_LEVELS, section="GRPO variants (D23-D25)")
    tis_cap: float | None = option(None, "truncated importance sampling: weigh each token's policy term by "
                                   "min(π_old / π_sampler, C), detached; acts when π_old is recomputed [D24]",
                                   above=0)
    mask_truncated: bool = option(False, "completions cut at --max-new-tokens add nothing to E3/E4 (nor to their "
                                  "denominators) [D25]")
    overlong_penalty: int = option(0, "DAPO's soft overlong punishment: over the last L tokens before "
                                   "--max-new-tokens the reward falls linearly to -1, added before E2 (0: off) "
                                   "[D25]", at_least=0)
    dynamic_sampling: int = option(0, "DAPO's dynamic sampling: a question whose N x G rewards are all equal is "
                                   "dropped and the batch refilled from new questions, in at most this many "
                                   "extra rounds (0: off) [D27]", at_least=0)
    beta: float = option(0.0, "weight of the reference-model KL, E4 (0 in MEML, 0.04 for GRPO)", at_least=0,
                         section="RIEL loss, continued (E4-E6)")
    kl_estimator: str = option("k3", "E4's per-token estimator", choices=ESTIMATORS)
    # E5
    lambda1: float = option(0.1, "weight of the inter-expert KL, E5 (0: off) [D9]", at_least=0)
    inter_expert_variant: str = option("sequence", "E5: one-sample estimate summed over O+'s tokens (sequence), "
                                       "the same divided by |O+| (token_mean), or the exact per-token KL over "
                                       "the vocabulary summed over O+ (full_vocab) [D8]",
                                       choices=INTER_EXPERT_VARIANTS)
    # E6
    hard_example_buffer: bool = option(True, "the hard-example buffer, E6")
    buffer_k: int = option(6, "K: a group with more than K of G wrong may enter the buffer [D10]", at_least=0)
    buffer_capacity: int = option(64, "B: buffer size that triggers SFT (paper: 64)", at_least=1)
    buffer_wrong_below: float = option(1.0, "a rollout counts as wrong for the buffer when its reward is below "
                                       "this (1: anything short of full marks; --reward may give partial credit)",
                                       above=0, at_most=1)
    buffer_control: str | None = option(None, "a control for E6: the metrics.jsonl of a run with the buffer; each "
                                        "step this run's buffer takes as many items as that run's took at the same "
                                        "step (buffer/insertions), each a random (question, expert) of this step: "
                                        "as many gold SFT items, on questions not chosen for being hard")
    buffer_target: str = option("gold", "SFT target: the gold worked solution or expert i's own verified "
                                "answer [D11]", choices=TARGETS)
    lambda2: float = option(1.0, "weight of the buffer's SFT loss, E6 [D9]", at_least=0)
    # memory
    micro_batch_size: int = option(64, "rows per forward/backward (memory only: the gradient is the same)",
                                   at_least=1, section="RIEL memory")
    rollout_batch_size: int = option(256, "rows per sampler call (memory only)", at_least=1)


def clip_bounds(r: RielConfig) -> tuple[float, float]:
    """(ε, ε_high) of the chosen objective, its own defaults where not given: E3' 0.2 and ε;
    GSPO (sequence level) 3e-4 and 4e-4, its paper's range (sequence ratios sit much closer to 1
    than token ratios); CISPO a weight cap of 1 + 4 = 5 (it has no lower cap)."""
    if r.loss == "cispo":
        return (r.clip_eps or 0.2), (4.0 if r.clip_eps_high is None else r.clip_eps_high)
    sequence = r.importance_sampling_level == "sequence"
    if r.clip_eps is None:
        low, default_high = (3e-4, 4e-4) if sequence else (0.2, 0.2)
    else:
        low = default_high = r.clip_eps
    return low, default_high if r.clip_eps_high is None else r.clip_eps_high


@dataclass
class TrainConfig:
    preset: str = "meml-grpo"         # set by --preset
    run_mef: bool = True              # set by the preset
    run_riel: bool = True             # set by the preset
    single_expert: bool = False       # set by the ExpertX presets
    expert: int = option(0, "ExpertX presets: which expert's data and prompt", at_least=0, section="method")
    synthetic_teachers: str = option("blind", "synthetic world only: the teachers with their blind spots, the "
                                     "same formats without them (to measure each format's learnability), or the "
                                     "gold solution for every expert (a base that has seen no teacher)",
                                     choices=("blind", "correct", "gold"))
    seed: int = option(0, "seed for data order, sampling and the buffer",
                       section="seed, threads, checkpoints")
    threads: int | None = option(None, "torch CPU threads (None: torch's choice)", at_least=1)
    save_every: int = option(50, "checkpoint every N steps", at_least=1)
    sample_every: int = option(10, "log a completion every N RIEL steps", at_least=1)
    # Stage 1, MEF (E1)
    mef_lr: float = option(1e-5, "MEF learning rate (paper: 1e-5)", above=0, section="stage 1, MEF (E1)")
    mef_epochs: float = option(1.0, "epochs over the expert data (paper: 1)", above=0)
    mef_steps: int | None = option(None, "number of MEF steps (overrides --mef-epochs)", at_least=0)
    mef_batch_size: int = option(16, "(question, expert) answers per MEF step", at_least=1)
    mef_schedule: str = option("constant", "MEF learning rate after warm-up", choices=SCHEDULES)
    warmup_steps: int = option(0, "MEF linear warm-up steps", at_least=0)
    # Stage 2, RIEL (E2-E7)
    riel_lr: float = option(1e-6, "RIEL learning rate (paper: 1e-6)", above=0,
                            section="stage 2, RIEL (E2-E7)")
    riel_epochs: float = option(1.0, "epochs over the training questions (paper: 1)", above=0)
    riel_steps: int | None = option(None, "number of RIEL steps (overrides --riel-epochs)", at_least=0)
    riel: RielConfig = field(default_factory=RielConfig)
    # optimisation, both stages
    grad_clip: float = option(1.0, "clip the gradient's global norm to this", above=0,
                              section="optimiser (both stages)")
    weight_decay: float = option(0.0, "AdamW weight decay", at_least=0)
    # evaluation (E8)
    eval_size: int = option(200, "held-out questions to evaluate on", at_least=0, section="evaluation (E8)")
    eval_max_new_tokens: int = option(256, "completion length limit when evaluating", at_least=1)
    pass_k: int = option(4, "samples per question for pass@k (0: skip)", at_least=0)
    dev_size: int = option(0, "dev questions (held out, apart from the --eval-size ones) on which the one "
                           "best expert is chosen without looking at the eval questions (0: skip)", at_least=0)
    eval_every: int = option(0, "learning curve: evaluate every N RIEL steps, greedy, on the first "
                             "--curve-size held-out questions, logged in metrics.jsonl (0: off)", at_least=0)
    curve_size: int = option(150, "held-out questions of each learning-curve point", at_least=1)
    # memory, both stages
    activation_checkpointing: bool = option(False, "recompute each decoder layer in the backward instead of "
                                            "keeping its activations (less memory, ~1/3 more compute)",
                                            section="memory")
    fsdp: bool = option(False, "under torchrun: shard weights, gradients and AdamW states across the processes "
                        "with FSDP2 (torch.distributed.fsdp.fully_shard) instead of replicating the model; "
                        "the update is the replicated one's")
    # LoRA, both stages (meml/lora.py)
    lora_rank: int = option(0, "r: train low-rank adapters of this rank on the target projections, every "
                            "weight frozen (0: full fine-tuning)", at_least=0, section="LoRA (meml/lora.py)")
    lora_alpha: float | None = option(None, "α: the adapters' output is scaled by α / r (default: α = 2r)", above=0)
    lora_targets: str = option(",".join(LORA_TARGETS), "the projections that get adapters, comma-separated")


_GRPO = {"riel.loss": "clipped", "riel.advantage_scale": "group_std", "riel.positive_only": False,
         "riel.aggregation": "seq_mean_token_mean", "riel.lambda1": 0.0,
         "riel.hard_example_buffer": False, "riel.beta": 0.04}
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
    "meml-no-buffer": {"riel.hard_example_buffer": False},
    "meml-no-iml": {"riel.lambda1": 0.0},
    "meml-no-mef": {"run_mef": False},
}

# Measured in reference_runs/LOG.md (2026-12-06, the blind-spot world): the 0.38M model needs
# ~4000 MEF steps of 16 at lr 3e-3 (cosine) to learn every family reliably across seeds (2400
# left some seeds far behind); from there plain GRPO gains 5-8 points in 300-400 RIEL steps at
# lr 1e-4 (1e-3 collapses), the gain RIEL methods are compared on: 400, since 300 came out at the
# 5-point threshold itself. B = 64, the paper's, so the buffer's SFT runs on few steps. One
# thread: two threads on two busy cores stall for seconds.
SYNTHETIC_SETTINGS = {
    "threads": 1, "mef_lr": 3e-3, "mef_batch_size": 16, "mef_steps": 4000, "mef_schedule": "cosine",
    "warmup_steps": 30, "riel_lr": 1e-4, "riel_steps": 400, "eval_size": 300, "eval_max_new_tokens": 96,
    "riel.questions_per_step": 8, "riel.group_size": 8, "riel.max_new_tokens": 96,
    "riel.buffer_capacity": 64, "riel.micro_batch_size": 256, "save_every": 200, "sample_every": 25,
}


def flag_options() -> list[tuple[str, object]]:
    """(key, dataclass field) of every option that is a flag; keys as overrides name them."""
    out = [(f.name, f) for f in fields(TrainConfig) if "help" in f.metadata]
    return out + [(f"riel.{f.name}", f) for f in fields(RielConfig) if "help" in f.metadata]


def flag_name(key: str) -> str:
    return "--" + key.split(".")[-1].replace("_", "-")


def _value_type(f) -> type:
    """int for `int`, `int | None`; bool, float, str likewise."""
    args = [a for a in typing.get_args(f.type) if a is not type(None)]
    return args[0] if args else f.type


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option, grouped in sections. Flags default to None (not given), so only the
    options a user names override the preset; the help shows the dataclass default and, where
    it differs, the synthetic world's."""
    group = parser
    for key, f in flag_options():
        if f.metadata["section"]:
            group = parser.add_argument_group(f.metadata["section"])
        text = f.metadata["help"] + f" (default {f.default}"
        if key in SYNTHETIC_SETTINGS:
            text += f"; synthetic world {SYNTHETIC_SETTINGS[key]}"
        text = (text + ")").replace("%", "%%")
        kind = _value_type(f)
        if kind is bool:
            group.add_argument(flag_name(key), dest=key, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        else:
            group.add_argument(flag_name(key), dest=key, type=kind, choices=f.metadata["choices"],
                               default=None, help=text, metavar=None if f.metadata["choices"] else kind.__name__.upper())


def overrides_from(args: argparse.Namespace) -> dict:
    """The options given on the command line, as {"key": value}."""
    return {key: getattr(args, key) for key, _ in flag_options() if getattr(args, key, None) is not None}


def with_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """Apply {"name": value} or {"riel.name": value} overrides; unknown names are an error."""
    top, riel = {}, {}
    names = {f.name for f in fields(TrainConfig)}
    riel_names = {f.name for f in fields(RielConfig)}
    for key, value in overrides.items():
        if key.startswith("riel."):
            if key[5:] not in riel_names:
                raise InputError(f"unknown RIEL option {key!r}")
            riel[key[5:]] = value
        elif key in names:
            top[key] = value
        else:
            raise InputError(f"unknown option {key!r}")
    return replace(cfg, **top, riel=replace(cfg.riel, **riel))


def make_config(preset: str, synthetic: bool, overrides: dict) -> TrainConfig:
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = TrainConfig(preset=preset)
    if synthetic:
        cfg = with_overrides(cfg, SYNTHETIC_SETTINGS)
    cfg = with_overrides(cfg, PRESETS[preset])
    cfg = with_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Impossible values and settings that cannot work together, named by their flags."""
    for key, f in flag_options():
        value = getattr(cfg.riel if key.startswith("riel.") else cfg, f.name)
        m, flag = f.metadata, flag_name(key)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{flag} {value}: must be a finite number")
        if m["choices"] and value not in m["choices"]:
            raise InputError(f"{flag} {value!r}: expected one of {', '.join(m['choices'])}")
        if m["at_least"] is not None and value < m["at_least"]:
            raise InputError(f"{flag} {value}: must be at least {m['at_least']}")
        if m["above"] is not None and not value > m["above"]:
            raise InputError(f"{flag} {value}: must be greater than {m['above']}")
        if m["at_most"] is not None and value > m["at_most"]:
            raise InputError(f"{flag} {value}: must be at most {m['at_most']}")
    if cfg.lora_rank and cfg.fsdp:
        raise InputError("--lora-rank with --fsdp: the adapters are small, so LoRA runs replicated (leave out "
                         "--fsdp; the frozen weights can stay bfloat16)")
    if not cfg.lora_rank and (cfg.lora_alpha is not None or cfg.lora_targets != ",".join(LORA_TARGETS)):
        raise InputError(f"{'--lora-alpha' if cfg.lora_alpha is not None else '--lora-targets'} applies to "
                         "adapters: add --lora-rank R (R > 0)")
    unknown = set(cfg.lora_targets.split(",")) - set(LORA_TARGETS)
    if unknown:
        raise InputError(f"--lora-targets {cfg.lora_targets}: {', '.join(sorted(unknown))} is not one of "
                         f"{', '.join(LORA_TARGETS)}")
    r = cfg.riel
    if r.overlong_penalty > r.max_new_tokens:
        raise InputError(f"--overlong-penalty {r.overlong_penalty} must be at most --max-new-tokens "
                         f"{r.max_new_tokens} (the penalty falls over the last L tokens before the limit)")
    if r.loss == "paper" and (r.importance_sampling_level != "token" or r.clip_eps is not None
                              or r.clip_eps_high is not None):
        used = "--importance-sampling-level" if r.importance_sampling_level != "token" else \
            "--clip-eps" if r.clip_eps is not None else "--clip-eps-high"
        raise InputError(f"{used} applies to a ratio, which --loss paper has none of: add --loss clipped or "
                         "--loss cispo")
    if r.loss == "cispo" and r.clip_eps is not None:
        raise InputError("--clip-eps: CISPO has no lower cap on its weight (its cap is 1 + --clip-eps-high)")
    if r.buffer_control is not None and not r.hard_example_buffer:
        raise InputError("--buffer-control is a control for the buffer: leave out --no-hard-example-buffer")
    if r.buffer_k > r.group_size:
        raise InputError(f"--buffer-k {r.buffer_k} must be at most --group-size {r.group_size} "
                         f"(a group with more than K of its G rollouts wrong enters the buffer)")
