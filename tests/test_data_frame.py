"""The square input frame: pixels, detector boxes and the box text codec land on the same pixel (odd
padding included); ``letterbox`` is LLaVA's ``expand2square``; ``bug_compatible_448_crop`` gives the
ParGo release's MME pixels bit for bit on real photos, through the code ``predict`` / ``evaluate`` run.
The references are written here from the released code, independently of ``data_pipelines``."""

from __future__ import annotations

import io
import os

import matplotlib
import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipelines import detections, frame, images
from data_pipelines.boxes import BoxCodec

BOX = [5, 10, 25, 20]  # drawn in red on the original image


def _drawn(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (0, 0, 0))
    img.paste((255, 0, 0), tuple(BOX))
    return img


def _red_extent(img: Image.Image) -> list[int]:
    """[x1, y1, x2, y2] of the red pixels (red above half, green and blue near 0)."""
    arr = np.asarray(img).astype(int)
    ys, xs = np.nonzero((arr[..., 0] > 127) & (arr[..., 1:].max(-1) < 64))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize(
    "mode,size,w,h",
    [
        ("letterbox", 61, 61, 30),  # side - h = 31: offset 15 (the float one was 15.5)
        ("letterbox", 61, 30, 61),
        ("letterbox", 122, 61, 30),  # the padded square scaled x2
        ("bug_compatible_448_crop", 36, 48, 23),  # 48 px canvas, offset 12 (not 12.5), 36 crop
    ],
)
def test_pixels_detector_boxes_and_text_codec_land_on_the_same_pixel(mode, size, w, h):
    out = images.resize(_drawn(w, h), size, mode)
    seen = _red_extent(out)
    np.testing.assert_array_equal(detections.transform_boxes(np.array([BOX]), w, h, size, mode)[0], seen)
    if mode == "letterbox":  # the codec's 'square' frame is the letterbox frame
        np.testing.assert_allclose(BoxCodec("norm3", "square").to_unit(BOX, w, h) * size, seen, atol=1e-9)
        if size == max(w, h):
            assert BoxCodec("pixel", "square").encode(BOX, w, h) == "[" + ",".join(map(str, seen)) + "]"


@pytest.mark.parametrize("mode", frame.RESIZE_MODES)
def test_square_frame_round_trips_boxes(mode):
    boxes = np.array([[0, 0, 333, 500], [12.5, 7, 100, 250.25]])
    f = frame.square_frame(333, 500, 224, mode)
    np.testing.assert_allclose(f.from_input(f.to_input(boxes)), boxes, atol=1e-9)
    with pytest.raises(ValueError, match="Unknown resize mode"):
        frame.square_frame(333, 500, 224, "crop")


def _expand2square(img: Image.Image, mean) -> Image.Image:
    """LLaVA's ``expand2square`` with ``tuple(int(x * 255) for x in image_mean)``."""
    w, h = img.size
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(int(x * 255) for x in mean))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


@pytest.mark.parametrize("w,h", [(61, 30), (30, 61), (40, 40), (500, 333)])
def test_letterbox_is_llava_expand2square(w, h):
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
    want = _expand2square(img, frame.CLIP_MEAN).resize((48, 48), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(images.resize(img, 48, "letterbox")), np.asarray(want))
    assert frame.fill_color(frame.CLIP_MEAN) == (122, 116, 104)  # int(), not round(): 123 for red


