"""TinyGroundingGPT's three stages (``experiments/grounding.py``): the demo's stages run one after another
on the shapes set's multi-scale records, each starting from the last (stage 2 reads crops as extra
images), and stage 3 ends with the shapes evaluation; the real preset's stages are configured as the
docstring says and a wrong stage name is one error."""

import os

import pytest

from experiments import grounding
from pargo_jax.configs import ConfigError
from tests.demo import SMALL_SHAPES, demo_config, losses, prepare_and_train

TINY_MULTISCALE = dict(num=48, num_eval=8)


@pytest.mark.slow  # three short training runs in a row, each with its compile
def test_three_demo_stages_train_in_a_chain(shapes_dir, tmp_path):
    data = str(tmp_path / "data")
    ends = {}
    for stage in (1, 2, 3):
        config = demo_config(shapes_dir, 2, stage=grounding, preset=f"tinygroundinggpt_demo:{stage}",
                             **{"input.batch_size": 4, "evals.shapes.batch_size": 8} if stage == 3 else
                             {"input.batch_size": 4})  # fmt: skip
        config.input.data_dir = data  # its own data dir: the multi-scale records are built there
        config.shapes.update(SMALL_SHAPES, num_eval=8)
        config.multiscale.update(TINY_MULTISCALE)
        if stage > 1:
            config.checkpoint.init_from = str(tmp_path / f"ground_{stage - 1}")
        ends[stage] = prepare_and_train(config, str(tmp_path / f"ground_{stage}"))
        assert ends[stage]["step"] == 2 and len(losses(str(tmp_path / f"ground_{stage}"))) == 2
    assert os.path.exists(os.path.join(data, "multiscale_shapes_tokenizer", "tokenizer.json"))
    assert ends[3]["eval/shapes/examples"] == 8  # the shapes questions, in the run's box codec
    assert 0.0 <= ends[3]["eval/shapes/ground"] <= 1.0


def test_stage_configs_chain_and_name_their_data():
    demo = [grounding.get_config(f"tinygroundinggpt_demo:{s}") for s in (1, 2, 3)]
    assert sum(c.total_steps for c in demo) == 4500  # the plain demo's pretrain 2000 + SFT 2500
    assert demo[1].input.max_images == 4 and demo[1].input.sources[0]["name"] == "multiscale_shapes/local"
    assert demo[2].checkpoint.init_from == "workdir/ground_2" and "shapes" in demo[2].evals
    real = [grounding.get_config(f"tinygroundinggpt:{s}") for s in (1, 2, 3)]
    assert dict(real[0].trainable) == {"projector/.*": 1.0}  # stage 1: the projector alone
    assert "llm/.*" in real[1].trainable and real[1].checkpoint.init_from_parts == ("projector",)
    assert real[2].evals.refcoco.type == "grounding" and real[2].model.projector.name == "mlp"
    for bad in ("tinygroundinggpt_demo:4", "demo:1"):
        with pytest.raises(ConfigError, match="PRESET:STAGE"):
            grounding.get_config(bad)
