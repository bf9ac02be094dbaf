"""Training across processes (meml/distributed.py) equals training in one, on 2 gloo processes.

Every multi-process case runs under a timeout (the process group's and the join's), so a hang
fails the test instead of blocking CI. One thread per process.
"""
import datetime
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests"))
from test_riel import EXAMPLES, G, make_rollouts, tiny_model  # noqa: E402

TIMEOUT_S = 120


def run_ranks(worker, tmp_path, *args):
    """worker(rank, tmp_path, *args) in 2 spawned processes joined by a file:// rendezvous."""
    context = mp.get_context("spawn")
    procs = [context.Process(target=_bootstrap, args=(worker, rank, str(tmp_path)) + args) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung (killed after the timeout)"
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed"


def _bootstrap(worker, rank, tmp, *args):
    import torch.distributed as dist

    from meml import distributed
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    # Leave as train.py does, at once (meml.distributed.finish): on a normal exit gloo's threads
    # can abort the interpreter after the work is done (seen here: exit code -6).
    try:
        worker(rank, tmp, *args)
    except BaseException:
        traceback.print_exc()
        distributed.finish(1)
    distributed.finish(0)


def _world(tmp):
    from meml import synthetic_assets
    from meml.model import ModelConfig
    from meml.e7 import Experts
    from meml.tokenizer import Tokenizer
    folder = synthetic_assets.write_synthetic_assets(os.path.join(tmp, "assets"))
    config = ModelConfig.from_json(folder / "config.json")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 32, 64
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 8
    world = Experts(Tokenizer.from_pretrained(folder), ["Expert zero.", "Expert one says more.", "Two"], "synthetic")
    return tiny_model(config, 0), world, tiny_model(config, 1)


# Question 0 (rank 0): experts disagree, E5 active; question 1 (rank 1): every expert always
# right, so rank 1 has no policy row (β > 0 aside) and no E5 question, and its share of the SFT.
REWARDS = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 0]],
                        [[1, 1, 1], [1, 1, 1], [1, 1, 1]]], dtype=torch.float)
SFT_ITEMS = [("q0", 2), ("q1", 0), ("q1", 1)]
# Both questions with E5 active (one on each rank): the active-question count must be global.
BOTH_ACTIVE = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 0]],
                            [[0, 0, 0], [1, 0, 1], [0, 1, 0]]], dtype=torch.float)


VARIANTS = dict(importance_sampling_level="sequence", clip_eps=0.02, tis_cap=1.2, mask_truncated=True)


def _e7_step(model, world, ref, rewards, items, aggregation, beta=0.1, variants=False, examples=EXAMPLES):
    """The first update of meml.riel.riel_step on `examples`, every rank taking its share of the
    questions as riel_step does, with made-up rollouts (make_rollouts), the given rewards and
    the given buffer items in place of sampling, the verifier and the buffer's coins; returns
    its metrics (the gradients are on the model). variants: GSPO's ratio, truncated IS and
    --mask-truncated (every fourth row of the step cut at the limit)."""
    from meml import riel
    from meml.buffer import HardExampleBuffer
    from meml.config import RielConfig
    ro = make_rollouts(world, examples)

    def sample(model, experts, questions, cfg, step_key, first_question=0):
        keep = ro.rows[first_question:first_question + len(questions)].flatten().tolist()
        return riel.Rollouts(torch.arange(len(keep)).view(len(questions), 3, G), [ro.prompts[r] for r in keep],
                             [ro.completions[r] for r in keep],
                             [ro.sampler_logprobs[r] - (0.1 * (r % 3) if variants else 0.0) for r in keep],
                             [r % 4 != 1 or not variants for r in keep], [""] * len(keep), [torch.zeros(1)] * len(keep))

    def score(rollouts, experts, questions):
        first = examples.index(questions[0])
        return rewards[first:first + len(questions)]

    saved = riel.sample_rollouts, riel.score_rollouts, riel.fill_buffer
    fill = lambda buffer, examples, r, below: (items, 0)  # noqa: E731
    riel.sample_rollouts, riel.score_rollouts, riel.fill_buffer = sample, score, fill
    try:
        cfg = RielConfig(group_size=G, aggregation=aggregation, beta=beta, lambda1=0.5, lambda2=2.0, micro_batch_size=4,
                         max_new_tokens=14, loss="clipped", **(VARIANTS if variants else {}))
        model.zero_grad()
        buffer = HardExampleBuffer(capacity=len(items), k=1, g=G)
        return next(riel.riel_step(model, world, examples, cfg, 0, buffer, {ex.id: ex for ex in examples}, ref))
    finally:
        riel.sample_rollouts, riel.score_rollouts, riel.fill_buffer = saved


