"""MME (Fu et al., 2023): yes/no questions, two per image, in 14 subtasks; a subtask scores
100 * accuracy + 100 * accuracy+ (the share of images with both answers right), perception sums 10
subtasks (max 2000) and cognition 4 (max 800).

Answer rules (``rule``):
  ``official``  the MME tool (``eval_tool/calculation.py``): the lowercased answer is ``yes`` / ``no``,
                else its first 4 characters contain "yes" -> yes, else "no" -> no, else "other";
  ``pargo``     ParGo's ``eval/calculation_mme.py``: the same with the first 20 characters (what
                ParGo's published numbers use). "It is not visible" is "other" under the first and
                "no" under the second.

Data (``data.dir``), any of:
  * the MME release: ``<dir>/<subtask>/images/<name>.jpg|png`` with
    ``<dir>/<subtask>/questions_answers_YES_or_NO/<name>.txt``, or the image and its ``.txt`` side by
    side in ``<dir>/<subtask>/``; each ``.txt`` holds ``question<TAB>Yes|No`` lines;
  * ParGo's layout: ``<dir>/Data_json/<subtask>.txt`` with ``image<TAB>question<TAB>answer`` lines and
    the images in ``<dir>/images/<subtask>/``.

Results are written in the MME tool's format, ``<out>/mme_results/<subtask>.txt`` with
``image<TAB>question<TAB>ground truth<TAB>prediction`` lines, two per image, so the official tool
scores them too; ``python -m pargo_jax.evaluators.mme --results_dir DIR [--rule ...] [--json]`` scores
such a directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pargo_jax import paths
from pargo_jax.evaluators import common

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
RULES = {"official": 4, "pargo": 20}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
Line = tuple[str, str, str, str]  # image, question, ground truth, prediction


class MMEDataError(ValueError):
    """The MME directory is missing or not in a known layout."""


def parse_yes_no(answer: str, rule: str = "official") -> str:
    """``yes`` / ``no`` / ``other`` by ``rule`` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"MME rule {rule!r} is unknown; use one of {sorted(RULES)}.")
    answer = answer.lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[: RULES[rule]]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def subtask_score(lines: Sequence[Line], rule: str = "official") -> dict[str, float]:
    """``acc``, ``acc_plus`` and ``score`` (= 100 * (acc + acc_plus)) of one subtask's lines, two
    consecutive lines per image; ``other``: answers that are neither yes nor no."""
    if len(lines) % 2:
        raise ValueError(f"MME lines come in pairs (two questions per image); got {len(lines)}.")
    right, both, other = 0, 0, 0
    for i in range(0, len(lines), 2):
        pair_right = 0
        for _, _, gt, pred in lines[i : i + 2]:
            if gt.lower() not in ("yes", "no"):
                raise ValueError(f"MME ground truth must be Yes or No, got {gt!r}.")
            label = parse_yes_no(pred, rule)
            other += label == "other"
            pair_right += label == gt.lower()
        right += pair_right
        both += pair_right == 2
    images = len(lines) // 2
    acc, acc_plus = right / max(len(lines), 1), both / max(images, 1)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "other": float(other)}


def mme_scores(results: Mapping[str, Sequence[Line]], rule: str = "official") -> dict[str, Any]:
    """``{"perception", "cognition", "subtasks": {name: score}, "details": {name: subtask_score},
    "missing": [subtasks without results]}`` over the subtasks present."""
    details = {name: subtask_score(lines, rule) for name, lines in results.items() if lines}
    unknown = sorted(set(details) - set(SUBTASKS))
    if unknown:
        raise ValueError(f"Unknown MME subtask(s) {unknown}; the subtasks are {list(SUBTASKS)}.")
    subtasks = {name: details[name]["score"] for name in SUBTASKS if name in details}
    return {
        "perception": sum(subtasks.get(n, 0.0) for n in PERCEPTION),
        "cognition": sum(subtasks.get(n, 0.0) for n in COGNITION),
        "subtasks": subtasks,
        "details": details,
        "missing": [n for n in SUBTASKS if n not in details],
    }


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split("\n")).strip()


def write_results(results_dir: str, results: Mapping[str, Sequence[Line]]) -> None:
    """``<results_dir>/<subtask>.txt`` in the MME tool's format (tabs / newlines in answers become spaces)."""
    root = paths.path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in results.items():
        text = "".join("\t".join(_clean(x) for x in line) + "\n" for line in lines)
        (root / f"{name}.txt").write_text(text)


