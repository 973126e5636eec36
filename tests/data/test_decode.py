"""Image decoding (cropformer/data/decode.py): odd image kinds, EXIF orientation, reduced JPEG decoding,
and corrupt / truncated / missing files (always an ImageDecodeError naming the path)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from cropformer.data.decode import ImageDecodeError, choose_reduction, decode_image, read_image_info

# Odd sizes so that reduced sizes round up (ceil(H / r)) and rotations change the shape.
H, W = 77, 123


def blocks(h: int = H, w: int = W) -> np.ndarray:
    """An asymmetric image of flat blocks: survives JPEG nearly unchanged and shows any rotation."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 3] = (220, 30, 30)
    img[: h // 2, w // 3:] = (30, 200, 40)
    img[h // 2:, : w // 2] = (40, 40, 210)
    img[h // 2:, w // 2:] = (230, 230, 60)
    img[5:15, 10:60] = (250, 250, 250)
    return img


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


# EXIF orientation -> the transform that displays the stored pixels upright (numpy, independent of PIL).
ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def save(path, array, exif_orientation=None, **kw):
    exif = None
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
    im = array if isinstance(array, Image.Image) else Image.fromarray(array)
    im.save(path, **({"exif": exif} if exif is not None else {}), **kw)
    return str(path)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_exif_orientation(tmp_path, orientation, fmt):
    img = blocks()
    plain = save(tmp_path / f"plain.{fmt}", img, 1, quality=95)
    rotated = save(tmp_path / f"o.{fmt}", img, orientation, quality=95)
    base = decode_image(plain).image
    got = decode_image(rotated)
    assert (got.height, got.width) == ORIENT[orientation](base).shape[:2]
    np.testing.assert_array_equal(got.image, ORIENT[orientation](base))
    info = read_image_info(rotated)
    assert (info.height, info.width, info.orientation) == (got.height, got.width, orientation)
    if fmt == "jpg":  # the reduced decoder (OpenCV) applies the same orientation
        red = decode_image(rotated, scale=0.5)
        assert red.reduction == 2
        np.testing.assert_array_equal(red.image, ORIENT[orientation](decode_image(plain, scale=0.5).image))


def test_grayscale(tmp_path):
    gray = smooth(H, W)[:, :, 0]
    for name in ("g.png", "g.jpg"):
        path = save(tmp_path / name, gray, quality=95)
        out = decode_image(path).image
        assert out.shape == (H, W, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
        tol = 0 if name.endswith("png") else 3
        assert np.abs(out[:, :, 0].astype(int) - gray).max() <= tol


def test_rgba_drops_alpha(tmp_path):
    rgb = smooth(H, W)
    alpha = np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1))
    path = save(tmp_path / "a.png", np.dstack([rgb, alpha]))
    np.testing.assert_array_equal(decode_image(path).image, rgb)
    la = save(tmp_path / "la.png", Image.fromarray(np.dstack([rgb[:, :, 0], alpha]), "LA"))
    np.testing.assert_array_equal(decode_image(la).image, np.repeat(rgb[:, :, :1], 3, 2))


def test_palette(tmp_path):
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 255, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (H, W), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.ravel().tolist())
    path = save(tmp_path / "p.png", im)
    np.testing.assert_array_equal(decode_image(path).image, palette[index])


def test_one_bit(tmp_path):
    bits = (np.indices((H, W)).sum(0) % 3 == 0)
    path = save(tmp_path / "b.png", Image.fromarray(bits))
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(decode_image(path).image[:, :, 1], bits.astype(np.uint8) * 255)


def test_sixteen_bit(tmp_path):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    path = str(tmp_path / "g16.png")
    cv2.imwrite(path, gray16)
    out = decode_image(path).image
    np.testing.assert_array_equal(out, np.repeat((gray16 >> 8).astype(np.uint8)[:, :, None], 3, 2))
    rgb16 = rng.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    path = str(tmp_path / "c16.png")
    cv2.imwrite(path, rgb16[:, :, ::-1])  # OpenCV writes BGR
    np.testing.assert_array_equal(decode_image(path).image, (rgb16 >> 8).astype(np.uint8))


def test_cmyk_jpeg(tmp_path):
    rgb = smooth(H, W)
    path = save(tmp_path / "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    assert Image.open(path).mode == "CMYK"
    out = decode_image(path).image
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))
    assert np.abs(out.astype(int) - rgb).mean() < 3
    red = decode_image(path, scale=0.3)  # CMYK goes through PIL's draft for the reduced decode
    assert red.reduction == 2 and red.image.shape == (math.ceil(H / 2), math.ceil(W / 2), 3)


