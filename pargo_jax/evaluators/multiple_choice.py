"""Multiple choice: MMBench (TSV) and ScienceQA (image questions), by option letter or by score.

``answer_by="generate"``: the model writes an answer and :func:`parse_option` reads the letter (the
one option letter standing alone in it; with several, a leading ``B.`` / ``(B)`` / ``B:``; with none,
the option whose text the answer is); an answer that names no option is wrong and counted.
``answer_by="score"``: the option (letter + text) with the highest log-likelihood after the prompt.

MMBench's circular evaluation (``circular=True``): a question with k options is asked k times with
the options rotated (A B C D, B C D A, ...), and counts right only if every rotation is. Rows of a TSV
that already holds the rotations (``index`` and ``index + 1e6 * r``) are grouped by ``index % 1e6``.

Data: ``mmbench``: ``data=dict(tsv="MMBench_DEV_EN.tsv")`` (columns ``index``, ``question``, ``hint``,
``A``.., ``answer``, ``category``, ``image`` base64); ``scienceqa``: ``data=dict(problems=
"problems.json", splits="pid_splits.json", images="<dir>/<split>", split="test")`` (questions with an
image, ScienceQA-IMG, images at ``<images>/<pid>/<image>``).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pargo_jax.evaluators import common

LETTERS = "ABCDEFGHIJ"
PROMPT = "Answer with the option's letter from the given choices directly."


def parse_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter ``answer`` chooses among ``options`` ({letter: text}), or None."""
    text = answer.strip()
    alone = {x for x in re.findall(r"\b([A-J])\b", text) if x in options}
    if len(alone) == 1:
        return alone.pop()
    if alone:  # several letters: only a leading "B." / "(B)" / "B:" decides
        m = re.match(r"^\(?([A-J])[.:)]", text)
        return m.group(1) if m and m.group(1) in options else None
    norm = lambda s: " ".join(s.lower().strip(" .").split())
    same = [k for k, v in options.items() if norm(v) == norm(text)]
    return same[0] if len(same) == 1 else None


def rotations(options: Sequence[str], answer: int) -> list[tuple[list[str], int]]:
    """The k circular shifts of ``options`` with the index of the right one in each."""
    k = len(options)
    return [([options[(i + r) % k] for i in range(k)], (answer - r) % k) for r in range(k)]


def circular_accuracy(results: Mapping[str, Sequence[bool]]) -> float:
    """Share of questions (keys) whose every rotation is right."""
    return sum(all(v) for v in results.values()) / max(len(results), 1)


def prompt_text(question: str, options: Sequence[str], hint: str = "", suffix: str = PROMPT) -> str:
    lines = ([hint.strip()] if hint and hint.strip() else []) + [question.strip()]
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines + ([suffix] if suffix else []))


