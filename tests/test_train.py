"""End-to-end training: loss falls, sharded == single device, frozen stays frozen, SIGKILL + resume ==
uninterrupted, SFT starts from the pretrain projector, and config mistakes fail with one clear error."""

import json
import os
import random
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from experiments import base, pretrain, sft
from pargo_jax import checkpoints, prepare, runs, sharding, train
from tests import procs
from tests.demo import demo_config, demo_flags, losses, prepare_and_train


@pytest.fixture
def data_dir(shapes_dir):
    """The session's small shapes build (and its demo tower)."""
    return shapes_dir


def demo(data_dir, steps, *, stage=pretrain, **overrides):
    return demo_config(data_dir, steps, stage=stage, **overrides)


def initial_and_saved(config, workdir, *, restore_from=None, with_parts=False):
    """The run's initial state, and the state saved at ``restore_from=(workdir, step)`` if given."""
    from data_pipelines.text import load_tokenizer

    mesh = runs.mesh_for(config)
    with sharding.mesh_context(mesh):
        prepare.prepare_data(config, workdir)
        parts = train.build_model(config, load_tokenizer(config.input.tokenizer), mesh)
        initial, shardings = train.init_state(parts, config, mesh)
        saved = None
        if restore_from is not None:
            ckpt = checkpoints.Checkpointer(restore_from[0], every_steps=1)
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), initial, shardings
            )
            saved, _ = ckpt.restore(restore_from[1], abstract)
            ckpt.close()
    return (initial, saved, parts) if with_parts else (initial, saved)


@pytest.mark.slow  # 30 demo steps: the loss must have time to fall
def test_demo_loss_falls_and_frozen_tower_is_untouched(data_dir, tmp_path):
    config = demo(data_dir, 30, **{"optim.warmup_steps": 5, "checkpoint.every_steps": 30})
    config.trainable = base.regex_dict({"projector/.*": 1.0, "llm/.*": 1.0})  # the tower out of it
    workdir = str(tmp_path / "run")
    summary = prepare_and_train(config, workdir)
    curve = losses(workdir)
    assert summary["step"] == 30 and len(curve) == 30
    assert np.mean([curve[s] for s in range(26, 31)]) < 0.6 * np.mean([curve[s] for s in range(1, 6)])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    for key in ("grad_norm", "lr", "tokens_per_second", "images_per_second", "step_seconds",
                "data_wait_seconds", "skipped/total"):  # fmt: skip
        assert key in row, key
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.path.exists(os.path.join(workdir, "config.json"))

    # The vision tower is frozen: bit-identical to its pretrained checkpoint.
    fresh, trained = initial_and_saved(config, workdir, restore_from=(workdir, 30))
    same = jax.tree.map(np.array_equal, fresh.params["vision_tower"], trained.params["vision_tower"])
    assert all(jax.tree.leaves(same))
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), fresh.params["projector"], trained.params["projector"]
    )
    assert all(jax.tree.leaves(changed))


@pytest.mark.slow  # four meshes, four compiles of the 8-device step
def test_sharded_mesh_and_grad_accumulation_equal_single_device(data_dir, tmp_path):
    """... and the chunked cross-entropy (32 of the 128 positions at a time) equals the full logits."""
    runs = {}
    for name, mesh, accum, chunk in [
        ("single", dict(data=1, fsdp=1, tensor=1, num_devices=1), 1, 0),
        ("2x2x2", dict(data=2, fsdp=2, tensor=2), 1, 0),
        ("data8_accum2", dict(data=8, fsdp=1, tensor=1), 2, 0),
        ("2x2x2_chunked_loss", dict(data=2, fsdp=2, tensor=2), 1, 32),
    ]:
        workdir = str(tmp_path / name)
        overrides = {"checkpoint.every_steps": 100, "optim.grad_accum_steps": accum, "loss_chunk": chunk}
        prepare_and_train(demo(data_dir, 3, mesh=mesh, **overrides), workdir)
        runs[name] = losses(workdir)
    assert runs["single"].keys() == runs["2x2x2"].keys() == {1, 2, 3}
    for name in ("2x2x2", "data8_accum2", "2x2x2_chunked_loss"):
        np.testing.assert_allclose(
            list(runs[name].values()), list(runs["single"].values()), rtol=0, atol=1e-5
        )


