"""The whole pipeline on the synthetic world, in seconds: presets, resume, the NaN guard.

Every run here is `train.py` itself (in-process through `main`, or as a subprocess where it
must be killed), with tiny step counts: what is checked is the plumbing a user relies on, not
accuracy.
"""
import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
import train  # noqa: E402
from meml.config import PRESETS  # noqa: E402

TINY = ["--train-size", "16", "--eval-size", "2", "--pass-k", "0", "--max-new-tokens", "8", "--eval-max-new-tokens", "8",
        "--questions-per-step", "2", "--group-size", "4", "--buffer-k", "2", "--mef-batch-size", "8"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_runs_a_step(preset, tmp_path):
    assert train.main(["--preset", preset, "--output", str(tmp_path), "--mef-steps", "1", "--riel-steps", "1"] + TINY) == 0
    rows = metrics(tmp_path)
    stages = [r["stage"] for r in rows]
    cfg = PRESETS[preset]
    assert stages.count("mef") == (0 if cfg.get("run_mef") is False else 1)
    assert stages.count("riel") == (0 if cfg.get("run_riel") is False else 1)
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss/"))
    if "riel" in stages:
        riel = rows[-1]
        num_experts = 1 if cfg.get("single_expert") else 3
        assert [k for k in riel if k.startswith("rewards/expert_") and k.endswith("/mean")] == \
            [f"rewards/expert_{i}/mean" for i in range(num_experts)]
        results = json.loads((tmp_path / "results.json").read_text())["results"]
        assert len(results["after RIEL"]["accuracy"]) == num_experts


def test_a_few_steps_of_mef_and_riel(tmp_path):
    """Loss parts present and finite, the buffer fills and triggers SFT, checkpoints round-trip."""
    args = ["--output", str(tmp_path), "--mef-steps", "2", "--riel-steps", "3", "--buffer-capacity", "2",
            "--save-every", "1"] + TINY
    assert train.main(args) == 0
    rows = metrics(tmp_path)
    riel = [r for r in rows if r["stage"] == "riel"]
    assert [r["step"] for r in rows] == [1, 2, 1, 2, 3]
    for r in riel:
        for part in ("loss/policy", "loss/inter_expert_kl", "loss/sft", "loss/total"):
            assert math.isfinite(r[part])
    # An untrained model gets (almost) everything wrong: every group has > K = 2 of 4 wrong, so
    # each step offers 6 groups to the buffer; at capacity 2 it must fill and trigger SFT.
    assert sum(r["buffer/insertions"] for r in riel) > 0
    assert sum(r["buffer/sft_triggers"] for r in riel) > 0 and any(r["loss/sft"] > 0 for r in riel)
    # The last checkpoint loads in our decoder and in transformers with the same logits.
    transformers = pytest.importorskip("transformers")
    from meml.model import Transformer
    last = tmp_path / "checkpoint-000005"
    ours = Transformer.from_pretrained(last).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4)
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    assert state["stage"] == "riel" and state["step"] == 3 and "buffer" in state["extra"]


def _weights(checkpoint):
    return load_file(str(checkpoint / "model.safetensors"))


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    args = ["--mef-steps", "2", "--riel-steps", "5", "--save-every", "1", "--buffer-capacity", "3"] + TINY
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert train.main(["--output", str(whole)] + args) == 0

    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), "--output", str(killed)] + args,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoint-000004"  # two RIEL steps done
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run never reached its second RIEL checkpoint"
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"

    assert train.main(["--resume", str(killed)]) == 0
    final_whole, final_resumed = _weights(whole / "checkpoint-000007"), _weights(killed / "checkpoint-000007")
    assert final_whole.keys() == final_resumed.keys()
    for name in final_whole:
        assert torch.equal(final_whole[name], final_resumed[name]), name
    steps = [(r["stage"], r["step"]) for r in metrics(killed)]
    assert steps == [("mef", 1), ("mef", 2)] + [("riel", s) for s in range(1, 6)]  # no step logged twice


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys):
    # A learning rate of 1e30 blows the weights up after the first step; the next loss is not finite.
    args = ["--output", str(tmp_path), "--mef-steps", "4", "--riel-steps", "0", "--save-every", "1",
            "--mef-lr", "1e30"] + TINY
    assert train.main(args) == 1
    assert "loss became nan" in capsys.readouterr().err.lower()
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints, "the first (finite) step should have been checkpointed"
    from meml.model import Transformer
    model = Transformer.from_pretrained(tmp_path / checkpoints[-1])  # intact: loads, no temp folders left
    assert not list(tmp_path.glob(".checkpoint-*"))
    assert model is not None


