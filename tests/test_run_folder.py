"""The run folder (meml/run_folder.py, meml/checkpoint.py): a run owns it, never loses or mixes
what is in it, and resumes from the newest checkpoint that loads.

Every run is `train.py` itself on the synthetic world with tiny step counts, in-process through
`main` or as a subprocess where it must be signalled or must hold a lock from another process.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
import train  # noqa: E402

TINY = ["--train-size", "16", "--eval-size", "2", "--pass-k", "0", "--max-new-tokens", "8", "--eval-max-new-tokens", "8",
        "--questions-per-step", "2", "--group-size", "4", "--buffer-k", "2", "--mef-batch-size", "8"]
RUN = ["--mef-steps", "2", "--riel-steps", "3", "--save-every", "1", "--buffer-capacity", "3"] + TINY


def _files(folder: Path) -> dict:
    """Every file under folder -> its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _weights(checkpoint):
    return load_file(str(checkpoint / "model.safetensors"))


def _same_weights(a, b):
    a, b = _weights(a), _weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted run of RUN: what every interrupted or resumed run must end at."""
    folder = tmp_path_factory.mktemp("whole") / "run"
    assert train.main(["--output", str(folder)] + RUN) == 0
    return folder


# ---- item 1: a new run never writes into a folder that holds anything ----

@pytest.mark.parametrize("contents", [{"results.json": "{\"mine\": 1}", "args.json": "[\"--seed\", \"7\"]"},
                                      {"metrics.jsonl": "{\"stage\": \"mef\", \"step\": 1}\n"},
                                      {"notes.txt": "a user's file"}])
def test_a_new_run_refuses_a_folder_that_holds_anything(contents, tmp_path, capsys):
    for name, text in contents.items():
        (tmp_path / name).write_text(text)
    before = _files(tmp_path)
    assert train.main(["--output", str(tmp_path)] + RUN) == 2
    err = capsys.readouterr().err
    assert f"train.py: --output {tmp_path} is not empty" in err and f"--resume {tmp_path}" in err
    assert _files(tmp_path) == before


def test_a_finished_run_reused_without_resume_is_left_as_it_was(whole, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(whole, copy)
    before = _files(copy)
    assert train.main(["--output", str(copy), "--seed", "3"] + RUN) == 2
    assert "is not empty" in capsys.readouterr().err
    assert _files(copy) == before


def test_a_run_stopped_by_a_mistake_before_its_first_step_leaves_its_folder_empty(tmp_path, capsys):
    """So that the corrected command can run there (and nothing a user wrote was there)."""
    folder = tmp_path / "run"
    assert train.main(["--output", str(folder), "--expert", "5", "--preset", "expert-sft"] + RUN) == 2
    assert "--expert 5: there are only 3 expert prompts" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] in ([], [".lock"])
    assert train.main(["--output", str(folder), "--preset", "expert-sft"] + RUN) == 0


# ---- item 2: the folder is locked while a process runs in it ----

HOLD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from meml import run_folder
run_folder.lock(Path({folder!r}))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_folder_in_use_is_refused_naming_the_process_that_holds_it(whole, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(whole, copy)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO_ROOT), folder=str(copy))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _files(copy)
        assert train.main(["--resume", str(copy)]) == 2
        err = capsys.readouterr().err
        assert f"train.py: {copy} is in use by process {holder.pid} on " in err
        assert _files(copy) == before
    finally:
        holder.kill()
        holder.wait()
    assert train.main(["--resume", str(copy)]) == 0  # the lock dies with its process


# ---- item 4: an update that leaves NaN weights never becomes a checkpoint ----

@pytest.mark.parametrize("stage, flags", [("mef", ["--mef-lr", "1e300"]), ("riel", ["--riel-lr", "1e300"])])
def test_an_update_to_non_finite_weights_stops_before_a_checkpoint(stage, flags, tmp_path, capsys):
    """1e300 is a finite float but infinite in fp32: the loss and gradient of the step are finite,
    the update is not."""
    assert train.main(["--output", str(tmp_path)] + RUN + flags) == 1
    err = capsys.readouterr().err
    assert f"train.py: [{stage}] the update of step 1 left weights that are NaN or infinite" in err
    for checkpoint in tmp_path.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in _weights(checkpoint).values()), checkpoint.name
    if stage == "riel":
        assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000001", "checkpoint-000002"]


# ---- item 5: a full disk ----

def test_a_failed_checkpoint_write_says_no_space_and_leaves_the_previous_one(tmp_path, capsys, monkeypatch, whole):
    """The writer fails half-way with ENOSPC: one line, no temporary folder left, the previous
    checkpoint still the newest, and the run resumes from it to the uninterrupted run's end."""
    import errno

    from meml import checkpoint
    real_save, calls = torch.save, {"n": 0}

    def save(obj, path):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint: the first RIEL step's
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    run = tmp_path / "run"
    assert train.main(["--output", str(run)] + RUN) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"train.py: no space left on {run}: checkpoint-000003 was not written (its partial copy is "
                   f"removed); the newest checkpoint is still checkpoint-000002. Free space, then continue with "
                   f"--resume {run}")
    assert not list(run.glob(".checkpoint-*")) and (run / "checkpoint-000002").is_dir()
    monkeypatch.undo()
    assert train.main(["--resume", str(run)]) == 0
    assert _same_weights(run / "checkpoint-000005", whole / "checkpoint-000005")