def _riel_gradients_worker(rank, tmp, aggregation, rewards, variants=False):
    from meml import distributed
    model, world, ref = _world(tmp)
    metrics = _e7_step(model, world, ref, rewards, SFT_ITEMS, aggregation, variants=variants)
    distributed.sum_gradients(model)
    torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "metrics": metrics},
               os.path.join(tmp, f"rank{rank}.pt"))


@pytest.mark.parametrize("aggregation, rewards, active, variants", [
    ("token_mean", REWARDS, 1, False), ("seq_mean_token_mean", REWARDS, 1, False), ("dr_grpo", REWARDS, 1, False),
    ("token_mean", BOTH_ACTIVE, 2, False), ("seq_mean_token_mean", BOTH_ACTIVE, 2, True)],
    ids=["token_mean", "seq_mean", "dr_grpo", "e5-on-both-ranks", "gspo-tis-mask-truncated"])
def test_riel_gradients_at_world_size_2_equal_world_size_1(tmp_path, aggregation, rewards, active, variants):
    run_ranks(_riel_gradients_worker, tmp_path, aggregation, rewards, variants)
    model, world, ref = _world(str(tmp_path))
    single = _e7_step(model, world, ref, rewards, SFT_ITEMS, aggregation, variants=variants)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, p in model.named_parameters():
            assert torch.allclose(got["grads"][name], p.grad, atol=1e-6, rtol=1e-4), (rank, name)
        for key in ("loss/policy", "loss/ref_kl", "loss/inter_expert_kl", "loss/sft", "loss/total"):
            # Each rank's forward has half the rows and one thread, so its logits round otherwise.
            # The inter-expert KL is a sum of differences of log-probs near -6 (fp32 ulp 5e-7)
            # that comes to ~0.34: an AMD EPYC measured it 5.5e-6 apart (relative), hence 2e-5.
            assert got["metrics"][key] == pytest.approx(single[key], rel=2e-5, abs=1e-9), key
        assert got["metrics"]["inter_expert/active_questions"] == single["inter_expert/active_questions"] == active


def _fsdp_gradients_worker(rank, tmp, beta, variants=False):
    from meml import distributed
    model, world, ref = _world(tmp)
    distributed.shard_model(model)
    metrics = _e7_step(model, world, ref, REWARDS, SFT_ITEMS, "token_mean", beta, variants)
    distributed.sum_gradients(model)  # nothing for a sharded model: its reduce-scatter summed them
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    torch.save({"grads": grads, "metrics": metrics}, os.path.join(tmp, f"rank{rank}.pt"))


@pytest.mark.parametrize("beta, variants", [(0.0, False), (0.1, False), (0.1, True)],
                         ids=["rank1-without-policy-rows", "beta", "gspo-tis-mask-truncated"])
def test_fsdp2_riel_gradients_at_world_size_2_equal_world_size_1(tmp_path, beta, variants):
    """The same step with the model sharded by FSDP2 (--fsdp). Rank 1 has no E5 question, one SFT
    item against rank 0's two, and with β = 0 no policy row at all: it pads with zero-weight
    micro-batches, or the step would hang."""
    run_ranks(_fsdp_gradients_worker, tmp_path, beta, variants)
    model, world, ref = _world(str(tmp_path))
    single = _e7_step(model, world, ref, REWARDS, SFT_ITEMS, "token_mean", beta, variants)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, p in model.named_parameters():
            assert torch.allclose(got["grads"][name], p.grad, atol=1e-6, rtol=1e-4), (rank, name)
        assert got["metrics"]["loss/total"] == pytest.approx(single["loss/total"], rel=1e-6)


def _buffer_worker(rank, tmp):
    from meml import distributed
    from meml.buffer import HardExampleBuffer
    from meml.riel import fill_buffer
    buffer = HardExampleBuffer(capacity=2, k=2, g=G, seed=2)
    gathered = distributed.all_gather_tensor(1 - REWARDS[[rank]])  # mostly wrong: many insertions
    popped, inserted = fill_buffer(buffer, EXAMPLES, gathered)
    torch.save({"state": buffer.state_dict(), "popped": popped, "inserted": inserted}, os.path.join(tmp, f"buf{rank}.pt"))


def test_the_buffer_is_the_same_on_every_rank_and_equals_one_process(tmp_path):
    from meml.buffer import HardExampleBuffer
    from meml.riel import fill_buffer
    run_ranks(_buffer_worker, tmp_path)
    buffer = HardExampleBuffer(capacity=2, k=2, g=G, seed=2)
    popped, inserted = fill_buffer(buffer, EXAMPLES, 1 - REWARDS)
    assert inserted > 0 and popped
    for rank in range(2):
        got = torch.load(tmp_path / f"buf{rank}.pt", weights_only=False)
        assert got["popped"] == popped and got["inserted"] == inserted
        assert got["state"]["items"] == buffer.state_dict()["items"]
        assert torch.equal(got["state"]["generator_state"], buffer.state_dict()["generator_state"])