def test_float_image_rejected(tmp_path):
    path = str(tmp_path / "f.tif")
    Image.fromarray(np.random.default_rng(0).random((H, W)).astype(np.float32), "F").save(path)
    with pytest.raises(ImageDecodeError, match="unsupported image mode"):
        decode_image(path)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jpg")
    with pytest.raises(ImageDecodeError, match="file not found") as e:
        decode_image(path)
    assert e.value.path == path and path in str(e.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ImageDecodeError) as e:
        decode_image(path)
    assert str(path) in str(e.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError):
        decode_image(empty)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_truncated_file(tmp_path, fmt, scale):
    """OpenCV decodes a truncated JPEG with a warning and grey rows; we must raise instead."""
    full = save(tmp_path / f"full.{fmt}", smooth(301, 403), quality=90)
    data = open(full, "rb").read()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageDecodeError) as e:
        decode_image(path, scale=scale)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("fmt,params", [("jpg", []), ("jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), ("png", [])])
def test_data_stopping_anywhere_is_detected(tmp_path, fmt, params):
    """A file whose data stops early (a torn download or copy) is refused wherever it stops, at full and
    reduced resolution, never returned with the missing part filled in."""
    ok, buf = cv2.imencode(f".{fmt}", smooth(121, 163), params)
    data = buf.tobytes()
    path = tmp_path / f"cut.{fmt}"
    for frac in np.linspace(0.1, 0.98, 12):
        path.write_bytes(data[: int(len(data) * frac)])
        for scale in (1.0, 0.25):
            with pytest.raises(ImageDecodeError, match=str(path)):
                decode_image(path, scale=scale)


def test_trailing_data_after_jpeg(tmp_path):
    full = save(tmp_path / "full.jpg", smooth(301, 403), quality=90)
    path = tmp_path / "trailer.jpg"
    path.write_bytes(open(full, "rb").read() + b"vendor trailer" * 20)
    for scale in (1.0, 0.5):
        np.testing.assert_array_equal(decode_image(path, scale=scale).image, decode_image(full, scale=scale).image)


def test_size_mismatch(tmp_path):
    path = save(tmp_path / "x.png", blocks())
    decode_image(path, expected_size=(H, W))
    with pytest.raises(ImageDecodeError, match="differs from the annotated"):
        decode_image(path, expected_size=(W, H))


@pytest.mark.parametrize("scale,expected", [(1.5, 1), (1.0, 1), (0.51, 1), (0.5, 2), (0.381, 2), (0.25, 4),
                                            (0.127, 4), (0.125, 8), (0.01, 8)])
def test_choose_reduction(scale, expected):
    assert choose_reduction(scale) == expected


@pytest.mark.parametrize("r", [2, 4, 8])
def test_reduced_decode_close_to_full(tmp_path, r):
    h, w = 1203, 1601
    img = smooth(h, w, seed=r)
    path = save(tmp_path / "big.jpg", img, quality=92)
    red = decode_image(path, scale=1.0 / r)
    assert red.reduction == r and (red.height, red.width) == (h, w)
    assert red.image.shape == (math.ceil(h / r), math.ceil(w / r), 3)
    full = decode_image(path).image
    # Each reduced pixel is (close to) the mean of an r x r block; the last row/column covers a
    # partial block and is left out.
    hf, wf = h // r, w // r
    block_mean = full[: hf * r, : wf * r].reshape(hf, r, wf, r, 3).mean((1, 3))
    diff = np.abs(block_mean - red.image[:hf, :wf])
    assert diff.mean() < 1.0, diff.mean()
    assert decode_image(path, scale=1.0 / r, reduced=False).reduction == 1


def test_opencv_and_pil_full_decode_agree(tmp_path):
    """Full-resolution JPEGs go through OpenCV; the original reads with PIL. Same libjpeg-turbo
    defaults, same pixels (this is what keeps the parity path exact for JPEG inputs)."""
    path = save(tmp_path / "x.jpg", smooth(301, 403), quality=90)
    np.testing.assert_array_equal(decode_image(path).image, np.asarray(Image.open(path).convert("RGB")))
