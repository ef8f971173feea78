"""ParGo projector: dense == structured (outputs and gradients), locality, baselines, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pargo_jax import sharding
from pargo_jax.models import masks
from pargo_jax.models.projectors import MLPConfig, ParGo, ParGoConfig, projector_config, projector_module
from tests.kernels import record_kernels

SMALL = dict(hidden=32, heads=4, layers=2, mlp_dim=48, vision_width=24, llm_width=20, max_positions=64)


def features(n=16, b=2, c=24, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, n, c))


def init(config, x):
    return jax.jit(ParGo(config).init)(jax.random.key(1), x)


def apply(config, variables, x):
    return jax.jit(ParGo(config).apply)(variables, x)


def loss_and_grads(config, variables, x):
    def loss(params):
        y = ParGo(config).apply({"params": params}, x)
        return jnp.sum(jnp.sin(y))

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


CASES = {
    "released_raster": dict(num_partial=8, num_global=2),
    "released_grid_2x2": dict(num_partial=4, num_global=3, layout="grid"),
    "cascaded_double": dict(num_partial=8, num_global=2, cpp="cascaded"),
    "cascaded_ragged": dict(num_partial=8, num_global=2, cpp="cascaded", cascade_schedule=(3, 8)),
    "multi_crop_grid": dict(num_partial=8, num_global=2, layout="grid", num_crops=2, grid=(4, 2)),
    "qformer": dict(num_partial=0, num_global=6),
    "partial_only": dict(num_partial=4, num_global=0, cpp="cascaded"),
}


@pytest.mark.parametrize("case", CASES)
def test_dense_equals_structured(case):
    dense = ParGoConfig(**SMALL, **CASES[case], impl="dense")
    structured = dataclasses.replace(dense, impl="structured")
    x = features()
    variables = init(dense, x)
    y_dense = apply(dense, variables, x)
    y_struct = apply(structured, variables, x)
    assert y_dense.shape == (2, dense.num_queries, 20)
    np.testing.assert_allclose(y_struct, y_dense, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["released_raster", "cascaded_ragged", "multi_crop_grid"])
def test_dense_and_structured_gradients_agree(case):
    dense = ParGoConfig(**SMALL, **CASES[case], impl="dense")
    structured = dataclasses.replace(dense, impl="structured")
    x = features()
    variables = init(dense, x)
    (l_dense, g_dense), (l_struct, g_struct) = (loss_and_grads(c, variables, x) for c in (dense, structured))
    np.testing.assert_allclose(l_struct, l_dense, rtol=1e-5)
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(g_dense), jax.tree.leaves(g_dense), jax.tree.leaves(g_struct)
    ):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path[0]))


@pytest.mark.parametrize("impl", ["dense", "structured"])
@pytest.mark.parametrize("layout", ["raster", "grid"])
def test_one_released_layer_is_local(impl, layout):
    """Perturbing patch j changes only partial token owner(j) and the global tokens."""
    config = ParGoConfig(**{**SMALL, "layers": 1}, num_partial=4, num_global=2, layout=layout, impl=impl)
    x = features()
    variables = init(config, x)
    base = apply(config, variables, x)
    bump = features(n=1, b=1, seed=3)[0, 0]  # not a constant: ln_vision would cancel a constant shift
    owner = np.zeros(16, int)
    for i, window in enumerate(masks.partial_windows(4, 16, layout=layout)):
        owner[window] = i
    for j in (0, 5, 10, 15):
        y = apply(config, variables, x.at[:, j].add(bump))
        changed = np.abs(np.asarray(y - base)).max(axis=(0, 2)) > 0
        expected = np.zeros(6, bool)
        expected[[owner[j], 4, 5]] = True
        np.testing.assert_array_equal(changed, expected, err_msg=f"patch {j}")


def test_cascade_grows_the_receptive_field():
    """Two cascaded layers with groups (1, 2): patch j reaches owner(j) and its group partner only."""
    config = ParGoConfig(
        **{**SMALL, "layers": 2}, num_partial=8, num_global=1, cpp="cascaded", cascade_schedule=(1, 2)
    )
    x = features()
    variables = init(config, x)
    base = apply(config, variables, x)
    y = apply(
        config, variables, x.at[:, 6].add(features(n=1, b=1, seed=3)[0, 0])
    )  # patch 6 belongs to partial 3 (k = 2)
    changed = np.abs(np.asarray(y - base)).max(axis=(0, 2)) > 0
    # Layer 1 (one-to-one) keeps the change in partial 3; layer 2 (pairs) spreads it to partial 2.
    np.testing.assert_array_equal(np.flatnonzero(changed), [2, 3, 8])


def test_params_carry_logical_axes():
    config = ParGoConfig(**SMALL, num_partial=8, num_global=2)
    boxed = jax.eval_shape(ParGo(config).init, jax.random.key(0), features())["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
    assert boxed["cross_kv_kernel"].names == ("layers", None, "embed", "heads")
    assert boxed["cross_kv_kernel"].value.shape == (2, 2, 24, 32)


def test_sharded_equals_single_device():
    config = ParGoConfig(**SMALL, num_partial=8, num_global=2)
    x = features(b=4)
    variables = init(config, x)
    expected = apply(config, variables, x)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        shardings = sharding.logical_shardings(variables, mesh)
        placed = jax.device_put(variables, shardings)
        data = jax.device_put(x, jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
        got = jax.jit(ParGo(config).apply)(placed, data)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_bf16_compute_close_to_f32():
    config = ParGoConfig(**SMALL, num_partial=8, num_global=2)
    x = features()
    variables = init(config, x)
    y32 = apply(config, variables, x)
    y16 = apply(dataclasses.replace(config, dtype="bfloat16"), variables, x)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1, rtol=0.1)


def kernels_picked(monkeypatch, config, x, backend="gpu"):
    """The kernel each of ParGo's attention calls picks on ``backend`` (traced on CPU)."""
    from pargo_jax.models.projectors import pargo

    picked = record_kernels(monkeypatch, pargo, backend)
    jax.eval_shape(ParGo(config).init, jax.random.key(1), x)
    return picked