def _launch(tmp_path, nproc, args, script="train.py"):
    """(command, environment) running `script` in nproc processes (torchrun) or in this Python."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1", MEML_DIST_TIMEOUT_MIN="2")
    return launcher + [str(REPO_ROOT / script)] + args, env


def _train(tmp_path, name, nproc, extra):
    args = ["--output", str(tmp_path / name), "--preset", "moe-sft", "--mef-steps", "3", "--mef-batch-size", "8",
            "--train-size", "32", "--eval-size", "6", "--pass-k", "0", "--eval-max-new-tokens", "8",
            "--save-every", "3", "--threads", "1"] + extra
    cmd, env = _launch(tmp_path, nproc, args)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return tmp_path / name


def test_mef_and_evaluation_under_torchrun_equal_one_process(tmp_path):
    """2 processes: each step's answers split, token counts and gradients summed; the end weights
    equal one process's (summation order aside), metrics are logged once, the table is the same."""
    from safetensors.torch import load_file
    one, two = _train(tmp_path, "one", 1, []), _train(tmp_path, "two", 2, [])
    a, b = load_file(str(one / "checkpoint-000003" / "model.safetensors")), \
        load_file(str(two / "checkpoint-000003" / "model.safetensors"))
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    # AdamW divides each gradient by its own running RMS (+ ε), so where a summed gradient is near
    # zero or near ε its update can move by a visible fraction of lr when the ranks' sum rounds in
    # another order (measured on an AMD EPYC: 1 element of 27,648 off by 1.2e-6 at lr 1e-4..3e-4).
    # A plumbing error (a rank's answers lost, halved or counted twice) moves most elements.
    adam_bound = 2 * sum(r["lr"] for r in lines)  # |Δ update| <= 2 lr per step
    for name in a:
        off = ~torch.isclose(a[name], b[name], atol=1e-6, rtol=1e-5)
        assert off.sum() <= off.numel() // 1000, name
        assert (a[name] - b[name]).abs().max() <= adam_bound, name
    assert [r["step"] for r in lines] == [1, 2, 3]
    single = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/nll"] for r in lines] == pytest.approx([r["loss/nll"] for r in single], rel=1e-5)
    ra, rb = (json.loads((d / "results.json").read_text())["results"]["after MEF"] for d in (one, two))
    for key in ("accuracy", "majority_vote", "oracle", "error_overlap", "samples", "num_questions"):
        assert ra[key] == rb[key], key
    # evaluate.py under torchrun scores the same questions the same way
    for nproc, out in ((2, tmp_path / "eval2.json"), (1, tmp_path / "eval1.json")):
        cmd, env = _launch(tmp_path, nproc, ["--model", str(one / "checkpoint-000003"), "--pass-k", "0",
                                             "--json", str(out)], script="evaluate.py")
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    e1, e2 = (json.loads((tmp_path / f"eval{n}.json").read_text()) for n in (1, 2))
    assert e1 == e2 and e1["accuracy"] == ra["accuracy"]


def test_a_batch_that_does_not_split_over_the_processes_is_an_error_naming_the_flag(tmp_path):
    cmd, env = _launch(tmp_path, 2, ["--output", str(tmp_path / "run"), "--preset", "moe-sft", "--mef-steps", "1",
                                     "--mef-batch-size", "7", "--train-size", "16", "--threads", "1"])
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "train.py: --mef-batch-size: 7 do not split evenly over 2 processes" in done.stderr
    assert "Traceback" not in done.stderr.split("train.py: --mef-batch-size")[0][-2000:]


RIEL_ARGS = ["--mef-steps", "2", "--riel-steps", "4", "--save-every", "1", "--train-size", "16", "--eval-size", "2",
             "--pass-k", "0", "--max-new-tokens", "8", "--eval-max-new-tokens", "8", "--questions-per-step", "2",
             "--group-size", "4", "--buffer-k", "2", "--buffer-capacity", "3", "--mef-batch-size", "8",
             "--threads", "1"]


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc: torchrun starts its ranks in sessions of
    their own, so killing torchrun's process group does not reach them)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_run(proc, ranks: list[int]) -> None:
    """SIGKILL a torchrun run the way that stops it: its ranks themselves, then torchrun; and
    check that none is left."""
    import signal
    import time
    assert len(ranks) == 2, ranks
    for pid in ranks + [-proc.pid]:  # -pid: torchrun's process group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # gone already
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(r) for r in ranks) and time.time() < deadline:
        time.sleep(0.02)
    assert not any(_alive(r) for r in ranks), "a rank outlived SIGKILL"


