"""MME: both answer rules on the odd cases, subtask / total scores by the tool's formula, the result
file format, both directory layouts, the standalone scorer, and the evaluator end to end."""

import json
import os

import jax
import pytest

from data_pipelines import shapes
from pargo_jax import evaluators, launcher, runs, sharding
from pargo_jax.evaluators import mme
from pargo_jax.predictor import Predictor
from tests import procs


@pytest.mark.parametrize(
    "answer, official, pargo",
    [
        ("Yes", "yes", "yes"),
        ("no", "no", "no"),
        ("Yes, there is a dog.", "yes", "yes"),
        ("It is not visible", "other", "no"),  # 'no' only within the first 20 characters
        ("I think yes", "other", "yes"),
        ("There is no dog in the image", "other", "no"),
        ("nope", "no", "no"),
        ("No, yes", "no", "yes"),  # "yes" is looked for first, within 20 characters it is found
        ("", "other", "other"),
        ("The answer is definitely YES", "other", "other"),  # past character 20
    ],
)
def test_yes_no_rules(answer, official, pargo):
    assert mme.parse_yes_no(answer, "official") == official
    assert mme.parse_yes_no(answer, "pargo") == pargo


def test_subtask_score_is_acc_plus_acc_plus():
    lines = [
        ("a.jpg", "q1", "Yes", "yes"), ("a.jpg", "q2", "No", "no"),  # both right
        ("b.jpg", "q1", "Yes", "yes"), ("b.jpg", "q2", "No", "yes"),  # one right
        ("c.jpg", "q1", "Yes", "It is not visible"), ("c.jpg", "q2", "No", "No."),  # other + right
    ]  # fmt: skip
    got = mme.subtask_score(lines, "official")
    assert got["acc"] == pytest.approx(4 / 6) and got["acc_plus"] == pytest.approx(1 / 3)
    assert got["score"] == pytest.approx(100 * (4 / 6 + 1 / 3)) and got["other"] == 1
    assert mme.subtask_score(lines, "pargo")["acc"] == pytest.approx(
        4 / 6
    )  # "not visible" -> no: still wrong
    scores = mme.mme_scores({"color": lines, "code_reasoning": lines[:2]})
    assert scores["subtasks"] == {"color": pytest.approx(100.0), "code_reasoning": 200.0}
    assert scores["perception"] == pytest.approx(100.0) and scores["cognition"] == 200.0
    assert "existence" in scores["missing"] and "color" not in scores["missing"]
    with pytest.raises(ValueError, match="come in pairs"):
        mme.subtask_score(lines[:3])
    with pytest.raises(ValueError, match="Unknown MME subtask"):
        mme.mme_scores({"colour": lines})


def test_results_round_trip_in_the_tool_format(tmp_path):
    lines = [("x.png", "Is it red?", "Yes", "yes\tindeed\nit is"), ("x.png", "Is it blue?", "No", "no")]
    mme.write_results(str(tmp_path), {"existence": lines})
    text = (tmp_path / "existence.txt").read_text()
    assert text == "x.png\tIs it red?\tYes\tyes indeed it is\nx.png\tIs it blue?\tNo\tno\n"
    assert mme.read_results(str(tmp_path))["existence"][0][3] == "yes indeed it is"
    (tmp_path / "count.txt").write_text("only\ttwo fields\n")
    with pytest.raises(mme.MMEDataError, match="4 tab-separated fields"):
        mme.read_results(str(tmp_path))


