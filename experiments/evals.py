"""Evaluations by name, for ``config.evals`` and for ``--evals=experiments/evals.py:NAME[,NAME...]``.

  python -m pargo_jax.evaluate --workdir=workdir/sft --evals=experiments/evals.py:shapes,val

Each entry is ``dict(type=..., data=dict(name=, split=[, data_dir=]), log_steps=..., batch_size=...)``
plus the evaluator's own options (see ``pargo_jax/evaluators``); ``data_dir`` defaults to the run's
``input.data_dir``. ``log_steps=0``: only when training ends. Entries list every field they use, so
the command line can change any of them (``--config.evals.shapes.batch_size=8``).
"""

import ml_collections

EVALS = {
    # The embedded benchmark: accuracy per question kind + grounding Acc@0.5 on held-out questions.
    "shapes": dict(
        type="shapes", data=dict(name="shapes", split="eval"), log_steps=0, batch_size=16, max_new_tokens=32
    ),
    # Masked loss / token accuracy on held-out captions (stage 1's validation loss).
    "val": dict(type="perplexity", data=dict(name="shapes", split="val"), log_steps=0, batch_size=16),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    names = [n for n in (arg or "shapes").split(",") if n]
    unknown = sorted(set(names) - set(EVALS))
    if unknown:
        raise ValueError(f"Unknown eval(s) {unknown}; choose from {sorted(EVALS)}.")
    return ml_collections.ConfigDict({n: EVALS[n] for n in names})
