"""Masked loss, perplexity and token accuracy on a held-out split (the training loss, measured).

    config.evals.val = dict(type="perplexity", data=dict(name="shapes", split="eval"), log_steps=100)

Each record is tokenized, masked and padded exactly as in training (``input.max_len``,
``input.overlong``, ``input.caption_prompt``); the loss covers the answer tokens only.

``groups={name: [word, ...]}`` also reports ``<name>_loss``, ``<name>_token_accuracy`` and
``<name>_tokens`` over the answer tokens that are one of those words (alone or after a space), e.g.
only the colour words of captions: how well each detail of the image reaches the LLM, teacher-forced
and without decoding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

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


def word_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The ids of ``words`` that are one token, alone or after a space (a word that is neither, e.g.
    split into pieces or unknown, fails naming it: its group would silently measure nothing)."""
    ids = []
    for w in words:
        pieces = (tokenizer.encode(w), tokenizer.encode(" " + w))
        found = [e[0] for e in pieces if len(e) == 1 and tokenizer.decode(e).strip() == w]  # not <unk>
        if not found:
            raise ValueError(f"groups: {w!r} is not one token of the tokenizer; name single-token words.")
        ids += found
    return sorted(set(ids))


class PerplexityEvaluator(common.Evaluator):
    OPTIONS = {"groups": {}}

    def evaluate(self, params, out_dir):
        from data_pipelines.schema import BadRecord
        from data_pipelines.text import pack_example
        from pargo_jax.predictor import PredictError

        records, bad = self.records()
        cfg, p = self.config.input, self.predictor
        groups = {g: word_ids(p.tokenizer, w) for g, w in self.options["groups"].items()}  # fail early
        examples, skipped = [], 0
        for i, rec in enumerate(records):
            if i % jax.process_count() != jax.process_index():  # another process prepares it
                examples.append(None)
                continue
            try:
                arrays = pack_example(
                    p.tokenizer, rec.messages(cfg.get("caption_prompt", "")),
                    num_image_tokens=p.mcfg.num_image_tokens, num_images=len(rec.images), max_len=cfg.max_len,
                    overlong=cfg.get("overlong", "truncate"), record_id=rec.id,
                )  # fmt: skip
                if groups:  # each group's share of the answer tokens, scored in the same pass
                    hits = [np.isin(arrays["targets"], ids) for ids in groups.values()]
                    arrays["group_masks"] = np.stack(hits).astype(np.float32)
                pixels = p.pixels_of(rec.images, rec.id)  # a text-only record (no image) is skipped
                examples.append(p.with_boxes(dict(arrays, image=pixels), rec.image, rec.boxes))
            except (BadRecord, PredictError):
                examples.append(None)
                skipped += 1
        rows = p.scores(params, examples, batch_size=self.batch_size, groups=len(groups))
        kept = [(rec, r) for rec, r in zip(records, rows) if r is not None]
        metrics = perplexity_metrics([r for _, r in kept])
        for g, group in enumerate(groups):
            sums = [{k: r[f"group_{k}"][g] for k in ("logprob", "tokens", "correct")} for _, r in kept]
            m = perplexity_metrics(sums)
            metrics.update({f"{group}_{k}": m[k] for k in ("loss", "token_accuracy", "tokens")})
        metrics["skipped"] = float(common.process_sum(skipped) + sum(bad.values()))
        predictions = [
            {"id": rec.id, "loss": -r["logprob"] / max(r["tokens"], 1.0), "tokens": int(r["tokens"])}
            for rec, r in kept
        ]
        return metrics, predictions