@pytest.mark.parametrize("case", ["released_raster", "cascaded_double", "cascaded_ragged", "qformer"])
def test_attention_picks_cudnn_on_gpu_in_bf16(monkeypatch, case):
    """Released, cascaded (groups folded into the batch) and ragged (masked) ParGo: every attention call
    is one cuDNN takes in bf16 on a GPU; float32, a CPU or ``attention_impl="xla"`` keep XLA's."""
    bf16 = ParGoConfig(**SMALL, **CASES[case], dtype="bfloat16")
    x = features()
    layers = SMALL["layers"]
    for config in (bf16, dataclasses.replace(bf16, impl="dense")):
        picked = kernels_picked(monkeypatch, config, x)
        assert picked == ["cudnn"] * len(picked) and len(picked) >= layers, (config.impl, picked)
    assert set(kernels_picked(monkeypatch, dataclasses.replace(bf16, dtype="float32"), x)) == {"xla"}
    assert set(kernels_picked(monkeypatch, bf16, x, backend="cpu")) == {"xla"}
    assert set(kernels_picked(monkeypatch, dataclasses.replace(bf16, attention_impl="xla"), x)) == {"xla"}


def test_qformer_and_mlp_baselines_share_the_face():
    x = features(n=16)
    qformer = projector_module(projector_config("qformer", {**SMALL, "num_global": 5}))
    assert qformer.config.num_partial == 0 and qformer.config.num_tokens(16) == 5
    assert jax.eval_shape(qformer.init_with_output, jax.random.key(0), x)[0].shape == (2, 5, 20)
    mlp = projector_module(projector_config("mlp", dict(vision_width=24, llm_width=20, group=4)))
    v = jax.jit(mlp.init)(jax.random.key(0), x)
    y = jax.jit(mlp.apply)(v, x)
    assert mlp.config.num_tokens(16) == 4 and y.shape == (2, 4, 20)
    # Grouping concatenates k adjacent patches along channels: permuting inside a group changes the token.
    swapped = x.at[:, [0, 1]].set(x[:, [1, 0]])
    y2 = jax.jit(mlp.apply)(v, swapped)
    assert not np.allclose(y2[:, 0], y[:, 0]) and np.allclose(y2[:, 1:], y[:, 1:])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: projector_config("perceiver", {}), "Unknown projector 'perceiver'"),
        (
            lambda: projector_config("qformer", {"num_partial": 4}),
            "qformer projector fixes {'num_partial': 0}",
        ),
        (
            lambda: projector_config("pargo", {"num_partials": 4}),
            "'num_partials' (did you mean 'num_partial'?)",
        ),
        (lambda: ParGoConfig(hidden=30, heads=4), "hidden=30 is not divisible by heads=4"),
        (lambda: ParGoConfig(num_partial=400, num_global=200), "600 queries exceed max_positions=512"),
        (lambda: ParGoConfig(impl="flash"), "impl='flash'"),
        (lambda: ParGoConfig(attention_impl="flash"), "attention_impl='flash'; use None (auto)"),
        (lambda: MLPConfig(group=5).num_tokens(576), "num_patches=576 is not divisible by group=5"),
    ],
)
def test_config_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_wrong_feature_width_is_named():
    config = ParGoConfig(**SMALL, num_partial=8, num_global=2)
    with pytest.raises(ValueError, match="features have width 7 but the projector expects vision_width=24"):
        init(config, jnp.zeros((1, 16, 7)))


@pytest.mark.parametrize("case", ["released_raster", "cascaded_double", "released_grid_2x2", "partial_only"])
def test_receptive_fields_are_what_the_model_depends_on(case):
    """masks.receptive_fields (the pictures of tools.draw_masks) equals the measured dependence of each
    query on each patch, perturbing one patch at a time, after 1, 2 and 3 layers."""
    for layers in (1, 2, 3):
        config = ParGoConfig(**{**SMALL, "layers": layers}, **CASES[case])
        x = features(b=1)
        variables = init(config, x)
        bump = features(n=1, b=1, seed=3)[0, 0]
        bumped = jnp.concatenate([x.at[:, j].add(bump) for j in range(16)])  # image j: patch j bumped
        base = apply(config, variables, jnp.repeat(x, 16, axis=0))  # the same batch shape: same rounding
        measured = (np.abs(np.asarray(apply(config, variables, bumped) - base)).max(-1) > 0).T
        s = masks.self_masks(
            config.num_partial, config.num_global, layers, config.cpp, config.cascade_schedule
        )
        c = masks.partial_global_cross_mask(config.num_partial, config.num_global, 16, layout=config.layout)
        np.testing.assert_array_equal(measured, masks.receptive_fields(s, c)[-1], err_msg=f"{layers} layers")


def test_draw_masks_writes_the_pictures(tmp_path):
    from pargo_jax import launcher
    from pargo_jax.tools import draw_masks

    args = ["--out", str(tmp_path), "--num_partial", "4", "--num_global", "1", "--patches", "16"]
    draw_masks.run(launcher.parse(draw_masks.define_flags, args))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cross_mask.png", "receptive_fields.png", "self_masks.png"]
    assert all((tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
