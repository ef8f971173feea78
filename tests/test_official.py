"""Official ParGo checkpoint import: parity with an independent PyTorch reference, loud failures."""

import dataclasses
import json
import os
import random
import sys

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn
from safetensors.torch import save_file

from pargo_jax.convert.official import load_projector
from pargo_jax.convert.tables import ConversionError
from pargo_jax.models.projectors import ParGo
from pargo_jax.param_tree import flatten
from tests import procs
from tests.torch_refs.pargo import ParGoReference
from tests.torch_refs.random_weights import randomize

SHAPE = dict(num_partial=8, num_global=4, hidden=64, heads=2, layers=2, mlp_dim=96, vision_width=48,
             llm_width=40, max_positions=40)  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return randomize(ParGoReference(**SHAPE)).eval()


def official_state(ref, prefix="ParGo.", wrap="module."):
    """A state dict laid out like the release: text-branch tensors included, tower/LLM tensors too."""
    state = {k.replace("ParGo.", prefix, 1): v.clone() for k, v in ref.state_dict().items()}
    extras = {
        f"{prefix}bert.embeddings.word_embeddings.weight": torch.zeros(30, 64),
        f"{prefix}bert.embeddings.position_ids": torch.arange(40)[None],
        f"{prefix}cls.predictions.bias": torch.zeros(30),
        f"{prefix}bert.encoder.layer.1.intermediate.dense.weight": torch.zeros(96, 64),
        f"{prefix}bert.encoder.layer.1.output.LayerNorm.bias": torch.zeros(64),
        "visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3),
        "llm_model.base_model.model.output.weight": torch.zeros(3, 3),
    }
    state.update(extras)
    return {wrap + k: v for k, v in state.items()}


def features(n=16, seed=0):
    return np.random.RandomState(seed).randn(3, n, 48).astype(np.float32)


def save(state, tmp_path, name="pargo.pth"):
    path = str(tmp_path / name)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "prefix, wrap, name",
    [
        ("ParGo.", "module.", "pargo.bin"),
        ("Q_former.", "", "ckpt.pth"),
        ("ParGo.", "", "model.safetensors"),
    ],
)
@pytest.mark.parametrize("impl", ["structured", "dense"])
def test_parity_with_pytorch_reference(reference, tmp_path, prefix, wrap, name, impl):
    path = save(official_state(reference, prefix, wrap), tmp_path, name)
    module, variables = load_projector(path, num_heads=2, num_partial=8, impl=impl)
    assert module.config.num_queries == 12 and module.config.layers == 2 and module.config.mlp_dim == 96
    x = features()
    got = np.asarray(jax.jit(module.apply)(variables, x))
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 12, 40)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_multi_crop_parity(reference, tmp_path):
    """Two crops concatenated (as the release's split_into_patches does) use raster windows of k=4."""
    module, variables = load_projector(save(official_state(reference), tmp_path), num_heads=2, num_partial=8)
    x = features(n=32)
    module = ParGo(dataclasses.replace(module.config, num_crops=2))
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(module.apply(variables, x)), want, atol=1e-5, rtol=0)


def test_wrapped_state_dict_and_default_heads(reference, tmp_path):
    path = save({"state_dict": official_state(reference, wrap="")}, tmp_path)
    module, _ = load_projector(path, num_partial=8)
    assert module.config.heads == 1  # H // 64 when num_heads is not given


def test_renamed_projector_is_an_error_not_a_silent_skip(reference, tmp_path):
    state = official_state(reference, prefix="Fusion.")
    with pytest.raises(ConversionError) as err:
        load_projector(save(state, tmp_path), num_heads=2, num_partial=8)
    assert "missing bert.embeddings.position_embeddings.weight" in str(err.value)


def test_every_bad_tensor_is_listed(reference, tmp_path):
    state = official_state(reference)
    del state["module.ParGo.bert.encoder.layer.0.crossattention.self.value.bias"]
    del state["module.ParGo.bert.encoder.layer.1.output_query.dense.weight"]
    state["module.ParGo.bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(64, 63)
    state["module.ParGo.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    state["module.pooler.dense.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError) as err:
        load_projector(save(state, tmp_path), num_heads=2, num_partial=8)
    msg = str(err.value)
    for name in (
        "bert.encoder.layer.0.attention.self.rotary.weight",  # unknown
        "pooler.dense.weight",  # unknown
        "fc2_kernel",  # missing layer 1 output_query.dense.weight
        "cross_kv_bias",  # missing layer 0 value bias
        "self_qkv_kernel",  # mis-shaped query weight
        "(63, 64)",
    ):
        assert name in msg, name


def test_cross_attention_every_other_layer_is_refused(reference, tmp_path):
    state = {k: v for k, v in official_state(reference).items() if "layer.1.crossattention" not in k}
    with pytest.raises(ConversionError, match=r"Layers \[1\] have no cross-attention"):
        load_projector(save(state, tmp_path), num_heads=2, num_partial=8)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_projector(str(tmp_path / "missing.bin"))
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"expected a \.safetensors, \.bin, \.pth or \.pt file"):
        load_projector(str(bad))


