"""Exact mask patterns (small cases written out by hand) and their properties."""

import numpy as np
import pytest

from pargo_jax.models import masks


def grid(text: str) -> np.ndarray:
    """'#' = True, '.' = False, one row per line."""
    return np.array([[ch == "#" for ch in row.split()] for row in text.strip().splitlines()])


def test_raster_cross_mask_released():
    expected = grid("""
        # # . . . .
        . . # # . .
        . . . . # #
        # # # # # #
    """)
    np.testing.assert_array_equal(masks.partial_global_cross_mask(3, 1, 6), expected)


def test_grid_cross_mask_2x2_windows():
    expected = grid("""
        # # . . # # . . . . . . . . . .
        . . # # . . # # . . . . . . . .
        . . . . . . . . # # . . # # . .
        . . . . . . . . . . # # . . # #
        # # # # # # # # # # # # # # # #
    """)
    np.testing.assert_array_equal(masks.partial_global_cross_mask(4, 1, 16, layout="grid"), expected)


def test_grid_rectangular_windows_and_explicit_grid():
    # 2 x 6 grid, 3 windows -> 2 x 2 windows.
    w = masks.partial_windows(3, 12, layout="grid", grid=(2, 6))
    np.testing.assert_array_equal(w, [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]])


def test_multi_crop_windows_stay_in_their_crop():
    w = masks.partial_windows(4, 8, layout="grid", num_crops=2)  # two 2x2 crops, 1 window... per 2 patches
    np.testing.assert_array_equal(w, [[0, 1], [2, 3], [4, 5], [6, 7]])
    w = masks.partial_windows(2, 32, layout="grid", num_crops=2)  # one 4x4 window per crop
    np.testing.assert_array_equal(w[1], np.arange(16, 32))
    w = masks.partial_windows(8, 32, layout="grid", num_crops=2)  # 2x2 windows in each 4x4 crop
    np.testing.assert_array_equal(w[4], [16, 17, 20, 21])
    # Released raster over concatenated crops equals per-crop raster.
    np.testing.assert_array_equal(masks.partial_windows(6, 24, num_crops=2), np.arange(24).reshape(6, 4))


def test_released_self_mask():
    expected = grid("""
        # # # . .
        # # # . .
        # # # . .
        . . . # #
        . . . # #
    """)
    np.testing.assert_array_equal(masks.partial_global_self_mask(3, 2), expected)


def test_cascaded_masks_by_layer():
    one_to_one = grid("""
        # . . . .
        . # . . .
        . . # . .
        . . . # .
        . . . . #
    """)
    one_to_two = grid("""
        # # . . .
        # # . . .
        . . # # .
        . . # # .
        . . . . #
    """)
    np.testing.assert_array_equal(masks.cascaded_self_mask(4, 1, 0, 3), one_to_one)
    np.testing.assert_array_equal(masks.cascaded_self_mask(4, 1, 1, 3), one_to_two)
    np.testing.assert_array_equal(masks.cascaded_self_mask(4, 1, 2, 3), masks.partial_global_self_mask(4, 1))


def test_cascade_schedules():
    assert masks.cascaded_group_sizes(288, 4) == (1, 2, 4, 288)
    assert masks.cascaded_group_sizes(288, 4, "linear") == (1, 2, 3, 288)
    assert masks.cascaded_group_sizes(8, 6) == (1, 2, 4, 8, 8, 8)
    assert masks.cascaded_group_sizes(5, 2, (3, 5)) == (3, 5)
    ragged = masks.cascaded_self_mask(5, 0, 0, 2, (3, 5))
    np.testing.assert_array_equal(ragged[3], [False, False, False, True, True])