def _tiny_hf_checkpoint(folder, tokenizer_dir, model_type, vocab_size):
    """A random-weight checkpoint in the real layout, written by transformers, with a tokenizer."""
    import shutil
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if model_type == "llama":
        config = transformers.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(config)
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


def _gsm8k_files(tmp_path, num=6):
    """GSM8K-format questions and an expert-1 JSONL answering half of them correctly."""
    from meml.data import ExpertAnswer, write_expert_jsonl
    tmp_path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": f"Mia has {n} apples and buys {n + 1} more. How many apples now?",
                         "answer": f"{n} + {n + 1} = {2 * n + 1}\n#### {2 * n + 1}"}) for n in range(num)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    answers = [ExpertAnswer(f"gsm8k-train-{n + 1}", 1, f"The answer is {2 * n + 1 + n % 2}.") for n in range(num)]
    write_expert_jsonl(tmp_path / "expert1.jsonl", answers)
    return data, tmp_path / "expert1.jsonl"


@pytest.mark.parametrize("tokenizer,model_type,vocab", [("qwen2.5", "qwen2", 151936), ("llama3", "llama", 128256)])
def test_real_checkpoint_layout_runs_both_stages(tmp_path, capsys, tokenizer, model_type, vocab):
    from conftest import require_shared
    folder = _tiny_hf_checkpoint(tmp_path / "model", require_shared("tokenizers", tokenizer), model_type, vocab)
    data, expert1 = _gsm8k_files(tmp_path)
    args = ["--model", str(folder), "--dataset", "gsm8k", "--data", str(data), "--expert-data", str(expert1),
            "--output", str(tmp_path / "run"), "--mef-steps", "1", "--riel-steps", "1", "--eval-size", "2",
            "--pass-k", "2", "--max-new-tokens", "6", "--eval-max-new-tokens", "6", "--questions-per-step", "1", "--group-size", "2",
            "--buffer-k", "1", "--mef-batch-size", "4"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    # 4 training questions: expert 0 = their gold solutions, expert 1 = the JSONL (2 of 4 right:
    # the wrong ones are dropped), expert 2 has no data.
    assert "MEF: 6 answers from experts [0, 1, 2] (dropped as wrong: {0: 0, 1: 2, 2: 0})" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert set(results) == {"after MEF", "after RIEL"} and len(results["after RIEL"]["pass@2"]) == 3


def test_evaluate_cli_scores_a_run_checkpoint_as_its_run_did(tmp_path, capsys):
    """A train.py checkpoint carries its run's prompts and held-out questions: evaluate.py with
    no other flag prints and writes every E8 figure, and its table is train.py's."""
    import evaluate
    run = tmp_path / "run"
    assert train.main(["--output", str(run), "--mef-steps", "1", "--riel-steps", "0"] + TINY + ["--eval-size", "3"]) == 0
    out_json = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(run / "checkpoint-000001"), "--pass-k", "2", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "majority" in printed and "oracle" in printed and "pass@2" in printed and "error overlap" in printed
    assert "the run's held-out synthetic questions" in printed
    r = json.loads(out_json.read_text())
    assert r["num_questions"] == 3 and len(r["accuracy"]) == 3 and len(r["pass@1"]) == 3
    assert r["oracle"] >= max(r["accuracy"]) and len(r["error_overlap"]) == 7
    trained = json.loads((run / "results.json").read_text())["results"]["after MEF"]
    for key in ("accuracy", "majority_vote", "oracle", "error_overlap", "samples"):
        assert r[key] == trained[key], key


def test_evaluate_cli_never_scores_the_questions_a_run_trained_on(tmp_path, capsys):
    """evaluate.py --data <the run's training file> scores only the run's held-out questions, with
    the run's own expert prompts; another file is scored whole."""
    import evaluate
    data, _ = _gsm8k_files(tmp_path, num=8)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Be brief.", "Be thorough."]))
    folder = tmp_path / "model"
    from meml import synthetic_assets
    from meml.model import ModelConfig, Transformer
    synthetic_assets.write_synthetic_assets(folder)
    model = Transformer(ModelConfig.from_json(folder / "config.json"))
    model.init_weights()
    model.save_pretrained(folder)
    run = tmp_path / "run"
    assert train.main(["--model", str(folder), "--dataset", "gsm8k", "--data", str(data), "--system-prompts", str(prompts),
                       "--output", str(run), "--mef-steps", "1", "--riel-steps", "0", "--eval-size", "3",
                       "--pass-k", "0", "--eval-max-new-tokens", "4"]) == 0
    out_json = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(run / "checkpoint-000001"), "--data", str(data), "--pass-k", "0",
                          "--json", str(out_json)]) == 0
    r = json.loads(out_json.read_text())
    assert r["num_questions"] == 3 and len(r["accuracy"]) == 2  # the last 3 of 8, two experts
    assert {s["id"] for s in r["samples"]} == {"gsm8k-train-6", "gsm8k-train-7", "gsm8k-train-8"}
    # The same questions in another file are still the ones it trained on: refused, named.
    copy = tmp_path / "copy.jsonl"
    copy.write_text(data.read_text())
    capsys.readouterr()
    assert evaluate.main(["--model", str(run / "checkpoint-000001"), "--data", str(copy), "--pass-k", "0"]) == 2
    assert f"evaluate.py: --data {copy}: 5 of its 8 questions are ones the run trained on" in capsys.readouterr().err
    # Questions it never saw are scored whole.
    other, _ = _gsm8k_files(tmp_path / "other", num=9)
    other.write_text("".join(line.replace("Mia", "Noor") + "\n" for line in other.read_text().splitlines()))
    assert evaluate.main(["--model", str(run / "checkpoint-000001"), "--data", str(other), "--pass-k", "0",
                          "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["num_questions"] == 9


def test_teacher_checkpoint_writes_verified_expert_data_then_trains(tmp_path, capsys):
    """--teacher DIR: expert 1's data is generated by a local checkpoint, written as expert JSONL
    into the run folder and trained on. (An untrained teacher is rarely right; that only verified
    answers are kept is checked with a teacher that learned its answer, in test_mef.py.)"""
    from meml import synthetic, synthetic_assets
    from meml.data import load_expert_jsonl, load_gsm8k
    from meml.model import ModelConfig, Transformer
    from meml.rewards import reward
    folder = synthetic_assets.write_synthetic_assets(tmp_path / "model")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_json(folder / "config.json"))
    model.init_weights()
    model.save_pretrained(folder)  # a checkpoint in HF layout with its tokenizer beside it
    train_ex = synthetic.load_synthetic(n_train=8, n_eval=1)[0]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": ex.question, "answer": f"{ex.solution}\n#### {ex.answer}"}) + "\n"
                            for ex in train_ex))
    args = ["--model", str(folder), "--dataset", "gsm8k", "--data", str(data), "--teacher", str(folder),
            "--output", str(tmp_path / "run"), "--mef-steps", "1", "--riel-steps", "0", "--eval-size", "2",
            "--pass-k", "0", "--max-new-tokens", "8", "--eval-max-new-tokens", "8"]
    assert train.main(args) == 0
    assert "verified answers" in capsys.readouterr().out
    written = load_expert_jsonl(tmp_path / "run" / "expert1.jsonl")
    by_id = {ex.id: ex for ex in load_gsm8k(data)}
    assert all(a.expert == 1 and reward("gsm8k", a.response, by_id[a.id]) == 1.0 for a in written)