def test_too_many_partial_queries(reference, tmp_path):
    with pytest.raises(ValueError, match="num_partial=20 exceeds the checkpoint's 12 queries"):
        load_projector(save(official_state(reference), tmp_path), num_heads=2, num_partial=20)


def test_export_to_pytorch_matches_jax(tmp_path):
    """JAX-initialized params -> official state dict -> the PyTorch model (strict load) computes the same."""
    from pargo_jax.convert.official import to_official_state_dict
    from pargo_jax.models.projectors import ParGoConfig

    config = ParGoConfig(**{**SHAPE, "heads": 2})
    x = features()
    variables = jax.jit(ParGo(config).init)(jax.random.key(3), x)
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda p: p + 0.05 * rng.randn(*p.shape), nn.unbox(variables["params"]))
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in to_official_state_dict(params).items()}
    torch_model = ParGoReference(**SHAPE)
    torch_model.load_state_dict(state, strict=True)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x)).numpy()
    got = np.asarray(jax.jit(ParGo(config).apply)({"params": params}, x))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # And back: the exported file loads to the same params.
    _, reloaded = load_projector(save(state, tmp_path, "export.safetensors"), num_heads=2, num_partial=8)
    for k, v in reloaded["params"].items():
        np.testing.assert_array_equal(v, np.asarray(params[k], np.float32), err_msg=k)


def test_torch_files_without_torch_name_the_extra(tmp_path, monkeypatch):
    from pargo_jax.convert.tables import read_torch_file

    file = tmp_path / "eva.pt"
    torch.save({"visual.pos_embed": torch.zeros(1, 5, 8)}, file)
    monkeypatch.setitem(sys.modules, "torch", None)  # as in a core install
    with pytest.raises(ImportError, match=r"needs PyTorch.*pip install -r requirements-torch.txt"):
        read_torch_file(str(file))


def official_checkpoint(path: str, seed: int = 0) -> dict:
    """A tiny checkpoint in the release's whole-model layout: EVA02 under ``visual_encoder.`` (EVA-CLIP
    names), ``ln_vision``, ``query_tokens``, ``ParGo.bert.*`` (text branch included), ``llm_proj``, and the
    PEFT-wrapped InternLM2: LoRA on ``wqkv`` plus two saved base weights (``base_layer`` naming).
    Returns the torch references and what was written."""
    from tests.torch_refs.eva02 import Eva, evaclip_state

    torch.manual_seed(seed)
    eva = randomize(Eva(img_size=28, patch_size=7, dim=48, depth=2, heads=2, hidden=64, ref_grid=16), seed)
    pargo = randomize(ParGoReference(**{**SHAPE, "llm_width": 64}), seed + 1).eval()
    state = {f"visual_encoder.{k}": v for k, v in evaclip_state(eva).items()}
    state.update(official_state(pargo, wrap=""))
    del state["visual_encoder.blocks.0.attn.qkv.weight"], state["llm_model.base_model.model.output.weight"]
    rng = np.random.RandomState(seed)
    lora = {i: (rng.normal(0, 0.3, (4, 64)), rng.normal(0, 0.3, (128, 4))) for i in range(2)}
    peft = "llm_model.base_model.model.model.layers.{}.attention.wqkv"
    for i, (a, b) in lora.items():
        state[peft.format(i) + ".lora_A.default.weight"] = torch.tensor(a, dtype=torch.float32)
        state[peft.format(i) + ".lora_B.default.weight"] = torch.tensor(b, dtype=torch.float32)
    saved = {  # LLM weights the checkpoint saved: they replace llm_path's, as the release's load does
        peft.format(0) + ".base_layer.weight": rng.normal(0, 0.2, (128, 64)),
        "llm_model.base_model.model.output.weight": rng.normal(0, 0.2, (128, 64)),
    }
    state.update({k: torch.tensor(v, dtype=torch.float32) for k, v in saved.items()})
    torch.save({"module." + k: v for k, v in state.items()}, path)
    return dict(eva=eva.eval(), pargo=pargo, lora=lora, saved=saved)


