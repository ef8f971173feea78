"""``python -m pargo_jax.benchmarks.projector_grid``: cached tower features give the model's logits,
seeds trained as one vmapped program train as they would alone, the exact-match score is what greedy
decoding answers, the intervals are scipy's, and the --quick grid runs through the command line."""

from __future__ import annotations

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy import stats

from pargo_jax.benchmarks import projector_grid as grid
from tests import procs


@pytest.fixture(scope="module")
def setup():
    """The demo model with a random tower at the fine variant's 128 px, ParGo at 16 tokens, and the
    questions of 6 scenes."""
    from data_pipelines import shapes
    from data_pipelines.text import load_tokenizer
    from experiments import pretrain
    from pargo_jax import demo_tower, runs

    c = pretrain.get_config("demo")
    c.model.vision = demo_tower.random_config(128)
    c.model.projector = grid.projectors.projector_options("pargo", 16)  # the grid's own cell
    c.input.image_size = 128
    tokenizer = load_tokenizer(shapes.ASSET_TOKENIZER)
    mcfg = runs.model_config(c, tokenizer)
    scenes = grid.make_scenes("sft", 6, 128)
    arrays = grid.tokenize(scenes, tokenizer, mcfg.num_image_tokens, "compact")  # as every size renders
    return mcfg, tokenizer, scenes, arrays


def test_scenes_ask_every_kind_and_tokenize_like_training(setup):
    mcfg, tokenizer, scenes, arrays = setup
    assert scenes.images.shape == (6, 128, 128, 3) and scenes.images.dtype == np.uint8
    assert len(scenes.kinds) == len(scenes.messages) == 6 * len(grid.ASKED)
    assert set(scenes.kinds) <= set(grid.KINDS) and "digit" in scenes.kinds
    first = arrays["input_ids"][0]
    assert (first == mcfg.image_token_id).sum() == 16
    answer = arrays["targets"][0][arrays["loss_mask"][0] > 0]
    assert tokenizer.decode(answer).strip().startswith(scenes.messages[0][1]["content"])


def test_a_training_dialogue_asks_a_scenes_questions_once_each(setup):
    """A dialogue holds the scene's one-turn questions, in an order drawn per scene, the image once."""
    mcfg, tokenizer, scenes, _ = setup
    dialogues = grid.make_scenes("sft", 6, 128, dialogue=True)
    np.testing.assert_array_equal(dialogues.images, scenes.images)
    assert dialogues.scene.tolist() == list(range(6)) and dialogues.kinds == ["dialogue"] * 6
    strip = lambda text: text.replace("<image>\n", "")
    pairs = lambda m: [(strip(m[j]["content"]), m[j + 1]["content"]) for j in range(0, len(m), 2)]
    n = len(grid.ASKED)
    orders = set()
    for i, conversation in enumerate(dialogues.messages):
        alone = [pair for m in scenes.messages[i * n : (i + 1) * n] for pair in pairs(m)]
        assert sorted(pairs(conversation)) == sorted(alone)
        assert sum("<image>" in m["content"] for m in conversation) == 1
        assert conversation[0]["content"].startswith("<image>\n")
        orders.add(tuple(alone.index(p) for p in pairs(conversation)))
    assert len(orders) > 1  # not one fixed order
    arrays = grid.tokenize(dialogues, tokenizer, mcfg.num_image_tokens)
    assert ((arrays["input_ids"] == mcfg.image_token_id).sum(1) == 16).all()
    runs = np.diff(np.concatenate([np.zeros((6, 1)), arrays["loss_mask"]], 1), axis=1) > 0
    assert (runs.sum(1) == n).all()  # one answer span per question


