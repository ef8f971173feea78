"""Command line: ``python -m pargo_jax.main --config=experiments/pretrain.py[:preset] [--config.x=y]``.

``--workdir`` defaults to ``./workdir/<experiment>`` (``_<preset>`` appended for non-default presets);
a run resumes from the newest checkpoint in its workdir. Multi-host: ``jax.distributed.initialize()``
runs when a cluster is detected (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS) or with --multihost=yes;
``--coordinator_address``, ``--num_processes`` and ``--process_id`` start a job by hand (e.g. several
processes on one machine; on CPU they talk through gloo collectives):

  python -m pargo_jax.main --config=... --multihost=yes --coordinator_address=localhost:12355 \
      --num_processes=2 --process_id=0     # and --process_id=1 in a second shell
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file[:preset].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")
_MULTIHOST = flags.DEFINE_enum("multihost", "auto", ["auto", "yes", "no"], "jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (by hand).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (by hand).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (by hand).")
CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def default_workdir(config_arg: str) -> str:
    path, _, preset = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("workdir", f"{name}_{preset}" if preset and preset != "demo" else name)


def multihost_wanted(mode: str) -> bool:
    if mode != "auto":
        return mode == "yes"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return any(os.environ.get(k) for k in CLUSTER_ENV if k != "TPU_WORKER_HOSTNAMES") or "," in hosts


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; use --config.key=value to override fields.")
    import jax

    if multihost_wanted(_MULTIHOST.value):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; else unused
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from pargo_jax import prepare, train

    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize().split("=", 1)[1])
    logging.info("Process %d/%d, workdir %s", jax.process_index(), jax.process_count(), workdir)
    train.check_config(_CONFIG.value)  # a mistyped key fails before the demo's data and tower are built
    prepare.prepare_run(_CONFIG.value, workdir)
    train.run(_CONFIG.value, workdir)


if __name__ == "__main__":
    from pargo_jax import launcher

    launcher.run(main, required=["config"])