@pytest.mark.parametrize("layout", ["raster", "grid"])
@pytest.mark.parametrize(
    "num_partial,num_patches,crops", [(288, 576, 1), (144, 576, 1), (36, 576, 1), (8, 32, 2)]
)
def test_every_patch_owned_exactly_once(layout, num_partial, num_patches, crops):
    w = masks.partial_windows(num_partial, num_patches, layout=layout, num_crops=crops)
    assert w.shape == (num_partial, num_patches // num_partial)
    np.testing.assert_array_equal(np.sort(w.reshape(-1)), np.arange(num_patches))
    cross = masks.partial_global_cross_mask(num_partial, 3, num_patches, layout=layout, num_crops=crops)
    assert cross[:num_partial].sum(0).tolist() == [1] * num_patches
    assert cross[num_partial:].all()


def test_self_masks_stack():
    released = masks.self_masks(4, 2, 3, "released")
    assert released.shape == (3, 6, 6) and (released == masks.partial_global_self_mask(4, 2)).all()
    cascaded = masks.self_masks(4, 2, 3, "cascaded")
    assert [int(m[:4, :4].sum()) for m in cascaded] == [4, 8, 16]
    assert not cascaded[:, :4, 4:].any() and cascaded[:, 4:, 4:].all()


def test_qformer_pairs_mask_blocks_padded_keys_only():
    """ITM (and, with no queries, the ITC text encoder): all-to-all except padded text as keys."""
    text_mask = np.array([[1, 1, 0], [1, 1, 1]])
    padded = grid("""
        # # # # .
        # # # # .
        # # # # .
        # # # # .
        # # # # .
    """)
    got = np.asarray(masks.qformer_mask(2, text_mask, "pairs"))
    assert got.shape == (2, 1, 5, 5) and got.dtype == bool
    np.testing.assert_array_equal(got[0, 0], padded)
    assert got[1].all()
    text_only = np.asarray(masks.qformer_mask(0, text_mask, "pairs"))
    np.testing.assert_array_equal(text_only[0, 0], grid("# # .\n# # .\n# # ."))


def test_qformer_generate_mask():
    """ITG: queries see the queries only; text token t sees every query and the real tokens <= t."""
    text_mask = np.array([[1, 1, 1], [1, 1, 0]])
    full = grid("""
        # # . . .
        # # . . .
        # # # . .
        # # # # .
        # # # # #
    """)
    padded = grid("""
        # # . . .
        # # . . .
        # # # . .
        # # # # .
        # # # # .
    """)
    got = np.asarray(masks.qformer_mask(2, text_mask, "generate"))
    np.testing.assert_array_equal(got[0, 0], full)
    np.testing.assert_array_equal(got[1, 0], padded)
    np.testing.assert_array_equal(masks.qformer_structure(2, 3, "generate"), full)
    with pytest.raises(ValueError, match="mode='causal' is not one of"):
        masks.qformer_mask(2, text_mask, "causal")


def test_segment_positions_restart_per_sample_and_skip_masked_tokens():
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    real = np.array([[1, 1, 1, 1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 1, 1, 1, 0, 0]])
    got = np.asarray(masks.segment_positions(seg, real))
    np.testing.assert_array_equal(got[0], [0, 1, 2, 0, 1, 1, 2, 0, 0])
    np.testing.assert_array_equal(got[1], np.maximum(np.cumsum(real[1]) - 1, 0))  # one segment: as unpacked
    assert got.dtype == np.int32


def test_segment_mask_is_block_diagonal_over_real_keys():
    seg = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 2, 2, 3, 0, 0]])
    real = np.array([[1, 1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    got = np.asarray(masks.segment_mask(seg, real))
    assert got.shape == (2, 1, 7, 7) and got.dtype == bool
    row0 = grid("""
        # # # . . . .
        # # # . . . .
        # # # . . . .
        . . . # . # .
        . . . # . # .
        . . . # . # .
        . . . . . . #
    """)
    row1 = grid("""
        # # . . . . .
        # # . . . . .
        . . # # . . .
        . . # # . . .
        . . . . # . .
        . . . . . # .
        . . . . . . #
    """)
    np.testing.assert_array_equal(got[0, 0], row0)
    np.testing.assert_array_equal(got[1, 0], row1)
    causal = got[:, 0] & np.tril(np.ones((7, 7), bool))
    assert causal.any(-1).all()  # every query keeps a key under the attention core's causality


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: masks.partial_windows(5, 576), "num_patches=576 cannot be split evenly among num_partial=5"),
        (
            lambda: masks.partial_windows(3, 16, layout="grid"),
            "num_patches=16 cannot be split evenly among",
        ),
        (lambda: masks.partial_windows(5, 15, layout="grid"), "15 is not a square number"),
        (lambda: masks.partial_windows(3, 12, num_crops=2), "num_partial=3 is not divisible by num_crops=2"),
        (lambda: masks.partial_windows(4, 13, num_crops=2), "num_patches=13 is not divisible by num_crops=2"),
        (lambda: masks.partial_windows(4, 16, layout="diagonal"), "layout='diagonal' is not one of"),
        (lambda: masks.partial_windows(4, 12, layout="grid", grid=(3, 3)), "grid=(3, 3) has 9 patches"),
        (lambda: masks.cascaded_group_sizes(8, 3, (1, 2)), "schedule has 2 group sizes but there are 3"),
        (lambda: masks.cascaded_group_sizes(8, 2, (1, 9)), "sizes outside [1, num_partial=8]"),
        (lambda: masks.cascaded_self_mask(8, 1, 3, 3), "layer=3 is outside"),
        (lambda: masks.self_masks(8, 1, 2, "nope"), "cpp='nope'"),
    ],
)
def test_invalid_shapes_name_the_values(call, message):
    with pytest.raises(ValueError, match=None) as err:
        call()
    assert message in str(err.value)
