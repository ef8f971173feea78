"""``regions.roi_align_mean`` (MG-LLaVA's object features) equals the materialized reference: every
stage map upsampled to the grid, concatenated, torchvision's RoIAlign (aligned=False, adaptive
sampling) and the bin mean, written loop by loop in numpy (tests/torch_refs/roi_align.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pargo_jax.models.regions import roi_align_mean
from tests.torch_refs.roi_align import roi_align_mean as reference


def _maps(rng, sizes, channels, batch=2):
    return [rng.randn(batch, s, s, c).astype(np.float32) for s, c in zip(sizes, channels, strict=True)]


@pytest.mark.parametrize(
    "image_size, grid, output_size, sizes",
    [(64, 24, 7, (16, 8, 4, 2)), (768, 192, 56, (12, 6, 3, 2))],  # small; MG-LLaVA's grid and bins
)
def test_roi_align_mean_equals_the_materialized_reference(image_size, grid, output_size, sizes):
    rng = np.random.RandomState(0)
    maps = _maps(rng, sizes, (3, 5, 6, 4))
    s = image_size
    boxes = np.array(
        [
            [
                [0, 0, s, s],
                [s * 0.1, s * 0.2, s * 0.6, s * 0.5],
                [s * 0.5, s * 0.5, s * 0.5 + 1, s * 0.5 + 2],
            ],
            [[s * 0.7, s * 0.05, s, s * 0.9], [3, 4, 9, 30], [s - 2, s - 2, s, s]],
        ],
        np.float32,
    )  # fmt: skip  (whole image, ordinary, sub-pixel, at the edges)
    fn = jax.jit(lambda m, b: roi_align_mean(m, b, image_size=image_size, output_size=output_size, grid=grid))
    got = np.asarray(fn(maps, boxes))
    want = reference(maps, boxes, image_size, output_size, grid)
    assert got.shape == (2, 3, 18)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