def read_results(results_dir: str) -> dict[str, list[Line]]:
    """The ``<subtask>.txt`` files of a results directory (the MME tool's format)."""
    if not os.path.isdir(results_dir):
        raise MMEDataError(f"No MME results directory {results_dir!r}.")
    out: dict[str, list[Line]] = {}
    for name in SUBTASKS:
        path = os.path.join(results_dir, f"{name}.txt")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        bad = [i + 1 for i, r in enumerate(rows) if len(r) != 4]
        if bad:
            raise MMEDataError(
                f"{path}: lines {bad[:5]} do not have 4 tab-separated fields "
                "(image, question, ground truth, prediction)."
            )
        out[name] = [tuple(r) for r in rows]  # type: ignore[misc]
    if not out:
        raise MMEDataError(f"{results_dir!r} holds no <subtask>.txt result file (e.g. existence.txt).")
    return out


# --- the benchmark's files --------------------------------------------------------------------------
def load_questions(root: str) -> dict[str, list[tuple[str, str, str]]]:
    """``{subtask: [(image path, question, Yes|No), ...]}`` from an MME directory in either layout
    (module docstring), two consecutive questions per image, in file order."""
    if not os.path.isdir(root):
        raise MMEDataError(f"MME directory {root!r} does not exist; {_LAYOUT}")
    if os.path.isdir(os.path.join(root, "Data_json")):
        out = _load_pargo(root)
    else:
        out = {
            name: _load_release_subtask(os.path.join(root, name))
            for name in SUBTASKS
            if os.path.isdir(os.path.join(root, name))
        }
    if not out:
        raise MMEDataError(
            f"{root!r} has no MME subtask folder (e.g. existence/) and no Data_json/; {_LAYOUT}"
        )
    for name, rows in out.items():
        images = [r[0] for r in rows]
        odd = [p for i, p in enumerate(images[::2]) if images[2 * i + 1 : 2 * i + 2] != [p]]
        if odd:
            raise MMEDataError(
                f"MME {name}: image {odd[0]!r} does not have exactly two consecutive questions."
            )
    return out


_LAYOUT = (
    "expected <dir>/<subtask>/images/ + <dir>/<subtask>/questions_answers_YES_or_NO/ (MME release), "
    "images and .txt side by side in <dir>/<subtask>/, or <dir>/Data_json/<subtask>.txt + "
    "<dir>/images/<subtask>/ (ParGo)."
)


def _load_release_subtask(folder: str) -> list[tuple[str, str, str]]:
    images = os.path.join(folder, "images")
    qa = os.path.join(folder, "questions_answers_YES_or_NO")
    if os.path.isdir(images) != os.path.isdir(qa):
        missing = qa if os.path.isdir(images) else images
        raise MMEDataError(f"{missing} is missing; {_LAYOUT}")
    if not os.path.isdir(images):
        images = qa = folder
    out = []
    for txt in sorted(f for f in os.listdir(qa) if f.endswith(".txt")):
        stem = txt[: -len(".txt")]
        found = [os.path.join(images, stem + e) for e in IMAGE_EXTENSIONS]
        image = next((p for p in found if os.path.exists(p)), found[0])
        with open(os.path.join(qa, txt), encoding="utf-8") as f:
            for n, line in enumerate(x for x in f if x.strip()):
                question, _, answer = line.rstrip("\n").rpartition("\t")
                if not question:
                    raise MMEDataError(f"{os.path.join(qa, txt)} line {n + 1} is not 'question<TAB>Yes|No'.")
                out.append((image, question, answer.strip()))
    if not out:
        raise MMEDataError(f"{folder} holds no question file; {_LAYOUT}")
    return out


def _load_pargo(root: str) -> dict[str, list[tuple[str, str, str]]]:
    out = {}
    for name in SUBTASKS:
        path = os.path.join(root, "Data_json", f"{name}.txt")
        if not os.path.exists(path):
            continue
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(x for x in f if x.strip()):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3:
                    raise MMEDataError(f"{path} line {n + 1} is not 'image<TAB>question<TAB>Yes|No'.")
                rows.append((os.path.join(root, "images", name, parts[0]), parts[1], parts[2].strip()))
        out[name] = rows
    return out


