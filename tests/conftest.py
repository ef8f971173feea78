"""Test setup: 8 fake CPU devices and a persistent compile cache, set before jax is imported."""

import os

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