def test_an_ordering_turn_lists_the_leftmost_colours(setup):
    """With ``order_turn`` a dialogue also asks the colours of the leftmost shapes, in order of their
    box centres (the scene's objects sorted here), and answers it like any other turn."""
    from data_pipelines import shapes

    mcfg, tokenizer, _, _ = setup
    plain = grid.make_scenes("sft", 6, 128, dialogue=True)
    ordered = grid.make_scenes("sft", 6, 128, dialogue=True, order_turn=3)
    pairs = lambda m: {q["content"].replace("<image>\n", ""): a["content"] for q, a in zip(m[::2], m[1::2])}
    for i, (before, after) in enumerate(zip(plain.messages, ordered.messages)):
        _, objects, _, _ = shapes.make_scene("sft", i, image_size=128, variant=grid.DATA)
        leftmost = sorted(objects, key=lambda o: o["box"][0] + o["box"][2])[:3]
        turns = pairs(after)
        answer = turns.pop("what colour are the first three shapes from the left?")
        assert answer == ", ".join(o["color"] for o in leftmost) + "."
        assert turns == pairs(before)  # the scene's other questions, unchanged
    two = [dict(color="red", box=(20, 0, 24, 4)), dict(color="blue", box=(0, 0, 4, 4))]
    assert shapes.order_question(two, 3) == (
        "what colour are the first two shapes from the left?",
        "blue, red.",
    )
    arrays = grid.tokenize(ordered, tokenizer, mcfg.num_image_tokens)
    assert (arrays["input_ids"] != tokenizer.token_ids("<unk>")[0]).all()  # every word in the vocabulary
    runs = np.diff(np.concatenate([np.zeros((6, 1)), arrays["loss_mask"]], 1), axis=1) > 0
    assert (runs.sum(1) == len(grid.ASKED) + 1).all()
    # its place is drawn with the others' (fixed last, first or right before the k-th question, it
    # taught the k-th colour worse in the pilots): it opens some dialogues, and comes before the k-th
    # question in some and after it in others
    places = set()
    for m in grid.make_scenes("sft", 40, 128, dialogue=True, order_turn=3).messages:
        kinds = [shapes.KINDS.get(shapes.question_kind(q["content"])) for q in m[::2]]
        order = [q["content"].endswith("first three shapes from the left?") for q in m[::2]].index(True)
        if "kth" in kinds:
            places.add((order == 0, order < kinds.index("kth")))
    assert places == {(True, True), (False, True), (False, False)}


def test_the_compact_template_renders_the_same_answers_in_fewer_tokens(setup):
    """``compact``: each question then a newline, each answer then the end-of-turn token (the text
    written out here); the answers and their ends are the ChatML's, 8 tokens fewer a question."""
    mcfg, tokenizer, _, _ = setup
    dialogues = grid.make_scenes("sft", 6, 128, dialogue=True, order_turn=3)
    rendered = tokenizer.with_chat_template(grid.TEMPLATES["compact"])
    for m in dialogues.messages:
        text = "<s>" + "".join(
            q["content"] + "\n" + a["content"] + "<|im_end|>" for q, a in zip(m[::2], m[1::2])
        )
        assert rendered.render(m) == text
    chat, compact = (grid.tokenize(dialogues, tokenizer, 16, t) for t in ("chat", "compact"))
    for i in range(6):
        answers = [x["targets"][i][x["loss_mask"][i] > 0].tolist() for x in (chat, compact)]
        assert answers[0] == answers[1] and answers[1][-1] in tokenizer.stop_ids
        pairs = len(grid.ASKED) + 1  # + the ordering turn
        assert compact["attention_mask"][i].sum() == chat["attention_mask"][i].sum() - 8 * pairs


