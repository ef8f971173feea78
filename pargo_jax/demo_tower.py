"""The demo's vision tower, pretrained on the demo's first run (options: the config's ``demo_tower``).

Real presets start from a pretrained tower (CLIP, SigLIP, EVA02); a random one cannot see shape. This
stands in for that pretraining at demo scale: each token of the tiny SigLIP-style tower of the ``demo``
preset learns the colour and, separately, the shape of the object under its patch centre, or
background (two linear heads per token, so that "circle" is one direction of the features whatever
the colour; images drawn on the fly by ``data_pipelines.shapes``, deterministic in the seed); then the
tower is written as a Hugging Face ``SiglipVisionModel`` directory, which the demo loads like any HF
tower.
The demo's first run builds it into ``workdir/demo_tower`` (about a minute on 2 cores).
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from pargo_jax.models.vision import VisionConfig, VisionTower, vision_preset

SHAPE = dict(patch_size=8, width=64, depth=2, heads=4, mlp_dim=128)


def tower_config(image_size: int = 64) -> VisionConfig:
    """The demo tower: a tiny SigLIP-style ViT, 8x8 patches (64 px: 64 of them)."""
    return vision_preset("tiny", image_size=image_size, **SHAPE)


def random_config(image_size: int = 64) -> dict:
    """``config.model.vision`` for a random tower of the demo tower's shape (no checkpoint needed)."""
    return dict(path=None, format="hf", preset="tiny", overrides=dict(SHAPE, image_size=image_size))


def num_classes(variant: str) -> int:
    """Labels of :func:`scenes`: background, each (colour, shape), for the fine variant the ten digits."""
    from data_pipelines import shapes

    return 1 + len(shapes.COLORS) * len(shapes.SHAPES) + (10 if variant == "fine" else 0)


