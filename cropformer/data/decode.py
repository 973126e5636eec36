"""Image decoding: any common file to H x W x 3 uint8 RGB, EXIF orientation applied, with JPEGs decoded
at reduced resolution when the views need far fewer pixels than the file holds.

EntitySeg images range from 200 px to 15,000 px on a side, while the network sees at most
1333 x 800 (crops at about 1.43x the full view's scale). A JPEG can be decoded at 1/2, 1/4 or 1/8 of
its size by scaling the inverse DCT (libjpeg's `scale_denom`; OpenCV's IMREAD_REDUCED_COLOR_2/4/8),
which skips most of the IDCT work and never materialises the full-resolution array: `decode_image`
picks the largest reduction that still leaves at least as many pixels per original pixel as the views
need (`scale`). The reduced image is a box-filtered version of the full one, so the final views differ
slightly from full decode + PIL resize (the parity path, `scale=1.0` or `reduced=False`); the numbers are
in tests/bench/test_bench_decode.py.

Decoders, in order of preference:
- OpenCV (`cv2.imdecode`) for baseline RGB/grayscale JPEGs whose data ends with the JPEG end-of-image
  marker. OpenCV applies EXIF orientation itself and, on a truncated file, only prints a warning and
  fills the missing rows with grey, which would be a silent wrong sample; a file without the end
  marker at its end therefore goes to PIL, which raises on truncation (and decodes files with trailing
  data after the marker correctly).
- PIL for everything else (PNG, CMYK JPEG, palette, 16-bit, RGBA, BMP, TIFF, WebP, ...), with
  `Image.draft` for reduced JPEG decoding and `ImageOps.exif_transpose` for orientation. This is the
  reader detectron2 uses, so full-resolution results match the original.

Mode conversions (to RGB uint8): grayscale / 1-bit are replicated to three channels; palette images go
through their palette; alpha is dropped (not composited; as detectron2's `convert("RGB")`); CMYK uses
PIL's conversion (Adobe-inverted CMYK JPEGs are handled by PIL's JPEG reader); 16-bit grayscale keeps
its high byte (value >> 8; PIL's own conversion would clip everything above 255 to white); 16-bit RGB
PNGs are read by PIL at 8 bits (their high byte). Float images are rejected.

Every failure (missing, unreadable, truncated, unsupported, size not as the annotation file says) is
an `ImageDecodeError` carrying the path; what to do with it is the dataset's choice (skip or fatal).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ImageDecodeError",
    "ImageInfo",
    "DecodedImage",
    "read_image_info",
    "choose_reduction",
    "decode_image",
    "MAX_PIXELS",
]

# Larger than any EntitySeg image (15,000 x 11,000 = 165 Mpx); PIL's own default (89 Mpx, error at
# twice that) would refuse some of them.
MAX_PIXELS = 400_000_000
REDUCTIONS = (8, 4, 2)
_CV2_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}
_EXIF_ORIENTATION = 0x0112
# PIL modes a plain `convert("RGB")` maps correctly.
_CONVERTIBLE = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class ImageDecodeError(RuntimeError):
    """An image could not be decoded into a correct sample. `path` names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of an image file. height/width are after EXIF orientation."""

    path: str
    format: str | None
    mode: str
    height: int
    width: int
    orientation: int


@dataclass
class DecodedImage:
    """A decoded image: `image` is h x w x 3 uint8 RGB with h = ceil(height / reduction) and
    w = ceil(width / reduction); height/width are the full-resolution (EXIF-oriented) size."""

    image: np.ndarray
    height: int
    width: int
    reduction: int
    path: str


@contextlib.contextmanager
def _pixel_limit():
    """Let PIL open images up to MAX_PIXELS without its decompression-bomb warning or error."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory") from None
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read file ({e})") from None


def _open(path: str, data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"image too large ({e})") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(path, f"not a readable image ({e})") from None


def _info(path: str, im: Image.Image) -> ImageInfo:
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        orientation = 1  # a broken EXIF block: no orientation, as detectron2's reader does
    if orientation not in range(1, 9):
        orientation = 1
    w, h = im.size
    if orientation >= 5:  # 5..8 transpose the axes
        h, w = w, h
    if h <= 0 or w <= 0:
        raise ImageDecodeError(path, f"empty image ({h} x {w})")
    if h * w > MAX_PIXELS:
        raise ImageDecodeError(path, f"{h} x {w} exceeds MAX_PIXELS = {MAX_PIXELS}")
    return ImageInfo(str(path), im.format, im.mode, h, w, orientation)


