"""Benchmark evaluators: each metric on hand-made cases of its official rule (CIDEr-D and BLEU-4 against
pycocoevalcap itself), and every evaluator end to end on a tiny directory in the benchmark's official
layout, on the demo model, with equal numbers on 8 devices and on 1."""

import base64
import csv
import io
import json
import pickle
import random

import jax
import pytest

from data_pipelines import shapes
from pargo_jax import evaluators, runs, sharding
from pargo_jax.evaluators.caption import bleu4, cider_d, ptb_tokenize
from pargo_jax.evaluators.grounding import grounding_metrics
from pargo_jax.evaluators.multiple_choice import circular_accuracy, parse_option, rotations
from pargo_jax.evaluators.vqa import gqa_match, pope_answer, pope_metrics, vqa_accuracy
from pargo_jax.predictor import Predictor


# --- VQA v2 / GQA / POPE ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Two", ["2"] * 10, 0.0),  # the answers agree: nothing is normalized, "Two" != "2"
        ("2", ["2"] * 10, 1.0),
        ("two", ["2"] * 9 + ["two"], 1.0),  # they disagree: number words become digits on both sides
        ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),  # leave-one-out: (2 * 1/3 + 8 * 2/3) / 10
        ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        ("a dog.", ["dog"] * 5 + ["cat"] * 5, 1.0),  # period and article dropped
        ("1,000", ["1000"] * 4 + ["lots"] * 6, 1.0),  # comma between digits removed
        ("dont", ["don't"] * 4 + ["no"] * 6, 1.0),  # contraction restored
        ("  red \n", ["red"] * 10, 1.0),  # newlines and outer spaces always stripped
        ("red-ish", ["red ish"] * 3 + ["red"] * 7, 0.9),  # a hyphen becomes a space
    ],
)
def test_vqa_accuracy_follows_the_official_code(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_gqa_and_pope_rules():
    assert gqa_match("Yes.", "yes") and gqa_match(" the left ", "the left") and not gqa_match("left", "right")
    assert pope_answer("No, there is not.") == "no" and pope_answer("Yes. But no dog.") == "yes"
    assert pope_answer("There is a dog") == "yes" and pope_answer("I do not see one") == "no"
    assert pope_answer("NO") == "yes"  # the rule matches the words No / no / not only
    m = pope_metrics(["Yes", "yes", "No", "no", "yes"], ["yes", "no", "yes", "no", "yes"])
    # TP 2, FP 1, FN 1, TN 1
    assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.6


# --- captions --------------------------------------------------------------------------------------
def test_cider_d_and_bleu4_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    vocab = "a the dog cat man red blue sitting on sofa grass ball with playing two of in".split()
    sent = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12)))
    refs = {str(i): [sent() for _ in range(rng.randint(1, 5))] for i in range(40)}
    preds = {i: sent() for i in refs}
    preds["3"] = refs["3"][0]  # one perfect caption
    want, _ = Cider().compute_score(refs, {i: [p] for i, p in preds.items()})
    assert cider_d(preds, refs) == pytest.approx(want, rel=1e-12)
    bleu, _ = Bleu(4).compute_score(refs, {i: [p] for i, p in preds.items()}, verbose=0)
    assert bleu4(preds, refs) == pytest.approx(bleu[3], rel=1e-12)
    with pytest.raises(ValueError, match="a prediction for every image"):
        cider_d({"0": "x"}, refs)


def test_ptb_style_tokens():
    assert ptb_tokenize("A man's dog, isn't it?  ...Yes!") == "a man 's dog is n't it yes"
    assert ptb_tokenize("Two-wheeled bikes.\n") == "two-wheeled bikes"


# --- multiple choice, grounding -----------------------------------------------------------------------
def test_option_parsing_and_circular_evaluation():
    options = {"A": "a red circle", "B": "a blue square", "C": "nothing"}
    assert parse_option("B", options) == "B" and parse_option("(C) nothing", options) == "C"
    assert (
        parse_option("B. a blue square", options) == "B" and parse_option("The answer is A.", options) == "A"
    )
    assert parse_option("a blue square", options) == "B"
    assert parse_option("A or B", options) is None and parse_option("D", options) is None
    assert rotations(["x", "y", "z"], 1) == [(["x", "y", "z"], 1), (["y", "z", "x"], 0), (["z", "x", "y"], 2)]
    assert circular_accuracy({"q1": [True, True], "q2": [True, False], "q3": [True]}) == pytest.approx(2 / 3)


