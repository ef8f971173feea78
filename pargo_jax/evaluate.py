"""Evaluate a checkpoint: ``python -m pargo_jax.evaluate --workdir W [--step N]``.

Runs the run's configured evals (``config.evals`` of ``W/config.json``; change any field with
``--config.evals.<name>.<field>=...``) or the ones an evals file names
(``--evals=experiments/evals.py:shapes,val``, fields again with ``--evals.<name>.<field>=...``) on
checkpoint ``N`` (default: the newest), writes ``W/eval/<N>/<name>.json`` and
``<name>.predictions.jsonl`` and prints a table per evaluator. Same checkpoint, same evals, same mesh
size: the numbers the run logged when training ended.
"""

from __future__ import annotations

import sys

import ml_collections


def _argv_value(argv: list[str], name: str) -> str | None:
    """``--name=value`` / ``--name value`` from the raw command line (before absl parses it)."""
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def evaluate(
    workdir: str,
    step: int | None,
    config: ml_collections.ConfigDict,
    evals: ml_collections.ConfigDict | None = None,
) -> None:
    """The command's work: ``config`` is the run's (``W/config.json``, overridden); ``evals`` replace
    its ``config.evals`` when given. A run with no evals or no such checkpoint exits with one line."""
    import jax

    from pargo_jax import evaluators
    from pargo_jax.predictor import Predictor
    from pargo_jax.runs import load_workdir

    if evals is not None:
        with config.unlocked():
            config.evals = evals
    chosen = evaluators.evals_config(config)
    if not chosen:
        sys.exit("evaluate: the run configures no evals; name some with --evals=experiments/evals.py:shapes")
    try:
        trained = load_workdir(workdir, step)
    except FileNotFoundError as e:
        sys.exit(f"evaluate: {e}")
    predictor = Predictor.from_config(trained.model, trained.tokenizer, trained.mesh, config)
    built = evaluators.build(chosen, predictor, config)
    if jax.process_index() == 0:
        print(f"Evaluating {trained.workdir} at step {trained.step}: {', '.join(built)}", flush=True)
    evaluators.run_all(built, trained.params, trained.step, trained.workdir, tables=True)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from pargo_jax import configs, launcher

    _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")

    workdir = _argv_value(sys.argv[1:], "workdir")
    if not workdir:
        sys.exit("evaluate: --workdir is required: the workdir of a training run")
    try:
        run_config = configs.load_run_config(workdir)
    except FileNotFoundError as e:
        sys.exit(f"evaluate: {e}")
    config_flags.DEFINE_config_dict("config", run_config, "The run's config (from W/config.json).")
    config_flags.DEFINE_config_file("evals", None, "An evals file[:names] replacing config.evals.")

    def main(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments {argv[1:]}; use --config.evals.<name>.<field>=value.")
        evaluate(_WORKDIR.value, _STEP.value, flags.FLAGS["config"].value, flags.FLAGS["evals"].value)

    launcher.run(main)
