"""Decode one encoded image and cut it to the model's input: random-resized crop (train) or resize-and-center-crop
(eval), as uint8 RGB.

Why it looks like this:

* Both transforms are "a box in the source image, resampled to ``size x size``" (Pillow's antialiased bilinear
  ``resize(box=...)``, one resampling pass). The eval transform (resize the short side to ``size / eval_crop``,
  then center-crop ``size``) is the same box, ``eval_crop * short side`` wide, in source coordinates.
* JPEG is decoded with libjpeg-turbo's reduced-size DCT whenever the box is at least twice the target in both
  directions (1/2, 1/4, 1/8 scale): a 2x smaller decode costs about a quarter. ``simplejpeg`` is used when it
  is installed (it is a dependency; it decodes ~10% faster than Pillow), Pillow otherwise: both run
  libjpeg-turbo with the same settings and give the same pixels, so batches do not depend on which one ran.
* Every image becomes 8-bit RGB: grayscale is replicated, CMYK converted, alpha dropped (as torchvision's loader
  does), 16-bit samples keep their high byte. Anything else is a :class:`BadImageError` naming the file: a
  truncated or corrupt file, a file that is not an image, an image over :data:`MAX_PIXELS`. Nothing is guessed.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np

# File name endings the image-folder source reads (any case); other files are not images to it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Largest image (pixels) decoded: Pillow's decompression-bomb limit (~89 Mpx, e.g. 9,459 x 9,459).
MAX_PIXELS = 89_478_485
_JPEG_MAGIC = b"\xff\xd8"

try:  # the fast path; Pillow gives the same pixels when it is missing
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency
    _simplejpeg = None


class BadImageError(ValueError):
    """An example that cannot be used; the message is one line naming the file and what is wrong."""


def _pil():
    from PIL import Image

    return Image


def probe(data: bytes, name: str) -> tuple[int, int, str]:
    """(width, height, kind) from the header alone; kind: "jpeg-fast" (simplejpeg decodes it), "jpeg" or
    "other" (Pillow decodes it)."""
    if not data:
        raise BadImageError(f"{name}: empty file (expected a JPEG, PNG, WebP or BMP image)")
    is_jpeg = data[:2] == _JPEG_MAGIC
    if is_jpeg and _simplejpeg is not None:
        try:
            h, w, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
            if colorspace in ("Gray", "YCbCr", "RGB"):  # CMYK goes to Pillow: its conversion is the reference
                return _check_pixels(w, h, name), h, "jpeg-fast"
        except ValueError:
            pass  # Pillow reports what is wrong (or reads what simplejpeg does not)
    Image = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.UnidentifiedImageError:
        raise BadImageError(f"{name}: not an image Pillow can read (expected a JPEG, PNG, WebP or BMP image)"
                            ) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadImageError(f"{name}: image too large (over {MAX_PIXELS:,} pixels)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"{name}: corrupt or truncated image header ({err})") from None
    return _check_pixels(w, h, name), h, "jpeg" if is_jpeg else "other"


def _check_pixels(w: int, h: int, name: str) -> int:
    if w * h > MAX_PIXELS:
        raise BadImageError(f"{name}: image of {w}x{h} pixels is too large (over {MAX_PIXELS:,} pixels)")
    if w < 1 or h < 1:
        raise BadImageError(f"{name}: image has no pixels ({w}x{h})")
    return w


def _to_rgb(im, name: str):
    """8-bit RGB Pillow image from any mode Pillow decodes."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) gray: keep the high byte of 16-bit samples rather than clipping at 255.
        a = np.asarray(im).astype(np.int64)
        a = np.clip(a >> 8, 0, 255).astype(np.uint8)
        return _pil().fromarray(np.repeat(a[..., None], 3, axis=-1))
    if mode == "F":
        raise BadImageError(f"{name}: floating-point image (mode F) is not supported; save it as 8- or 16-bit")
    return im.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...


