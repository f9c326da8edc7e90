"""Batches of decoded images from a folder or ArrayRecord source: uint8, cut by the train or eval transform.

The same contract as the array pipelines (see ``pipeline``): the global batch of train step ``s`` is a pure
function of ``(seed, s)``. Example ``i`` of a batch is decoded with its own generator,
``default_rng([seed, tag, s, global row])``, so the pixels do not depend on which worker process, or which of
several hosts, decoded it, nor on how many there are. ``ImageOptions.randaugment`` (train batches only) then
augments the crop with ``randaugment.example_rng(seed, s, global row)``, a stream of its own.

Bad examples (``on_bad_example``): ``"error"`` stops at the first one with its one-line reason (file and
what is wrong). ``"skip"`` puts, in its place, the next example of the same epoch's permutation that decodes
(the same one every run: the set of skipped files and their substitutes is a function of the data and the
seed only) and reports the skipped files in the batch's ``"skipped"`` entry, which the train loop counts and
logs. In eval batches a bad example is masked out (mask 0) and reported the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import image_sources, images, randaugment

# Mixed into each example's generator seed so it never coincides with a shuffle stream.
_DECODE_TAG = 0x1A6E
ON_BAD_EXAMPLE = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How examples become model inputs. ``augment``: random-resized crop (area fraction in
    [``min_scale``, 1], aspect ratio in [1/``max_aspect``, ``max_aspect``]) + flip for training; otherwise
    training uses the eval transform (short side to ``size / eval_crop``, center ``size x size``).
    ``randaugment``: '' (off), 'N,M' or 'trivial' (see ``randaugment``), applied to train crops after either."""

    size: int = 224
    augment: bool = True
    min_scale: float = 0.08
    max_aspect: float = 4 / 3
    eval_crop: float = 0.875
    on_bad_example: str = "error"
    randaugment: str = ""

    def __post_init__(self):
        checks = [("data.image_size", self.size >= 1, ">= 1"),
                  ("data.crop_min_scale", 0 < self.min_scale <= 1, "in (0, 1]"),
                  ("data.crop_max_aspect", self.max_aspect >= 1, ">= 1"),
                  ("data.eval_crop", 0 < self.eval_crop <= 1, "in (0, 1]"),
                  ("data.on_bad_example", self.on_bad_example in ON_BAD_EXAMPLE, f"one of {ON_BAD_EXAMPLE}")]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"{key} must be {rule}, got {getattr(self, _FIELD[key])!r}")
        randaugment.parse(self.randaugment)  # a one-line error naming data.randaugment


_FIELD = {"data.image_size": "size", "data.crop_min_scale": "min_scale", "data.crop_max_aspect": "max_aspect",
          "data.eval_crop": "eval_crop", "data.on_bad_example": "on_bad_example"}


def _transform(data: bytes, name: str, opts: ImageOptions, rng_seed, train: bool) -> np.ndarray:
    if train and opts.augment:
        rng = np.random.default_rng(rng_seed)
        return images.train_transform(data, name, rng, size=opts.size, min_scale=opts.min_scale,
                                      max_aspect=opts.max_aspect)
    return images.eval_transform(data, name, size=opts.size, crop=opts.eval_crop)


class TrainBatches:
    """``self(step)``: this process's rows of the global batch of ``step``, as
    ``{"image": uint8 (b, S, S, 3), "label": int32 (b,), "skipped": tuple of reasons}``."""

    def __init__(self, source, order, *, seed: int, rows: tuple[int, int], opts: ImageOptions):
        self.source, self.order, self.seed, self.rows, self.opts = source, order, seed, rows, opts

    def __call__(self, step: int) -> dict:
        step = int(step)
        lo, hi = self.rows
        s = self.opts.size
        out = {"image": np.empty((hi - lo, s, s, 3), np.uint8), "label": np.empty(hi - lo, np.int32)}
        skipped = []
        for j, row in enumerate(range(lo, hi)):
            position = step * self.order.b + row  # in the endless stream of epochs
            for attempt in range(len(self.source)):
                index = self.order.at(position, attempt)
                try:
                    data, label, name = self.source[index]
                    image = _transform(data, name, self.opts, [self.seed, _DECODE_TAG, step, row], True)
                    out["image"][j] = self._augment(image, step, row)
                    out["label"][j] = label
                    break
                except (images.BadImageError, FileNotFoundError) as err:
                    if self.opts.on_bad_example == "error":
                        raise
                    skipped.append(str(err))
            else:
                raise ValueError(f"every example of the train split is bad (data.on_bad_example=skip): {skipped[0]}")
        out["skipped"] = tuple(skipped)
        return out

    def _augment(self, image: np.ndarray, step: int, row: int) -> np.ndarray:
        policy = randaugment.parse(self.opts.randaugment)
        return image if policy is None else policy(image, randaugment.example_rng(self.seed, step, row))


class EvalBatches:
    """``self(k)``: examples ``[k*B, (k+1)*B)`` of the split in order, padded to ``B`` rows (mask 0)."""

    def __init__(self, source, *, batch_size: int, opts: ImageOptions):
        self.source, self.batch_size, self.opts = source, batch_size, opts

    def __len__(self) -> int:
        return -(-len(self.source) // self.batch_size)

    def __call__(self, k: int) -> dict:
        b, s = self.batch_size, self.opts.size
        out = {"image": np.zeros((b, s, s, 3), np.uint8), "label": np.zeros(b, np.int32),
               "mask": np.zeros(b, np.float32)}
        skipped = []
        for j, index in enumerate(range(int(k) * b, min((int(k) + 1) * b, len(self.source)))):
            try:
                data, label, name = self.source[index]
                out["image"][j] = _transform(data, name, self.opts, None, False)
            except (images.BadImageError, FileNotFoundError) as err:
                if self.opts.on_bad_example == "error":
                    raise
                skipped.append(str(err))
                continue
            out["label"][j], out["mask"][j] = label, 1.0
        out["skipped"] = tuple(skipped)
        return out


def open_split(name: str, data_dir, split: str, opts: ImageOptions):
    """The split's source; an empty class folder is an error unless bad examples are skipped."""
    source = image_sources.open_split(name, data_dir, split)
    if source.empty_classes and opts.on_bad_example == "error":
        raise ValueError(f"class folder(s) {', '.join(source.empty_classes[:5])} of {split}/ under {data_dir} hold "
                         "no image (set data.on_bad_example=skip to train without them)")
    if len(source) == 0:
        raise ValueError(f"the {split} split under {data_dir} holds no image files (.jpg .jpeg .png .webp .bmp)")
    return source
