"""Test setup: 8 fake CPU devices, fast-compile flags and the shared compile cache, set before jax is
imported and inherited by every command a test starts (:func:`tests.procs.child_env`)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] += (
    "" if "device_count" in os.environ["XLA_FLAGS"] else " --xla_force_host_platform_device_count=8"
)
# Tests are compile-bound on 2 cores: skip LLVM's expensive optimizations (numerics are unchanged).
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pargo_jax.process_setup import use_compile_cache  # noqa: E402

use_compile_cache()  # ~/.cache/pargo_jax/jax unless JAX_COMPILATION_CACHE_DIR says otherwise

import pytest  # noqa: E402


def once(tmp_path_factory, name: str, build):
    """``build(path)`` run once for the whole test run, also across pytest-xdist workers: the first
    worker to ask builds it under a file lock, the others wait for it and reuse the result (a JSON
    value). Tests only read what it built; what one adds beside it (eval results) no other test reads."""
    import fcntl
    import json

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the run's, not the worker's
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / f"{name}.json"
        if not done.exists():
            done.write_text(json.dumps(build(str(root / name))))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """A small shapes build (tests/demo.py's SMALL_SHAPES) and its demo tower, shared by the whole run."""

    def build(path: str) -> str:
        from pargo_jax import prepare
        from tests.demo import build_shapes, demo_config

        build_shapes(path)
        prepare.prepare_demo_tower(demo_config(path, 1))
        return path

    return once(tmp_path_factory, "shapes", build)


@pytest.fixture(scope="session")
def trained_workdir(shapes_dir, tmp_path_factory) -> str:
    """A demo SFT run of 60 steps from scratch (everything trains) with the ``shapes`` and ``val``
    evals configured and checkpoints at steps 30 and 60: the workdir predict / evaluate start from."""
    from experiments import base, evals, sft
    from tests.demo import demo_config, prepare_and_train

    def build(workdir: str) -> str:
        config = demo_config(
            shapes_dir, 60, stage=sft, log_every_steps=10, mesh=dict(data=-1, fsdp=1, tensor=1),  # 8 devices
            **{"checkpoint.init_from": None, "checkpoint.every_steps": 30, "optim.lr": 3e-3},
        )  # fmt: skip
        config.trainable = base.regex_dict({".*": 1.0})
        config.evals = evals.get_config("shapes,val")
        prepare_and_train(config, workdir)
        return workdir

    return once(tmp_path_factory, "trained_sft", build)


@pytest.fixture(scope="session")
def mg_llava_workdirs(shapes_dir, tmp_path_factory) -> dict[str, str]:
    """``mg_llava_demo``'s two stages, 3 steps each, on 2 devices, configured as ``python -m
    pargo_jax.main --config=experiments/STAGE.py:mg_llava_demo`` would be: ``{"pretrain", "sft"}``
    workdirs and ``log``, what the SFT run printed."""
    import contextlib
    import io

    from experiments import pretrain, sft
    from tests.demo import demo_config, prepare_and_train

    def build(root: str) -> dict[str, str]:
        out = {"pretrain": os.path.join(root, "pt"), "sft": os.path.join(root, "sft")}
        stages = {"pretrain": (pretrain, {}), "sft": (sft, {"checkpoint.init_from": out["pretrain"]})}
        for name, (stage, extra) in stages.items():
            config = demo_config(shapes_dir, 3, stage=stage, preset="mg_llava_demo", **{
                "optim.warmup_steps": 1, "mesh.num_devices": 2, **extra})  # fmt: skip
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                prepare_and_train(config, out[name])
        return {**out, "log": printed.getvalue()}

    return once(tmp_path_factory, "mg_llava", build)


# Tests on a trained workdir pay for its training (the 60-step demo run, MG-LLaVA's two stages) unless
# another test built it first: they are slow by construction and leave the fast tier.
SLOW_FIXTURES = {"trained_workdir", "mg_llava_workdirs"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