def read_image_info(path: str | os.PathLike) -> ImageInfo:
    """Size (after EXIF orientation), format and mode of an image, reading only its header."""
    path = str(path)
    with _pixel_limit():
        try:
            with Image.open(path) as im:
                return _info(path, im)
        except FileNotFoundError:
            raise ImageDecodeError(path, "file not found") from None
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(path, f"image too large ({e})") from None
        except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageDecodeError(path, f"not a readable image ({e})") from None


def choose_reduction(scale: float, *, reductions: tuple[int, ...] = REDUCTIONS) -> int:
    """Largest JPEG reduction r (8, 4, 2, else 1) whose decoded resolution 1/r is at least `scale`.

    `scale` is the largest ratio (output pixels / original pixels, per axis) any view of the sample
    needs; a view that upsamples (scale >= 1) always gets the full-resolution decode.
    """
    for r in sorted(reductions, reverse=True):
        if 1.0 / r >= scale:
            return r
    return 1


def _ends_with_eoi(data: bytes) -> bool:
    # The JPEG end-of-image marker, allowing the padding some writers add after it.
    return data.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")


def _to_rgb(path: str, im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        # 16-bit grayscale (PIL opens 16-bit PNGs as I;16 or I): keep the high byte.
        gray = np.asarray(im).astype(np.int64)
        gray = (np.clip(gray, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode not in _CONVERTIBLE:
        raise ImageDecodeError(path, f"unsupported image mode {mode!r}")
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def _decode_pil(path: str, data: bytes, info: ImageInfo, reduction: int) -> tuple[np.ndarray, int]:
    with _pixel_limit():
        im = _open(path, data)
        try:
            if reduction > 1 and info.format == "JPEG":
                raw_w, raw_h = im.size
                # draft() picks the largest DCT scale s with size // s >= the requested size.
                im.draft(im.mode, (max(1, raw_w // reduction), max(1, raw_h // reduction)))
                reduction = next(
                    (r for r in (8, 4, 2) if im.size == (math.ceil(raw_w / r), math.ceil(raw_h / r))), 1
                )
            else:
                reduction = 1
            im.load()
            im = ImageOps.exif_transpose(im) if info.orientation != 1 else im
            return _to_rgb(path, im), reduction
        except ImageDecodeError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageDecodeError(path, f"decoding failed ({e})") from None
        finally:
            im.close()


def _decode_cv2(path: str, data: bytes, reduction: int) -> np.ndarray | None:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_REDUCED[reduction])
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        return None
    return np.ascontiguousarray(bgr[:, :, ::-1])


def decode_image(
    path: str | os.PathLike,
    *,
    scale: float = 1.0,
    reduced: bool = True,
    expected_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode an image file to RGB uint8, EXIF orientation applied.

    Args:
        path: the image file.
        scale: the largest output/original pixel ratio the caller's views need (<= 1 allows a
            reduced JPEG decode; see `choose_reduction`). 1.0 decodes at full resolution.
        reduced: False forces a full-resolution decode (the parity path).
        expected_size: (height, width) the annotation file states; a different oriented size raises.

    Returns:
        DecodedImage with `image` h x w x 3 uint8 (C-contiguous), h = ceil(height / reduction).

    Raises:
        ImageDecodeError: missing, unreadable, truncated or unsupported file, or a size mismatch.
    """
    path = str(path)
    data = _read_bytes(path)
    with _pixel_limit():
        im = _open(path, data)
        try:
            info = _info(path, im)
        finally:
            im.close()
    if expected_size is not None and (info.height, info.width) != tuple(expected_size):
        raise ImageDecodeError(
            path,
            f"size {info.height} x {info.width} (after EXIF orientation) differs from the annotated "
            f"{expected_size[0]} x {expected_size[1]}",
        )
    reduction = choose_reduction(scale) if reduced else 1
    image = None
    if info.format == "JPEG" and info.mode in ("RGB", "L") and _ends_with_eoi(data):
        image = _decode_cv2(path, data, reduction)
    if image is None:
        image, reduction = _decode_pil(path, data, info, reduction)
    want = (math.ceil(info.height / reduction), math.ceil(info.width / reduction))
    if image.shape[:2] != want:
        raise ImageDecodeError(path, f"decoded to {image.shape[:2]}, expected {want} at 1/{reduction}")
    if not image.flags.c_contiguous or not image.flags.writeable:
        image = np.array(image)
    return DecodedImage(image, info.height, info.width, reduction, path)