# --- the benchmarks' files ---------------------------------------------------------------------------
def load_mmbench(tsv: str) -> list[dict[str, Any]]:
    """``[{"id", "group", "question", "hint", "options", "answer" (index), "category", "image" bytes}]``."""
    if not os.path.exists(tsv):
        raise FileNotFoundError(f"MMBench file {tsv!r} not found (e.g. MMBench_DEV_EN.tsv).")
    csv.field_size_limit(sys.maxsize)
    with open(tsv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    need = {"index", "question", "A", "B", "answer", "image"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{tsv} is not an MMBench TSV: it needs the columns {sorted(need)}.")
    out = []
    for r in rows:
        options = [r[x] for x in LETTERS if x in r and r[x] and r[x].strip().lower() != "nan"]
        letter = r["answer"].strip()
        if letter not in LETTERS[: len(options)]:
            raise ValueError(
                f"{tsv}: row {r['index']} answers {letter!r} but has options {LETTERS[: len(options)]}."
            )
        hint = r.get("hint", "")
        out.append(
            {
                "id": r["index"],
                "group": str(int(r["index"]) % 1_000_000),
                "question": r["question"],
                "hint": "" if hint.strip().lower() == "nan" else hint,
                "options": options,
                "answer": LETTERS.index(letter),
                "category": r.get("category", "mmbench"),
                "image": base64.b64decode(r["image"]),
            }
        )
    return out


def load_scienceqa(problems: str, splits: str, images: str, split: str = "test") -> list[dict[str, Any]]:
    """ScienceQA-IMG: the ``split`` questions that have an image."""
    for path in (problems, splits):
        if not os.path.exists(path):
            raise FileNotFoundError(f"ScienceQA file {path!r} not found (problems.json, pid_splits.json).")
    with open(problems, encoding="utf-8") as f:
        probs = json.load(f)
    with open(splits, encoding="utf-8") as f:
        pids = json.load(f)
    if split not in pids:
        raise ValueError(f"{splits} has no split {split!r}; it has {sorted(pids)}.")
    out = []
    for pid in pids[split]:
        p = probs[pid]
        if not p.get("image"):
            continue
        path = os.path.join(images, pid, p["image"])
        data = open(path, "rb").read() if os.path.exists(path) else b""  # missing: skipped and counted
        out.append(
            {
                "id": pid,
                "group": pid,
                "question": p["question"],
                "hint": p.get("hint", ""),
                "options": list(p["choices"]),
                "answer": int(p["answer"]),
                "category": p.get("subject", "scienceqa"),
                "image": data,
            }
        )
    return out


# --- the evaluator -----------------------------------------------------------------------------------
class MultipleChoiceEvaluator(common.Evaluator):
    """``benchmark``: ``mmbench`` or ``scienceqa``; ``answer_by``: ``generate`` or ``score``."""

    OPTIONS = {
        "benchmark": "mmbench",
        "answer_by": "generate",
        "circular": True,
        "prompt_suffix": PROMPT,
        "max_new_tokens": 8,
        "method": "greedy",
        "num_beams": 4,
    }
    DATA_KEYS = frozenset({"tsv", "problems", "splits", "images", "split"})

    def items(self) -> list[dict[str, Any]]:
        if self.options["benchmark"] == "mmbench":
            return load_mmbench(self.data_dir("tsv"))
        if self.options["benchmark"] == "scienceqa":
            return load_scienceqa(
                self.data_dir("problems"),
                self.data_dir("splits"),
                self.data_dir("images"),
                self.data.get("split", "test"),
            )
        raise ValueError(
            f"config.evals.{self.name}.benchmark={self.options['benchmark']!r}; use mmbench or scienceqa."
        )

    def evaluate(self, params, out_dir):
        from pargo_jax.predictor import question

        if self.options["answer_by"] not in ("generate", "score"):
            raise ValueError(f"config.evals.{self.name}.answer_by must be 'generate' or 'score'.")
        items = self.items()
        circular = self.options["circular"] and self.options["benchmark"] == "mmbench"
        asks = []  # (item, options, right index)
        groups = {}
        for it in items:
            groups.setdefault(it["group"], []).append(it)
        for rows in groups.values():
            if circular and len(rows) == 1:
                asks += [
                    (rows[0], opts, right) for opts, right in rotations(rows[0]["options"], rows[0]["answer"])
                ]
            else:
                asks += [(it, it["options"], it["answer"]) for it in rows]
        suffix = self.options["prompt_suffix"]
        queries = [
            self.attach_detections(
                question(
                    f"{it['id']}/{n}", it["image"], prompt_text(it["question"], opts, it["hint"], suffix)
                ),
                it,
            )
            for n, (it, opts, _) in enumerate(asks)
        ]
        if self.options["answer_by"] == "score":
            choices = self._score(params, queries, asks)
        else:
            answers = self.predictor.answers(
                params, queries, self.decode_options(), batch_size=self.batch_size
            )
            choices = [
                "error" if "error" in a else parse_option(a["answer"], dict(zip(LETTERS, opts)))
                for a, (_, opts, _) in zip(answers, asks)
            ]
        rows, by_group, skipped = [], {}, 0
        for (it, _, right), q, choice in zip(asks, queries, choices):
            if choice == "error":
                skipped += 1
                continue
            ok = choice is not None and LETTERS.index(choice) == right
            by_group.setdefault(it["group"], []).append(ok)
            rows.append(
                {
                    "id": q.id,
                    "group": it["group"],
                    "category": it["category"],
                    "choice": choice,
                    "answer": LETTERS[right],
                    "correct": ok,
                }
            )
        metrics = {
            "accuracy": circular_accuracy(by_group),  # every asked variant of a question right
            "per_question_accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1),
            "unparseable": float(sum(r["choice"] is None for r in rows)),
            "questions": float(len(by_group)),
            "skipped": float(skipped),
        }
        return metrics, rows

    def _score(self, params, queries, asks) -> list[str | None]:
        """The option with the highest summed log-likelihood (letter + text) after each prompt."""
        from data_pipelines.text import pack_example
        from pargo_jax.predictor import PredictError

        p = self.predictor
        examples, owners = [], []
        for n, (q, (_, opts, _)) in enumerate(zip(queries, asks)):
            try:
                pixels = p.pixels_of(q.images, q.id)
            except PredictError:
                owners.append((n, None))
                continue
            for i, o in enumerate(opts):
                messages = [*q.messages, {"role": "assistant", "content": f"{LETTERS[i]}. {o}"}]
                arrays = pack_example(
                    p.tokenizer,
                    messages,
                    num_image_tokens=p.mcfg.num_image_tokens,
                    num_images=len(q.images),
                    max_len=self.config.input.max_len,
                )
                examples.append(p.with_boxes(dict(arrays, image=pixels), q.images[0], q.boxes, q.id))
                owners.append((n, LETTERS[i]))
        scores = p.scores(params, examples, batch_size=self.batch_size)
        best: dict[int, tuple[float, str]] = {}
        it = iter(scores)
        choice: list[str | None] = ["error"] * len(queries)
        for n, letter in owners:
            if letter is None:
                continue
            s = next(it)["logprob"]
            if n not in best or s > best[n][0]:
                best[n] = (s, letter)
        for n, (_, letter) in best.items():
            choice[n] = letter
        return choice