# --- the ParGo release's MME image steps ------------------------------------------------------------
def _release_pixels(data: bytes) -> np.ndarray:
    """``MMEBenchDataset.__getitem__``'s image: a PNG pasted on white with ``split()[3]`` as the mask
    (falling back to ``convert('RGB')`` when there is no 4th band), ``resize_and_pad`` onto 448 with
    BICUBIC and ``int(x * 255)`` of the CLIP mean, then ``split_into_patches``' top-left 336 patch."""
    image = Image.open(io.BytesIO(data))
    if image.format == "PNG":
        try:
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.split()[3])
            image = background
        except IndexError:
            image = image.convert("RGB")
    else:
        image = image.convert("RGB")
    ratio = min(448 / image.width, 448 / image.height)
    new = (int(image.width * ratio), int(image.height * ratio))
    padded = Image.new("RGB", (448, 448), tuple(int(x * 255) for x in frame.CLIP_MEAN))
    padded.paste(image.resize(new, Image.BICUBIC), ((448 - new[0]) // 2, (448 - new[1]) // 2))
    return np.asarray(padded)[:336, :336]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Real photos that matplotlib ships (a JPEG portrait, an RGBA icon, an RGBA logo), re-encoded at
    several sizes and in the PNG modes with transparency."""
    sample = os.path.join(matplotlib.get_data_path(), "sample_data")
    read = lambda name: open(os.path.join(sample, name), "rb").read()
    hopper = Image.open(io.BytesIO(read("grace_hopper.jpg"))).convert("RGB")  # 512 x 600
    alpha = Image.linear_gradient("L").resize((333, 390))
    palette = hopper.resize((333, 390)).quantize(64)
    return {
        "jpeg_512x600": read("grace_hopper.jpg"),
        "jpeg_700x467": _encode(hopper.resize((700, 467), Image.LANCZOS), "JPEG", quality=90),
        "jpeg_2400x1800": _encode(hopper.resize((2400, 1800), Image.LANCZOS), "JPEG", quality=90),
        "png_rgb_333x390": _encode(hopper.resize((333, 390)), "PNG"),
        "png_rgba_icon": read("Minduka_Present_Blue_Pack.png"),  # 128 x 128, real alpha
        "png_rgba_logo": read("logo2.png"),  # 542 x 130
        "png_la": _encode(Image.merge("LA", (hopper.resize((333, 390)).convert("L"), alpha)), "PNG"),
        "png_palette_transparent": _encode(palette, "PNG", transparency=0),
    }


@pytest.fixture(scope="module")
def release_predictor():
    """A Predictor of a 336 px model set up as ``from_config`` does for the release's preprocessing."""
    from pargo_jax.models.llm import LLMConfig
    from pargo_jax.models.mllm import MLLMConfig, VisionLanguageModel
    from pargo_jax.models.projectors import MLPConfig
    from pargo_jax.models.vision import vision_preset
    from pargo_jax.predictor import Predictor

    llm = LLMConfig(vocab_size=32, hidden_size=24, intermediate_size=48, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=12)  # fmt: skip
    vision = vision_preset("tiny", image_size=336, patch_size=14)
    mcfg = MLLMConfig(vision, MLPConfig(vision_width=vision.width, llm_width=24), llm, image_token_id=3)
    config = ml_collections.ConfigDict({"input": {"resize": "bug_compatible_448_crop"}})
    return Predictor.from_config(VisionLanguageModel(mcfg), None, None, config)


def test_bug_compatible_448_crop_is_the_release_mme_input_on_photos(photos, release_predictor):
    assert release_predictor.mcfg.pixel_mean == frame.CLIP_MEAN and not release_predictor.jpeg_draft
    for name, data in photos.items():
        got = release_predictor.pixels(data, name)
        assert got.shape == (336, 336, 3) and got.dtype == np.uint8, name
        np.testing.assert_array_equal(got, _release_pixels(data), err_msg=name)
    # the cases that tell the rules apart: alpha dropped / reduced-scale JPEG decoding are not the release
    dropped = images.resize(Image.open(io.BytesIO(photos["png_rgba_icon"])).convert("RGB"), 336,
                            "bug_compatible_448_crop")  # fmt: skip
    assert not np.array_equal(np.asarray(dropped), release_predictor.pixels(photos["png_rgba_icon"]))
    draft = images.load(photos["jpeg_2400x1800"], 336, "bug_compatible_448_crop", jpeg_draft=True)
    assert not np.array_equal(np.asarray(draft), release_predictor.pixels(photos["jpeg_2400x1800"]))


def test_letterbox_drops_alpha_as_llava(photos):
    """LLaVA opens every image with ``convert('RGB')``: no white background under transparency."""
    for name in ("png_rgba_icon", "png_la", "png_palette_transparent"):
        data = photos[name]
        want = _expand2square(Image.open(io.BytesIO(data)).convert("RGB"), frame.CLIP_MEAN)
        want = want.resize((64, 64), Image.BICUBIC)
        np.testing.assert_array_equal(np.asarray(images.load(data, 64, "letterbox")), np.asarray(want), name)
