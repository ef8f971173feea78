"""Box codec round trips and image decode / resize / normalize, including corrupt images."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images
from data_pipelines.boxes import FORMATS, FRAMES, BoxCodec, box_iou
from data_pipelines.schema import BadRecord


def _encoded(w=40, h=20, fmt="PNG", color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("frame", FRAMES)
def test_box_round_trip(fmt, frame):
    codec = BoxCodec(fmt, frame)
    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (333, 500), (64, 64)]:
        for _ in range(20):
            x1, x2 = sorted(rng.uniform(0, w, 2))
            y1, y2 = sorted(rng.uniform(0, h, 2))
            text = codec.encode([x1, y1, x2, y2], w, h)
            back = codec.decode(text, w, h)
            assert np.abs(back - [x1, y1, x2, y2]).max() <= codec.tolerance(w, h), (text, back)
            assert codec.encode(back, w, h) == text  # encode(decode(s)) == s


def test_box_known_values():
    box, w, h = [100, 50, 300, 150], 400, 200  # padded square: side 400, offset y 100
    assert BoxCodec("norm3", "original").encode(box, w, h) == "[0.250,0.250,0.750,0.750]"
    assert BoxCodec("norm3", "square").encode(box, w, h) == "[0.250,0.375,0.750,0.625]"
    assert BoxCodec("int1000", "square").encode(box, w, h) == "[250,375,750,625]"
    assert BoxCodec("pixel", "square").encode(box, w, h) == "[100,150,300,250]"
    assert BoxCodec("pixel", "original").encode(box, w, h) == "[100,50,300,150]"
    # decoding is tolerant of spaces and finds every box in free text
    found = BoxCodec("norm3", "square").decode_all("a [0.25, 0.375 ,0.75,0.625] and [0,0.25,1,0.75]", w, h)
    np.testing.assert_allclose(found[0], box)
    np.testing.assert_allclose(found[1], [0, 0, 400, 200])
    with pytest.raises(ValueError, match="No"):
        BoxCodec().decode("no box here", w, h)
    with pytest.raises(ValueError, match="Unknown box format"):
        BoxCodec("xyxy")
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)


def test_decode_rejects_bad_images():
    good = _encoded(fmt="JPEG")
    assert images.decode(good).size == (40, 20)
    cases = {
        "zero_byte_image": b"",
        "bad_image": b"not an image at all",
    }
    for reason, data in cases.items():
        with pytest.raises(BadRecord) as e:
            images.decode(data, "rid")
        assert e.value.reason == reason and e.value.record_id == "rid"
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(big, format="JPEG")
    for data in (big.getvalue()[: len(big.getvalue()) // 2], _encoded(64, 64, "PNG")[:60]):
        with pytest.raises(BadRecord) as e:  # truncated files fail, never silently grey-filled
            images.decode(data)
        assert e.value.reason == "bad_image"


def test_decode_converts_modes_to_rgb():
    buf = io.BytesIO()
    Image.new("L", (8, 6), 77).save(buf, format="PNG")
    img = images.decode(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)


def test_resize_modes_and_normalization():
    mean, std = images.CLIP_MEAN, images.CLIP_STD
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    norm = images.Normalizer(mean, std)
    sq = norm(images.resize(img, 16, "squash", mean))
    assert sq.shape == (16, 16, 3) and sq.dtype == np.float32
    np.testing.assert_allclose(sq[8, 8], (np.array([200, 10, 10]) / 255 - mean) / std, atol=1e-5)
    lb_u8 = np.asarray(images.resize(img, 16, "letterbox", mean))
    # centred content rows 4..11, padding above and below in int(255 * mean): within 1/255 of the mean
    assert (lb_u8[:2] == (122, 116, 104)).all() and (lb_u8[-2:] == (122, 116, 104)).all()
    lb = norm(lb_u8)
    assert np.abs(lb[:2]).max() < 1 / 255 / min(std) and np.abs(lb[-2:]).max() < 1 / 255 / min(std)
    np.testing.assert_allclose(lb[8, 8], sq[8, 8], atol=1e-5)
    pad = norm(images.resize(img, 16, "pad", mean))
    # top-left placement: content rows 0..7, padding from row 8 down
    np.testing.assert_allclose(pad[2, 2], sq[8, 8], atol=1e-5)
    assert np.abs(pad[9:]).max() < 1 / 255 / min(std)
    with pytest.raises(ValueError, match="Unknown resize mode"):
        images.resize(img, 16, "crop")


def test_letterbox_geometry_matches_square_box_frame():
    """A box encoded in the 'square' frame lands on the object after letterbox resize."""
    w, h, size = 60, 30, 32
    img = Image.new("RGB", (w, h), (0, 0, 0))
    img.paste((255, 255, 255), (20, 10, 40, 20))  # white box [20,10,40,20]
    out = np.asarray(images.resize(img, size, "letterbox"))
    unit = BoxCodec("norm3", "square").to_unit([20, 10, 40, 20], w, h)
    x1, y1, x2, y2 = np.round(unit * size).astype(int)
    inside = out[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
    assert inside.min() > 200
    assert out[: y1 - 1].max() < 200 and out[y2 + 1 :].max() < 200


def test_jpeg_draft_is_opt_in_and_keeps_requested_size():
    from data_pipelines.pipeline import InputConfig

    buf = io.BytesIO()
    Image.new("RGB", (1200, 800), (10, 120, 30)).save(buf, format="JPEG")
    assert images.decode(buf.getvalue()).size == (1200, 800)  # full resolution unless asked
    img = images.decode(buf.getvalue(), draft=300)
    assert min(img.size) >= 300 and img.size[0] < 1200  # decoded at a reduced scale
    assert images.load(buf.getvalue(), 336, "letterbox", jpeg_draft=True).size == (336, 336)
    assert InputConfig.jpeg_draft is False


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "1", "P"])
@pytest.mark.parametrize("size", [(1, 1), (37, 23), (384, 384), (700, 500)])
def test_to_array_equals_numpy_asarray(mode, size):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    got, want = images.to_array(img), np.asarray(img)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_to_array_falls_back_without_the_private_encoder(monkeypatch):
    import types

    img = Image.new("RGB", (5, 4), (1, 2, 3))
    monkeypatch.setattr(images, "Image", types.SimpleNamespace())  # a PIL without _getencoder
    got = images.to_array(img)
    assert got.shape == (4, 5, 3) and (got == [1, 2, 3]).all()
