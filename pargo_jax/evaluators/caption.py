"""Image captioning (COCO captions): CIDEr-D and BLEU-4 as pycocoevalcap computes them.

``cider_d(predictions, references)`` equals pycocoevalcap's ``Cider().compute_score`` on the same
tokenized strings, quirks included (tf-idf over 1-4-grams with document frequencies from the
references, the clipped cosine, a Gaussian length penalty with sigma 6 on the *bigram* counts as the
scorer counts them, x10, mean over references then images); ``bleu4`` equals ``Bleu(4)`` (corpus
n-gram counts, "closest" reference length, its 1e-9 / 1e-15 smoothing). Official COCO numbers
tokenize with the Java Stanford PTB tokenizer; :func:`ptb_tokenize` is a Java-free approximation
(lowercase, PTB clitics split, the punctuation tokens pycocoevalcap drops removed), so numbers
computed here may differ slightly from the official ones where the two tokenizers disagree.

Data: ``data=dict(annotations=captions_val2014.json, images=<dir with its file_name images>)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence

from pargo_jax.evaluators import common

_DROP = {
    "''",
    "'",
    "``",
    "`",
    "-lrb-",
    "-rrb-",
    "-lcb-",
    "-rcb-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|[a-z0-9]+(?:[-./][a-z0-9]+)*|\S", re.IGNORECASE)


def ptb_tokenize(text: str) -> str:
    """Lowercased PTB-style tokens joined by spaces, punctuation tokens removed."""
    text = text.replace("\n", " ").lower()
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text)
    tokens = _TOKEN.findall(text)
    return " ".join(t for t in tokens if t not in _DROP)


def _ngrams(sentence: str, n: int = 4) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D of tokenized ``predictions`` {id: caption} against ``references`` {id: [captions]}."""
    return cider_d_per_image(predictions, references, sigma)[0]


def cider_d_per_image(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], sigma: float = 6.0
) -> tuple[float, dict[str, float]]:
    """(corpus CIDEr-D, {id: CIDEr-D}); see the module docstring."""
    if set(predictions) != set(references):
        raise ValueError("cider_d needs a prediction for every image with references, and only those.")
    ids = list(references)
    refs = {i: [_ngrams(r) for r in references[i]] for i in ids}
    if any(not r for r in refs.values()):
        raise ValueError("Every image needs at least one reference caption.")
    df: Counter = Counter()
    for i in ids:
        df.update({g for r in refs[i] for g in r})
    log_n = math.log(float(len(ids)))

    def vector(counts: Counter):
        vec = [dict() for _ in range(4)]
        norm = [0.0] * 4
        bigrams = 0
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[k] += vec[k][g] ** 2
            bigrams += tf if k == 1 else 0  # the scorer's "length" counts bigrams
        return vec, [math.sqrt(x) for x in norm], bigrams

    def similarity(hyp, ref) -> list[float]:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        out = []
        for k in range(4):
            val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            out.append(val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2)))
        return out

    per_image = {}
    for i in ids:
        hyp = vector(_ngrams(predictions[i]))
        total = [0.0] * 4
        for r in refs[i]:
            total = [a + b for a, b in zip(total, similarity(hyp, vector(r)))]
        per_image[i] = 10.0 * (sum(total) / 4) / len(refs[i])
    return sum(per_image.values()) / len(per_image), per_image


def bleu4(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> float:
    """Corpus BLEU-4 as pycocoevalcap's ``Bleu(4)`` ("closest" reference length)."""
    small, tiny = 1e-9, 1e-15
    guess, correct, testlen, reflen = [0] * 4, [0] * 4, 0, 0
    for i, pred in predictions.items():
        words = pred.split()
        counts = _ngrams(pred)
        maxref: Counter = Counter()
        for r in references[i]:
            maxref |= _ngrams(r)
        lengths = [len(r.split()) for r in references[i]]
        testlen += len(words)
        reflen += min((abs(n - len(words)), n) for n in lengths)[1]
        for k in range(4):
            guess[k] += max(0, len(words) - k)
        for g, c in counts.items():
            correct[len(g) - 1] += min(maxref.get(g, 0), c)
    score = 1.0
    for k in range(4):
        score *= (correct[k] + tiny) / (guess[k] + small)
    score **= 1 / 4
    ratio = (testlen + tiny) / (reflen + small)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def load_coco_captions(annotations: str, images: str) -> tuple[list[dict], dict[str, list[str]]]:
    """(images ``[{"id", "image"}]``, references ``{id: [captions]}``) of a COCO captions file."""
    if not os.path.exists(annotations):
        raise FileNotFoundError(f"COCO captions file {annotations!r} not found (e.g. captions_val2014.json).")
    with open(annotations, encoding="utf-8") as f:
        data = json.load(f)
    if not {"images", "annotations"} <= set(data):
        raise ValueError(f"{annotations} is not a COCO captions file (needs 'images' and 'annotations').")
    refs: dict[str, list[str]] = {}
    for a in data["annotations"]:
        refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    items = [
        {"id": str(im["id"]), "image": os.path.join(images, im["file_name"])}
        for im in data["images"]
        if str(im["id"]) in refs
    ]
    return items, refs


class CaptionEvaluator(common.Evaluator):
    """COCO captions: CIDEr-D and BLEU-4 on PTB-style tokens."""

    OPTIONS = {
        "prompt": "Provide a one-sentence caption for the provided image.",
        "max_new_tokens": 32,
        "method": "greedy",
        "num_beams": 4,
    }
    DATA_KEYS = frozenset({"annotations", "images"})

    def evaluate(self, params, out_dir):
        from pargo_jax.predictor import question

        items, refs = load_coco_captions(self.data_dir("annotations"), self.data_dir("images"))
        done, skipped = self.ask(
            params, items, lambda it, image: question(it["id"], image, self.options["prompt"])
        )
        got = {it["id"]: a["answer"] for it, a in done}
        tokenized = {i: ptb_tokenize(c) for i, c in got.items()}
        ref_tok = {i: [ptb_tokenize(r) for r in refs[i]] for i in got}
        metrics = {
            "cider_d": cider_d(tokenized, ref_tok) if got else 0.0,
            "bleu4": bleu4(tokenized, ref_tok) if got else 0.0,
            "images": float(len(got)),
            "skipped": float(skipped),
        }
        predictions = [{"id": i, "caption": c, "references": refs[i]} for i, c in got.items()]
        return metrics, predictions
