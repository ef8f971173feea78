"""Worker processes of a benchmark: core shares, cell claims and the parent's hold on the folder (the
processes themselves run in the projector grid's command-line test)."""

import os
import subprocess
import sys

import pytest

from pargo_jax.benchmarks import workers


def test_cores_are_shared_out_contiguously_and_evenly():
    assert workers.core_shares([0, 1], 2) == [[0], [1]]
    assert workers.core_shares([3, 0, 2, 1, 4], 2) == [[0, 1], [2, 3, 4]]
    assert workers.core_shares([0, 1, 2, 3], 1) == [[0, 1, 2, 3]]
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"{bad} workers for 2 cores"):
            workers.core_shares([0, 1], bad)


def test_a_cell_is_claimed_once_until_the_claims_are_cleared(tmp_path):
    path = str(tmp_path / "cells" / "pargo-t16.json")
    assert workers.claim(path) and not workers.claim(path)
    assert workers.claim(str(tmp_path / "cells" / "qformer-t16.json"))
    workers.clear_claims(str(tmp_path / "cells"))
    assert not list((tmp_path / "cells").iterdir()) and workers.claim(path)


def test_a_failed_worker_is_named(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1})  # the workers never pin
    monkeypatch.chdir(tmp_path)
    (tmp_path / "failing.py").write_text(
        "import sys\nprint('worker', sys.argv[-1])\nsys.exit(sys.argv[-1] == '--worker=1')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(SystemExit, match=r"Workers failed: w1 \(exit 1\)"):
        workers.run("failing", [], 2, log=lines.append)
    assert lines[0] == "2 workers on cores [[0], [1]]" and sorted(lines[1:]) == [
        "w0 | worker --worker=0",
        "w1 | worker --worker=1",
    ]


def test_a_worker_pins_itself_to_its_share():
    import os

    before = os.sched_getaffinity(0)
    try:
        share = workers.pin(len(before) - 1, len(before))  # the last core alone
        assert share == [max(before)] and os.sched_getaffinity(0) == set(share)
    finally:
        os.sched_setaffinity(0, before)


def test_one_command_at_a_time_holds_a_folder(tmp_path):
    folder, lock = str(tmp_path / "cells"), tmp_path / "cells" / ".lock"
    with workers.exclusive(folder):
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(SystemExit, match=f"Process {os.getpid()} is training into .*cells"):
            with workers.exclusive(folder):
                pass
    assert not lock.exists()  # released
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    lock.write_bytes(ended.stdout.strip())  # left by a process that has ended: taken over
    with workers.exclusive(folder):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()
