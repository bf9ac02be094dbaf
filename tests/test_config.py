"""Options: each defined once (meml/config.py) and reachable as a flag, with its bounds enforced."""
import argparse

import pytest

from meml import advantage, buffer, kl, losses
from meml.config import (PRESETS, RielConfig, TrainConfig, _value_type, add_option_flags, flag_name,
                         flag_options, make_config, overrides_from)
from meml.errors import InputError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    return make_config("meml-grpo", synthetic=False, overrides=overrides_from(parser.parse_args(argv)))


def test_every_option_is_a_flag_that_sets_its_field():
    for key, f in flag_options():
        value = f.metadata["choices"][-1] if f.metadata["choices"] else None
        if _value_type(f) is bool:  # on/off flags, including bool | None ("auto") ones
            argv, value = [f"--no-{flag_name(key)[2:]}"] if f.default else [flag_name(key)], not f.default
        else:
            value = value if value is not None else (1 if f.metadata["at_most"] else 7)
            argv = [flag_name(key), str(value)]
        if key in RATIO_OPTIONS:  # meaningless without a ratio: the default loss has none (an error)
            argv += ["--loss", "clipped"]
        if key == "lora_targets":  # a list of projection names
            value, argv = "q_proj", [flag_name(key), "q_proj"]
        if key == "riel.buffer_control":  # a path
            value, argv = "m.jsonl", [flag_name(key), "m.jsonl"]
        if key in ("lora_alpha", "lora_targets"):  # meaningless without adapters (an error)
            argv += ["--lora-rank", "4"]
        cfg = parse(argv)
        got = getattr(cfg.riel, key[5:]) if key.startswith("riel.") else getattr(cfg, key)
        assert got == value, key


RATIO_OPTIONS = ("riel.clip_eps", "riel.clip_eps_high", "riel.importance_sampling_level")


def test_ratio_options_without_a_ratio_are_refused():
    for key in RATIO_OPTIONS:
        f = dict(flag_options())[key]
        value = f.metadata["choices"][-1] if f.metadata["choices"] else "0.1"
        with pytest.raises(InputError, match=f"{flag_name(key)} applies to a ratio, which --loss paper has none of"):
            parse([flag_name(key), value])


def test_the_decision_options_have_flags_and_their_choices_are_the_modules_own():
    flags = {flag_name(key): f for key, f in flag_options()}
    for name in ("--advantage-scale", "--positive-only", "--loss", "--clip-eps", "--aggregation",
                 "--kl-estimator", "--top-k", "--top-p", "--lambda1", "--lambda2", "--beta",
                 "--buffer-k", "--buffer-target", "--inter-expert-variant", "--advantage-eps"):
        assert name in flags, name
    assert flags["--aggregation"].metadata["choices"] is losses.AGGREGATIONS
    assert flags["--loss"].metadata["choices"] is losses.POLICY_LOSSES
    assert flags["--advantage-scale"].metadata["choices"] is advantage.SCALES
    assert flags["--kl-estimator"].metadata["choices"] is kl.ESTIMATORS
    assert flags["--inter-expert-variant"].metadata["choices"] is kl.INTER_EXPERT_VARIANTS
    assert flags["--buffer-target"].metadata["choices"] is buffer.TARGETS


@pytest.mark.parametrize("argv, message", [
    (["--lambda1", "-0.1"], "--lambda1 -0.1: must be at least 0"),
    (["--lambda2", "-1"], "--lambda2 -1.0: must be at least 0"),
    (["--beta", "-0.04"], "--beta -0.04: must be at least 0"),
    (["--top-p", "1.5"], "--top-p 1.5: must be at most 1"),
    (["--top-p", "0"], "--top-p 0.0: must be greater than 0"),
    (["--temperature", "0"], "--temperature 0.0: must be greater than 0"),
    (["--clip-eps", "-0.2"], "--clip-eps -0.2: must be greater than 0"),
    (["--group-size", "1"], "--group-size 1: must be at least 2"),
    (["--mef-lr", "0"], "--mef-lr 0.0: must be greater than 0"),
    (["--buffer-k", "9"], "--buffer-k 9 must be at most --group-size 8"),
])
def test_impossible_values_are_refused_naming_the_flag(argv, message):
    with pytest.raises(InputError, match=message.replace("+", r"\+")):
        parse(argv)


def test_precedence_default_then_synthetic_then_preset_then_flags():
    assert TrainConfig().mef_lr == 1e-5 and RielConfig().lambda1 == 0.1
    assert make_config("meml-grpo", synthetic=True, overrides={}).mef_lr == 3e-3
    assert make_config("meml-no-iml", synthetic=True, overrides={}).riel.lambda1 == 0.0
    assert make_config("meml-no-iml", synthetic=True, overrides={"riel.lambda1": 0.3}).riel.lambda1 == 0.3
    assert set(PRESETS["moe-sft-grpo"]) <= {key for key, _ in flag_options()} | {"run_riel", "single_expert"}