def test_cached_features_give_the_models_logits(setup):
    """The grid's forward on cached tower features == VisionLanguageModel on the images."""
    from pargo_jax.models.mllm import VisionLanguageModel

    mcfg, _, scenes, arrays = setup
    model = VisionLanguageModel(mcfg)
    images, ids, mask = (
        scenes.images[arrays["scene"][:4]],
        arrays["input_ids"][:4],
        arrays["attention_mask"][:4],
    )
    params = nn.unbox(model.init(jax.random.key(0), images, ids, mask)["params"])
    expected = model.apply({"params": params}, images, ids, mask)
    features = grid.tower_features(mcfg, params["vision_tower"], scenes.images, batch=4)
    got = grid.forward(mcfg)(
        {k: params[k] for k in ("projector", "llm")}, features[arrays["scene"][:4]], ids, mask
    )
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_cached_mae_tokens_give_x_formers_logits():
    """X-Former in the grid: its forward on cached tower features and MAE tokens == VisionLanguageModel
    on the images (random tower and MAE at 128 px)."""
    import dataclasses

    from data_pipelines import shapes
    from data_pipelines.text import load_tokenizer
    from experiments import pretrain
    from pargo_jax import demo_mae, demo_tower, runs
    from pargo_jax.models.mllm import VisionLanguageModel

    c = pretrain.get_config("demo")
    c.model.vision = demo_tower.random_config(128)
    c.model.projector = grid.projectors.projector_options("xformer", 16)
    mae = {k: v for k, v in dataclasses.asdict(demo_mae.mae_config(128)).items() if k != "dtype"}
    c.model.detail = dict(config=mae)
    c.input.image_size = 128
    tokenizer = load_tokenizer(shapes.ASSET_TOKENIZER)
    mcfg = runs.model_config(c, tokenizer)
    assert mcfg.detail.mae.image_size == 128 and mcfg.num_image_tokens == 16
    scenes = grid.make_scenes("sft", 2, 128)
    arrays = grid.tokenize(scenes, tokenizer, mcfg.num_image_tokens)
    rows = np.array([0, len(grid.ASKED)])  # a question of each scene
    images, ids, mask = (
        scenes.images[arrays["scene"][rows]],
        arrays["input_ids"][rows],
        arrays["attention_mask"][rows],
    )
    model = VisionLanguageModel(mcfg)
    params = nn.unbox(model.init(jax.random.key(0), images, ids, mask)["params"])
    expected = model.apply({"params": params}, images, ids, mask)
    visual = {
        "features": grid.tower_features(mcfg, params["vision_tower"], images),
        "detail": grid.detail_tokens(mcfg, params["detail_tower"], images),
    }
    assert visual["detail"].shape == (2, mcfg.detail.mae.num_patches + 1, 64)  # + the MAE's CLS
    got = grid.forward(mcfg)({k: params[k] for k in ("projector", "llm")}, visual, ids, mask)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    assert set(visual) == {"features", "detail"}  # the caller's dict is left as it was
    without = jax.tree.map(jnp.zeros_like, visual["detail"])  # the MAE tokens matter
    assert not np.allclose(grid.forward(mcfg)({k: params[k] for k in ("projector", "llm")},
                                              visual | {"detail": without}, ids, mask), expected)  # fmt: skip


def test_cached_convnext_inputs_give_mg_llavas_logits():
    """MG-LLaVA in the grid: its forward on the cached tower features, ConvNeXt map and box features ==
    VisionLanguageModel on the 512 px images (bicubic, as ``squash``) and the boxes (4x the 128 px
    scene's), the slots of absent boxes masked as the pipeline does (random tower and ConvNeXt)."""
    from PIL import Image

    from data_pipelines import shapes
    from data_pipelines.text import load_tokenizer
    from experiments import pretrain
    from pargo_jax import demo_tower, runs
    from pargo_jax.models.mllm import VisionLanguageModel

    c = pretrain.get_config("mg_llava_demo")
    c.model.vision = demo_tower.random_config(128)
    c.model.projector = grid.projectors.projector_options("mg_llava", 16)
    c.model.high_res.update(image_size=512, roi_grid=128, max_boxes=4)
    c.model.high_res.fusion.zero_init = False  # else the ConvNeXt's part of the fusion starts at 0
    c.input.image_size = 512
    tokenizer = load_tokenizer(shapes.ASSET_TOKENIZER)
    mcfg = runs.model_config(c, tokenizer)
    assert mcfg.num_image_tokens == 16 and mcfg.high_res.max_boxes == 4
    scenes = grid.make_scenes("sft", 2, 128)
    scenes.boxes[1] = scenes.boxes[1][:2]  # a scene with 2 boxes: 2 slots masked out
    arrays = grid.tokenize(scenes, tokenizer, mcfg.num_image_tokens)
    rows = np.array([0, len(grid.ASKED)])  # a question of each scene
    images = np.stack(
        [np.asarray(Image.fromarray(x).resize((512, 512), Image.BICUBIC)) for x in scenes.images]
    )
    boxes = np.zeros((2, 4, 4), np.float32)
    boxes[0], boxes[1, :2] = scenes.boxes[0][:4] * 4, scenes.boxes[1] * 4
    ids, mask = arrays["input_ids"][rows], arrays["attention_mask"][rows].copy()
    mask[1, np.flatnonzero(ids[1] == mcfg.image_token_id)[-2:]] = 0
    model = VisionLanguageModel(mcfg)
    params = nn.unbox(model.init(jax.random.key(0), images, ids, mask, boxes=boxes)["params"])
    expected = model.apply({"params": params}, images, ids, mask, boxes=boxes)

    frozen = {k: params[k] for k in ("vision_tower", "high_res_tower")}
    assert c.input.resize == "squash"
    inputs = grid.mg_llava_inputs(mcfg, frozen, scenes, c.input.resize)
    assert inputs["real_boxes"].tolist() == [4, 2]
    visual = grid.cell_inputs(mcfg, {"mg_llava": inputs}, arrays)  # masks the absent boxes' slots
    np.testing.assert_array_equal(arrays["attention_mask"][rows], mask)
    assert set(visual) == {"features", "high_res", "box_features"}
    visual = {k: v[arrays["scene"][rows]] for k, v in visual.items()}
    trained = {k: params[k] for k in ("projector", "llm", "fusion", "box_projector")}
    got = grid.forward(mcfg)(trained, visual, ids, mask)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    for part in ("high_res", "box_features"):  # the ConvNeXt's map and the boxes matter
        changed = visual | {part: jnp.zeros_like(visual[part])}
        assert not np.allclose(grid.forward(mcfg)(trained, changed, ids, mask), expected, atol=1e-3)