def test_grounding_metrics_count_unparseable_as_wrong():
    m = grounding_metrics([0.9, 0.5, 0.49, None])
    assert (
        m["acc@0.5"] == 0.5 and m["miou"] == pytest.approx((0.9 + 0.5 + 0.49) / 4) and m["unparseable"] == 1
    )


# --- end to end ------------------------------------------------------------------------------------
def _png(i):
    return shapes.make_record("eval", i).image


@pytest.fixture(scope="module")
def benchmark_dirs(tmp_path_factory):
    """One tiny directory per benchmark in its official layout (8 images, one undecodable where the
    format allows it)."""
    root = tmp_path_factory.mktemp("benchmarks")
    coco = root / "val2014"
    coco.mkdir()
    for i in range(4):
        (coco / f"COCO_val2014_{i:012d}.jpg").write_bytes(_png(i))
    (coco / f"COCO_val2014_{9:012d}.jpg").write_bytes(b"not an image")
    qs = [
        {"image_id": i, "question": f"what colour is shape {k}?", "question_id": 10 * i + k}
        for i in (0, 1, 2, 3, 9)
        for k in range(2)
    ]
    anns = [
        {
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "question_type": "what colour",
            "answer_type": "other" if q["question_id"] % 2 else "yes/no",
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                for j, a in enumerate(["red"] * 6 + ["blue"] * 4)
            ],
        }
        for q in qs
    ]
    (root / "questions.json").write_text(json.dumps({"data_subtype": "val2014", "questions": qs}))
    (root / "annotations.json").write_text(json.dumps({"annotations": anns}))
    gqa = {
        f"g{i}": {"imageId": f"COCO_val2014_{i:012d}", "question": "is it red?", "answer": "yes"}
        for i in range(3)
    }
    (root / "gqa.json").write_text(json.dumps(gqa))
    pope = [
        {
            "question_id": i,
            "image": f"COCO_val2014_{i % 4:012d}.jpg",
            "text": "Is there a dog?",
            "label": "yes" if i % 2 else "no",
        }
        for i in range(6)
    ]
    (root / "coco_pope_random.json").write_text("".join(json.dumps(p) + "\n" for p in pope))
    images = [
        {"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 64, "height": 64} for i in (0, 1, 2, 9)
    ]
    caps = [
        {"image_id": i, "id": 100 + 3 * i + k, "caption": c}
        for i in (0, 1, 2, 9)
        for k, c in enumerate(["A red shape.", "Some shapes.", "a blue square"])
    ]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))
    # RefCOCO: refs(unc).p + instances.json
    refs = [
        {
            "ref_id": i,
            "ann_id": 500 + i,
            "image_id": i,
            "split": "val",
            "sentences": [{"sent": "the red one"}, {"sent": "left shape"}],
        }
        for i in (0, 1, 9)
    ]
    inst = {
        "images": images,
        "annotations": [{"id": 500 + i, "image_id": i, "bbox": [4, 8, 20, 16]} for i in (0, 1, 9)],
    }
    (root / "refcoco").mkdir()
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    (root / "refcoco" / "instances.json").write_text(json.dumps(inst))
    # MMBench TSV (base64 images)
    rows = [
        {
            "index": i,
            "question": "what colour is the shape?",
            "hint": "nan" if i else "look closely",
            "A": "red",
            "B": "blue",
            "C": "green",
            "D": "nan",
            "answer": "ABC"[i % 3],
            "category": "colour",
            "image": base64.b64encode(_png(i)).decode(),
        }
        for i in range(3)
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t")
    w.writeheader()
    w.writerows(rows)
    (root / "mmbench.tsv").write_text(buf.getvalue())
    # ScienceQA: problems.json + pid_splits.json + <images>/<pid>/image.png
    probs = {
        str(i): {
            "question": "which colour?",
            "choices": ["red", "blue"],
            "answer": i % 2,
            "hint": "",
            "image": "image.png" if i < 3 else None,
            "subject": "natural science",
        }
        for i in range(4)
    }
    (root / "problems.json").write_text(json.dumps(probs))
    (root / "pid_splits.json").write_text(json.dumps({"test": list(probs)}))
    for i in range(3):
        (root / "sqa" / str(i)).mkdir(parents=True)
        (root / "sqa" / str(i) / "image.png").write_bytes(_png(i))
    return root


def _configs(root):
    r = str(root)
    return {
        "vqa": dict(
            type="vqa",
            batch_size=4,
            data=dict(
                questions=f"{r}/questions.json", annotations=f"{r}/annotations.json", images=f"{r}/val2014"
            ),
        ),
        "gqa": dict(type="gqa", data=dict(questions=f"{r}/gqa.json", images=f"{r}/val2014")),
        "pope": dict(type="pope", data=dict(questions=f"{r}/coco_pope_random.json", images=f"{r}/val2014")),
        "caption": dict(type="caption", data=dict(annotations=f"{r}/captions.json", images=f"{r}/val2014")),
        "refcoco": dict(
            type="grounding",
            data=dict(
                refs=f"{r}/refcoco/refs(unc).p",
                instances=f"{r}/refcoco/instances.json",
                images=f"{r}/val2014",
                split="val",
            ),
        ),
        "mmbench": dict(type="multiple_choice", data=dict(tsv=f"{r}/mmbench.tsv"), batch_size=4),
        "mmbench_score": dict(type="multiple_choice", data=dict(tsv=f"{r}/mmbench.tsv"), answer_by="score"),
        "sqa": dict(
            type="multiple_choice",
            benchmark="scienceqa",
            circular=False,
            data=dict(problems=f"{r}/problems.json", splits=f"{r}/pid_splits.json", images=f"{r}/sqa"),
        ),
    }


def test_every_benchmark_evaluator_runs_and_8_devices_equal_1(trained_workdir, benchmark_dirs, tmp_path):
    results = {}
    for devices in (8, 1):
        mesh = sharding.make_mesh({"data": -1}, jax.devices()[:devices])
        run = runs.load_workdir(trained_workdir, mesh=mesh)
        predictor = Predictor.from_config(run.model, run.tokenizer, run.mesh, run.config)
        built = evaluators.build(_configs(benchmark_dirs), predictor, run.config)
        results[devices] = {
            n: dict(ev.run(run.params, str(tmp_path / str(devices)))) for n, ev in built.items()
        }
    for name in results[8]:
        assert results[8][name] == pytest.approx(results[1][name], rel=1e-6), name
    r = results[8]
    assert r["vqa"]["questions"] == 8 and r["vqa"]["skipped"] == 2 and 0 <= r["vqa"]["accuracy"] <= 1
    assert {"accuracy/other", "accuracy/yes/no"} <= set(r["vqa"])
    assert r["gqa"]["questions"] == 3 and r["pope"]["questions"] == 6
    assert set(r["pope"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert r["caption"]["images"] == 3 and r["caption"]["skipped"] == 1 and r["caption"]["cider_d"] >= 0
    assert r["refcoco"]["items"] == 4 and r["refcoco"]["skipped"] == 2  # one item per sentence
    assert (
        r["mmbench"]["questions"] == 3 and r["mmbench"]["accuracy"] <= r["mmbench"]["per_question_accuracy"]
    )
    assert r["mmbench_score"]["unparseable"] == 0  # scoring always picks an option
    assert r["sqa"]["questions"] == 3  # the text-only question is not part of ScienceQA-IMG
    preds = [json.loads(x) for x in open(tmp_path / "8" / "mmbench.predictions.jsonl")]
    assert len(preds) == 9 and {p["id"].split("/")[0] for p in preds} == {"0", "1", "2"}  # 3 rotations each


@pytest.mark.parametrize(
    "name, mutate, message",
    [
        ("vqa", lambda c: c["data"].update(annotations="/nope.json"), "'/nope.json'"),
        ("pope", lambda c: c["data"].update(question="x"), "'question'"),
        ("mmbench", lambda c: c.update(benchmark="mmb"), "benchmark='mmb'"),
        ("refcoco", lambda c: c["data"].update(split="testC"), "has no split 'testC'"),
    ],
)
def test_bad_benchmark_configs_are_named(trained_workdir, benchmark_dirs, name, mutate, message):
    run = runs.load_workdir(trained_workdir, mesh=sharding.make_mesh({}, jax.devices()[:1]))
    predictor = Predictor.from_config(run.model, run.tokenizer, run.mesh, run.config)
    cfg = _configs(benchmark_dirs)[name]
    cfg["data"] = dict(cfg["data"])
    mutate(cfg)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        for ev in evaluators.build({name: cfg}, predictor, run.config).values():
            dict(ev.run(run.params))
    assert message in str(err.value)


def test_every_named_eval_builds(trained_workdir):
    """Each entry of experiments/evals.py is a valid config for its evaluator (keys and types)."""
    from experiments import evals

    run = runs.load_workdir(trained_workdir, mesh=sharding.make_mesh({}, jax.devices()[:1]))
    predictor = Predictor.from_config(run.model, run.tokenizer, run.mesh, run.config)
    built = evaluators.build(evals.get_config(",".join(evals.EVALS)).to_dict(), predictor, run.config)
    assert set(built) == set(evals.EVALS)
    names = {type(e).__name__ for e in built.values()}
    assert names >= {"MMEEvaluator", "VQAEvaluator", "GroundingEvaluator", "CaptionEvaluator"}


def test_textvqa_and_vizwiz_files_read_as_vqa(tmp_path):
    from pargo_jax.evaluators.vqa import load_vqa

    textvqa = {
        "data": [
            {"question_id": 7, "question": "what is written?", "image_id": "abc", "answers": ["stop"] * 10}
        ]
    }
    vizwiz = [{"image": "VizWiz_val_00000001.jpg", "question": "what is it?", "answer_type": "other",
               "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10}]  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps(textvqa))
    (tmp_path / "v.json").write_text(json.dumps(vizwiz))
    t = load_vqa(str(tmp_path / "t.json"), "imgs")
    v = load_vqa(str(tmp_path / "v.json"), "imgs")
    assert t[0]["id"] == "7" and t[0]["image"] == "imgs/abc.jpg" and t[0]["answers"] == ["stop"] * 10
    assert v[0]["image"] == "imgs/VizWiz_val_00000001.jpg" and v[0]["answers"] == ["unanswerable"] * 10
    (tmp_path / "x.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="neither VQA v2 annotations"):
        load_vqa(str(tmp_path / "x.json"), "imgs")


def test_benchmark_evaluators_give_mg_llava_its_detector_boxes(mg_llava_workdirs, benchmark_dirs, tmp_path):
    """``detections=`` on any evaluator: boxes joined by item id or image file name reach the object
    tokens (generated and scored answers); items without an entry are counted in ``without_boxes``."""
    dets = {"0": {"boxes": [[2, 2, 30, 30]], "scores": [0.9], "labels": ["shape"]},
            "COCO_val2014_000000000000.jpg": {"boxes": [[2, 2, 30, 30], [1, 1, 9, 9]]}}  # fmt: skip
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    configs = {n: c for n, c in _configs(benchmark_dirs).items() if n in ("vqa", "mmbench_score")}
    for c in configs.values():
        c["detections"] = str(tmp_path / "dets.json")
    run = runs.load_workdir(
        mg_llava_workdirs["sft"], mesh=sharding.make_mesh({"data": -1}, jax.devices()[:2])
    )
    assert run.mcfg.high_res.max_boxes == 4
    predictor = Predictor.from_config(run.model, run.tokenizer, run.mesh, run.config)
    built = evaluators.build(configs, predictor, run.config)
    r = {n: dict(ev.run(run.params, str(tmp_path))) for n, ev in built.items()}
    assert r["vqa"]["questions"] == 8  # of 10 asked: 2 on the undecodable image
    assert r["vqa"]["without_boxes"] == 8  # the 2 questions on image 0 have boxes
    assert r["mmbench_score"]["without_boxes"] == 6  # 3 rotations x 3 questions; question 0 has boxes