def test_resume_refuses_an_optimizer_state_for_another_layout_and_names_the_file(tmp_path, capsys):
    """A checkpoint whose optimizer state has more tensors than the model (as one written before
    q/k/v_proj were fused: three tensors where there is now one) stops with a message."""
    run = tmp_path / "run"
    assert train.main(["--output", str(run), "--mef-steps", "2", "--riel-steps", "1", "--save-every", "1"] + TINY) == 0
    shutil.rmtree(run / "checkpoint-000003")  # resume from the last MEF step...
    path = run / "checkpoint-000002" / "trainer_state.pt"
    metrics_before = (run / "metrics.jsonl").read_text()
    assert '"stage": "riel"' in metrics_before  # ...with a metrics line after it, which must survive
    state = torch.load(path, weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    group["params"] = group["params"] + [max(group["params"]) + 1, max(group["params"]) + 2]
    torch.save(state, path)
    assert train.main(["--resume", str(run)]) == 2
    assert f"train.py: cannot resume from {path}: its optimizer state does not fit" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == metrics_before  # nothing lost


def _run_cli(script, args, cwd):
    return subprocess.run([sys.executable, str(REPO_ROOT / script)] + args, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_a_users_mistake_is_one_line_and_exit_2_not_a_traceback(tmp_path):
    for script, args, message in [
            ("train.py", ["--lambda1", "-0.1", "--output", str(tmp_path / "a")], "train.py: --lambda1 -0.1: must be at least 0"),
            ("train.py", ["--resume", str(tmp_path / "nothing")], f"train.py: {tmp_path / 'nothing' / 'args.json'} not found"),
            ("evaluate.py", ["--model", str(tmp_path / "missing"), "--dataset", "synthetic"], "evaluate.py: "),
    ]:
        done = _run_cli(script, args, tmp_path)
        assert done.returncode == 2, (script, done.stderr)
        assert done.stderr.startswith(message) and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _model_folder(tmp_path):
    from meml import synthetic_assets
    from meml.model import ModelConfig, Transformer
    folder = synthetic_assets.write_synthetic_assets(tmp_path / "model")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_json(folder / "config.json"))
    model.init_weights()
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("num_questions, extra, message", [
    (2, [], "holds 2 questions and --eval-size 200 holds out the last 200 for evaluation, leaving none to train on"),
    (3, ["--eval-size", "3"], "holds 3 questions and --eval-size 3 holds out the last 3"),
    (0, [], "holds no questions"),
])
def test_a_data_file_that_leaves_nothing_to_train_on_stops_naming_the_file(tmp_path, capsys, num_questions, extra, message):
    folder = _model_folder(tmp_path)
    data, _ = _gsm8k_files(tmp_path, num=num_questions)
    args = ["--model", str(folder), "--dataset", "gsm8k", "--data", str(data), "--output", str(tmp_path / "run")]
    assert train.main(args + extra) == 2
    assert f"train.py: {data} {message}" in capsys.readouterr().err


def test_eval_size_0_trains_on_every_question_and_evaluates_none(tmp_path, capsys):
    folder = _model_folder(tmp_path)
    data, _ = _gsm8k_files(tmp_path, num=5)
    args = ["--model", str(folder), "--dataset", "gsm8k", "--data", str(data), "--output", str(tmp_path / "run"),
            "--eval-size", "0", "--mef-steps", "1", "--riel-steps", "0", "--mef-batch-size", "2"]
    assert train.main(args) == 0
    assert "MEF: 5 answers from experts [0, 1, 2]" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["results"]["after MEF"] is None


def test_a_truncated_safetensors_file_is_named_in_the_error(tmp_path, capsys):
    import evaluate
    folder = _model_folder(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert evaluate.main(["--model", str(folder), "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evaluate.py: {weights}: not a readable safetensors file") and "truncated" in err


def test_a_checkpoint_carries_a_chat_template_that_lives_only_in_chat_template_jinja(tmp_path):
    """Recent transformers saves the template as chat_template.jinja, not in tokenizer_config.json:
    the run's checkpoints must carry that file, or they cannot be loaded and evaluated."""
    from meml.inference import load
    folder = _model_folder(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").write_text(config.pop("chat_template"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data, _ = _gsm8k_files(tmp_path, num=6)
    run = tmp_path / "run"
    assert train.main(["--model", str(folder), "--dataset", "gsm8k", "--data", str(data), "--output", str(run),
                       "--eval-size", "2", "--mef-steps", "1", "--riel-steps", "0", "--pass-k", "0",
                       "--eval-max-new-tokens", "4"]) == 0
    checkpoint = run / "checkpoint-000001"
    assert (checkpoint / "chat_template.jinja").read_text() == (folder / "chat_template.jinja").read_text()
    _, tokenizer = load(checkpoint)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        load(folder)[1].apply_chat_template([{"role": "user", "content": "hi"}])


def _nll(run_dir):
    return [r["loss/nll"] for r in metrics(run_dir) if r["stage"] == "mef"]


def test_bf16_mixed_precision_learns_as_fp32_does_and_bf16_weights_do_not(tmp_path):
    """The settings where pure bf16 weights were found to learn a quarter as much as fp32
    (issue 11): 60 MEF steps at lr 1e-5. Mixed precision keeps fp32 master weights, so its
    loss falls as far as fp32's; --bf16-weights rounds most updates away."""
    args = ["--preset", "moe-sft", "--mef-steps", "60", "--mef-lr", "1e-5", "--mef-schedule", "constant",
            "--eval-size", "0", "--pass-k", "0", "--save-every", "1000"]
    drops = {}
    for name, flags in [("fp32", []), ("bf16", ["--dtype", "bfloat16"]),
                        ("bf16-weights", ["--dtype", "bfloat16", "--bf16-weights"])]:
        assert train.main(args + ["--output", str(tmp_path / name)] + flags) == 0
        losses = _nll(tmp_path / name)
        drops[name] = losses[0] - losses[-1]
    assert drops["fp32"] > 0.2  # the run learns at all (0.29 measured)
    assert drops["bf16"] >= 0.8 * drops["fp32"], drops
    assert drops["bf16-weights"] < 0.5 * drops["fp32"], drops  # 0.08 of 0.29 measured
    checkpoint = tmp_path / "bf16" / "checkpoint-000060"
    assert {t.dtype for t in _weights(checkpoint).values()} == {torch.bfloat16}  # HF files: bf16
    masters = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["master_weights"]
    assert {t.dtype for t in masters.values()} == {torch.float32}


def test_a_resumed_bf16_run_continues_from_its_fp32_master_weights(tmp_path):
    """Resume from a checkpoint whose HF files are bf16: the run must continue from the fp32
    masters in trainer_state.pt, bit for bit as if it had not stopped."""
    args = ["--mef-steps", "2", "--riel-steps", "2", "--save-every", "1", "--dtype", "bfloat16"] + TINY
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train.main(["--output", str(whole)] + args) == 0
    assert train.main(["--output", str(resumed)] + args) == 0
    for name in ("checkpoint-000004", "results.json"):  # as if killed after the first RIEL step
        shutil.rmtree(resumed / name) if name.startswith("checkpoint") else (resumed / name).unlink()
    assert train.main(["--resume", str(resumed)]) == 0
    for step in ("checkpoint-000004",):
        a = torch.load(whole / step / "trainer_state.pt", weights_only=True)["master_weights"]
        b = torch.load(resumed / step / "trainer_state.pt", weights_only=True)["master_weights"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_several_updates_per_rollout_batch_and_the_policy_health_metrics(tmp_path):
    """--num-iterations 2: one metrics line per step; entropy per expert and the sampler-trainer
    log-prob gap are logged (β > 0 scores every row), and in fp32 the sampler's π_old is the
    trainer's (gap ~1e-7) while in bf16 they differ."""
    args = ["--mef-steps", "1", "--riel-steps", "2", "--num-iterations", "2", "--loss", "clipped",
            "--beta", "0.04"] + TINY
    assert train.main(args + ["--output", str(tmp_path / "fp32")]) == 0
    riel = [r for r in metrics(tmp_path / "fp32") if r["stage"] == "riel"]
    assert [r["step"] for r in riel] == [1, 2]
    for r in riel:
        assert 0 < r["logprobs/sampler_trainer_gap"] < 1e-4
        assert all(0 < r[f"entropy/expert_{i}"] <= math.log(512) for i in range(3))  # at most a uniform's
        assert 0 <= r["clip_ratio"] <= 1
    assert train.main(args + ["--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    fp32_gap = riel[-1]["logprobs/sampler_trainer_gap"]
    assert metrics(tmp_path / "bf16")[-1]["logprobs/sampler_trainer_gap"] > 10 * fp32_gap


def test_pi_old_is_recomputed_by_default_unless_compute_is_fp32():
    cfg = train.make_config("meml-grpo", synthetic=True, overrides={})
    fp32, bf16 = train.Precision(*[torch.float32] * 3), train.Precision(torch.float32, torch.bfloat16, torch.bfloat16)
    assert not train.riel_settings(cfg, fp32).recompute_old_logprobs
    assert train.riel_settings(cfg, bf16).recompute_old_logprobs
    forced = train.make_config("meml-grpo", synthetic=True, overrides={"riel.recompute_old_logprobs": False})
    assert train.riel_settings(forced, bf16).recompute_old_logprobs is False


def test_expert_data_naming_an_unknown_question_says_what_the_ids_are(tmp_path, capsys):
    """The message once taught `<dataset>-<stem>-<n>`, which StrategyQA ids are not (they are the
    records' qids): it now names the id of the data file's first question."""
    folder = _model_folder(tmp_path)
    data = tmp_path / "strategyqa.json"
    data.write_text(json.dumps([{"qid": f"abc{n}", "question": f"Is {n} even?", "answer": n % 2 == 0,
                                 "facts": [f"{n} is {'even' if n % 2 == 0 else 'odd'}."]} for n in range(6)]))
    expert = tmp_path / "expert1.jsonl"
    expert.write_text(json.dumps({"id": "strategyqa-strategyqa-1", "expert": 1, "response": "yes"}) + "\n")
    args = ["--model", str(folder), "--dataset", "strategyqa", "--data", str(data), "--expert-data", str(expert),
            "--output", str(tmp_path / "run"), "--eval-size", "2"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert f"{expert}: 1 answers name questions that are not in {data}" in err and "'abc0' for its first" in err


def test_learning_curve_points_leave_the_run_unchanged(tmp_path):
    """--eval-every: greedy evaluations between steps draw no random numbers, so the run ends at
    the same weights; the points are logged at step 0, every N steps and the last step."""
    args = ["--mef-steps", "2", "--riel-steps", "5", "--save-every", "10"] + TINY
    plain, curve = tmp_path / "plain", tmp_path / "curve"
    assert train.main(["--output", str(plain)] + args) == 0
    assert train.main(["--output", str(curve), "--eval-every", "2", "--curve-size", "2"] + args) == 0
    a, b = _weights(plain / "checkpoint-000007"), _weights(curve / "checkpoint-000007")
    assert all(torch.equal(a[name], b[name]) for name in a)
    points = [r for r in metrics(curve) if "eval/expert_0/accuracy" in r]
    assert [r["step"] for r in points] == [0, 2, 4, 5] and all(r["eval/num_questions"] == 2 for r in points)
    assert [r["reward"] for r in metrics(plain) if r["stage"] == "riel"] == \
        [r["reward"] for r in metrics(curve) if "reward" in r and r["stage"] == "riel"]


def test_init_from_a_mef_run_is_riel_of_that_run(tmp_path, capsys):
    """A RIEL preset started with --init-from from a MEF-only run ends at the weights of the
    same preset run whole (MEF then RIEL, same seed); a checkpoint of another seed's world (its
    own tokenizer) is refused in one line."""
    mef, whole, riel = tmp_path / "mef", tmp_path / "whole", tmp_path / "riel"
    common = ["--mef-steps", "3", "--save-every", "10", "--eval-size", "4", "--dev-size", "3"] + TINY[:2] + TINY[4:]
    assert train.main(["--preset", "moe-sft", "--output", str(mef)] + common) == 0
    assert train.main(["--output", str(whole), "--riel-steps", "3"] + common) == 0
    assert train.main(["--output", str(riel), "--riel-steps", "3", "--init-from", str(mef)] + common) == 0
    a, b = _weights(whole / "checkpoint-000006"), _weights(riel / "checkpoint-000003")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [r["stage"] for r in metrics(riel)] == ["riel"] * 3
    results = json.loads((riel / "results.json").read_text())["results"]
    before = json.loads((mef / "results.json").read_text())["results"]["after MEF"]
    assert results["before RIEL"]["per_question"] == before["per_question"]
    assert results["before RIEL"]["dev_choice"]["num_questions"] == 3
    info = json.loads((riel / "meml_run.json").read_text())
    assert len(info["eval_ids"]) == 4 and len(info["dev_ids"]) == 3 and not set(info["eval_ids"]) & set(info["dev_ids"])
    capsys.readouterr()
    assert train.main(["--output", str(tmp_path / "other"), "--seed", "1", "--init-from", str(mef)] + common) == 2
    assert "tokenizer is not this run's" in capsys.readouterr().err


def test_eval_size_above_300_draws_that_many_synthetic_questions(tmp_path):
    assert train.main(["--preset", "moe-sft", "--output", str(tmp_path), "--mef-steps", "0", "--eval-size", "450",
                       "--dev-size", "20"] + TINY[:2] + TINY[4:]) == 0
    info = json.loads((tmp_path / "meml_run.json").read_text())
    assert len(set(info["eval_ids"])) == 450 and len(set(info["dev_ids"]) - set(info["eval_ids"])) == 20


def test_a_riel_run_draws_its_plots_or_says_how_to_get_them(tmp_path, capsys, monkeypatch):
    from meml import plots
    args = ["--mef-steps", "1", "--riel-steps", "2", "--eval-every", "1", "--curve-size", "2"] + TINY
    monkeypatch.setattr(plots, "available", lambda: False)
    assert train.main(["--output", str(tmp_path / "without")] + args) == 0
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "without" / "plots").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert train.main(["--output", str(tmp_path / "with")] + args) == 0
    assert (tmp_path / "with" / "plots" / "riel.png").stat().st_size > 10_000


def test_dtype_auto_picks_bf16_on_a_gpu_that_has_it_and_fp32_on_the_cpu(capsys):
    """A CUDA run used to default to fp32 with TF32 off (~10x slower GEMMs than bf16)."""
    import argparse
    from meml.task import precision_of
    auto = argparse.Namespace(dtype="auto", bf16_weights=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf16 = precision_of(auto, cuda, bf16_supported=True)
    assert (bf16.weights, bf16.compute, bf16.tf32) == (torch.float32, torch.bfloat16, False)
    assert bf16.describe(cuda) == "bfloat16 autocast on cuda, fp32 master weights"
    older = precision_of(auto, cuda, bf16_supported=False)  # e.g. a V100: fp32 with TF32 matmuls
    assert (older.compute, older.tf32) == (torch.float32, True)
    on_cpu = precision_of(auto, cpu)
    assert (on_cpu.compute, on_cpu.tf32) == (torch.float32, False)
    explicit = precision_of(argparse.Namespace(dtype="float32", bf16_weights=False), cuda, bf16_supported=True)
    assert (explicit.compute, explicit.tf32) == (torch.float32, False)  # asked for: true fp32
    assert train.parse_args([]).dtype == "auto"


def test_the_run_summary_reads_metrics_written_before_a_key_existed(tmp_path):
    """A run resumed across versions has metrics lines without premise/... (added later): the
    summary averages over the lines that have a figure instead of stopping the run at its end."""
    old = {"stage": "riel", "reward": 0.5, "frac_reward_zero_std/expert_0": 1.0, "rewards/expert_0/all_wrong": 0.0,
           "buffer/insertions": 1, "buffer/sft_triggers": 0}
    new = {**old, "premise/rescuable": 0.25, "premise/all_wrong": 0.5}
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    summary = train.summarise_riel(path, 1)
    assert summary["rescuable"] == 0.25 and summary["all_wrong_questions"] == 0.5 and summary["insertions"] == 2