def test_a_killed_2_process_run_resumes_exactly_and_checkpoints_resume_at_another_world_size(tmp_path):
    import time

    from safetensors.torch import load_file
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    cmd, env = _launch(tmp_path, 2, ["--output", str(whole)] + RIEL_ARGS)
    assert subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=300).returncode == 0
    cmd, env = _launch(tmp_path, 2, ["--output", str(killed)] + RIEL_ARGS)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target, deadline = killed / "checkpoint-000004", time.time() + 300
    ranks = []
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        ranks = ranks if len(ranks) == 2 else _children(proc.pid)
        time.sleep(0.02)
    _kill_run(proc, ranks if len(ranks) == 2 else _children(proc.pid))
    assert target.exists() and not (killed / "results.json").exists(), "not killed mid-RIEL"
    cmd, env = _launch(tmp_path, 2, ["--resume", str(killed)])
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(str(whole / "checkpoint-000006" / "model.safetensors")), \
        load_file(str(killed / "checkpoint-000006" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())]
    assert steps == [("mef", 1), ("mef", 2)] + [("riel", s) for s in range(1, 5)]  # logged once each

    # The uninterrupted 2-process run, resumed from its RIEL step 3 in one process: it finishes,
    # with one metrics line per step.
    subprocess.run(["rm", "-rf", str(whole / "checkpoint-000006"), str(whole / "results.json")], check=True)
    cmd, env = _launch(tmp_path, 1, ["--resume", str(whole)])
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines())]
    assert steps == [("mef", 1), ("mef", 2)] + [("riel", s) for s in range(1, 5)]
    assert (whole / "checkpoint-000006" / "model.safetensors").exists()
    # ... and its last step, written by one process, resumed again in two.
    subprocess.run(["rm", "-rf", str(whole / "checkpoint-000006"), str(whole / "results.json")], check=True)
    cmd, env = _launch(tmp_path, 2, ["--resume", str(whole)])
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((whole / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_fsdp2_training_equals_the_replicated_model_and_resumes_exactly(tmp_path):
    """train.py --fsdp on 2 processes: MEF and RIEL (rollouts and learning-curve evaluations
    generated with the weights gathered once) end at the replicated run's weights, up to
    summation order; its checkpoints hold whole tensors, so a resumed run ends bit for bit as
    the uninterrupted one."""
    from safetensors.torch import load_file
    args = RIEL_ARGS + ["--eval-every", "2", "--curve-size", "2"]
    runs = {}
    for name, extra in (("replicated", []), ("fsdp", ["--fsdp"])):
        cmd, env = _launch(tmp_path, 2, ["--output", str(tmp_path / name)] + args + extra)
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = load_file(str(tmp_path / name / "checkpoint-000006" / "model.safetensors"))
    for name in runs["replicated"]:
        assert torch.allclose(runs["replicated"][name], runs["fsdp"][name], atol=1e-5, rtol=1e-4), name
    fsdp = tmp_path / "fsdp"
    subprocess.run(["rm", "-rf", str(fsdp / "checkpoint-000006"), str(fsdp / "results.json")], check=True)
    cmd, env = _launch(tmp_path, 2, ["--resume", str(fsdp)])
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = load_file(str(fsdp / "checkpoint-000006" / "model.safetensors"))
    assert all(torch.equal(resumed[name], runs["fsdp"][name]) for name in resumed)


def test_fsdp_in_one_process_is_an_error_naming_the_flag(tmp_path):
    cmd, env = _launch(tmp_path, 1, ["--output", str(tmp_path / "run"), "--fsdp", "--mef-steps", "1", "--train-size", "16"])
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "train.py: --fsdp shards the model" in done.stderr


def test_a_question_samples_the_same_rollouts_at_any_world_size(tmp_path):
    """Rollouts draw from keys of (seed, step, question, expert, rollout) (D22): one process and
    two sample the same completions, so their RIEL steps see the same rewards and lengths and
    end at the same weights (up to the order of the gradient sum)."""
    from safetensors.torch import load_file
    lines, weights = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"world{nproc}"
        cmd, env = _launch(tmp_path, nproc, ["--output", str(out)] + RIEL_ARGS)
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        lines[nproc] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                        if '"riel"' in line]
        weights[nproc] = load_file(str(out / "checkpoint-000006" / "model.safetensors"))
    for key in ("reward", "completions/mean_length", "buffer/insertions", "entropy"):
        assert [r[key] for r in lines[1]] == pytest.approx([r[key] for r in lines[2]], rel=1e-5), key
    assert len({r["completions/mean_length"] for r in lines[1]}) > 1  # the steps sample different things
    for name in weights[1]:
        assert torch.allclose(weights[1][name], weights[2][name], atol=1e-5, rtol=1e-4), name
