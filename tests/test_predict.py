"""Prediction: the predict functions against the model run by hand, padding and batching that change
nothing, one device == eight, streaming == batch decoding, several images per query, and the command
line with its errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import schema, shapes
from data_pipelines.builders import open_source
from data_pipelines.text import pack_example, prompt_ids
from pargo_jax import predict, runs, sharding
from pargo_jax.generate import generate, stream
from pargo_jax.models.llm import CausalLM
from pargo_jax.predictor import DecodeOptions, PredictError, Predictor, conversation, question
from tests import procs


@pytest.fixture(scope="module")
def run(trained_workdir):
    trained = runs.load_workdir(trained_workdir)
    return trained, Predictor.from_config(trained.model, trained.tokenizer, trained.mesh, trained.config)


@pytest.fixture(scope="module")
def records(shapes_dir):
    src = open_source(shapes_dir, "shapes", "eval")
    return [schema.from_example(src[i]) for i in range(len(src))]


def _queries(records, n=5):
    return [
        conversation(r.id, r.image, [{"role": "user", "content": r.conversation[0].text}])
        for r in records[:n]
    ]


def _by_hand(trained, predictor, query, max_new_tokens):
    """Greedy answer tokens of one query: pixels ((1, S, S, 3), or (1, n, S, S, 3) for n images) + prompt
    ids, spliced embeddings, generate()."""
    n = len(query.images)
    ids = prompt_ids(
        trained.tokenizer, query.messages, num_image_tokens=trained.mcfg.num_image_tokens, num_images=n
    )
    pixels = np.stack([predictor.pixels(b) for b in query.images])[None]
    pixels = pixels[:, 0] if n == 1 else pixels
    model, params = trained.model, trained.params
    embeds = jax.jit(lambda p, x, i: model.apply({"params": p}, x, i, method=model.embed_inputs))(
        params, pixels, ids[None]
    )
    tok = trained.tokenizer
    out = generate(
        CausalLM(trained.mcfg.llm), {"params": params["llm"]}, inputs_embeds=embeds,
        max_new_tokens=max_new_tokens, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id,
    )  # fmt: skip
    return out.tokens[0, : int(out.lengths[0])].tolist()


def test_a_scanned_llm_decodes_unscanned_once_with_the_same_answers(run, records):
    """``Predictor.for_decoding``: the LLM's layers stacked as ``scan_layers`` stores them are laid out
    one buffer per layer once per params tree, and the answers are those of the unscanned model."""
    import dataclasses

    from pargo_jax.models.mllm import VisionLanguageModel

    trained, predictor = run
    llm = dict(trained.params["llm"])
    blocks = [llm.pop(f"layers_{i}") for i in range(trained.mcfg.llm.num_layers)]
    llm["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    mcfg = dataclasses.replace(trained.mcfg, llm=dataclasses.replace(trained.mcfg.llm, scan_layers=True))
    scanned = Predictor(VisionLanguageModel(mcfg), trained.tokenizer, trained.mesh)
    params = {**trained.params, "llm": llm}
    model, unstacked = scanned.for_decoding(params)
    assert not model.config.llm.scan_layers and "layers" not in unstacked["llm"]
    assert scanned.for_decoding(params)[1] is unstacked  # converted once, not per batch
    queries, options = _queries(records, 3), DecodeOptions(max_new_tokens=8)
    assert scanned.answers(params, queries, options) == predictor.answers(trained.params, queries, options)


def test_answers_equal_the_model_run_by_hand(run, records):
    trained, predictor = run
    queries = _queries(records, 5)
    got = predictor.answers(trained.params, queries, DecodeOptions(max_new_tokens=12), batch_size=8)
    assert [g["id"] for g in got] == [q.id for q in queries]
    for g, q in zip(got, queries):
        assert g["tokens"] == _by_hand(trained, predictor, q, 12), q.id
        assert g["answer"] == trained.tokenizer.decode(g["tokens"])
        assert g["ended"] == (bool(g["tokens"]) and g["tokens"][-1] in trained.tokenizer.stop_ids)


def test_several_images_per_query(run, records):
    """A two-image query's prompt has one block of image tokens per image, and its answer is the model
    run by hand on (1, 2, S, S, 3) pixels, batched with a one-image query (whose answer stays that of
    the one-image path) and streamed. MG-LLaVA refuses it."""
    import dataclasses
    import itertools

    from pargo_jax.models.convnext import ConvNeXtConfig
    from pargo_jax.models.fusion import FusionConfig
    from pargo_jax.models.mllm import HighResConfig, VisionLanguageModel

    trained, predictor = run
    one = _queries(records, 1)[0]
    two = question("two", [records[1].image, records[2].image], "what colour is the circle?")
    assert two.images == (records[1].image, records[2].image)
    assert two.messages[0]["content"] == "<image>\n<image>\nwhat colour is the circle?"
    is_image = predictor.prompt(two) == trained.mcfg.image_token_id
    blocks = [len(list(g)) for image, g in itertools.groupby(is_image) if image]
    assert blocks == [trained.mcfg.num_image_tokens] * 2
    options = DecodeOptions(max_new_tokens=8)
    together = predictor.answers(trained.params, [one, two], options)
    assert together[0] == predictor.answers(trained.params, [one], options)[0]
    assert together[1]["tokens"] == _by_hand(trained, predictor, two, 8)
    assert "".join(predictor.stream(trained.params, two, options)) == together[1]["answer"]

    high_res = HighResConfig(ConvNeXtConfig(), FusionConfig(), max_boxes=4)
    mg = Predictor(VisionLanguageModel(dataclasses.replace(trained.mcfg, high_res=high_res)),
                   trained.tokenizer, trained.mesh)  # fmt: skip
    with pytest.raises(PredictError, match="two: MG-LLaVA reads one image per query; this query has 2"):
        mg.pixels_of(two.images, two.id)


def test_padding_rows_batch_size_and_mesh_change_nothing(run, records):
    """5 queries in one batch of 8 (3 padding rows, prompts of 2 lengths left-padded together) == one
    query per batch, and the 8-device mesh == 1 device."""
    trained, predictor = run
    queries = _queries(records, 5)
    assert len({len(predictor.prompt(q)) for q in queries}) > 1  # different prompt lengths share a batch
    options = DecodeOptions(max_new_tokens=10)
    together = predictor.answers(trained.params, queries, options, batch_size=8)
    one = runs.load_workdir(trained.workdir, mesh=sharding.make_mesh({}, jax.devices()[:1]))
    single = Predictor.from_config(one.model, one.tokenizer, one.mesh, one.config)
    alone = [single.answers(one.params, [q], options, batch_size=1)[0] for q in queries]
    assert [a["tokens"] for a in together] == [a["tokens"] for a in alone]


def test_score_is_the_log_likelihood_of_the_answer_tokens(run, records):
    """Sums over the answer tokens, and in the same pass over the answer tokens of 2 token groups
    (a random half of the positions, and all of them)."""
    trained, predictor = run
    tok, mcfg = trained.tokenizer, trained.mcfg
    examples, rng = [], np.random.default_rng(0)
    for r in records[:3]:
        arrays = pack_example(tok, r.messages(), num_image_tokens=mcfg.num_image_tokens, max_len=64)
        n = len(arrays["targets"])
        groups = np.stack([rng.random(n) < 0.5, np.ones(n)]).astype(np.float32)  # half, all
        examples.append(dict(arrays, image=predictor.pixels(r.image), group_masks=groups))
    got = predictor.scores(trained.params, examples + [None], batch_size=8, groups=2)
    assert got[3] is None
    for ex, g in zip(examples, got):
        batch = {k: jnp.asarray(v)[None] for k, v in ex.items()}
        logits = trained.model.apply({"params": trained.params}, batch["image"], batch["input_ids"],
                                     batch["attention_mask"])  # fmt: skip
        logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)))
        mask = ex["loss_mask"] > 0
        picked = logp[np.arange(len(mask)), ex["targets"]]
        assert g["tokens"] == mask.sum() > 0
        assert g["logprob"] == pytest.approx(float(picked[mask].sum()), rel=1e-5, abs=1e-4)
        assert g["correct"] == float((logp.argmax(-1) == ex["targets"])[mask].sum())
        for k, group in enumerate(ex["group_masks"] > 0):
            sub = mask & group
            assert g["group_tokens"][k] == sub.sum()
            assert g["group_logprob"][k] == pytest.approx(float(picked[sub].sum()), rel=1e-5, abs=1e-4)
            assert g["group_correct"][k] == float((logp.argmax(-1) == ex["targets"])[sub].sum())
        everything = [g[f"group_{k}"][1] for k in ("logprob", "tokens", "correct")]  # group 1: all
        assert everything == pytest.approx([g[k] for k in ("logprob", "tokens", "correct")], rel=1e-6)


def test_image_tokens_are_the_projector_output(run, records):
    from pargo_jax.predictor import image_tokens

    trained, predictor = run
    pixels = np.stack([predictor.pixels(r.image) for r in records[:8]])
    got = image_tokens(trained.model, trained.params, sharding.shard_batch({"x": pixels}, trained.mesh)["x"])
    want = trained.model.apply({"params": trained.params}, pixels, method=trained.model.encode_images)
    assert got.shape == (8, trained.mcfg.num_image_tokens, trained.mcfg.llm.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_stream_yields_the_tokens_generate_gives(run, method):
    trained, _ = run
    llm = CausalLM(trained.mcfg.llm)
    variables = {"params": trained.params["llm"]}
    ids = jnp.asarray([[2, 9, 14, 30, 7]])
    opts = dict(max_new_tokens=9, method=method, temperature=1.5, seed=3)
    batch = generate(llm, variables, input_ids=ids, **opts)
    streamed = list(stream(llm, variables, input_ids=ids, **opts))
    assert streamed == batch.tokens[0, : int(batch.lengths[0])].tolist()


def test_streamed_pieces_join_to_the_batch_answer(run, records):
    trained, predictor = run
    options = DecodeOptions(max_new_tokens=12)
    for q in _queries(records, 3):
        pieces = list(predictor.stream(trained.params, q, options))
        assert "".join(pieces) == predictor.answers(trained.params, [q], options)[0]["answer"]


def test_bad_queries_are_named():
    with pytest.raises(PredictError, match="the prompt is empty"):
        question("q1", b"x", "   ")
    with pytest.raises(PredictError, match="must end with a non-empty user turn"):
        conversation("q2", b"x", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(PredictError, match="needs a role and a text"):
        conversation("q3", b"x", [{"speaker": "user", "content": "hi"}])
    q = conversation("q4", b"x", [{"from": "human", "value": "what colour?"}])
    assert q.messages[0] == {"role": "user", "content": "<image>\nwhat colour?"}
    q = conversation("q5", [b"x", b"y"], [{"role": "user", "content": "<image> or <image>?"}])
    assert q.image == (b"x", b"y") and q.messages[0]["content"] == "<image> or <image>?"  # kept as placed
    with pytest.raises(PredictError, match="q6: the text has 1 <image> placeholders for 2 images"):
        question("q6", [b"x", b"y"], "<image> which?")
    with pytest.raises(PredictError, match="q7: the text has 2 <image> placeholders for 1 images"):
        conversation("q7", b"x", [{"role": "user", "content": "<image> or <image>?"}])


# --- the command line --------------------------------------------------------------------------------
def _predict(*args):
    proc = procs.run("pargo_jax.predict", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_command_answers_an_image_and_a_jsonl_file(run, records, tmp_path, capsys):
    """The command line answers one image (a subprocess, as a user runs it) and a JSONL file of good
    and bad queries (the same ``main``, in this process)."""
    trained, predictor = run
    images = []
    for i, r in enumerate(records[:2]):
        (tmp_path / f"img{i}.png").write_bytes(r.image)
        images.append(f"img{i}.png")
    prompt = records[0].conversation[0].text.replace("<image>\n", "")
    want = predictor.answers(trained.params, [question("x", records[0].image, prompt)], DecodeOptions())[0]
    one = _predict("--workdir", trained.workdir, "--image", str(tmp_path / images[0]), "--prompt", prompt)
    assert one.stdout.strip() == want["answer"].strip()

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    lines = [
        {"id": "a", "image": images[0], "prompt": prompt},
        {
            "id": "b",
            "image": images[1],
            "conversation": [{"role": "user", "content": records[1].conversation[0].text}],
        },
        {"id": "c", "image": "missing.png", "prompt": "what?"},
        {"id": "d", "image": "broken.png", "prompt": "what?"},
        {"id": "e", "image": images[0], "prompt": ""},
        {"id": "f", "image": images, "prompt": prompt},  # two images: one batch with one-image queries
        {"id": "g", "image": [], "prompt": "what?"},
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    out = tmp_path / "a.jsonl"
    capsys.readouterr()
    args = ["--workdir", trained.workdir, "--input", str(tmp_path / "q.jsonl"), "--output", str(out)]
    predict.main(["predict"], predict.parse_flags([*args, "--batch_size", "4"]))
    stderr = capsys.readouterr().err
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    expected = predictor.answers(trained.params, _queries(records, 2), DecodeOptions())
    both = question("f", [r.image for r in records[:2]], prompt)
    assert answers == [
        {"id": "a", "answer": want["answer"]},
        {"id": "b", "answer": expected[1]["answer"]},
        {"id": "f", "answer": predictor.answers(trained.params, [both], DecodeOptions())[0]["answer"]},
    ]
    skipped = [x for x in stderr.splitlines() if x.startswith("predict: skipped")]
    assert len(skipped) == 5, stderr
    assert any("c:" in x and "not found" in x for x in skipped)
    assert any("d:" in x and "does not decode" in x for x in skipped)
    assert any("e:" in x and "prompt is empty" in x for x in skipped)
    assert any("g:" in x and "a non-empty list of paths" in x for x in skipped)
    assert any("line 8" in x and "not a JSON object" in x for x in skipped)
    assert "answered 3 of 8 queries (5 skipped)" in stderr


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda w, d: ["--workdir", w, "--image", f"{d}/nope.jpg", "--prompt", "hi"], "image file"),
        (lambda w, d: ["--workdir", w, "--image", f"{d}/broken.png", "--prompt", "hi"], "does not decode"),
        (lambda w, d: ["--workdir", w, "--image", f"{d}/ok.png", "--prompt", " "], "the prompt is empty"),
        (lambda w, d: ["--workdir", d, "--image", f"{d}/ok.png", "--prompt", "hi"], "No config.json"),
        (
            lambda w, d: ["--workdir", f"{d}/untrained", "--image", f"{d}/ok.png", "--prompt", "hi"],
            "no finished",
        ),
        (lambda w, d: ["--workdir", w], "ask either --image with --prompt, or --input"),
    ],
)
def test_command_errors_are_one_clear_line(trained_workdir, tmp_path, make_args, message):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "ok.png").write_bytes(shapes.make_record("eval", 0).image)
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    for name in ("config.json", "model.json"):
        (untrained / name).write_text(open(os.path.join(trained_workdir, name)).read())
    with pytest.raises(SystemExit) as exited:  # sys.exit("predict: ..."): that one line, no traceback
        predict.main(["predict"], predict.parse_flags(make_args(trained_workdir, str(tmp_path))))
    line = str(exited.value.code)
    assert line.startswith("predict: ") and message in line and "\n" not in line, line