@pytest.mark.slow  # two runs, two compiles
def test_bfloat16_compute_trains_like_float32(data_dir, tmp_path):
    """``model.dtype="bfloat16"`` (tower, projector and LLM compute; params and optimizer stay float32):
    over 4 steps the losses stay within 2% of the float32 run's, and they are not the same numbers."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        workdir = str(tmp_path / dtype)
        prepare_and_train(demo(data_dir, 4, **{"model.dtype": dtype, "checkpoint.every_steps": 4}), workdir)
        runs[dtype] = np.array(list(losses(workdir).values()))
    np.testing.assert_allclose(runs["bfloat16"], runs["float32"], rtol=0.02)
    assert not np.array_equal(runs["bfloat16"], runs["float32"])
    with open(tmp_path / "bfloat16" / "model.json") as f:
        model = json.load(f)
    assert model["llm"]["dtype"] == model["vision"]["dtype"] == "bfloat16"
    assert model["llm"]["param_dtype"] == model["vision"]["param_dtype"] == "float32"


@pytest.mark.slow  # two runs, a restore and an export
def test_bfloat16_frozen_storage_trains_like_float32_and_round_trips(data_dir, tmp_path):
    """``model.frozen_dtype="bfloat16"`` (the real presets') stores the frozen tower and LLM in bfloat16,
    the trained projector and its Adam moments in float32: over 4 steps the losses stay within 1% of
    float32 storage; the checkpoint holds those dtypes and restores them; export writes the stored values."""
    from safetensors.numpy import load_file

    from pargo_jax import export

    runs, trainable = {}, base.regex_dict({"projector/.*": 1.0})
    for dtype in ("float32", "bfloat16"):
        config = demo(data_dir, 4, **{"model.frozen_dtype": dtype, "checkpoint.every_steps": 4})
        config.trainable = trainable
        prepare_and_train(config, str(tmp_path / dtype))
        runs[dtype] = np.array(list(losses(str(tmp_path / dtype)).values()))
    np.testing.assert_allclose(runs["bfloat16"], runs["float32"], rtol=0.01)
    assert not np.array_equal(runs["bfloat16"], runs["float32"])

    workdir = str(tmp_path / "bfloat16")
    fresh, saved = initial_and_saved(config, str(tmp_path / "again"), restore_from=(workdir, 4))
    dtypes = lambda tree: {str(x.dtype) for x in jax.tree.leaves(tree)}
    assert dtypes(saved.params["vision_tower"]) == dtypes(saved.params["llm"]) == {"bfloat16"}
    assert dtypes(saved.params["projector"]) == dtypes(saved.opt_state) - {"int32"} == {"float32"}
    same = jax.tree.map(np.array_equal, fresh.params["llm"], saved.params["llm"])  # frozen: untouched
    assert all(jax.tree.leaves(same)) and dtypes(fresh.params["llm"]) == {"bfloat16"}

    out = str(tmp_path / "export")
    export.export_workdir(workdir, out)
    written = load_file(os.path.join(out, "vision_tower", "model.safetensors"))
    patch = saved.params["vision_tower"]["patch_embed"]["kernel"]
    assert written["embeddings.patch_embedding.weight"].dtype == np.float32
    np.testing.assert_array_equal(
        written["embeddings.patch_embedding.weight"],
        np.asarray(patch, np.float32).transpose(3, 2, 0, 1),
    )


def test_nonfinite_losses_skip_updates_then_stop_naming_records(data_dir, tmp_path):
    config = demo(data_dir, 20, max_nonfinite_steps=3, **{"optim.lr": 1e30, "optim.clip_norm": 1e30})
    with pytest.raises(FloatingPointError) as err:
        prepare_and_train(config, str(tmp_path / "nan"))
    message = str(err.value)
    assert "consecutive non-finite steps by step" in message and "shapes/pretrain/" in message
    rows = losses(str(tmp_path / "nan"))
    assert not all(np.isfinite(list(rows.values())))


def test_image_slots_train_exactly_like_one_image_rows(data_dir, tmp_path):
    """``input.max_images=2`` on one-image records: (B, 2, H, W, 3) pixels with an empty slot per row give
    the losses of today's (B, H, W, 3) rows."""
    rows = prepare_and_train(demo(data_dir, 3), str(tmp_path / "rows"))
    slots = prepare_and_train(demo(data_dir, 3, **{"input.max_images": 2}), str(tmp_path / "slots"))
    assert rows["step"] == slots["step"] == 3
    a, b = losses(str(tmp_path / "rows")), losses(str(tmp_path / "slots"))
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=0, atol=1e-6)


