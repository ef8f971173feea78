"""Evaluators: the metric rules on hand-made cases, question kinds, bad configs, skipped images, and
one device == eight devices on a trained demo model."""

import json
import math
import os

import jax
import pytest

from data_pipelines import shapes
from data_pipelines.boxes import BoxCodec
from data_pipelines.builders import write_records
from data_pipelines.schema import Record, Turn, to_example
from experiments import evals as eval_presets
from pargo_jax import evaluators, runs, sharding
from pargo_jax.evaluators.perplexity import perplexity_metrics
from pargo_jax.evaluators.shapes import normalize, score_item, shapes_metrics
from pargo_jax.predictor import Predictor


def test_normalize_and_exact_match():
    assert normalize("  A Red   circle. ") == "a red circle"
    assert score_item("refer", "a red circle", "a red circle.") == (True, None)
    assert score_item("colour", "Red.", "red") == (True, None)
    assert score_item("colour", "dark red", "red") == (False, None)  # exact, not substring
    assert score_item("count", "", "two") == (False, None)


def test_grounding_by_iou_and_unparseable_answers_count_as_wrong():
    ref = "[0.000,0.000,0.500,0.500]"
    ok, iou = score_item("ground", "[0.000,0.000,0.500,0.400]", ref)
    assert ok and iou == pytest.approx(0.8)
    ok, iou = score_item("ground", "[0.250,0.000,0.750,0.500]", ref)  # IoU 1/3
    assert not ok and iou == pytest.approx(1 / 3)
    assert score_item("ground", "[0.00.0.00,0.0.00,0.0", ref) == (False, None)
    ok, iou = score_item("ground", "[0,0,500,400]", "[0,0,500,500]", BoxCodec("int1000"))  # a run's codec
    assert ok and iou == pytest.approx(0.8)
    items = [
        dict(kind="ground", prediction="[0.000,0.000,0.500,0.400]", reference=ref, ended=True),
        dict(kind="ground", prediction="somewhere", reference=ref, ended=False),
        dict(kind="colour", prediction="red", reference="red", ended=True),
        dict(kind="colour", prediction="blue", reference="red", ended=True),
        dict(kind="count", prediction="two.", reference="two", ended=True),
    ]
    m = shapes_metrics(items)
    assert m["colour"] == 0.5 and m["count"] == 1.0 and m["ground"] == 0.5
    assert m["ground_unparseable"] == 1 and m["ground_miou"] == pytest.approx(0.4)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["ended"] == pytest.approx(4 / 5) and m["examples"] == 5
    assert "shape" not in m  # kinds without questions are not reported as 0


def test_evaluators_read_boxes_in_the_runs_codec_and_a_conflict_is_one_error(tmp_path):
    """Grounding and shapes evaluators take the run's ``config.box_codec``; an explicit box_format /
    box_frame naming another, or shapes data declaring another, is one error naming both."""
    from experiments import base

    config = base.base()
    config.box_codec = dict(format="int1000", frame="square")
    grounding = {"type": "grounding", "data": dict(refs="r.p", instances="i.json", images="im", split="val")}
    built = evaluators.build({"g": grounding, "s": dict(type="shapes")}, None, config)
    assert built["g"].codec == built["s"].codec == BoxCodec("int1000", "square")
    evaluators.build({"g": dict(grounding, box_format="int1000", box_frame="square")}, None, config)  # agrees
    with pytest.raises(ValueError) as err:
        evaluators.build({"g": dict(grounding, box_format="norm3")}, None, config)
    assert "config.evals.g reads boxes as norm3/square" in str(err.value)
    assert "config.box_codec is int1000/square" in str(err.value)
    data_dir = shapes.build(str(tmp_path), num_pretrain=0, num_sft=0, num_eval=2, num_val=0)["data_dir"]
    data = dict(name="shapes", split="eval", data_dir=data_dir)
    ev = evaluators.build({"s": dict(type="shapes", data=data)}, None, config)["s"]
    declared = r"shapes\) writes its boxes as norm3/square but the run's config.box_codec is int1000"
    with pytest.raises(ValueError, match=declared):
        dict(ev.run(None))  # before any question is asked


def test_question_kinds_of_every_template():
    assert shapes.question_kind("<image>\nwhat colour is the circle?") == "colour"
    assert shapes.question_kind("how many shapes are there?") == "count"
    assert shapes.question_kind("how many circles are there?") == "count_shape"
    assert shapes.question_kind("how many red shapes are there?") == "count_color"
    assert shapes.question_kind("what is at [0.1,0.2,0.3,0.4]?") == "refer"
    assert shapes.question_kind("what colour is the hexagon?") is None
    for i in range(100):
        for t in shapes.make_record("sft", i).conversation[::2]:
            assert shapes.question_kind(t.text) in shapes.KINDS


