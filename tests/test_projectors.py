"""The resampler and C-Abstractor projectors against plain torch references written from their papers
(random weights, every parameter perturbed), gradients, FLOPs, sharded == single device, errors."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from pargo_jax import sharding
from pargo_jax.models.projectors import projector_config, projector_module
from pargo_jax.models.projectors.c_abstractor import adaptive_pool_matrix
from tests.torch_refs import projectors as ref

RESAMPLERS = {
    "qwen_vl": dict(num_queries=9, hidden=32, heads=4, layers=1, mlp_dim=0, vision_width=24, llm_width=20),
    "flamingo": dict(num_queries=4, hidden=24, heads=3, layers=2, mlp_dim=48, vision_width=24, llm_width=20),
}
C_ABSTRACTORS = {
    "pool_5_to_3": dict(num_queries=9, hidden=16, depth=2, mlp_depth=2, vision_width=24, llm_width=20),
    "pool_4_to_2": dict(num_queries=4, hidden=24, depth=1, mlp_depth=1, vision_width=24, llm_width=20),
    "pool_4_to_2_views": dict(num_queries=4, hidden=24, depth=1, mlp_depth=1, vision_width=24, llm_width=20,
                              depthwise="views"),  # the projector grid's form
}  # fmt: skip
CASES = {**{f"resampler/{k}": ("resampler", v) for k, v in RESAMPLERS.items()},
         **{f"c_abstractor/{k}": ("c_abstractor", v) for k, v in C_ABSTRACTORS.items()}}  # fmt: skip


def build(case: str):
    name, options = CASES[case]
    module = projector_module(projector_config(name, options))
    n = 25 if case.endswith("5_to_3") else 16
    x = jax.random.normal(jax.random.key(1), (3, n, options["vision_width"]))
    params = jax.jit(module.init)(jax.random.key(0), x)["params"]
    params = nn.unbox(params)
    # Every parameter random (norm scales ~1, biases ~0.1), so that no term hides behind a zero init.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return module, jax.tree.unflatten(tree, leaves), x


def torch_reference(case: str, params, x) -> np.ndarray:
    name, o = CASES[case]
    p = {k: np.asarray(v) for k, v in params.items()}
    xt = torch.as_tensor(np.asarray(x))
    if name == "resampler":
        y = ref.resampler(p, xt, heads=o["heads"], layers=o["layers"], mlp_dim=o["mlp_dim"], eps=1e-6)
    else:
        y = ref.c_abstractor(
            p,
            xt,
            num_queries=o["num_queries"],
            depth=o["depth"],
            mlp_depth=o["mlp_depth"],
            se_ratio=0.25,
            eps=1e-6,
        )
    return y.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_torch_reference(case):
    module, params, x = build(case)
    got = jax.jit(module.apply)({"params": params}, x)
    assert got.shape == (3, CASES[case][1]["num_queries"], 20)
    np.testing.assert_allclose(got, torch_reference(case, params, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_parameter_gets_a_gradient(case):
    module, params, x = build(case)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x) ** 2)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_flops_match_xla_cost_analysis(case):
    """The closed form counts the matmuls / convolutions; XLA also counts elementwise work (norms,
    activations, and, in the C-Abstractor's ``views`` form, the padded views around its depthwise
    convolutions: 32% of its count), so the closed form must be at most XLA's count and within 35% of it."""
    module, params, x = build(case)
    compiled = jax.jit(module.apply).lower({"params": params}, x[:1]).compile()
    analysis = compiled.cost_analysis()
    xla = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    ours = module.config.flops(x.shape[1])
    assert 0.65 * xla <= ours <= 1.01 * xla, (ours, xla)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_single_device(case):
    module, params, x = build(case)
    x = jnp.concatenate([x, x[:1]])  # batch 4 over data x fsdp
    expected = jax.jit(module.apply)({"params": params}, x)
    boxed = jax.eval_shape(module.init, jax.random.key(0), x)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        shardings = sharding.logical_shardings(boxed, mesh)["params"]
        placed = jax.device_put(params, shardings)
        data = jax.device_put(x, jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
        got = jax.jit(module.apply)({"params": placed}, data)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_adaptive_pool_bins_are_pytorchs():
    x = torch.randn(1, 3, 7, 5)
    m_r, m_c = adaptive_pool_matrix(7, 3), adaptive_pool_matrix(5, 2)
    got = np.einsum("ir,jc,brcd->bijd", m_r, m_c, x.permute(0, 2, 3, 1).numpy())
    want = torch.nn.functional.adaptive_avg_pool2d(x, (3, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_sincos_positions_match_the_reference_formula():
    from pargo_jax.models.layers import sincos_2d

    np.testing.assert_allclose(sincos_2d(3, 4, 16), ref.sincos_2d(3, 4, 16).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "name, options, n, message",
    [
        ("resampler", dict(num_queries=10), 16, "num_queries=10 is not a square"),
        ("c_abstractor", dict(num_queries=8), 16, "num_queries=8 is not a square"),
        ("c_abstractor", dict(depthwise="fft"), 16, "depthwise='fft' is not one of"),
        ("resampler", dict(hidden=30, heads=3), 16, "hidden=30 is not divisible by 4"),
        ("resampler", dict(num_queries=4, hidden=8, heads=2, vision_width=8, llm_width=8), 17,
         "17 patches are not a square grid"),
        ("c_abstractor", dict(num_queries=4, hidden=8, vision_width=8, llm_width=8, grid=(3, 5)), 16,
         "grid=(3, 5) does not hold the 16 patches"),
    ],
)  # fmt: skip
def test_clear_errors(name, options, n, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        module = projector_module(projector_config(name, options))
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, n, module.config.vision_width)))


@pytest.mark.parametrize(
    "projector",
    [dict(name="resampler", num_queries=9, hidden=32, heads=4, layers=2, mlp_dim=64),
     dict(name="c_abstractor", num_queries=9, hidden=32, depth=1)],
)  # fmt: skip
@pytest.mark.slow  # a demo run per projector family
def test_trains_in_the_demo_and_loads_back(projector, shapes_dir, tmp_path):
    from pargo_jax import runs
    from tests.demo import demo_config, losses, prepare_and_train

    config = demo_config(shapes_dir, 3, **{"checkpoint.every_steps": 3})
    config.model.projector = projector
    workdir = str(tmp_path / projector["name"])
    summary = prepare_and_train(config, workdir)
    assert summary["step"] == 3 and len(losses(workdir)) == 3 and np.isfinite(summary["loss"])
    run = runs.load_workdir(workdir)
    assert run.mcfg.num_image_tokens == 9 and type(run.mcfg.projector).__name__.lower().startswith(
        projector["name"].replace("_", "")
    )
    # The export writes the LLM and tower and says why the transformers model and official file are not.
    from pargo_jax.export import export_workdir

    done = export_workdir(workdir, str(tmp_path / "export"))
    assert done["transformers"] == f"skipped: The {projector['name']!r} projector has no PyTorch export."
    assert (
        done["official"].startswith("skipped: ")
        and os.path.isdir(done["llm"])
        and os.path.isdir(done["vision_tower"])
    )