# --- the evaluator -----------------------------------------------------------------------------------
class MMEEvaluator(common.Evaluator):
    """``data=dict(dir=...)``; options: ``rule``, ``prompt_suffix`` (appended after a newline to each
    question; MME's questions already end with "Please answer yes or no."), decoding."""

    DATA_KEYS = {"dir"}
    OPTIONS = {
        "rule": "official",
        "prompt_suffix": "",
        "max_new_tokens": 16,
        "method": "greedy",
        "num_beams": 4,
    }

    def evaluate(self, params, out_dir):
        from pargo_jax.predictor import question

        rule = self.options["rule"]
        if rule not in RULES:
            raise ValueError(f"config.evals.{self.name}.rule={rule!r}; use one of {sorted(RULES)}.")
        suffix = self.options["prompt_suffix"]
        items = [
            {
                "id": f"{name}/{os.path.basename(path)}/{k % 2}",
                "subtask": name,
                "image": path,
                "question": q,
                "gt": gt,
            }
            for name, rows in load_questions(self.data_dir("dir")).items()
            for k, (path, q, gt) in enumerate(rows)
        ]
        ask = lambda it, image: question(
            it["id"], image, f"{it['question']}\n{suffix}" if suffix else it["question"]
        )
        done, skipped = self.ask(params, items, ask)
        results: dict[str, list[Line]] = {}
        for it, a in done:  # both questions of an image share its fate, so pairs stay whole
            line = (os.path.basename(it["image"]), it["question"], it["gt"], a["answer"])
            results.setdefault(it["subtask"], []).append(line)
        scores = mme_scores(results, rule)
        if out_dir:
            write_results(paths.join(out_dir, f"{self.name}_results"), results)
        metrics = {
            "perception": scores["perception"],
            "cognition": scores["cognition"],
            **{f"subtask/{k}": v for k, v in scores["subtasks"].items()},
            "other": sum(d["other"] for d in scores["details"].values()),
            "questions": float(sum(len(v) for v in results.values())),
            "skipped": float(skipped),
        }
        predictions = [
            {"subtask": n, "image": i, "question": q, "answer": gt, "prediction": p}
            for n, lines in results.items()
            for i, q, gt, p in lines
        ]
        return metrics, predictions


def define_flags(fv) -> None:
    """``python -m pargo_jax.evaluators.mme``'s flags, in ``fv`` (an absl ``FlagValues``)."""
    from absl import flags

    flags.DEFINE_string("results_dir", None, "Directory of <subtask>.txt result files.", flag_values=fv)
    flags.DEFINE_enum("rule", "official", sorted(RULES), "How answers are read as yes / no.", flag_values=fv)
    flags.DEFINE_bool("json", False, "Print one JSON object as the last line.", flag_values=fv)
    flags.mark_flags_as_required(["results_dir"], flag_values=fv)


def score(a) -> dict[str, Any]:
    """Scores the MME result files of ``a`` (:func:`define_flags`, parsed) and prints the tables."""
    import json

    try:
        scores = mme_scores(read_results(a.results_dir), a.rule)
    except (MMEDataError, ValueError) as e:
        sys.exit(f"mme: {e}")
    for part, names in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        present = [n for n in names if n in scores["subtasks"]]
        print(f"=========== {part} ({a.rule} rule) ===========")
        print(f"total score: {scores[part.lower()]:.2f}")
        for n in present:
            d = scores["details"][n]
            print(
                f"  {n:<24} {d['score']:8.2f}   acc {d['acc']:.4f}  acc+ {d['acc_plus']:.4f}  "
                f"other {int(d['other'])}"
            )
    if scores["missing"]:
        print(f"missing subtasks: {', '.join(scores['missing'])}")
    if a.json:
        print(json.dumps({k: scores[k] for k in ("perception", "cognition", "subtasks")}))
    return scores


def main(argv: Sequence[str]) -> None:
    """Scores MME result files (the MME tool's format): :func:`score` on absl's parsed ``FLAGS``."""
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"Unexpected arguments {list(argv[1:])}; every option is a --flag.")
    score(flags.FLAGS)


if __name__ == "__main__":
    from absl import flags

    from pargo_jax import launcher

    define_flags(flags.FLAGS)
    launcher.run(main)