def test_perplexity_metrics_are_token_weighted():
    m = perplexity_metrics([dict(logprob=-2.0, tokens=2, correct=1), dict(logprob=-6.0, tokens=6, correct=3)])
    assert m["loss"] == pytest.approx(1.0) and m["perplexity"] == pytest.approx(math.e)
    assert m["token_accuracy"] == 0.5 and m["tokens"] == 8 and m["examples"] == 2


@pytest.fixture(scope="module")
def trained(trained_workdir):
    return runs.load_workdir(trained_workdir)


def _build(trained, evals, mesh=None):
    mesh = mesh or trained.mesh
    predictor = Predictor.from_config(trained.model, trained.tokenizer, mesh, trained.config)
    return evaluators.build(evals, predictor, trained.config)


def test_one_device_equals_eight(trained, tmp_path):
    cfg = eval_presets.get_config("shapes,val").to_dict()
    eight = {n: dict(ev.run(trained.params, str(tmp_path / "8"))) for n, ev in _build(trained, cfg).items()}
    one_dev = runs.load_workdir(trained.workdir, mesh=sharding.make_mesh({}, jax.devices()[:1]))
    assert one_dev.mesh.size == 1 and trained.mesh.size == 8
    one = {n: dict(ev.run(one_dev.params, str(tmp_path / "1"))) for n, ev in _build(one_dev, cfg).items()}
    assert one["shapes"] == eight["shapes"]
    assert one["shapes"]["examples"] == 16 and one["val"]["examples"] == 16
    for k, v in eight["val"].items():
        assert one["val"][k] == pytest.approx(v, rel=1e-5), k
    preds = [json.loads(x) for x in open(tmp_path / "8" / "shapes.predictions.jsonl")]
    assert len(preds) == 16 and {"id", "kind", "question", "reference", "prediction", "correct"} <= set(
        preds[0]
    )
    saved = json.loads(open(tmp_path / "8" / "shapes.json").read())
    assert saved == eight["shapes"]


def test_word_groups_score_exactly_their_words(trained):
    """``groups``: each group's token count is the number of its words in the held-out captions
    (counted here from the text), the loss and accuracy are over those tokens only, and a word that is
    not one token fails naming it."""
    import re

    cfg = {"v": dict(type="perplexity", data=dict(name="shapes", split="val"), groups=shapes.CAPTION_FIELDS)}
    ev = _build(trained, cfg)["v"]
    out = dict(ev.run(trained.params))
    words = [w for r in ev.records()[0] for w in re.findall(r"[a-z]+|[0-9]", r.caption)]
    for group, members in shapes.CAPTION_FIELDS.items():
        assert out[f"{group}_tokens"] == sum(w in members for w in words), group
        assert 0.0 <= out[f"{group}_token_accuracy"] <= 1.0
        assert (out[f"{group}_loss"] > 0.0) == (out[f"{group}_tokens"] > 0)  # no digits in basic captions
    assert out["colour_tokens"] > 0 and out["tokens"] > sum(out[f"{g}_tokens"] for g in shapes.CAPTION_FIELDS)
    plain = dict(_build(trained, {"v": dict(cfg["v"], groups={})})["v"].run(trained.params))
    assert plain == {k: v for k, v in out.items() if k in plain}  # the groups change nothing else
    bad = {"v": dict(cfg["v"], groups={"odd": ["hexagonal"]})}
    with pytest.raises(ValueError, match="'hexagonal' is not one token"):
        dict(_build(trained, bad)["v"].run(trained.params))


def test_undecodable_images_are_skipped_and_counted(trained, tmp_path):
    good = [shapes.make_record("eval", i) for i in range(3)]
    broken = Record("broken/0", b"\x89PNG broken", conversation=list(good[0].conversation))
    write_records(str(tmp_path), "odd", {"eval": [*good, to_example(broken)]}, progress=False)
    cfg = {
        "q": dict(type="shapes", data=dict(name="odd", split="eval", data_dir=str(tmp_path)), batch_size=8),
        "v": dict(type="perplexity", data=dict(name="odd", split="eval", data_dir=str(tmp_path))),
    }
    out = {n: dict(ev.run(trained.params)) for n, ev in _build(trained, cfg).items()}
    assert out["q"]["examples"] == 3 and out["q"]["skipped"] == 1
    assert out["v"]["examples"] == 3 and out["v"]["skipped"] == 1


