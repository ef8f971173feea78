"""The demo tower's pretraining: per-patch labels name the object under each patch centre, a short
build writes a HF SigLIP directory that loads back, and a demo run builds it once on first use."""

from __future__ import annotations

import os
import random

import jax
import numpy as np

from data_pipelines import shapes
from pargo_jax import demo_tower
from pargo_jax.convert.hf_vision import load_vision


def test_patch_labels_name_the_object_under_each_patch_centre():
    cfg = demo_tower.tower_config()
    images, labels = demo_tower.scenes(4, 0, 0, cfg)
    assert images.shape == (4, 64, 64, 3) and labels.shape == (4, 64)
    for i in range(4):
        objects = shapes.sample_scene(random.Random(f"demo_tower/0/0/{i}"), 64)
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            want = 1 + list(shapes.COLORS).index(o["color"]) * 4 + shapes.SHAPES.index(o["shape"])
            for p in np.flatnonzero(labels[i] == want):
                cy, cx = (p // 8) * 8 + 4, (p % 8) * 8 + 4
                assert x1 <= cx < x2 and y1 <= cy < y2
        assert (labels[i] == 0).sum() > 0 and (labels[i] > 0).sum() > 0


def test_short_build_loads_as_a_siglip_directory(tmp_path):
    logs, out = [], str(tmp_path / "tower")
    assert demo_tower.ensure(out, steps=4, batch_size=4, lr=1e-3, log=logs.append)
    module, variables = load_vision(out)
    assert module.config.image_size == 64 and module.config.width == 64
    x = np.zeros((1, 64, 64, 3), np.float32)
    assert jax.jit(module.apply)(variables, x).shape == (1, 64, 64)
    assert any("held-out object tokens" in line for line in logs)
    assert not demo_tower.ensure(out, steps=4, batch_size=4, lr=1e-3)  # already there: not rebuilt
    assert sorted(os.listdir(tmp_path)) == ["tower"]  # no temporary directory left behind
    logs.clear()
    assert demo_tower.ensure(out, steps=2, batch_size=4, lr=1e-3, log=logs.append)  # other options
    assert any("demo tower 2/2" in line for line in logs) and sorted(os.listdir(tmp_path)) == ["tower"]
    os.remove(os.path.join(out, demo_tower.BUILD_STAMP))
    assert not demo_tower.ensure(out, steps=9)  # built before its options were recorded: kept


def test_fine_variant_labels_the_digits_too():
    cfg = demo_tower.tower_config(128)
    images, labels = demo_tower.scenes(4, 0, 0, cfg, "fine")
    assert images.shape == (4, 128, 128, 3) and labels.shape == (4, 256)
    assert labels.max() < demo_tower.num_classes("fine") == 43
    for i in range(4):
        rng = random.Random(f"demo_tower/0/0/{i}")
        number = shapes.sample_number(rng, 128)
        digits = labels[i][labels[i] >= 33] - 33
        assert set(digits.tolist()) <= {int(c) for c in number["text"]} and digits.size > 0


def test_factor_splits_each_label_into_its_colour_and_shape():
    labels = np.arange(demo_tower.num_classes("fine"))
    colour, shape = (np.asarray(t) for t in demo_tower.factor(labels))
    assert colour[0] == shape[0] == 0  # background in both
    for label in range(1, 33):  # (colour, shape) pairs, colour-major as scenes() numbers them
        c, s = divmod(label - 1, len(shapes.SHAPES))
        assert (colour[label], shape[label]) == (c + 1, s + 1)
    assert (colour[33:] == len(shapes.COLORS) + 1).all()  # the digits' one text colour
    assert shape[33:].tolist() == list(range(len(shapes.SHAPES) + 1, len(shapes.SHAPES) + 11))
    assert colour.max() < demo_tower.COLOUR_CLASSES and shape.max() < demo_tower.SHAPE_CLASSES
    # every (colour, shape) pair is a distinct label: the two heads together lose nothing
    assert len(set(zip(colour.tolist(), shape.tolist()))) == labels.size