def test_a_writer_error_on_a_full_disk_is_read_as_a_full_disk(tmp_path, monkeypatch):
    """torch.save's own error on a full disk ("unexpected pos") carries no errno: the free space
    where it was writing decides."""
    from collections import namedtuple

    from meml import checkpoint
    from meml.errors import InputError

    def save(obj, path):
        Path(path).write_bytes(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(checkpoint.torch, "save", save)
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda folder, dtype=None, state=None: None
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage(10 ** 9, 10 ** 9, 4096))
    with pytest.raises(InputError, match="no space left on"):
        checkpoint.save_checkpoint(tmp_path, 1, model, tmp_path, {})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage(10 ** 9, 0, 10 ** 9))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: a bug, kept as it is
        checkpoint.save_checkpoint(tmp_path, 1, model, tmp_path, {})
    assert list(tmp_path.iterdir()) == []


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/meml-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok


@pytest.mark.skipif(not _can_mount(), reason="needs root and tmpfs mounts to fill a real disk")
def test_a_real_full_disk(tmp_path, capsys, whole):
    """A 9 MB tmpfs: the run's assets and first checkpoints fit, a later one does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(disk)], check=True)
    try:
        run = disk / "run"
        assert train.main(["--output", str(run)] + RUN) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"train.py: no space left on {run}: checkpoint-"), err
        assert not list(run.glob(".checkpoint-*"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert train.main(["--resume", str(run)]) == 0
        assert _same_weights(run / "checkpoint-000005", whole / "checkpoint-000005")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---- item 6: a corrupt newest checkpoint ----

@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "weights"])
def test_resume_falls_back_past_a_corrupt_newest_checkpoint(damage, whole, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    (run / "results.json").unlink()
    for name in ("checkpoint-000005",):  # as if killed after the RIEL step 3 checkpoint... but damaged
        state = run / name / "trainer_state.pt"
        if damage == "truncated":
            state.write_bytes(state.read_bytes()[:5000])
        elif damage == "empty":
            state.write_bytes(b"")
        elif damage == "garbage":
            state.write_bytes(random.Random(0).randbytes(3000))
        else:
            weights = run / name / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:4000])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "riel", "st')  # a line cut short by the kill
    assert train.main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint-000005: " in out and "resuming from " + str(run / "checkpoint-000004") in out
    assert "dropped its last line, cut short" in out
    assert (run / "checkpoint-000005.unreadable").is_dir()
    assert _same_weights(run / "checkpoint-000005", whole / "checkpoint-000005")
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert steps == [("mef", 1), ("mef", 2), ("riel", 1), ("riel", 2), ("riel", 3)]


# ---- item 8: --resume takes the run's own arguments, and only a few changes ----

def test_resume_refuses_a_flag_that_would_change_the_run(whole, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(whole, copy)
    before = _files(copy)
    for flags, name in [(["--lambda1", ".5"], "--lambda1"), (["--output", str(tmp_path / "x")], "--output"),
                        (["--model", str(tmp_path)], "--model"), (["--seed", "4"], "--seed")]:
        assert train.main(["--resume", str(copy)] + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"train.py: {name}: --resume continues {copy} with the arguments it started with")
        assert "--riel-steps, --save-every" in err
    assert _files(copy) == before


def test_resume_with_more_riel_steps_ends_where_a_longer_run_ends(whole, tmp_path, capsys):
    """A finished 3-step run resumed with --riel-steps 5 equals a 5-step run; args.json keeps
    the change, so a later plain --resume keeps it too."""
    longer = tmp_path / "longer"
    assert train.main(["--output", str(longer)] + RUN + ["--riel-steps", "5"]) == 0
    copy = tmp_path / "run"
    shutil.copytree(whole, copy)
    assert train.main(["--resume", str(copy), "--riel-steps", "5"]) == 0
    assert "resuming with --riel-steps 5" in capsys.readouterr().out
    assert _same_weights(copy / "checkpoint-000007", longer / "checkpoint-000007")
    assert json.loads((copy / "args.json").read_text())[-2:] == ["--riel-steps", "5"]
    assert train.parse_args(json.loads((copy / "args.json").read_text())).riel_steps == 5


def test_resume_of_a_run_that_wrote_no_checkpoint_starts_it_again(whole, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    for p in run.glob("checkpoint-*"):
        shutil.rmtree(p)
    (run / "results.json").unlink()
    assert train.main(["--resume", str(run)]) == 0
    assert "no complete checkpoint" in capsys.readouterr().out
    assert _same_weights(run / "checkpoint-000005", whole / "checkpoint-000005")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5


# ---- item 12: Ctrl-C says where the run can continue from ----

def test_ctrl_c_prints_the_last_checkpoint_and_the_resume_command(tmp_path, whole):
    run = tmp_path / "run"
    # SIGINT as a terminal delivers it: a suite started in the background (`cmd &`) inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt (the run ended with exit 0)
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), "--output", str(run)] + RUN,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (run / "checkpoint-000003").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: interrupted; the last checkpoint is "), err
    assert lines[0].endswith(f"continue with: python train.py --resume {run}")
    assert train.main(["--resume", str(run)]) == 0
    assert _same_weights(run / "checkpoint-000005", whole / "checkpoint-000005")


# ---- a checkpoint written on a GPU resumes anywhere, loaded onto the CPU first ----

def test_a_trainer_state_saved_from_cuda_tensors_is_loaded_onto_the_cpu(whole, tmp_path, capsys, monkeypatch):
    """trainer_state.pt of a GPU run holds CUDA tensors (rank 0's AdamW states, fp32 masters:
    ~18.6 GB at 1.5B); torch.load without map_location put every rank's copy on cuda:0, and on a
    machine without CUDA it fails. Written here with the CUDA location tag, as a GPU run writes
    it: the resume must load it onto the CPU and end where the uninterrupted run ends."""
    import torch.serialization
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    for name in ("checkpoint-000005", "results.json"):
        shutil.rmtree(run / name) if name.startswith("checkpoint") else (run / name).unlink()
    path = run / "checkpoint-000004" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # what a load without map_location does here
    assert train.main(["--resume", str(run)]) == 0
    assert "skipping" not in capsys.readouterr().out
    assert _same_weights(run / "checkpoint-000005", whole / "checkpoint-000005")


def test_resume_lets_go_of_the_loaded_optimizer_state():
    """restore takes the optimizer's tensors out of the loaded state (the run keeps the state
    dict for its small parts; its big ones must not stay referenced for the whole run)."""
    from meml.trainer import Stage, restore
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"stage": "riel", "step": 1, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "generators": {}, "extra": {}}
    assert restore(state, Stage("riel", 2, 1e-3, 1), torch.optim.AdamW(model.parameters())) == 1
    assert "optimizer" not in state


# ---- from the session's review: resume keeps what the run was ----

def test_resume_refuses_a_flag_even_when_it_names_the_default(whole, tmp_path, capsys):
    """--preset meml-grpo is the default value: it used to slip through and was appended to the
    run's command (a moe-sft-grpo run would silently become meml-grpo)."""
    copy = tmp_path / "run"
    shutil.copytree(whole, copy)
    assert train.main(["--resume", str(copy), "--preset", "meml-grpo"]) == 2
    assert capsys.readouterr().err.startswith("train.py: --preset: --resume continues")


def test_the_dtype_auto_chose_is_recorded_and_an_older_run_resumes_in_float32(whole, tmp_path):
    """--dtype auto depends on the device; a resume (perhaps on another device) keeps the run's.
    A run folder written before --dtype auto existed (no --dtype in args.json) was float32."""
    saved = json.loads((whole / "args.json").read_text())
    assert saved[-2:] == ["--dtype", "float32"]  # what auto chose on this CPU
    older = tmp_path / "older"
    older.mkdir()
    (older / "args.json").write_text(json.dumps(saved[:-2]))
    args, command, _ = train.resumed_args(train.parse_args(["--resume", str(older)]), ["--resume", str(older)])
    assert args.dtype == "float32" and command[-2:] == ["--dtype", "float32"]


def test_a_resume_whose_every_checkpoint_is_unreadable_stops_and_changes_nothing(whole, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    for checkpoint in run.glob("checkpoint-*"):
        (checkpoint / "trainer_state.pt").write_bytes(b"")
    before = _files(run)
    assert train.main(["--resume", str(run)]) == 2
    assert f"train.py: no checkpoint in {run} can be read" in capsys.readouterr().err
    assert _files(run) == before  # nothing renamed, no metrics dropped, the run not started over
