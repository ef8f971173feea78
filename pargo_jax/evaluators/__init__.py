"""Evaluators, built from ``config.evals = {name: dict(type=..., ...)}``; see ``common.py``.

``type``: ``perplexity`` (masked loss / token accuracy on a held-out split), ``shapes`` (the embedded
benchmark: accuracy per question kind and grounding Acc@0.5), ``mme`` (MME, official or ParGo rule),
``vqa`` (VQA v2 / TextVQA / VizWiz), ``gqa``, ``pope``, ``multiple_choice`` (MMBench circular,
ScienceQA-IMG), ``grounding`` (RefCOCO/+/g REC), ``caption`` (COCO: CIDEr-D, BLEU-4).
A new evaluator is a :class:`~pargo_jax.evaluators.common.Evaluator` subclass and one ``EVALUATORS``
entry.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from typing import Any

import jax

from pargo_jax import paths
from pargo_jax.evaluators.common import Evaluator, evals_config

# type -> "module:class", imported when first built (so `python -m pargo_jax.evaluators.mme` and
# the other standalone scorers load only what they use).
EVALUATORS: dict[str, str] = {
    "perplexity": "pargo_jax.evaluators.perplexity:PerplexityEvaluator",
    "shapes": "pargo_jax.evaluators.shapes:ShapesEvaluator",
    "mme": "pargo_jax.evaluators.mme:MMEEvaluator",
    "vqa": "pargo_jax.evaluators.vqa:VQAEvaluator",
    "gqa": "pargo_jax.evaluators.vqa:GQAEvaluator",
    "pope": "pargo_jax.evaluators.vqa:POPEEvaluator",
    "multiple_choice": "pargo_jax.evaluators.multiple_choice:MultipleChoiceEvaluator",
    "grounding": "pargo_jax.evaluators.grounding:GroundingEvaluator",
    "caption": "pargo_jax.evaluators.caption:CaptionEvaluator",
}


def evaluator_class(kind: str) -> type[Evaluator]:
    module, _, name = EVALUATORS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def build(evals: Mapping[str, Mapping[str, Any]], predictor, config) -> dict[str, Evaluator]:
    """One evaluator per ``evals`` entry (unknown types fail naming the registered ones)."""
    out = {}
    for name, options in evals.items():
        kind = dict(options).get("type")
        if kind not in EVALUATORS:
            raise ValueError(
                f"config.evals.{name}.type={kind!r} is unknown; use one of {sorted(EVALUATORS)}."
            )
        out[name] = evaluator_class(kind)(name, options, predictor, config)
    return out


def run_all(
    evals: Mapping[str, Evaluator], params, step: int, workdir: str, writer=None, *, tables: bool = False
) -> dict[str, float]:
    """Runs ``evals`` on ``params``: results in ``{workdir}/eval/{step}/``, scalars ``eval/<name>/<metric>``
    to ``writer`` (a ``metrics.MetricWriter``), one console line per evaluator (and its table with
    ``tables``). Returns the scalars."""
    from pargo_jax import metrics

    logged: dict[str, float] = {}
    for name, ev in evals.items():
        t0 = time.perf_counter()
        values = dict(ev.run(params, out_dir=paths.join(workdir, "eval", str(step))))
        scalars = {f"eval/{name}/{k}": float(v) for k, v in values.items()}
        if writer:
            writer.write(step, scalars)
        if jax.process_index() == 0:
            shown = " | ".join(f"{k} {metrics.format_value(k, v)}" for k, v in values.items())
            print(f"eval {name} @ step {step} ({time.perf_counter() - t0:.1f} s) | {shown}", flush=True)
            if tables:
                print(ev.table(values), flush=True)
        logged.update(scalars)
    return logged


__all__ = ["EVALUATORS", "Evaluator", "build", "evaluator_class", "evals_config", "run_all"]
