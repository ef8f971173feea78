"""The model factory: one registry entry makes a new projector trainable, model.json round trips, a
trained workdir loads back, the schedule ends at total_steps, and config mistakes are named."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from data_pipelines.text import load_tokenizer
from experiments import pretrain, sft
from pargo_jax import checkpoints, demo_tower, runs, sharding, train
from pargo_jax.models import factory, projectors
from pargo_jax.models.layers import Dense
from pargo_jax.models.llm import LLMConfig, RopeScaling
from pargo_jax.models.mllm import MLLMConfig
from pargo_jax.models.projectors import MLPConfig, ParGoConfig
from pargo_jax.models.vision import vision_preset
from tests.demo import demo_config, losses, prepare_and_train


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """A projector that averages groups of patches and maps them to the LLM width."""

    vision_width: int = 8
    llm_width: int = 8
    groups: int = 4
    dtype: str = "float32"

    def num_tokens(self, num_patches: int) -> int:
        return self.groups

    def flops(self, num_patches: int) -> float:
        return 2.0 * self.groups * self.vision_width * self.llm_width


class ToyProjector(nn.Module):
    config: ToyConfig

    @nn.compact
    def __call__(self, features, *, deterministic=True):
        b, n, c = features.shape
        pooled = features.reshape(b, self.config.groups, n // self.config.groups, c).mean(2)
        return Dense((self.config.llm_width,), ("embed", "mlp"), dtype=self.config.dtype, name="proj")(pooled)


@pytest.fixture
def toy_registered():
    projectors.register("toy", ToyConfig, ToyProjector)
    yield
    projectors.PROJECTORS.pop("toy")


def test_a_new_projector_is_one_registry_entry(toy_registered, shapes_dir, tmp_path):
    config = demo_config(shapes_dir, 4, **{"checkpoint.every_steps": 4})
    config.model.projector = dict(name="toy", groups=8)
    workdir = str(tmp_path / "toy")
    summary = prepare_and_train(config, workdir)
    assert summary["step"] == 4 and np.isfinite(summary["loss"]) and "mfu" not in summary  # CPU: no peak
    assert len(losses(workdir)) == 4
    run = runs.load_workdir(workdir)
    assert isinstance(run.mcfg.projector, ToyConfig) and run.mcfg.num_image_tokens == 8
    assert json.load(open(os.path.join(workdir, "model.json")))["projector"]["name"] == "toy"
    assert set(run.params["projector"]) == {"proj"}
    with pytest.raises(ValueError, match="Unknown projector 'toys'; registered: .*'toy'"):
        projectors.projector_config("toys", {})


def test_model_json_round_trips():
    llm = LLMConfig(vocab_size=99, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=4, rope_scaling=RopeScaling(factor=4.0), dtype=jnp.bfloat16,
                    lora_rank=2, lora_targets="attn/q")  # fmt: skip
    for projector in (
        ParGoConfig(num_partial=8, num_global=2, hidden=16, heads=2, layers=3, mlp_dim=8, vision_width=32,
                    llm_width=16, cpp="cascaded", cascade_schedule=(1, 2, 8), layout="grid", grid=(4, 4)),
        ParGoConfig(num_partial=0, num_global=5, hidden=16, heads=2, vision_width=32, llm_width=16),
        MLPConfig(vision_width=32, llm_width=16, group=4),
    ):  # fmt: skip
        mcfg = MLLMConfig(vision_preset("tiny", dtype=jnp.bfloat16), projector, llm, image_token_id=4,
                          pixel_mean=(0.1, 0.2, 0.3))  # fmt: skip
        d = json.loads(json.dumps(factory.model_config_to_dict(mcfg)))
        assert factory.model_config_from_dict(d) == mcfg
    d["projector"]["num_partials"] = 3
    with pytest.raises(ValueError, match="'num_partials'"):
        factory.model_config_from_dict(d)


def test_qformer_is_pargo_without_partial_queries():
    q = projectors.projector_config(
        "qformer", dict(num_global=6, vision_width=8, llm_width=8, hidden=16, heads=2)
    )
    assert isinstance(q, ParGoConfig) and q.num_partial == 0 and q.num_tokens(576) == 6
    assert projectors.projector_name(q) == "pargo"  # saved as the pargo config it is
    assert isinstance(projectors.projector_module(q), projectors.ParGo)


def test_load_workdir_restores_the_saved_params(trained_workdir):
    run = runs.load_workdir(trained_workdir)
    assert run.step == 60 and run.mesh.size == 8 and run.tokenizer.vocab_size == run.mcfg.llm.vocab_size
    older = runs.load_workdir(trained_workdir, step=30)
    ckpt = checkpoints.Checkpointer(trained_workdir, every_steps=1)
    assert ckpt.all_steps() == [30, 60]
    ckpt.close()
    parts = factory.build(run.mcfg, run.mesh)
    saved = checkpoints.restore_subtree(
        checkpoints.step_dir(trained_workdir, 30), parts.abstract_on_mesh(), "params"
    )
    same = jax.tree.map(np.array_equal, older.params, saved)
    assert all(jax.tree.leaves(same))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), older.params["llm"], run.params["llm"])
    assert any(jax.tree.leaves(changed))
    with pytest.raises(FileNotFoundError, match=r"No checkpoint of step 45 .*it holds steps \[30, 60\]"):
        runs.load_workdir(trained_workdir, step=45)


def test_the_schedule_ends_at_total_steps(shapes_dir, tmp_path):
    """``--config.total_steps=1000`` on the demo: the cosine schedule spans 1000 steps (one value)."""
    config = demo_config(shapes_dir, 1000)
    config.optim.warmup_steps = pretrain.get_config().optim.warmup_steps
    tok = load_tokenizer(os.path.join(shapes_dir, "shapes_tokenizer"))
    mesh = runs.mesh_for(config)
    with sharding.mesh_context(mesh):
        setup = train.build_model(config, tok, mesh)
    lr, warmup = config.optim.lr, config.optim.warmup_steps
    at = lambda s: float(setup.schedule(s))
    assert at(600) == pytest.approx(
        lr * 0.5 * (1 + math.cos(math.pi * (600 - warmup) / (1000 - warmup))), rel=1e-5
    )
    assert at(999) > 0 and at(1000) == pytest.approx(0.0, abs=1e-9)
    with config.unlocked():
        config.optim.total_steps = 400
    with pytest.raises(ValueError, match="config.optim.total_steps is not a setting"):
        train.run(config, str(tmp_path / "x"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.model.projector.update(num_partials=4), "'num_partials' (did you mean 'num_partial'?)"),
        (lambda c: c.model.vision.overrides.update(feature_layers=-2), "'feature_layers'"),
        (
            lambda c: c.model.llm.config.update(hidden=8),
            "'hidden' (did you mean 'hidden_size'?) in config.model.llm.config",
        ),
        (lambda c: c.model.update(projector=dict(name="perceiver")), "Unknown projector 'perceiver'"),
        (lambda c: c.model.update(towers=1), "'towers' in config.model"),
    ],
)
def test_model_config_mistakes_are_named(shapes_dir, mutate, message):
    config = sft.get_config()
    with config.unlocked():
        config.model.vision = demo_tower.random_config()
        mutate(config)
    tok = load_tokenizer(os.path.join(shapes_dir, "shapes_tokenizer"))
    with pytest.raises(ValueError) as err:
        runs.model_config(config, tok)
    assert message in str(err.value)


def test_init_from_parts_are_checked(shapes_dir, trained_workdir):
    config = demo_config(shapes_dir, 1, stage=sft, **{"checkpoint.init_from": trained_workdir})
    config.checkpoint.init_from_parts = ("projector", "lm")
    tok = load_tokenizer(os.path.join(shapes_dir, "shapes_tokenizer"))
    mesh = runs.mesh_for(config)
    with sharding.mesh_context(mesh):
        parts = factory.build(runs.model_config(config, tok), mesh)
        with pytest.raises(ValueError, match="init_from_parts names 'lm'"):
            runs.init_params(parts, config)
        config.checkpoint.init_from_parts = ("projector", "llm", "vision_tower")
        params = runs.init_params(parts, config)
    run = runs.load_workdir(trained_workdir)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, run.params)))
