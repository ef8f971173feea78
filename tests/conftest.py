"""Test setup: 8 fake CPU devices and a persistent compile cache, set before jax is imported."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] += (
    "" if "device_count" in os.environ["XLA_FLAGS"] else " --xla_force_host_platform_device_count=8"
)
# Tests are compile-bound on 2 cores: skip LLVM's expensive optimizations (numerics are unchanged).
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)

import jax  # noqa: E402

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """A small shapes build (tests/demo.py's SMALL_SHAPES) shared by the whole session."""
    from tests.demo import build_shapes

    return build_shapes(str(tmp_path_factory.mktemp("shapes_session")))


@pytest.fixture(scope="session")
def trained_workdir(shapes_dir, tmp_path_factory) -> str:
    """A demo SFT run of 60 steps from scratch (everything trains) with the ``shapes`` and ``val``
    evals configured and checkpoints at steps 30 and 60: the workdir predict / evaluate start from."""
    from experiments import base, evals, sft
    from pargo_jax import train
    from tests.demo import demo_config

    config = demo_config(
        shapes_dir, 60, stage=sft, log_every_steps=10,
        **{"checkpoint.init_from": None, "checkpoint.every_steps": 30, "optim.lr": 3e-3},
    )  # fmt: skip
    config.trainable = base.regex_dict({".*": 1.0})
    config.evals = evals.get_config("shapes,val")
    workdir = str(tmp_path_factory.mktemp("trained") / "sft")
    train.run(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def mg_llava_workdirs(shapes_dir, tmp_path_factory) -> dict[str, str]:
    """``mg_llava_demo``'s two stages, 3 steps each, through ``python -m pargo_jax.main`` (2 devices):
    ``{"pretrain", "sft"}`` workdirs and ``log``, the SFT command's output."""
    import subprocess
    import sys

    from tests.demo import demo_flags

    root = tmp_path_factory.mktemp("mg_llava")
    out = {"pretrain": str(root / "pt"), "sft": str(root / "sft")}
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for stage, extra in (("pretrain", []), ("sft", [f"--config.checkpoint.init_from={out['pretrain']}"])):
        cmd = [sys.executable, "-m", "pargo_jax.main", f"--config=experiments/{stage}.py:mg_llava_demo",
               f"--workdir={out[stage]}", f"--config.input.data_dir={shapes_dir}", "--config.total_steps=3",
               "--config.optim.warmup_steps=1", "--config.log_every_steps=1", *demo_flags(shapes_dir),
               *extra]  # fmt: skip
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
    out["log"] = run.stderr + run.stdout
    return out