def test_official_model_runs_as_released(tmp_path):
    from pargo_jax.convert.hf import load_llm
    from pargo_jax.convert.official import load_model
    from tests.torch_refs.tiny_llm import checkpoint, edit_checkpoint

    _, llm_path = checkpoint("internlm2")
    ref = official_checkpoint(str(tmp_path / "pargo.bin"))
    model, variables = load_model(
        str(tmp_path / "pargo.bin"), llm_path, num_partial=8, num_heads=2, vision_heads=2
    )
    assert model.config.projector.num_queries == 12 and not model.config.vision.apply_final_norm
    # Image tokens: EVA last block, no final norm, CLS dropped -> ln_vision -> ParGo -> llm_proj.
    x = np.random.RandomState(3).randn(2, 28, 28, 3).astype(np.float32)
    with torch.no_grad():
        _, hidden = ref["eva"].forward_features(torch.from_numpy(x).permute(0, 3, 1, 2), return_hidden=True)
        want = ref["pargo"](hidden[-1][:, 1:]).numpy()
    got = np.asarray(jax.jit(lambda v, im: model.apply(v, im, method=model.encode_images))(variables, x))
    assert got.shape == (2, 12, 64)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The LLM: llm_path with the saved weights put over it and W + (alpha / r) B A merged (alpha 512, r 4).
    saved, edits = ref["saved"], {}
    edits["output.weight"] = lambda w: saved["llm_model.base_model.model.output.weight"]
    for i, (a, b) in ref["lora"].items():
        base = saved.get(f"llm_model.base_model.model.model.layers.{i}.attention.wqkv.base_layer.weight")
        edits[f"model.layers.{i}.attention.wqkv.weight"] = lambda w, a=a, b=b, base=base: (
            (w if base is None else base) + 512.0 / 4 * b @ a
        )
    edit_checkpoint(llm_path, str(tmp_path / "merged"), edits)
    _, merged = load_llm(str(tmp_path / "merged"), fused_qkv=True)
    for k, v in flatten(merged["params"]).items():
        np.testing.assert_allclose(flatten(variables["params"]["llm"])[k], v, atol=1e-4, err_msg=k)


def test_official_model_accounts_for_every_tensor(tmp_path):
    from pargo_jax.convert.official import load_model
    from tests.torch_refs.tiny_llm import checkpoint

    file = str(tmp_path / "pargo.bin")
    official_checkpoint(file)
    state = torch.load(file)
    state["module.llm_model.base_model.model.model.layers.0.attention.wq.weight"] = torch.zeros(2, 2)
    state["module.mystery.weight"] = torch.zeros(2)
    torch.save(state, file)
    with pytest.raises(ConversionError) as err:
        load_model(file, checkpoint("internlm2")[1], num_partial=8, num_heads=2, vision_heads=2)
    assert "mystery.weight" in str(err.value)
    del state["module.mystery.weight"]
    torch.save(state, file)
    with pytest.raises(ConversionError, match=r"unused tensor.*model\.layers\.0\.attention\.wq\.weight"):
        load_model(file, checkpoint("internlm2")[1], num_partial=8, num_heads=2, vision_heads=2)


def test_official_layout_round_trip(tmp_path):
    """load_model -> official_checkpoint -> a .bin -> load_model: identical params; the file has the
    release's names (no text branch, EVA-CLIP tower names, PEFT-wrapped InternLM2)."""
    import re

    from pargo_jax.convert.official import TEXT_BRANCH, load_model, to_official_checkpoint
    from tests.torch_refs.tiny_llm import checkpoint

    src = str(tmp_path / "pargo.bin")
    official_checkpoint(src)
    kw = dict(num_partial=8, num_heads=2, vision_heads=2)
    model, variables = load_model(src, checkpoint("internlm2")[1], **kw)
    state = to_official_checkpoint(model.config, variables["params"])
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, tmp_path / "out.bin")
    _, again = load_model(str(tmp_path / "out.bin"), checkpoint("internlm2")[1], **kw)
    jax.tree.map(np.testing.assert_array_equal, again["params"], variables["params"])
    names = set(state)
    source = {k.removeprefix("module.") for k in torch.load(src)}
    text = lambda k: any(re.fullmatch(p, k.removeprefix("ParGo.")) for p in TEXT_BRANCH)
    assert {k for k in source if not k.startswith("llm_model.") and not text(k)} <= names
    assert "visual_encoder.blocks.0.attn.q_bias" in names and "visual_encoder.blocks.0.mlp.w1.weight" in names
    assert "llm_model.base_model.model.model.layers.1.attention.wqkv.base_layer.weight" in names
    assert not any("lora_" in k or "word_embeddings" in k for k in names)


def _tiny_llm_tokenizer(path) -> str:
    """A word-level LLM tokenizer (no <image>) prepared for training, small enough for the tiny LLM."""
    from data_pipelines.text import prepare_tokenizer
    from tests.demo import word_tokenizer

    words = ["<unk>", "<s>", "</s>", "yes", "no", "is", "there", "a", "circle", "?", "red"]
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages[0]['content'] }}"}
    src = word_tokenizer(path / "internlm2_tok", words, words[:3], config)
    return prepare_tokenizer(src, str(path / "tokenizer"))