def factor(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(colour, shape) targets of :func:`scenes`' labels, 0 = background in both: colours 1-8 and the
    digits' text colour 9; shapes 1-4 and the digits 5-14."""
    from data_pipelines import shapes

    n_colours, n_shapes = len(shapes.COLORS), len(shapes.SHAPES)
    thing, digit = labels - 1, labels - 1 - n_colours * n_shapes
    is_digit = digit >= 0
    colour = jnp.where(labels == 0, 0, jnp.where(is_digit, n_colours + 1, thing // n_shapes + 1))
    shape = jnp.where(labels == 0, 0, jnp.where(is_digit, n_shapes + 1 + digit, thing % n_shapes + 1))
    return colour, shape


COLOUR_CLASSES, SHAPE_CLASSES = 10, 15  # factor()'s ranges (the basic variant uses 9 and 5 of them)


def scenes(
    batch: int, index: int, seed: int, cfg: VisionConfig, variant: str = "basic"
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (B, S, S, 3), per-patch labels (B, N): 0 background, else 1 + the index of the
    (colour, shape) of the object whose box holds the patch centre; in the fine variant 33 + d on digit
    d, and the patch under each thing's centre is labelled too) of batch ``index``."""
    from PIL import Image

    from data_pipelines import shapes

    size, patch = cfg.image_size, cfg.patch_size
    colours, kinds = list(shapes.COLORS), shapes.SHAPES
    centres = np.arange(size // patch) * patch + patch / 2
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    images, labels = [], np.zeros((batch, (size // patch) ** 2), np.int32)
    for i in range(batch):
        rng = random.Random(f"demo_tower/{seed}/{index}/{i}")
        number = shapes.sample_number(rng, size) if variant == "fine" else None
        objects = shapes.sample_scene(rng, size, variant, occupied=(number["box"],) if number else ())
        png = shapes.draw_scene(objects, size, rng.randint(10, 50), number)
        images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))

        things = [
            (o["box"], 1 + colours.index(o["color"]) * len(kinds) + kinds.index(o["shape"])) for o in objects
        ]
        things += [
            (box, 1 + len(colours) * len(kinds) + int(c)) for c, box in (number or {}).get("digits", ())
        ]
        for box, label in things:
            inside = ((cx >= box[0]) & (cx < box[2]) & (cy >= box[1]) & (cy < box[3])).reshape(-1)
            labels[i, inside] = label
            if variant == "fine":  # small things may cover no patch centre: also the patch under theirs
                row, col = int((box[1] + box[3]) / 2 // patch), int((box[0] + box[2]) / 2 // patch)
                labels[i, row * (size // patch) + col] = label
    return np.stack(images), labels


def pretrain(
    cfg: VisionConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    variant: str = "basic",
    object_weight: float = 0.0,
    log=print,
) -> dict:
    """The tower's params after ``steps`` of per-token colour and shape classification (a linear head
    each; a token is right when both are). A token on an object weighs ``1 + object_weight`` times a
    background token in the loss: most tokens are background, and the objects are what is learned."""
    tower = VisionTower(cfg)
    x0 = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    head = lambda n: {"kernel": jnp.zeros((cfg.width, n)), "bias": jnp.zeros(n)}
    params: dict[str, Any] = {
        "tower": nn.unbox(tower.init(jax.random.key(seed), x0)["params"]),
        "colour": head(COLOUR_CLASSES),
        "shape": head(SHAPE_CLASSES),
    }
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 5), steps)
    tx = optax.adamw(schedule, weight_decay=1e-4)
    opt = tx.init(params)

    def loss_fn(p, images, labels):
        x = (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5
        features = tower.apply({"params": p["tower"]}, x)
        loss, hits = 0.0, labels > 0
        weight = 1.0 + object_weight * hits
        weight = weight / weight.mean()
        for name, target in zip(("colour", "shape"), factor(labels)):
            logits = features @ p[name]["kernel"] + p[name]["bias"]
            loss += (optax.softmax_cross_entropy_with_integer_labels(logits, target) * weight).mean()
            hits &= logits.argmax(-1) == target
        return loss, hits.sum() / jnp.maximum((labels > 0).sum(), 1)

    @jax.jit
    def step(p, o, images, labels):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, images, labels)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss, acc

    t0 = time.perf_counter()
    for i in range(steps):
        images, labels = scenes(batch_size, i, seed, cfg, variant)
        params, opt, loss, acc = step(params, opt, images, labels)
        if (i + 1) % max(1, steps // 10) == 0 or i + 1 == steps:
            seconds = time.perf_counter() - t0
            log(f"demo tower {i + 1}/{steps} | loss {loss:.4f} | objects {acc:.3f} | {seconds:.0f} s")
    images, labels = scenes(512, -1, seed + 1, cfg, variant)  # held-out scenes
    _, acc = jax.jit(loss_fn)(params, images, labels)
    log(f"demo tower: held-out object tokens classified right: {float(acc):.3f}")
    return jax.device_get(params["tower"])


def build(out: str, *, image_size: int = 64, log=print, **options) -> str:
    """Pretrains the tower (``options``: :func:`pretrain`'s, as the config's ``demo_tower`` section holds
    them) and writes its HF directory into place at ``out`` (:func:`write_into_place`)."""
    from pargo_jax.convert.hf_vision import save_vision

    cfg = tower_config(image_size)
    params = pretrain(cfg, log=log, **options)
    return write_into_place(out, lambda tmp: save_vision(tmp, params, cfg), ".demo_tower_")


def write_into_place(out: str, write: Callable[[str], Any], prefix: str) -> str:
    """``write(tmp)`` fills a temporary directory beside ``out``, which is then renamed to ``out``, so
    concurrent builders leave one whole copy. Returns ``out`` (absolute)."""
    import os
    import shutil
    import tempfile

    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(out))
    try:
        write(tmp)
        os.rename(tmp, out)
    except OSError:  # another process finished first
        if not os.path.exists(os.path.join(out, "config.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


BUILD_STAMP = "build_options.json"  # the options a directory was built with (see ensure)


def ensure(out: str, build: Callable[..., str] = build, **options) -> bool:
    """Builds the directory at ``out`` with ``build(out, **options)`` (the demo tower's unless told)
    unless it is there, built with the same options; returns whether it built. A directory built with
    other options is rebuilt; one without a record of them (built before they were recorded) is kept."""
    import json
    import os
    import shutil

    stamp, recorded = os.path.join(out, BUILD_STAMP), {k: v for k, v in options.items() if k != "log"}
    if os.path.exists(os.path.join(out, "config.json")):
        if not os.path.exists(stamp):
            return False
        with open(stamp) as f:
            if json.load(f) == json.loads(json.dumps(recorded)):
                return False
        shutil.rmtree(out)
    build(out, **options)
    with open(stamp, "w") as f:
        json.dump(recorded, f, indent=1, sort_keys=True)
    return True