def _data(setup, n=12):
    mcfg, _, _, arrays = setup
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 256, mcfg.vision.width)).astype(np.float32)
    return {k: v[:n] for k, v in arrays.items()} | {"features": features}


def test_seeds_in_one_program_train_as_they_would_alone(setup):
    """Seeds (3, 5) stacked and vmapped == seed 5 trained by itself: params and scores."""
    mcfg = setup[0]
    data = jax.device_put(_data(setup))
    both = grid.SeedProgram(mcfg, (3, 5), steps=3)
    alone = grid.SeedProgram(mcfg, (5,), steps=3)
    np.testing.assert_array_equal(both.order(12, 4, 3)[:, 1], alone.order(12, 4, 3)[:, 0])
    assert not np.array_equal(both.order(12, 4, 3)[:, 0], both.order(12, 4, 3)[:, 1])  # own data orders
    phases = [("a", data, 2), ("b", data, 1)]  # two phases: one LR schedule, the order of each its own
    p_both = both.train(phases, batch=4, chunk=2, log=lambda s: None)
    p_alone = alone.train(phases, batch=4, chunk=2, log=lambda s: None)
    for a, b in zip(jax.tree.leaves(p_both), jax.tree.leaves(p_alone)):
        np.testing.assert_allclose(a[1], b[0], atol=5e-5)  # 5% of one Adam step (lr 1e-3)
    assert any(not np.allclose(a[0], a[1]) for a in jax.tree.leaves(p_both))  # own inits
    assert alone.train_flops > 0 and both.train_flops == pytest.approx(2 * alone.train_flops, rel=0.01)
    alone._chunk = types.SimpleNamespace(lower=lambda *a: types.SimpleNamespace(cost_analysis=lambda: None))
    assert alone.step_flops(None, data, 4) is None  # a backend without a cost model: no count, no error
    np.testing.assert_array_equal(both.correct(p_both, data)[1], alone.correct(p_alone, data)[0])


def _greedy(logits_fn, params, features, ids, mask, start, stop_ids, limit):
    """Greedy decoding by hand from ``ids[:start]``: the generated ids up to and including a stop id."""
    seq = list(ids[:start])
    out = []
    for _ in range(limit):
        x = np.zeros((1, len(ids)), np.int32)
        m = np.zeros((1, len(ids)), np.int32)
        x[0, : len(seq)], m[0, : len(seq)] = seq, 1
        nxt = int(np.asarray(logits_fn(params, features[None], x, m))[0, len(seq) - 1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt in stop_ids or len(seq) == len(ids):
            break
    return out


def test_exact_match_is_what_greedy_decoding_answers(setup):
    """After overfitting 12 questions, the teacher-forced score of each equals whether greedy decoding
    (a plain loop, no cache) writes its answer and ends the turn."""
    mcfg, tokenizer, _, _ = setup
    data = _data(setup)
    program = grid.SeedProgram(mcfg, (0,), steps=60, lr=3e-3)
    params = program.train([("qa", jax.device_put(data), 60)], batch=12, chunk=60, log=lambda s: None)
    correct = program.correct(params, jax.device_put(data))[0]
    one = jax.tree.map(lambda x: x[0], params)
    logits_fn = jax.jit(program.logits)
    stop = set(tokenizer.stop_ids)
    for q in range(12):
        answer_at = np.flatnonzero(data["loss_mask"][q])
        target = list(data["targets"][q][answer_at])
        assert target[-1] in stop  # the answer ends the turn
        feats = data["features"][data["scene"][q]]
        ids, mask = data["input_ids"][q], data["attention_mask"][q]
        said = _greedy(logits_fn, one, feats, ids, mask, answer_at[0] + 1, stop, len(target))
        assert (said == target) == bool(correct[q]), q
    assert 0 < correct.sum()  # the overfit model answers some exactly: the comparison is not all-False


def test_intervals_match_scipy():
    x = [0.61, 0.58, 0.66, 0.70, 0.63]
    mean, half = grid.mean_interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x)) and half == pytest.approx((hi - lo) / 2, rel=1e-3)
    a, b = [0.61, 0.58, 0.66, 0.70, 0.63], [0.50, 0.62, 0.41, 0.55, 0.47, 0.52]
    d, half = grid.difference_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d == pytest.approx(np.mean(a) - np.mean(b))
    exact = (ci.high - ci.low) / 2
    assert exact <= half <= 1.1 * exact  # floor(df): a little wider, never narrower
    assert grid.mean_interval([0.5])[1] == math.inf and grid.t975(0.5) == math.inf


