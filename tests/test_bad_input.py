"""The one-line contract, as a table: a user's mistake ends in `<script>: <what and where>` on
one line of stderr and exit status 2, never a traceback, and loses nothing already written.

Each row is a case an outside fuzz found (a careless or unlucky user: flags that do not apply,
bad numbers, malformed configs, tokenizers and data, a folder already in use); the message
fragment is what the line must name. `main` is called in-process: anything but the one line
(an exception of any other kind) escapes it and fails the test with its traceback.
"""
import json
import math
import shutil

import pytest
import torch

from conftest import REPO_ROOT

import sys
sys.path.insert(0, str(REPO_ROOT))
import evaluate  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-weight checkpoint of the synthetic world's shape, with its tokenizer."""
    from meml import synthetic_assets
    from meml.model import ModelConfig, Transformer
    folder = synthetic_assets.write_synthetic_assets(tmp_path_factory.mktemp("model"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_json(folder / "config.json"))
    model.init_weights()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"Mia has {n} apples and buys {n + 1} more. How many now?",
                                        "answer": f"{n} + {n + 1} = {2 * n + 1}\n#### {2 * n + 1}"}) + "\n"
                            for n in range(8)))
    return path


def _one_line(capsys, script: str, code: int, expected: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{script}: "), err
    assert expected in lines[0], lines[0]
    return lines[0]


def _with_config(model_dir, tmp_path, **changes):
    """A copy of the checkpoint with config.json fields changed (None: removed)."""
    folder = tmp_path / "edited"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


SYNTHETIC = ["--mef-steps", "1", "--riel-steps", "1", "--train-size", "8", "--eval-size", "2", "--pass-k", "0",
             "--max-new-tokens", "4", "--eval-max-new-tokens", "4", "--questions-per-step", "1", "--group-size", "2",
             "--buffer-k", "1", "--mef-batch-size", "4"]


# (flags, fragment of the one line); {out} is a fresh run folder, {data} a GSM8K file, {model} a checkpoint
TRAIN_CASES = [
    # flags that do not apply to the synthetic world (item 7)
    (["--dataset", "gsm8k", "--data", "/nonexistent.jsonl"], "--dataset needs --model"),
    (["--data", "{data}"], "--data needs --model"),
    (["--expert-data", "{data}"], "--expert-data needs --model"),
    (["--eval-data", "{data}"], "--eval-data needs --model"),
    (["--system-prompts", "/nonexistent.json"], "--system-prompts needs --model"),
    (["--teacher", "{model}"], "--teacher needs --model"),
    (["--model", "{model}", "--dataset", "gsm8k", "--data", "{data}", "--synthetic-teachers", "gold"],
     "--synthetic-teachers picks the built-in world's teachers"),
    (["--synthetic-teachers", "perfect"], "argument --synthetic-teachers: invalid choice"),
    (["--buffer-control", "{data}", "--no-hard-example-buffer"], "--buffer-control is a control for the buffer"),
    (["--buffer-control", "{data}"], "no RIEL step with buffer/insertions"),
    # numbers that cannot work (item 9)
    (["--lambda1", "nan"], "--lambda1 nan: must be a finite number"),
    (["--beta", "inf"], "--beta inf: must be a finite number"),
    (["--riel-lr", "inf"], "--riel-lr inf: must be a finite number"),
    (["--mef-lr", "nan"], "--mef-lr nan: must be a finite number"),
    (["--clip-eps-high", "inf"], "--clip-eps-high inf: must be a finite number"),
    (["--train-size", "-5"], "argument --train-size: -5: must be at least 1"),
    (["--dtype", "float16"], "argument --dtype: invalid choice"),
    (["--group-size", "two"], "argument --group-size: invalid int value"),
    # devices (item 12)
    (["--device", "foo"], "--device foo: not a device name"),
    # the run folder (item 1)
    (["--output", ""], "--output must name a run folder"),
]


@pytest.mark.parametrize("flags, expected", TRAIN_CASES, ids=[" ".join(f)[:40] for f, _ in TRAIN_CASES])
def test_train_flags(flags, expected, tmp_path, capsys, gsm8k, model_dir):
    fill = {"{data}": str(gsm8k), "{model}": str(model_dir)}
    args = ["--output", str(tmp_path / "run")] + [fill.get(f, f) for f in flags]
    _one_line(capsys, "train.py", train.main(args + SYNTHETIC), expected)
    assert not (tmp_path / "run" / "args.json").exists()  # refused before anything was written


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _one_line(capsys, "train.py", train.main(["--device", "cuda", "--output", str(tmp_path)] + SYNTHETIC),
              "--device cuda: this machine has no CUDA device")
    _one_line(capsys, "evaluate.py", evaluate.main(["--model", str(tmp_path), "--device", "cuda"]),
              "--device cuda: this machine has no CUDA device")


# config.json fields a user's checkpoint may get wrong (item 12)
CONFIG_CASES = [
    ({"model_type": "mistral"}, "model_type='mistral' is not supported"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 is not supported: must divide num_attention_heads=4"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
    ({"vocab_size": -5}, "vocab_size=-5 must be a positive integer"),
    ({"hidden_size": "96"}, "hidden_size='96' must be a positive integer"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps='1e-6' must be a positive number"),
    ({"max_position_embeddings": 0}, "max_position_embeddings=0 must be a positive integer"),
]


@pytest.mark.parametrize("changes, expected", CONFIG_CASES, ids=[next(iter(c)) for c, _ in CONFIG_CASES])
def test_a_config_meml_cannot_run_is_one_line_naming_the_file_and_field(changes, expected, tmp_path, capsys,
                                                                         model_dir, gsm8k):
    folder = _with_config(model_dir, tmp_path, **changes)
    args = ["--model", str(folder), "--dataset", "gsm8k", "--data", str(gsm8k), "--output", str(tmp_path / "run"),
            "--eval-size", "2"]
    line = _one_line(capsys, "train.py", train.main(args), expected)
    assert str(folder / "config.json") in line
    line = _one_line(capsys, "evaluate.py", evaluate.main(["--model", str(folder), "--dataset", "synthetic"]), expected)


def test_a_corrupt_tokenizer_json_is_named(tmp_path, capsys, model_dir, gsm8k):
    folder = _with_config(model_dir, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}')
    _one_line(capsys, "evaluate.py", evaluate.main(["--model", str(folder), "--dataset", "synthetic"]),
              f"{folder / 'tokenizer.json'}: not a readable tokenizer file")


def test_a_model_whose_vocabulary_misses_ordinary_tokens_is_refused(tmp_path, capsys):
    """Special tokens first (ids 0-2), 200 ordinary ones after: a model of 64 rows covers every id
    the chat format needs but not the text's tokens (which would index past its embedding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from meml import synthetic_assets
    from meml.model import ModelConfig, Transformer
    folder = synthetic_assets.write_synthetic_assets(tmp_path / "model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([f"Mia has {n} apples and {n * 7} pears." for n in range(300)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=list(synthetic_assets.SPECIAL_TOKENS),
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "config.json").read_text())
    config.update(vocab_size=64, bos_token_id=0, eos_token_id=2)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    model = Transformer(ModelConfig.from_json(folder / "config.json"))
    model.init_weights()
    model.save_pretrained(folder)
    _one_line(capsys, "evaluate.py", evaluate.main(["--model", str(folder), "--dataset", "synthetic"]),
              "the tokenizer's ordinary tokens reach id")


def _prompts(tmp_path, prompts):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    return path


def _expert_file(tmp_path, lines):
    path = tmp_path / "expert.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _run_on(model_dir, gsm8k, tmp_path, *extra):
    return ["--model", str(model_dir), "--dataset", "gsm8k", "--data", str(gsm8k), "--output",
            str(tmp_path / "run"), "--eval-size", "2", "--mef-steps", "1", "--riel-steps", "1", "--pass-k", "0",
            "--max-new-tokens", "4", "--eval-max-new-tokens", "4", "--questions-per-step", "1", "--group-size", "2",
            "--buffer-k", "1", "--mef-batch-size", "2"] + list(extra)


def test_expert_data_for_an_expert_without_a_prompt_is_refused(tmp_path, capsys, model_dir, gsm8k):
    expert = _expert_file(tmp_path, [{"id": f"gsm8k-train-{n}", "expert": 3, "response": "#### 1"} for n in (1, 2)])
    _one_line(capsys, "train.py", train.main(_run_on(model_dir, gsm8k, tmp_path, "--expert-data", str(expert))),
              f"{expert}: 2 answers are for expert 3 or later, but there are only 3 expert prompts")


def test_two_different_answers_of_one_expert_to_one_question_are_refused(tmp_path, capsys, model_dir, gsm8k):
    expert = _expert_file(tmp_path, [{"id": "gsm8k-train-1", "expert": 1, "response": "#### 1"},
                                     {"id": "gsm8k-train-1", "expert": 1, "response": "#### 2"}])
    _one_line(capsys, "train.py", train.main(_run_on(model_dir, gsm8k, tmp_path, "--expert-data", str(expert))),
              "two different answers of expert 1 to question 'gsm8k-train-1'")


def test_a_repeated_answer_line_trains_once(tmp_path, capsys, model_dir, gsm8k):
    """The same line twice weighed double in MEF: it now counts once, with a note."""
    line = {"id": "gsm8k-train-1", "expert": 1, "response": "0 + 1 = 1\n#### 1"}
    expert = _expert_file(tmp_path, [line, line, line])
    assert train.main(_run_on(model_dir, gsm8k, tmp_path, "--expert-data", str(expert), "--riel-steps", "0")) == 0
    out = capsys.readouterr().out
    assert f"{expert}: 2 repeated answers (same question, expert and text) counted once" in out
    # 6 training questions: 6 gold answers of expert 0 and 1 of expert 1 (not 3)
    assert "MEF: 7 answers from experts [0, 1, 2]" in out


def test_identical_system_prompts_are_refused(tmp_path, capsys, model_dir, gsm8k):
    prompts = _prompts(tmp_path, ["Be brief.", "Be thorough.", "Be brief."])
    _one_line(capsys, "train.py", train.main(_run_on(model_dir, gsm8k, tmp_path, "--system-prompts", str(prompts))),
              f"{prompts}: prompts 0 and 2 are the same text")


def test_one_expert_with_the_inter_expert_kl_on_is_refused(tmp_path, capsys, model_dir, gsm8k):
    prompts = _prompts(tmp_path, ["Be brief."])
    _one_line(capsys, "train.py", train.main(_run_on(model_dir, gsm8k, tmp_path, "--system-prompts", str(prompts))),
              "one expert prompt, but the inter-expert KL (E5, --lambda1 0.1) needs two experts or more")
    assert train.main(_run_on(model_dir, gsm8k, tmp_path, "--system-prompts", str(prompts), "--lambda1", "0")) == 0


def test_an_over_long_question_is_named_before_anything_is_allocated(tmp_path, capsys, model_dir, gsm8k):
    """A 5 MB question once asked for a 390 GB allocation; the check names it instead (the
    synthetic checkpoint's context is 512 tokens)."""
    data = tmp_path / "long.jsonl"
    data.write_text(gsm8k.read_text() + json.dumps({"question": "How many? " + "apples " * 700_000,
                                                    "answer": "#### 3"}) + "\n")
    _one_line(capsys, "train.py", train.main(_run_on(model_dir, data, tmp_path, "--eval-size", "1")),
              "held-out question 'gsm8k-long-9': its prompt is")
    short = tmp_path / "short.jsonl"  # fits alone, but not with --max-new-tokens 500 on top
    short.write_text(gsm8k.read_text())
    _one_line(capsys, "train.py", train.main(_run_on(model_dir, short, tmp_path, "--max-new-tokens", "500")),
              "exceeds the model's context of 512 (max_position_embeddings)")


# evaluate.py's flags (items 9 and 12)
EVALUATE_CASES = [
    (["--pass-k", "-2"], "argument --pass-k: -2: must be at least 0"),
    (["--batch-size", "0"], "argument --batch-size: 0: must be at least 1"),
    (["--limit", "-1"], "argument --limit: -1: must be at least 1"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0: must be at least 1"),
    (["--device", "foo"], "--device foo: not a device name"),
    (["--json", "/nonexistent-folder/results.json"], "--json /nonexistent-folder/results.json: folder"),
]


@pytest.mark.parametrize("flags, expected", EVALUATE_CASES, ids=[f[0] for f, _ in EVALUATE_CASES])
def test_evaluate_flags(flags, expected, capsys, model_dir):
    _one_line(capsys, "evaluate.py", evaluate.main(["--model", str(model_dir), "--dataset", "synthetic"] + flags),
              expected)


def test_a_corrupt_run_info_is_named(tmp_path, capsys, model_dir):
    folder = _with_config(model_dir, tmp_path)
    (folder / "meml_run.json").write_text('{"dataset": "synth')
    _one_line(capsys, "evaluate.py", evaluate.main(["--model", str(folder)]),
              f"{folder / 'meml_run.json'}: not the JSON object train.py writes")


def test_resume_with_a_corrupt_args_json_is_named(tmp_path, capsys):
    (tmp_path / "args.json").write_text("--mef-steps 3")
    _one_line(capsys, "train.py", train.main(["--resume", str(tmp_path)]),
              f"{tmp_path / 'args.json'}: not the JSON list of arguments train.py writes")
    assert (tmp_path / "args.json").read_text() == "--mef-steps 3"


def test_the_finite_check_covers_every_float_option():
    """Every float option of meml/config.py refuses NaN and infinity (a table above lists only
    some): a new float option gets the check by being an option."""
    from meml.config import flag_name, flag_options, make_config
    from meml.errors import InputError
    floats = [key for key, f in flag_options() if f.type in (float, "float", float | None, "float | None")]
    assert len(floats) >= 10
    for key in floats:
        for bad in (math.nan, math.inf):
            with pytest.raises(InputError, match=f"{flag_name(key)} {bad}: must be a finite number"):
                make_config("meml-grpo", synthetic=True, overrides={key: bad})


def test_plan_takes_a_positive_size_and_plans_for_a_gpu_this_machine_lacks(tmp_path, capsys, monkeypatch):
    for bad in ("nan", "inf", "-5", "0"):
        _one_line(capsys, "train.py", train.main(["--plan", bad]), f"argument --plan: {bad}: must be a finite number")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--plan", "80", "--device", "cuda"]) == 0  # no CUDA needed to plan for one
    out = capsys.readouterr().out
    assert "compute torch.bfloat16" in out and "of 80.00 GB (the size asked for)" in out


def test_cispo_refuses_a_lower_clip_it_does_not_have(capsys):
    from meml.config import make_config
    from meml.errors import InputError
    with pytest.raises(InputError, match="--clip-eps: CISPO has no lower cap"):
        make_config("meml-grpo", synthetic=True, overrides={"riel.loss": "cispo", "riel.clip_eps": 0.1})