@pytest.mark.slow  # a real process to kill, plus the straight run
@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])  # packed: resumes at its record
def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(data_dir, tmp_path, packing):
    common = {"optim.schedule": "constant", "optim.warmup_steps": 0, "checkpoint.every_steps": 2,
              "input.packing": packing}  # fmt: skip
    straight = str(tmp_path / "straight")
    prepare_and_train(demo(data_dir, 8, **common), straight)

    killed = str(tmp_path / "killed")
    args = [f"--config.{k}={v}" for k, v in common.items()] + [
        "--config.total_steps=1000", "--config.log_every_steps=1", f"--config.input.data_dir={data_dir}",
        f"--workdir={killed}", "--config.sample_at_end=", *demo_flags(data_dir),
    ]  # fmt: skip
    proc = procs.popen("pargo_jax.main", "--config=experiments/pretrain.py", *args, devices=1,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 600
        while not os.path.isdir(os.path.join(killed, "checkpoints", "4")):
            assert proc.poll() is None, "the training process died before its step-4 checkpoint"
            assert time.time() < deadline, "no step-4 checkpoint within 10 minutes"
            time.sleep(0.2)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = prepare_and_train(demo(data_dir, 8, **common), killed)
    assert resumed["step"] == 8
    a, b = losses(straight), losses(killed)
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


@pytest.mark.slow  # a real process to signal
def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
    workdir = str(tmp_path / "preempted")
    args = [
        "--config.total_steps=1000", "--config.log_every_steps=1", "--config.checkpoint.every_steps=500",
        f"--config.input.data_dir={data_dir}", f"--workdir={workdir}", *demo_flags(data_dir),
    ]  # fmt: skip
    proc = procs.popen("pargo_jax.main", "--config=experiments/pretrain.py", *args, devices=1,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 600
    while not (os.path.exists(metrics_file) and len(open(metrics_file).readlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training did not reach step 3"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    saved = checkpoints.Checkpointer(workdir, every_steps=500)
    assert saved.latest_step() == max(losses(workdir)) >= 3  # saved exactly where it stopped
    saved.close()


def test_train_run_only_trains_the_prepare_step_fills_in_the_demo(data_dir, tmp_path):
    """``train.run`` builds no data and names no tokenizer: on a demo config that was not prepared it
    stops at the missing ``input.tokenizer``; :func:`pargo_jax.prepare.prepare_run` fills it in from
    the shapes build it ensured."""
    config = demo(data_dir, 1)
    with pytest.raises(FileNotFoundError, match="input.tokenizer path None does not exist"):
        train.run(config, str(tmp_path / "unprepared"))
    prepare.prepare_run(config, str(tmp_path / "prepared"))
    assert config.input.tokenizer == os.path.join(data_dir, "shapes_tokenizer")
    assert config.input.data_dir == data_dir
    assert config.model.vision.path == os.path.join(data_dir, "demo_tower")


def test_sft_starts_from_the_pretrain_projector(data_dir, tmp_path):
    pre = str(tmp_path / "pretrain")
    prepare_and_train(demo(data_dir, 2, **{"checkpoint.every_steps": 2}), pre)
    config = demo(data_dir, 2, stage=sft, **{"checkpoint.init_from": pre})
    state, stage1 = initial_and_saved(config, str(tmp_path / "sft"), restore_from=(pre, 2))
    for part in ("projector", "llm"):
        same = jax.tree.map(np.array_equal, state.params[part], stage1.params[part])
        assert all(jax.tree.leaves(same)), part


@pytest.mark.slow  # a run, then decoding through the predictor
def test_sample_at_end_is_the_predictors_answer(data_dir, tmp_path, capsys):
    from data_pipelines import schema
    from data_pipelines.builders import open_source
    from pargo_jax.predictor import DecodeOptions, Predictor, conversation

    workdir = str(tmp_path / "sampled")
    summary = prepare_and_train(
        demo(data_dir, 3, stage=sft, sample_at_end="eval", **{"checkpoint.init_from": None}), workdir
    )
    sample = summary["sample"]
    rec = schema.from_example(open_source(data_dir, "shapes", "eval")[0])
    assert sample["prompt"] == rec.conversation[0].text and sample["reference"] == rec.conversation[1].text
    run = runs.load_workdir(workdir)
    predictor = Predictor.from_config(run.model, run.tokenizer, run.mesh, run.config)
    query = conversation(rec.id, rec.image, [{"role": "user", "content": rec.conversation[0].text}])
    assert (
        sample["answer"]
        == predictor.answers(run.params, [query], DecodeOptions(max_new_tokens=32))[0]["answer"]
    )
    assert json.dumps(sample, indent=2) in capsys.readouterr().out


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda c: c.__setitem__("learning_rate", 1.0), ValueError, "Unknown key(s) 'learning_rate'"),
        (lambda c: c.mesh.update(data=3, fsdp=-1, num_devices=None), ValueError, "cannot fill 8 devices"),
        (lambda c: c.mesh.update(data=3, num_devices=None), ValueError, "has 3 devices but 8 are available"),
        (lambda c: c.model.llm.update(path="/nonexistent/llm"), FileNotFoundError, "'/nonexistent/llm'"),
        (lambda c: c.checkpoint.update(init_from="/nonexistent/run"), FileNotFoundError, "/nonexistent/run"),
    ],
)
def test_config_errors_are_one_clear_line(data_dir, tmp_path, mutate, error, message):
    config = demo(data_dir, 1)
    with config.unlocked():
        mutate(config)
    with pytest.raises(error) as err:
        prepare_and_train(config, str(tmp_path / "bad"))
    assert message in str(err.value)


def test_config_sources_in_another_box_codec_fail_at_start(tmp_path, monkeypatch):
    """A dataset built with int1000 boxes and a run configured for norm3 (the default): one error at start,
    before any weights are read, naming the source, both codecs and the fix; a caption set declaring no
    codec is no error, and neither is the run set to the data's codec."""
    from data_pipelines import shapes
    from data_pipelines.boxes import BoxCodec
    from data_pipelines.builders import write_records
    from data_pipelines.schema import IMAGE_PLACEHOLDER, Record, Turn

    data_dir, codec = str(tmp_path / "data"), BoxCodec("int1000", "square")
    objects = shapes.sample_scene(random.Random(0), 64)
    box = codec.encode(objects[0]["box"], 64, 64)
    turns = [Turn("user", IMAGE_PLACEHOLDER + "\ngive the bounding box."), Turn("assistant", box)]
    image = shapes.draw_scene(objects, 64, 20)
    write_records(data_dir, "refs", {"train": [Record("r0", image, conversation=turns)]}, box_codec=codec)
    write_records(data_dir, "captions", {"train": [Record("c0", image, caption="shapes.")]})
    config = pretrain.get_config("demo")
    config.model.vision = dict(path=None, format="hf", preset="tiny", overrides=dict(image_size=64))
    sources = [dict(name="captions", split="train"), dict(name="refs", split="train")]
    config.input.update(data_dir=data_dir, tokenizer=shapes.ASSET_TOKENIZER, batch_size=2, sources=sources)
    config.evals, config.mesh = {}, dict(data=1, num_devices=1)
    monkeypatch.setattr(train, "init_state", lambda *a: pytest.fail("weights read before the codec check"))
    with pytest.raises(ValueError) as err:
        train.run(config, str(tmp_path / "run"))
    message = str(err.value)
    assert f"input.sources[1] (refs in {data_dir}) writes its boxes as int1000/square" in message
    assert "config.box_codec is norm3/square" in message and "captions" not in message
    assert "config.box_codec=dict(format='int1000', frame='square')" in message
    config.box_codec = codec.as_dict()
    train.check_box_codecs(config)  # the data's codec: no error
    config.box_codec.frame = "skewed"
    with pytest.raises(ValueError, match="config.box_codec: Unknown box frame 'skewed'"):
        train.check_config(config)


def test_real_preset_path_loads_hf_tower_and_llm(data_dir, tmp_path):
    """The checkpoint-driven path of the real presets, on tiny HF SigLIP + Llama dirs made here."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from data_pipelines.text import load_tokenizer
    from pargo_jax.convert.hf import load_llm
    from pargo_jax.convert.hf_vision import load_vision

    torch.manual_seed(0)
    vocab = load_tokenizer(os.path.join(data_dir, "shapes_tokenizer")).vocab_size
    tower_dir, llm_dir = str(tmp_path / "siglip"), str(tmp_path / "llama")
    SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8)
    ).save_pretrained(tower_dir)  # fmt: skip
    LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ).save_pretrained(llm_dir)  # fmt: skip
    config = demo(data_dir, 2, **{"checkpoint.every_steps": 2})
    config.model.vision.path, config.model.vision.overrides = tower_dir, {}  # replace, not merge
    config.model.llm.path, config.model.llm.overrides = llm_dir, {}
    config.input.tokenizer = os.path.join(data_dir, "shapes_tokenizer")
    config.trainable = base.regex_dict({"projector/.*": 1.0})
    workdir = str(tmp_path / "run")
    summary = prepare_and_train(config, workdir)
    assert summary["step"] == 2 and np.isfinite(summary["loss"])

    state, _, parts = initial_and_saved(config, workdir, with_parts=True)
    assert parts.mcfg.vision.width == 32 and parts.mcfg.llm.vocab_size == vocab + 3
    for part, (_, variables) in {"vision_tower": load_vision(tower_dir), "llm": load_llm(llm_dir)}.items():
        same = jax.tree.map(np.array_equal, state.params[part], variables["params"])
        assert all(jax.tree.leaves(same)), part