def decode(data: bytes, name: str, *, min_size: tuple[int, int] | None = None, header=None):
    """The image as an 8-bit RGB Pillow image, and the factor its size was divided by (1, 2, 4 or 8: JPEGs only,
    the largest that keeps both sides at least ``min_size = (width, height)``). ``header``: ``probe``'s answer,
    when the caller has it already."""
    w, h, kind = header or probe(data, name)
    is_jpeg = kind != "other"
    scale = 1
    if is_jpeg and min_size is not None:  # only the 1/2, 1/4, 1/8 scales: both decoders have them
        scale = max([1] + [s for s in (2, 4, 8) if w / s >= min_size[0] and h / s >= min_size[1]])
    want = (math.ceil(w / scale), math.ceil(h / scale))  # libjpeg's size at 1/scale: simplejpeg picks that scale
    if kind == "jpeg-fast":
        try:
            a = _simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=want[0], min_height=want[1])
            return _pil().fromarray(a), w / a.shape[1]
        except ValueError:
            pass  # e.g. CMYK or a corrupt file: Pillow decodes it or says what is wrong
    Image = _pil()
    try:
        im = Image.open(io.BytesIO(data))
        if scale > 1:  # Pillow picks the largest scale <= min(w // dw, h // dh): these make it exactly `scale`
            im.draft("RGB", (max(1, w // scale), max(1, h // scale)))
        im.load()
        return _to_rgb(im, name), w / im.size[0]
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name}: corrupt or truncated image ({err})") from None


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int, *, min_scale: float = 0.08,
                            max_aspect: float = 4 / 3) -> tuple[float, float, float, float]:
    """Inception-style crop box (left, top, right, bottom): area a uniform fraction in [min_scale, 1] of the
    image, aspect ratio log-uniform in [1/max_aspect, max_aspect]; 10 tries, then the largest centered box of
    an allowed aspect ratio (torchvision's ``RandomResizedCrop`` algorithm)."""
    area = width * height
    log_lo, log_hi = math.log(1 / max_aspect), math.log(max_aspect)
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    ratio = width / height
    if ratio < 1 / max_aspect:
        w, h = width, int(round(width * max_aspect))
    elif ratio > max_aspect:
        w, h = int(round(height * max_aspect)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int, *, crop: float = 0.875) -> tuple[float, float, float, float]:
    """The square box ``crop * short side`` wide at the center: resize-short-side-then-center-crop in one box."""
    side = crop * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _resample_box(data: bytes, name: str, header, box, size: int, flip: bool = False):
    """Decode ``data`` (reduced when the box allows) and resample ``box`` to ``size x size`` uint8 RGB."""
    width, height, _ = header
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    # The smallest decode whose box is still at least ``size`` in both directions.
    min_size = (math.ceil(width * size / box_w), math.ceil(height * size / box_h))
    im, factor = decode(data, name, min_size=min_size, header=header)
    if factor != 1:
        sx, sy = width / im.size[0], height / im.size[1]
        box = (box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy)
    Image = _pil()
    out = im.resize((size, size), Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def train_transform(data: bytes, name: str, rng: np.random.Generator, *, size: int, min_scale: float = 0.08,
                    max_aspect: float = 4 / 3) -> np.ndarray:
    """(size, size, 3) uint8: random-resized crop + horizontal flip (p = 0.5), all draws from ``rng``."""
    header = w, h, _ = probe(data, name)
    box = random_resized_crop_box(rng, w, h, min_scale=min_scale, max_aspect=max_aspect)
    return _resample_box(data, name, header, box, size, flip=bool(rng.random() < 0.5))


def eval_transform(data: bytes, name: str, *, size: int, crop: float = 0.875) -> np.ndarray:
    """(size, size, 3) uint8: the short side resized to ``size / crop``, then the center ``size x size``."""
    header = w, h, _ = probe(data, name)
    return _resample_box(data, name, header, center_crop_box(w, h, crop=crop), size)
