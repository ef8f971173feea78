"""Masked loss, perplexity and token accuracy on a held-out split (the training loss, measured).

    config.evals.val = dict(type="perplexity", data=dict(name="shapes", split="eval"), log_steps=100)

Each record is tokenized, masked and padded exactly as in training (``input.max_len``,
``input.overlong``, ``input.caption_prompt``); the loss covers the answer tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax

from pargo_jax.evaluators import common


def perplexity_metrics(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """From per-example sums (``logprob``, ``tokens``, ``correct``): token-weighted ``loss`` (mean
    negative log-likelihood), ``perplexity`` = exp(loss), ``token_accuracy``, ``tokens``, ``examples``."""
    tokens = sum(r["tokens"] for r in rows)
    loss = -sum(r["logprob"] for r in rows) / max(tokens, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "token_accuracy": sum(r["correct"] for r in rows) / max(tokens, 1.0),
        "tokens": float(tokens),
        "examples": float(len(rows)),
    }


class PerplexityEvaluator(common.Evaluator):
    def evaluate(self, params, out_dir):
        from data_pipelines.schema import BadRecord
        from data_pipelines.text import pack_example
        from pargo_jax.predict import PredictError

        records, bad = self.records()
        cfg, p = self.config.input, self.predictor
        examples, skipped = [], 0
        for i, rec in enumerate(records):
            if i % jax.process_count() != jax.process_index():  # another process prepares it
                examples.append(None)
                continue
            try:
                arrays = pack_example(
                    p.tokenizer, rec.messages(cfg.get("caption_prompt", "")),
                    num_image_tokens=p.mcfg.num_image_tokens, max_len=cfg.max_len,
                    overlong=cfg.get("overlong", "truncate"), record_id=rec.id,
                )  # fmt: skip
                examples.append(
                    p.with_boxes(dict(arrays, image=p.pixels(rec.image, rec.id)), rec.image, rec.boxes)
                )
            except (BadRecord, PredictError):
                examples.append(None)
                skipped += 1
        rows = p.scores(params, examples, batch_size=self.batch_size)
        kept = [(rec, r) for rec, r in zip(records, rows) if r is not None]
        metrics = perplexity_metrics([r for _, r in kept])
        metrics["skipped"] = float(common.process_sum(skipped) + sum(bad.values()))
        predictions = [
            {"id": rec.id, "loss": -r["logprob"] / max(r["tokens"], 1.0), "tokens": int(r["tokens"])}
            for rec, r in kept
        ]
        return metrics, predictions