def test_tables_report_intervals_and_the_difference():
    row = lambda v, acc: dict(variant=v, budget=16, tokens=16, seeds=[0, 1, 2], seconds=1.0, split="",
                              accuracy={"digit": acc, "all": acc})  # fmt: skip
    rows = [row("pargo", [0.9, 0.8, 0.85]), row("qformer", [0.2, 0.3, 0.25])]
    text = grid.table(rows)
    assert "| pargo | 16 | 0.850 ± 0.124 |" in text
    diff = grid.differences(rows)
    assert "| 16 tokens | **+0.600 ± 0.1" in diff  # excludes 0: bold
    assert grid.goal(rows, tokens=16).startswith(
        "Fine-detail goal (the best at 16 tokens >= 0.6 on digit and kth): not met"
    )
    rows[0]["accuracy"]["kth"] = [0.7, 0.6, 0.65]
    assert ": met: digit 0.850 (pargo); kth 0.650 (pargo)." in grid.goal(rows, tokens=16)
    assert grid.compute(rows) == ""  # cells cached before the count: no compute line
    rows[0]["train_flops"], rows[1]["train_flops"] = 3e12, 1e12
    assert grid.compute(rows) == (
        "Compute: 4.0 TFLOP of training (XLA's count) in the cells' 2 s, 2000.0 GFLOP/s."
    )
    colours = [grid.colour_index(v) for v in grid.SUPPORTED]  # the plot: one colour per projector
    assert len(set(colours)) == len(colours) and all(0 <= c < 20 for c in colours)