def test_standalone_scorer_prints_json_last(tmp_path, capsys):
    """The command line once (a subprocess), then the other rule and a bad directory through the same
    ``score`` in this process."""
    lines = [("a.jpg", "q", "Yes", "Yes"), ("a.jpg", "q", "No", "It is not visible")]
    mme.write_results(str(tmp_path), {"OCR": lines})
    args = ["--results_dir", str(tmp_path), "--rule", "official", "--json"]
    proc = procs.run("pargo_jax.evaluators.mme", *args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    official = json.loads(proc.stdout.strip().splitlines()[-1])
    assert official == {"perception": 50.0, "cognition": 0.0, "subtasks": {"OCR": 50.0}}
    mme.score(launcher.parse(mme.define_flags, ["--results_dir", str(tmp_path), "--rule", "pargo", "--json"]))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["subtasks"] == {"OCR": 200.0}
    with pytest.raises(SystemExit) as bad:
        mme.score(launcher.parse(mme.define_flags, ["--results_dir", str(tmp_path / "x")]))
    assert str(bad.value.code).startswith("mme: No MME results directory")


def _release(root, subtask, images, nested=True):
    """An MME release subtask folder: images + one question file per image (2 questions)."""
    img_dir = root / subtask / ("images" if nested else "")
    qa_dir = root / subtask / ("questions_answers_YES_or_NO" if nested else "")
    img_dir.mkdir(parents=True, exist_ok=True)
    qa_dir.mkdir(parents=True, exist_ok=True)
    for name, (data, questions) in images.items():
        (img_dir / f"{name}.png").write_bytes(data)
        (qa_dir / f"{name}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in questions))


def _pairs(i):
    rec = shapes.make_record("eval", i)
    color = rec.labels[0].split()[0]
    return rec.image, [(f"Is there a {color} shape? Please answer yes or no.", "Yes"),
                       ("Is there a pink shape? Please answer yes or no.", "No")]  # fmt: skip


def test_both_layouts_read_the_same_questions(tmp_path):
    release, pargo = tmp_path / "release", tmp_path / "pargo"
    _release(release, "color", {"img0": _pairs(0), "img1": _pairs(1)})
    _release(release, "OCR", {"img2": _pairs(2)}, nested=False)
    (pargo / "Data_json").mkdir(parents=True)
    for sub, names in (("color", ["img0", "img1"]), ("OCR", ["img2"])):
        (pargo / "images" / sub).mkdir(parents=True)
        lines = []
        for n in names:
            data, qs = _pairs(int(n[-1]))
            (pargo / "images" / sub / f"{n}.png").write_bytes(data)
            lines += [f"{n}.png\t{q}\t{a}\n" for q, a in qs]
        (pargo / "Data_json" / f"{sub}.txt").write_text("".join(lines))
    a, b = mme.load_questions(str(release)), mme.load_questions(str(pargo))
    strip = lambda d: {k: [(os.path.basename(p), q, g) for p, q, g in v] for k, v in d.items()}
    assert strip(a) == strip(b) and len(a["color"]) == 4 and len(a["OCR"]) == 2
    with pytest.raises(mme.MMEDataError, match="does not exist"):
        mme.load_questions(str(tmp_path / "nope"))
    with pytest.raises(mme.MMEDataError, match="no MME subtask folder"):
        mme.load_questions(str(tmp_path))
    (release / "color" / "questions_answers_YES_or_NO" / "img1.txt").write_text(
        "Is it? Please answer.\tYes\n"
    )
    with pytest.raises(mme.MMEDataError, match="exactly two consecutive questions"):
        mme.load_questions(str(release))


def test_evaluator_end_to_end_one_device_equals_eight(trained_workdir, tmp_path):
    root = tmp_path / "MME"
    _release(root, "color", {f"img{i}": _pairs(i) for i in range(3)})
    _release(root, "existence", {"img3": _pairs(3)})
    (root / "existence" / "images" / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "existence" / "questions_answers_YES_or_NO" / "broken.txt").write_text("A?\tYes\nB?\tNo\n")
    cfg = {"m": dict(type="mme", data=dict(dir=str(root)), batch_size=4, rule="pargo")}
    out = {}
    for devices in (8, 1):
        mesh = sharding.make_mesh({"data": -1}, jax.devices()[:devices])
        run = runs.load_workdir(trained_workdir, mesh=mesh)
        predictor = Predictor.from_config(run.model, run.tokenizer, run.mesh, run.config)
        ev = evaluators.build(cfg, predictor, run.config)["m"]
        out[devices] = dict(ev.run(run.params, str(tmp_path / f"out{devices}")))
    assert out[1] == out[8]
    m = out[8]
    assert m["questions"] == 8 and m["skipped"] == 2
    assert set(m) >= {"perception", "cognition", "subtask/color", "subtask/existence"}
    results = mme.read_results(str(tmp_path / "out8" / "m_results"))
    assert len(results["color"]) == 6 and results["color"][0][0] == "img0.png"
    rescored = mme.mme_scores(results, "pargo")
    assert rescored["perception"] == pytest.approx(m["perception"])