@pytest.mark.slow  # the converter command, predict, MME, two fine-tuning steps
def test_official_checkpoint_as_a_workdir(tmp_path, shapes_dir, capsys):
    """python -m pargo_jax.import_official -> a workdir that predict answers from (the release's
    prompt and input crop) and that fine-tuning starts from."""
    import shutil

    from data_pipelines import shapes
    from data_pipelines.text import load_tokenizer
    from experiments import base
    from experiments import evals as evals_file
    from pargo_jax import configs, evaluate, predict, runs, train
    from pargo_jax.convert.official import load_model
    from tests.torch_refs.tiny_llm import checkpoint

    llm = str(tmp_path / "internlm2")  # the tiny InternLM2 with room for the release's long prompt
    shutil.copytree(checkpoint("internlm2")[1], llm)
    hf = json.load(open(os.path.join(llm, "config.json")))
    json.dump({**hf, "max_position_embeddings": 256}, open(os.path.join(llm, "config.json"), "w"))
    src, tok = str(tmp_path / "pargo.bin"), _tiny_llm_tokenizer(tmp_path)
    official_checkpoint(src)
    work = str(tmp_path / "official")
    proc = procs.run("pargo_jax.import_official", f"--checkpoint={src}", f"--llm_path={llm}",
                     f"--tokenizer={tok}", f"--workdir={work}", "--num_partial=8", "--num_heads=2",
                     "--vision_heads=2")  # fmt: skip
    assert proc.returncode == 0 and "--evals=experiments/evals.py:mme_release" in proc.stdout, proc.stderr[
        -2000:
    ]
    run = runs.load_workdir(work)
    model, variables = load_model(src, llm, num_partial=8, num_heads=2, vision_heads=2)
    x = np.random.RandomState(0).randn(2, 28, 28, 3).astype(np.float32)
    encode = lambda m, v: np.asarray(jax.jit(lambda v, im: m.apply(v, im, method=m.encode_images))(v, x))
    np.testing.assert_allclose(encode(run.model, {"params": run.params}), encode(model, variables), atol=1e-5)
    assert run.config.input.resize == "bug_compatible_448_crop"
    prompt = run.tokenizer.render(
        [{"role": "user", "content": "<image>\nis there a circle?\nAnswer yes"}], True
    )
    assert prompt == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <Img><image></Img> "
        "is there a circle?\nAnswer yes\nASSISTANT: "
    )
    image = tmp_path / "x.png"
    image.write_bytes(shapes.draw_scene(shapes.sample_scene(random.Random(0), 64), 64, 20))
    # predict and evaluate (their command lines are run by their own tests) read the workdir.
    ask = [f"--workdir={work}", f"--image={image}", "--prompt=is there a circle?", "--max_new_tokens=3"]
    predict.main(["predict"], predict.parse_flags(ask))
    # MME as released: its rule and suffix, 4-beam search (3 new tokens here instead of 100).
    from tests.test_mme import _pairs, _release

    _release(tmp_path / "MME", "color", {f"img{i}": _pairs(i) for i in range(2)})
    mme = evals_file.get_config("mme_release")
    mme.mme_release.data.dir, mme.mme_release.max_new_tokens = str(tmp_path / "MME"), 3
    evaluate.evaluate(work, None, configs.load_run_config(work), mme)
    assert "perception" in capsys.readouterr().out
    # Fine-tuning starts from it: every part from the workdir, full training, two steps on shapes data.
    config = configs.load_run_config(work)
    with config.unlocked():
        config.input.update(data_dir=shapes_dir, sources=[dict(name="shapes", split="sft")], batch_size=8,
                            max_len=128)  # fmt: skip
        config.model.llm.overrides.update(lora_rank=0, lora_targets="")
        config.model.projector.init_from_bert = None
        config.checkpoint.update(init_from=work, init_from_parts=("vision_tower", "projector", "llm"))
        config.update(total_steps=2, log_every_steps=1, sample_at_end="", evals={})
        config.optim.warmup_steps = 1
        config.trainable = base.regex_dict({".*": 1.0})
        config.model.dtype = "float32"
        # Data-parallel: with the preset's fsdp=8 on 8 CPU devices (scanned InternLM2) XLA:CPU deadlocked
        # in a collective in about half the runs (devices waiting in different all-gather / all-reduce).
        config.mesh = dict(data=-1, fsdp=1, tensor=1)
    assert load_tokenizer(tok).vocab_size == 12
    out = train.run(config, str(tmp_path / "finetune"))
    assert np.isfinite(out["loss"])
