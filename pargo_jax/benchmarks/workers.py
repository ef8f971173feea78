"""A benchmark's cells trained by worker processes side by side, each pinned to its share of the cores.

On a 2-core CPU, the projector grid's step (small matmuls, many elementwise ops) gains little from a
second intra-op thread: a 64-token cell took 935-965 s in one process on both cores and 1396-1500 s
in each of two single-core processes side by side, 1.35x the cells an hour. A worker is the
benchmark's own command line plus ``--worker=I``: it pins itself to its share of the cores, trains
the cells it claims (a ``.claim`` file created exclusively beside the cell's result, so two workers
never train one cell) and writes them where the benchmark caches cells; the parent then finds them
all cached and writes the report. The parent holds the folder (:func:`exclusive`) while they train:
a second command on it would clear their claims.
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence


def core_shares(cores: Sequence[int], workers: int) -> list[list[int]]:
    """``cores`` split into ``workers`` contiguous shares as equal as they can be (each >= 1 core)."""
    if not 1 <= workers <= len(cores):
        raise ValueError(f"{workers} workers for {len(cores)} cores: use 1 to {len(cores)}.")
    cores, edges = sorted(cores), [round(i * len(cores) / workers) for i in range(workers + 1)]
    return [cores[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def claim(path: str) -> bool:
    """True for the one worker that first claims the cell whose result goes to ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = _create(path + ".claim")
    if fd is not None:
        os.close(fd)
    return fd is not None


def clear_claims(folder: str) -> None:
    """Drops the claims an earlier (finished or interrupted) set of workers left in ``folder``."""
    for path in glob.glob(os.path.join(folder, "*.claim")):
        os.remove(path)


@contextlib.contextmanager
def exclusive(folder: str) -> Iterator[None]:
    """Holds ``folder``'s lock (a file with this process's id) while one command trains into it; a second
    command on it stops with an error naming the first. A lock whose process has ended is taken over."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    while (fd := _create(path)) is None:
        owner = _owner(path)
        if owner is not None:
            raise SystemExit(f"Process {owner} is training into {folder}: wait for it or use another --out.")
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # left by a process that has ended
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        os.remove(path)


def _create(path: str) -> int | None:
    """A descriptor of the new file ``path``, or None when it exists."""
    try:
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None


def _owner(path: str) -> int | None:
    """The running process that holds the lock at ``path``, or None (ended, or no id in the file)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: raises if there is no such process
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: running
        pass
    return pid


def pin(index: int, workers: int) -> list[int]:
    """Pins this process (before it starts its compute threads) to worker ``index``'s share of the cores
    it may use; returns the share."""
    share = core_shares(sorted(os.sched_getaffinity(0)), workers)[index]
    os.sched_setaffinity(0, share)
    return share


def run(module: str, argv: Sequence[str], workers: int, log: Callable[[str], None] = print) -> None:
    """Runs ``python -m module argv --worker=I`` for I < ``workers`` (each calls :func:`pin` first), their
    output prefixed ``wI |``; a SystemExit naming the workers that failed."""
    log(f"{workers} workers on cores {core_shares(sorted(os.sched_getaffinity(0)), workers)}")
    procs, readers = [], []
    for i in range(workers):
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *argv, f"--worker={i}"], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        reader = threading.Thread(target=_relay, args=(proc, f"w{i} | ", log))
        reader.start()
        procs.append(proc)
        readers.append(reader)
    codes = [proc.wait() for proc in procs]
    for reader in readers:
        reader.join()
    failed = [f"w{i} (exit {code})" for i, code in enumerate(codes) if code]
    if failed:
        raise SystemExit(f"Workers failed: {', '.join(failed)}; their output is above.")


def _relay(proc: subprocess.Popen, prefix: str, log: Callable[[str], None]) -> None:
    for line in proc.stdout:
        log(prefix + line.rstrip("\n"))
