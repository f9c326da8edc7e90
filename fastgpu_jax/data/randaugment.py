"""RandAugment and TrivialAugment on the host: one uint8 (H, W, 3) image at a time, with Pillow.

Why torchvision's definition (``torchvision.transforms.RandAugment(num_ops=N, magnitude=M,
num_magnitude_bins=31)`` and ``TrivialAugmentWide()``): it is one short table, its defaults are what most
recipes quote, and every op is a single Pillow call, so each can be checked against Pillow itself.

* 14 ops, each drawn uniformly (with replacement): Identity, ShearX, ShearY, TranslateX, TranslateY, Rotate,
  Brightness, Color, Contrast, Sharpness, Posterize, Solarize, AutoContrast, Equalize.
* Magnitudes come in 31 bins, 0..30 (:data:`BINS`). RandAugment ``'N,M'``: N ops per image, each at bin M.
  TrivialAugment (``'trivial'``): one op per image at a uniformly drawn bin, over wider ranges.
* Signed ops (shears, translations, rotation and the four enhancements) are negated with probability 1/2.
* Geometric ops sample the nearest pixel and fill what comes from outside the image with 0 (torchvision's
  defaults). Solarize at bin 0 has threshold 255, so it inverts pure white pixels, as torchvision does.
* The draws, in torchvision's order, all come from the numpy Generator passed in: per op its index, then (for
  TrivialAugment, ops with a magnitude) its bin, then (signed ops) its sign. The pipelines seed it per example
  with :func:`example_rng`, which is why a batch does not depend on workers, hosts or resumes.
* Where (``pipeline``, ``image_pipeline``): train batches only, after the crop and flip, before normalisation;
  on cifar10/cifar100 and the image-file sets. The registry refuses it on digits, MNIST, Fashion-MNIST and
  synthetic data (grayscale or float images).
* One difference: the bins are float64 ``numpy.linspace`` values, torchvision's float32 ``torch.linspace``;
  they differ by under 1e-7 relative, which can move a rare pixel of a nearest-neighbour shear.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable

import numpy as np

BINS = 31
# Mixed into each example's generator seed so it never coincides with a shuffle, crop or decode stream.
SEED_TAG = 0x8A4D
KEY = "data.randaugment"
_SPEC = re.compile(r"\s*([0-9]+)\s*,\s*([0-9]+)\s*")
_FILL = (0, 0, 0)


def _pil():
    from PIL import Image, ImageEnhance, ImageOps

    return Image, ImageEnhance, ImageOps


@functools.lru_cache(maxsize=64)
def _bins(lo: float, hi: float) -> tuple:
    return tuple(float(v) for v in np.linspace(lo, hi, BINS))


def _linear(lo: float, hi):
    """Bin ``k`` of ``linspace(lo, hi, BINS)``; ``hi`` may depend on the image's (width, height)."""
    def level(k: int, width: int, height: int) -> float:
        return _bins(lo, hi(width, height) if callable(hi) else hi)[k]
    return level


def _posterize_bits(steps: int):
    """Bits kept at bin ``k``: 8 - round(k / ((BINS - 1) / steps)) (8..4 for RandAugment, 8..2 for Trivial)."""
    return lambda k, width, height: float(8 - np.round(k / ((BINS - 1) / steps)))


def _affine(im, matrix):
    Image = _pil()[0]
    return im.transform(im.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=_FILL)


def _enhance(name: str):
    return lambda im, v: getattr(_pil()[1], name)(im).enhance(1.0 + v)


@dataclasses.dataclass(frozen=True)
class Op:
    """``apply(pil_image, value)``; ``rand``/``trivial``: value at bin k for an image of (width, height), None
    for the ops without a magnitude."""

    name: str
    signed: bool
    apply: Callable
    rand: Callable | None = None
    trivial: Callable | None = None