def test_a_two_image_record_is_scored_and_asked(trained, tmp_path):
    """Perplexity and the shapes evaluator read every image of a record (``more_images``): beside a
    one-image record, the two-image one is asked and scored, its loss that of the model run by hand
    on its (1, 2, S, S, 3) pixels."""
    import jax.numpy as jnp
    import numpy as np

    from data_pipelines.text import pack_example

    one, other = shapes.make_record("eval", 0), shapes.make_record("eval", 1)
    turns = [Turn("user", "<image>\n" + one.conversation[0].text), one.conversation[1]]
    two = Record("two/0", one.image, conversation=turns, more_images=[other.image])
    write_records(str(tmp_path), "multi", {"eval": [to_example(other), to_example(two)]}, progress=False)
    data = dict(name="multi", split="eval", data_dir=str(tmp_path))
    cfg = {"q": dict(type="shapes", data=data), "v": dict(type="perplexity", data=data)}
    built = _build(trained, cfg)
    out = {n: dict(ev.run(trained.params, str(tmp_path / "out"))) for n, ev in built.items()}
    assert out["q"]["examples"] == 2 and out["q"]["skipped"] == 0
    assert out["v"]["examples"] == 2 and out["v"]["skipped"] == 0
    loss = {p["id"]: p["loss"] for p in map(json.loads, open(tmp_path / "out" / "v.predictions.jsonl"))}
    p = built["v"].predictor
    ex = pack_example(trained.tokenizer, two.messages(), num_image_tokens=p.mcfg.num_image_tokens,
                      max_len=trained.config.input.max_len, num_images=2)  # fmt: skip
    pixels = p.pixels_of(two.images)[None]
    logits = trained.model.apply({"params": trained.params}, pixels, ex["input_ids"][None],
                                 ex["attention_mask"][None])  # fmt: skip
    logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)))
    picked = logp[np.arange(len(ex["targets"])), ex["targets"]][ex["loss_mask"] > 0]
    assert loss["two/0"] == pytest.approx(-picked.mean(), rel=1e-5)


def test_text_questions_that_are_not_shapes_questions_are_counted(trained, tmp_path):
    turns = [Turn("user", "<image>\nwhat is the meaning of life?"), Turn("assistant", "42")]
    odd = Record("odd/0", shapes.make_record("eval", 0).image, conversation=turns)
    write_records(str(tmp_path), "other", {"eval": [odd, shapes.make_record("eval", 1)]}, progress=False)
    cfg = {"q": dict(type="shapes", data=dict(name="other", split="eval", data_dir=str(tmp_path)))}
    out = dict(_build(trained, cfg)["q"].run(trained.params))
    assert out["examples"] == 1 and out["skipped"] == 1


@pytest.mark.parametrize(
    "evals, message",
    [
        ({"x": dict(type="mmbench")}, "config.evals.x.type='mmbench' is unknown"),
        ({"x": dict(type="shapes", data=dict(name="shapes", split="eval"), log_step=3)}, "'log_step'"),
        ({"x": dict(type="shapes", data=dict(name="shapes"))}, "needs ['split']"),
        ({"x": dict(type="shapes", data=dict(name="shapes", split="eval", data_dir="/nope"))}, "'/nope'"),
        ({"x": dict(type="shapes", data=dict(name="shapes", split="test"))}, "has no split 'test'"),
    ],
)
def test_bad_eval_configs_fail_naming_the_problem(trained, evals, message):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        for ev in _build(trained, evals).values():
            dict(ev.run(trained.params))
    assert message in str(err.value)


def test_evals_run_during_training_and_evaluate_reproduces_them(trained, tmp_path):
    """The fixture run logged eval/<name>/* at its last step; the evaluate command on its workdir
    gives the same numbers and writes W/eval/<step>/<name>.json."""
    from experiments import evals as evals_file
    from pargo_jax import configs, evaluate
    from tests import procs
    from tests.demo import eval_metrics

    logged = eval_metrics(trained.workdir, "shapes")
    assert list(logged) == [60]  # log_steps=0: only when training ends
    assert set(logged[60]) >= {"colour", "shape", "count", "position", "accuracy", "examples"}
    assert set(eval_metrics(trained.workdir, "val")[60]) >= {"loss", "perplexity", "token_accuracy"}
    proc = procs.run("pargo_jax.evaluate", f"--workdir={trained.workdir}", "--config.evals.val.batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(open(os.path.join(trained.workdir, "eval", "60", "shapes.json")).read())
    assert again == pytest.approx(logged[60])
    val = json.loads(open(os.path.join(trained.workdir, "eval", "60", "val.json")).read())
    assert val == pytest.approx(eval_metrics(trained.workdir, "val")[60], rel=1e-5)
    assert "| shapes |" in proc.stdout and "| accuracy |" in proc.stdout
    # Another step and the evals of a file, in this process (the same function the command runs).
    run_config = configs.load_run_config(trained.workdir)
    evaluate.evaluate(trained.workdir, 30, run_config, evals_file.get_config("val"))
    assert os.path.exists(os.path.join(trained.workdir, "eval", "30", "val.json"))
    assert not os.path.exists(os.path.join(trained.workdir, "eval", "30", "shapes.json"))
