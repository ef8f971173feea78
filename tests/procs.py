"""The one way tests start a command: ``python -m MODULE ARGS`` in the repository root, with the test
session's environment (fast-compile XLA flags, compile cache) and only the device count changed."""

from __future__ import annotations

import os
import subprocess
import sys

from pargo_jax.process_setup import host_device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """``os.environ`` with ``devices`` fake CPU devices (None: the session's 8) and ``extra`` set."""
    env = {**os.environ, **extra}
    if devices is not None:
        env["XLA_FLAGS"] = host_device_flags(env.get("XLA_FLAGS", ""), devices)
    return env


def command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run(
    module: str, *args: str, devices: int | None = None, timeout: float = 600, cwd: str = ROOT
) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` to the end, output captured as text."""
    return subprocess.run(
        command(module, *args), cwd=cwd, env=child_env(devices), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def popen(module: str, *args: str, devices: int | None = None, **kwargs) -> subprocess.Popen:
    """Starts ``python -m module args`` without waiting (``kwargs`` go to ``subprocess.Popen``)."""
    return subprocess.Popen(command(module, *args), cwd=ROOT, env=child_env(devices), **kwargs)