@pytest.mark.slow  # the --quick grid (20-step tower + MAE, 3 cells x 2 seeds), then MG-LLaVA in-process
def test_quick_grid_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "grid"
    done = procs.run(
        "pargo_jax.benchmarks.projector_grid", "--quick", "--workers=2", f"--out={out}", devices=1
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # two workers, each pinned to its core share, trained the three cells between them, each once
    trained = [line for line in done.stdout.splitlines() if line.startswith("w") and "] " in line]
    assert sorted(line[line.index("] ") + 2 :] for line in trained) == [
        "pargo-t16",
        "qformer-t16",
        "xformer-t16",
    ]
    assert {line[:2] for line in trained} == {"w0", "w1"} and not list(out.glob("**/*.claim"))
    report = json.loads((out / "projector_grid_quick.json").read_text())
    cells = [(c["variant"], c["tokens"]) for c in report["cells"]]
    assert cells == [("pargo", 16), ("qformer", 16), ("xformer", 16)]
    for cell in report["cells"]:
        assert cell["seeds"] == [0, 1] and set(cell["accuracy"]) >= {"digit", "all"}
        assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in cell["accuracy"].values())
    text = (out / "projector_grid_quick.md").read_text()
    assert "| pargo (8+8) | 16 |" in text and "| pargo - qformer |" in text and "\nCompute: " in text
    assert all(cell["train_flops"] > 0 for cell in report["cells"])
    assert (out / "projector_grid_quick.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun finds every cell trained: no workers start, the same rows
    again = grid.main(["--quick", "--workers=2", f"--out={out}"])["rows"]
    assert [r["accuracy"] for r in again] == [c["accuracy"] for c in report["cells"]]
    assert "workers on cores" not in capsys.readouterr().out
    # MG-LLaVA in-process on the same --out: its ConvNeXt inputs cached, its cell trained and reported
    mg = grid.main(["--quick", "--variants=mg_llava", f"--out={out}"])["rows"]
    assert [(r["variant"], r["tokens"]) for r in mg] == [("mg_llava", 16)]
    assert "| mg_llava" in (out / "projector_grid_quick-mg_llava.md").read_text()


def test_a_second_command_on_the_same_cells_stops(tmp_path):
    out = str(tmp_path / "grid")  # this process holds the cells as another command would
    with grid.workers.exclusive(grid.output_stem(out, "quick", grid.SIZES["quick"])):
        with pytest.raises(SystemExit, match=f"Process {os.getpid()} is training into"):
            grid.main(["--quick", f"--out={out}"])


def test_a_cell_is_reused_only_with_the_same_settings(tmp_path):
    path, runs = str(tmp_path / "cells" / "pargo-t16.json"), []
    run = lambda: runs.append(1) or dict(accuracy={"all": [float(len(runs))]})
    settings = dict(seeds=[0, 1], asked=["digit"], tower=dict(steps=6000))
    assert grid.cached_cell(path, settings, run)["accuracy"]["all"] == [1.0]
    assert grid.cached_cell(path, settings, run)["accuracy"]["all"] == [1.0] and len(runs) == 1  # reused
    other = dict(settings, tower=dict(steps=2000))  # another tower: retrained
    assert grid.cached_cell(path, other, run)["accuracy"]["all"] == [2.0] and len(runs) == 2
    # a row that records more than a cell's settings (an older grid's budgets) is still that cell
    assert grid.cached_cell(path, dict(seeds=[0, 1], asked=["digit"]), run)["accuracy"]["all"] == [2.0]
    assert len(runs) == 2 and grid.cached_cell(path, dict(seeds=[0]), run) and len(runs) == 3


def test_a_changed_size_writes_beside_the_grid_not_over_it():
    size = dict(grid.SIZES["cpu"])
    assert grid.output_stem("o", "cpu", size) == "o/projector_grid_cpu"
    more = grid.output_stem("o", "cpu", size | dict(qa_steps=3000))
    assert more.startswith("o/projector_grid_cpu-") and more == grid.output_stem(
        "o", "cpu", size | dict(qa_steps=3000)
    )
    assert more != grid.output_stem("o", "cpu", size | dict(seeds=(5, 6, 7, 8, 9)))
    # a subset of the variants or budgets shares the grid's cells and writes its tables beside the grid's
    assert (
        grid.output_stem("o", "cpu", size | dict(budgets=(64,), ablation_budgets=(64,)))
        == "o/projector_grid_cpu"
    )
    assert grid.report_stem("o/g", ("pargo", "qformer"), ("pargo", "qformer")) == "o/g"
    assert grid.report_stem("o/g", ("pargo",), ("pargo", "qformer")) == "o/g-pargo"
    assert grid.report_stem("o/g", ("pargo",), ("pargo", "qformer"), (16, 64)) == "o/g-pargo-t16+64"


def test_the_command_line_overrides_the_named_size():
    args = ["--steps=4000", "--order-turn=3", "--train-scenes=16000", "--budgets=64", "--template=chat"]
    size = grid.grid_size(grid.parser().parse_args(args))
    assert size == grid.SIZES["cpu"] | dict(qa_steps=4000, order_turn=3, train=16000, budgets=(64,),
                                            ablation_budgets=(64,), template="chat")  # fmt: skip
    assert grid.SIZES["cpu"]["template"] == "compact"
    assert grid.grid_size(grid.parser().parse_args(["--quick"])) == grid.SIZES["quick"]
    for bad in ("--train-scenes=many", "--train-scenes=0", "--steps=-5", "--order-turn=-1", "--template=x"):
        with pytest.raises(SystemExit):
            grid.parser().parse_args([bad])


def test_workers_claim_the_most_tokens_first():
    cells = [("pargo", 16), ("qformer", 16), ("pargo", 64), ("mlp", 256), ("qformer", 64)]
    assert grid.training_order(cells) == [3, 2, 4, 0, 1]