# torchvision's _apply_op: the shear matrices are its inverse affine matrix with center (0, 0) and shear angle
# atan(v) (so tan(angle) = v); translations are by int(v) pixels.
OPS = (
    Op("Identity", False, lambda im, v: im),
    Op("ShearX", True, lambda im, v: _affine(im, (1, v, 0, 0, 1, 0)), _linear(0.0, 0.3), _linear(0.0, 0.99)),
    Op("ShearY", True, lambda im, v: _affine(im, (1, 0, 0, v, 1, 0)), _linear(0.0, 0.3), _linear(0.0, 0.99)),
    Op("TranslateX", True, lambda im, v: _affine(im, (1, 0, -int(v), 0, 1, 0)),
       _linear(0.0, lambda w, h: 150.0 / 331.0 * w), _linear(0.0, 32.0)),
    Op("TranslateY", True, lambda im, v: _affine(im, (1, 0, 0, 0, 1, -int(v))),
       _linear(0.0, lambda w, h: 150.0 / 331.0 * h), _linear(0.0, 32.0)),
    Op("Rotate", True, lambda im, v: im.rotate(v, _pil()[0].NEAREST, fillcolor=_FILL),
       _linear(0.0, 30.0), _linear(0.0, 135.0)),
    Op("Brightness", True, _enhance("Brightness"), _linear(0.0, 0.9), _linear(0.0, 0.99)),
    Op("Color", True, _enhance("Color"), _linear(0.0, 0.9), _linear(0.0, 0.99)),
    Op("Contrast", True, _enhance("Contrast"), _linear(0.0, 0.9), _linear(0.0, 0.99)),
    Op("Sharpness", True, _enhance("Sharpness"), _linear(0.0, 0.9), _linear(0.0, 0.99)),
    Op("Posterize", False, lambda im, v: _pil()[2].posterize(im, int(v)), _posterize_bits(4), _posterize_bits(6)),
    Op("Solarize", False, lambda im, v: _pil()[2].solarize(im, v), _linear(255.0, 0.0), _linear(255.0, 0.0)),
    Op("AutoContrast", False, lambda im, v: _pil()[2].autocontrast(im)),
    Op("Equalize", False, lambda im, v: _pil()[2].equalize(im)),
)
OP_NAMES = tuple(op.name for op in OPS)
_BY_NAME = {op.name: op for op in OPS}


def _signed(op: Op, value: float, rng: np.random.Generator) -> float:
    return -value if op.signed and rng.integers(2) else value


def rand_augment_plan(rng: np.random.Generator, n: int, m: int, width: int, height: int) -> list:
    """The ``n`` (op name, signed value) pairs RandAugment applies to a ``width x height`` image at bin ``m``."""
    plan = []
    for _ in range(n):
        op = OPS[int(rng.integers(len(OPS)))]
        value = op.rand(m, width, height) if op.rand else 0.0
        plan.append((op.name, _signed(op, value, rng)))
    return plan


def trivial_augment_plan(rng: np.random.Generator, width: int, height: int) -> list:
    """The one (op name, signed value) pair TrivialAugmentWide applies: a uniform op at a uniform bin."""
    op = OPS[int(rng.integers(len(OPS)))]
    value = op.trivial(int(rng.integers(BINS)), width, height) if op.trivial else 0.0
    return [(op.name, _signed(op, value, rng))]


def apply_plan(image: np.ndarray, plan) -> np.ndarray:
    """``image`` (uint8 (H, W, 3)) with each (op name, value) of ``plan`` applied in order."""
    if not plan:
        return image
    im = _pil()[0].fromarray(np.asarray(image, np.uint8))
    for name, value in plan:
        im = _BY_NAME[name].apply(im, value)
    return np.asarray(im)


def rand_augment(image: np.ndarray, rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """RandAugment: ``n`` uniformly drawn ops at magnitude bin ``m`` (0..30), all draws from ``rng``."""
    h, w = image.shape[:2]
    return apply_plan(image, rand_augment_plan(rng, n, m, w, h))


def trivial_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """TrivialAugmentWide: one uniformly drawn op at a uniformly drawn bin, all draws from ``rng``."""
    h, w = image.shape[:2]
    return apply_plan(image, trivial_augment_plan(rng, w, h))


def example_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The generator of the example at ``row`` of the global batch of train ``step``: the same whichever
    worker or host augments it."""
    return np.random.default_rng([int(seed), SEED_TAG, int(step), int(row)])


@functools.lru_cache(maxsize=16)
def parse(spec: str):
    """``data.randaugment`` as ``augment(image, rng) -> image``, or None when off (''). 'N,M': RandAugment,
    N >= 1 ops at bin M in 0..30; 'trivial': TrivialAugmentWide. Anything else is a one-line ValueError."""
    if not isinstance(spec, str):
        raise ValueError(f"{KEY} must be a string ('', 'N,M' or 'trivial'), got {spec!r}")
    if spec == "":
        return None
    if spec == "trivial":
        return trivial_augment
    match = _SPEC.fullmatch(spec)
    if not match:
        raise ValueError(f"{KEY} must be '' (off), 'N,M' (RandAugment: N ops at magnitude M in 0..{BINS - 1}, "
                         f"e.g. '2,9') or 'trivial', got {spec!r}")
    n, m = int(match[1]), int(match[2])
    if n < 1:
        raise ValueError(f"{KEY}: N (ops per image) must be >= 1, got {spec!r} (use '' to turn it off)")
    if m > BINS - 1:
        raise ValueError(f"{KEY}: M (magnitude bin) must be in 0..{BINS - 1}, got {spec!r}")
    return functools.partial(rand_augment, n=n, m=m)
