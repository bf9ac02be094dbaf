"""The run folder: one run owns it, from its first file to its last.

A run folder (`train.py --output DIR`) holds everything one run writes:

    args.json            the command line it was started with (what --resume reads back)
    meml_run.json        data set, expert prompts, held-out ids, training file (evaluate.py)
    metrics.jsonl        one JSON line per step; samples.jsonl, a completion every N steps
    checkpoint-NNNNNN/   the newest two checkpoints (meml/checkpoint.py)
    reference/           E4's reference model (β > 0); expert<n>.jsonl, teacher data (--teacher)
    synthetic/           the built-in world's tokenizer and config
    results.json         the tables, when the run has finished; plots/ (with matplotlib)
    .lock                held while a process runs in it

Three rules keep a run from being lost or mixed with another:
- a new run starts only in a folder that does not exist or is empty; anything else is a run
  already, continued with `--resume DIR` or left alone by choosing another `--output`;
- the running process holds an exclusive lock on `DIR/.lock` (an OS lock: it is released when
  the process ends, however it ends), so a second run, or a resume of a run that still has a live
  process, stops with a line naming the holder instead of writing beside it;
- under torchrun rank 0 alone claims and locks the folder, and every rank learns the outcome
  (`distributed.agree`), so a refused start stops every rank in one line.
"""
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from meml.errors import InputError
from meml.hf_checkpoint import atomic_write

LOCK = ".lock"
_held: dict[Path, int] = {}  # folder -> file descriptor of its lock, kept open for the process's life


def claim(folder: Path, argv: list[str], *, resume: bool, changes: list[str]) -> None:
    """Make `folder` this run's: locked, and for a new run empty before args.json (its command
    line) is written; a resume that changed flags (`changes`) records them in args.json too, so
    a later resume keeps them."""
    folder = Path(folder)
    if not resume:
        check_new(folder)  # before the lock creates the folder: "" and files are named as --output
    lock(folder)
    try:
        if not resume:
            check_new(folder)  # again, now that no other run can write there
    except InputError:
        release(folder)
        raise
    if not resume or changes:
        atomic_write(folder / "args.json", lambda tmp: Path(tmp).write_text(json.dumps(argv)))
    if changes:
        print(f"resuming with {' '.join(changes)} (recorded in {folder / 'args.json'})")


def abandon(folder: Path) -> None:
    """A new run that stopped before its first step (a mistake found while loading its inputs)
    leaves its folder as it found it, empty, so the corrected command can run there. What took
    work to make (teacher data, metrics, checkpoints) is kept, and the folder then needs --resume."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if any(p.name.startswith(("checkpoint-", "expert")) or p.name == "metrics.jsonl" for p in folder.iterdir()):
        return
    for path in folder.iterdir():
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_new(folder: Path) -> None:
    """A new run may start in `folder` only if it does not exist or holds nothing."""
    if str(folder) in ("", "."):
        raise InputError("--output must name a run folder (got the current directory)")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--output {folder}: is a file, not a folder")
    found = sorted(p.name for p in folder.iterdir() if p.name != LOCK) if folder.is_dir() else []
    if found:
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise InputError(f"--output {folder} is not empty ({listed}): continue the run there with "
                         f"--resume {folder}, or start this one in another --output")


def lock(folder: Path) -> None:
    """Hold `folder`'s lock until this process ends; a folder locked by another process is an
    error naming it (pid and host, as written into the lock file by its holder)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise InputError(f"{folder} is in use by {holder}: a run writes there now; wait for it to end "
                         "(or stop it), or choose another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    os.fsync(fd)  # other nodes read it (check_shared); NFS shows writes after a flush
    _held[key] = fd


def check_shared(folder: Path) -> None:
    """Under torchrun: every rank must see the run folder rank 0 claimed, the same files at the
    same path (ranks read args.json, checkpoints, reference/ and expert<n>.jsonl that rank 0
    writes). Each rank reads the lock file rank 0 just wrote; a rank that does not find rank 0's
    text there (another node with its own disk) stops every rank in one line."""
    from meml import distributed
    if distributed.world_size() == 1:
        return
    path = Path(folder) / LOCK
    seen = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    views = distributed.all_gather_objects((socket.gethostname(), seen))
    blind = [(rank, host) for rank, (host, text) in enumerate(views) if text != views[0][1]]
    if blind:
        rank, host = blind[0]
        raise InputError(f"{folder}: rank {rank} (on {host}) does not see the run folder rank 0 writes "
                         f"({len(blind)} of {len(views)} ranks): every node must mount one shared filesystem "
                         "(NFS, Lustre, ...) at the same path, since every rank reads the checkpoints and files "
                         "rank 0 writes there")


def release(folder: Path) -> None:
    """Let go of `folder`'s lock (the end of a run in a process that goes on, e.g. a test)."""
    fd = _held.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)
