"""Short-answer VQA benchmarks by their official rules: VQA v2 / TextVQA / VizWiz (``vqa``), GQA
(``gqa``) and POPE (``pope``).

``vqa_accuracy`` is the current VQA v2 evaluation code (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``): answers and prediction lose newlines, tabs and
outer spaces; only when the ground-truth answers disagree are punctuation, number words, articles and
contractions normalized (so "Two" scores 0 when all ten answers are "2"); the accuracy is the mean
over the 10 leave-one-out subsets of min(1, matches / 3). GQA: exact match after lowercasing and
stripping punctuation. POPE (``evaluate.py`` of the POPE release): the first sentence of the answer is
"no" when it holds the word "No", "no" or "not", else "yes"; accuracy, precision, recall, F1 and the
share of "yes" answers.

Data (``data``):
  vqa   ``questions`` + ``annotations`` (VQA v2 ``v2_OpenEnded_mscoco_val2014_questions.json`` +
        ``v2_mscoco_val2014_annotations.json``, images ``COCO_val2014_<id:012d>.jpg``), or only
        ``annotations`` = TextVQA's ``TextVQA_0.5.1_val.json`` (images ``<image_id>.jpg``) or VizWiz's
        ``val.json`` (images by name); ``images``: the image directory.
  gqa   ``questions`` (``testdev_balanced_questions.json``), ``images`` (``<imageId>.jpg``).
  pope  ``questions`` (``coco_pope_{random,popular,adversarial}.json``, one JSON object per line with
        ``question_id``, ``image``, ``text``, ``label``), ``images`` (COCO val2014).
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from pargo_jax.evaluators import common

# The VQA tool's tables (vqaEval.py): contractions without apostrophes -> with, number words -> digits.
_CONTRACTIONS = dict(
    pair.split(">")
    for pair in (
        "aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've "
        "couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've "
        "hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's "
        "howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd "
        "itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't "
        "mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've "
        "neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at "
        "'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've "
        "shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd "
        "somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's "
        "someoned>someone'd someoned've>someone'd've someone'dve>someone'd've someonell>someone'll "
        "someones>someone's somethingd>something'd somethingd've>something'd've "
        "something'dve>something'd've somethingll>something'll thats>that's thered>there'd "
        "thered've>there'd've there'dve>there'd've therere>there're theres>there's theyd>they'd "
        "theyd've>they'd've they'dve>they'd've theyll>they'll theyre>they're theyve>they've twas>'twas "
        "wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've werent>weren't whatll>what'll whatre>what're "
        "whats>what's whatve>what've whens>when's whered>where'd wheres>where's whereve>where've whod>who'd "
        "whod've>who'd've who'dve>who'd've wholl>who'll whos>who's whove>who've whyll>why'll whyre>why're "
        "whys>why's wont>won't wouldve>would've wouldnt>wouldn't wouldnt've>wouldn't've "
        "wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll yall'd've>y'all'd've "
        "y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've you'dve>you'd've "
        "youll>you'll youre>you're youve>you've"
    ).split()
)
_NUMBERS = dict(
    zip(
        "none zero one two three four five six seven eight nine ten".split(),
        "0 0 1 2 3 4 5 6 7 8 9 10".split(),
    )
)
_ARTICLES = ("a", "an", "the")
_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written in the tool: a period not followed by a digit
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=re.UNICODE)  # the tool passes re.UNICODE (32) as sub's count


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA v2 accuracy of ``prediction`` against the (10) human ``answers``, in [0, 1]."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer.")
    gts = [_strip(a) for a in answers]
    pred = _strip(prediction)
    if len(set(gts)) > 1:
        gts = [_digits_articles(_punctuation(a)) for a in gts]
        pred = _digits_articles(_punctuation(pred))
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def gqa_match(prediction: str, answer: str) -> bool:
    """GQA: exact match after lowercasing and stripping punctuation (and surrounding spaces)."""
    clean = lambda s: " ".join(s.lower().translate(str.maketrans("", "", string.punctuation)).split())
    return clean(prediction) == clean(answer)


def pope_answer(prediction: str) -> str:
    """POPE's rule: ``no`` if the first sentence holds the word ``No``, ``no`` or ``not``, else ``yes``."""
    text = prediction.split(".")[0] if "." in prediction else prediction
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (``yes`` is the positive class) and ``yes_ratio``."""
    pred = [pope_answer(p) == "yes" for p in predictions]
    gold = [lab.strip().lower() != "no" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(pred), 1)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred) / n,
    }


# --- the benchmarks' files ---------------------------------------------------------------------------
def _read_json(path: str, what: str) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{what} file {path!r} not found; see the layout in pargo_jax/evaluators/vqa.py."
        )
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e.msg} at line {e.lineno}).") from e


def load_vqa(annotations: str, images: str, questions: str | None = None) -> list[dict[str, Any]]:
    """``[{"id", "image", "question", "answers", "type"}]`` of VQA v2 (questions + annotations),
    TextVQA or VizWiz (annotations alone)."""
    ann = _read_json(annotations, "annotations")
    if questions:  # VQA v2: questions + annotations joined by question_id
        qs = _read_json(questions, "questions")
        if "questions" not in qs or "annotations" not in ann:
            raise ValueError(f"{questions} / {annotations} are not a VQA v2 questions + annotations pair.")
        subtype = qs.get("data_subtype", "val2014")
        by_id = {a["question_id"]: a for a in ann["annotations"]}
        missing = [q["question_id"] for q in qs["questions"] if q["question_id"] not in by_id]
        if missing:
            raise ValueError(
                f"{len(missing)} questions have no annotation (e.g. {missing[:3]}) in {annotations}."
            )
        return [
            {
                "id": str(q["question_id"]),
                "question": q["question"],
                "type": by_id[q["question_id"]]["answer_type"],
                "image": os.path.join(images, f"COCO_{subtype}_{q['image_id']:012d}.jpg"),
                "answers": [a["answer"] for a in by_id[q["question_id"]]["answers"]],
            }
            for q in qs["questions"]
        ]
    if isinstance(ann, dict) and "data" in ann:  # TextVQA
        return [
            {
                "id": str(d["question_id"]),
                "question": d["question"],
                "answers": list(d["answers"]),
                "image": os.path.join(images, f"{d['image_id']}.jpg"),
                "type": "textvqa",
            }
            for d in ann["data"]
        ]
    if isinstance(ann, list):  # VizWiz
        return [
            {
                "id": d["image"],
                "question": d["question"],
                "answers": [a["answer"] for a in d["answers"]],
                "image": os.path.join(images, d["image"]),
                "type": d.get("answer_type", "vizwiz"),
            }
            for d in ann
        ]
    raise ValueError(f"{annotations} is neither VQA v2 annotations (with questions=), TextVQA nor VizWiz.")


def load_gqa(questions: str, images: str) -> list[dict[str, Any]]:
    qs = _read_json(questions, "GQA questions")
    return [
        {
            "id": qid,
            "question": q["question"],
            "answers": [q["answer"]],
            "image": os.path.join(images, f"{q['imageId']}.jpg"),
            "type": q.get("types", {}).get("structural", "gqa"),
        }
        for qid, q in qs.items()
    ]


def load_pope(questions: str, images: str) -> list[dict[str, Any]]:
    if not os.path.exists(questions):
        raise FileNotFoundError(f"POPE questions file {questions!r} not found (coco_pope_<split>.json).")
    out = []
    with open(questions, encoding="utf-8") as f:
        for n, line in enumerate(x for x in f if x.strip()):
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{questions} line {n + 1} is not a JSON object ({e.msg}).") from e
            out.append(
                {
                    "id": str(d["question_id"]),
                    "question": d["text"],
                    "answers": [d["label"]],
                    "image": os.path.join(images, d["image"]),
                    "type": "pope",
                }
            )
    return out


# --- evaluators --------------------------------------------------------------------------------------
SINGLE_WORD = "Answer the question using a single word or phrase."


class _ShortAnswer(common.Evaluator):
    """Questions with short answers: load, ask (question + ``prompt_suffix``), score each answer."""

    OPTIONS = {"prompt_suffix": SINGLE_WORD, "max_new_tokens": 16, "method": "greedy", "num_beams": 4}
    DATA_KEYS = frozenset({"questions", "annotations", "images"})

    def items(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def score(self, prediction: str, item: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        types = sorted({r["type"] for r in rows})
        out = {"accuracy": sum(r["score"] for r in rows) / max(len(rows), 1)}
        if len(types) > 1:
            out.update(
                {
                    f"accuracy/{t}": sum(r["score"] for r in rows if r["type"] == t)
                    / sum(r["type"] == t for r in rows)
                    for t in types
                }
            )
        return out

    def evaluate(self, params, out_dir):
        from pargo_jax.predictor import question

        suffix = self.options["prompt_suffix"]
        ask = lambda it, image: question(
            it["id"], image, f"{it['question']}\n{suffix}" if suffix else it["question"]
        )
        done, skipped = self.ask(params, self.items(), ask)
        rows = [
            {"id": it["id"], "type": it["type"], "question": it["question"], "answers": it["answers"],
             "prediction": a["answer"], "score": self.score(a["answer"], it)}
            for it, a in done
        ]  # fmt: skip
        metrics = self.summarize(rows)
        metrics.update(questions=float(len(rows)), skipped=float(skipped))
        return metrics, rows


class VQAEvaluator(_ShortAnswer):
    """VQA v2 / TextVQA / VizWiz accuracy."""

    def items(self):
        q = self.data.get("questions")
        return load_vqa(
            self.data_dir("annotations"), self.data_dir("images"), self.data_dir("questions") if q else None
        )

    def score(self, prediction, item):
        return vqa_accuracy(prediction, item["answers"])


class GQAEvaluator(_ShortAnswer):
    DATA_KEYS = frozenset({"questions", "images"})

    def items(self):
        return load_gqa(self.data_dir("questions"), self.data_dir("images"))

    def score(self, prediction, item):
        return float(gqa_match(prediction, item["answers"][0]))


class POPEEvaluator(_ShortAnswer):
    DATA_KEYS = frozenset({"questions", "images"})

    def items(self):
        return load_pope(self.data_dir("questions"), self.data_dir("images"))

    def score(self, prediction, item):
        return float(pope_answer(prediction) == item["answers"][0].strip().lower())

    def summarize(self, rows):
        return pope_metrics([r["prediction"] for r in rows], [r["answers"][0] for r in rows])
