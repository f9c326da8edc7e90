"""Grain input pipelines: an infinite, resumable train iterator and ordered eval batches.

Design (why it looks like this):

* The GLOBAL batch of train step ``s`` is a pure function of ``(seed, s)``. The
  pipeline is a Grain ``MapDataset`` over step indices, so random access by step
  is what defines the data, and the iterator state is just the next step index
  (``{"next_index": s}``): a checkpoint can store it as JSON and a resumed run
  continues exactly where it left off, with any ``process_count``.
* Sample order: the train examples are read as an endless stream of epochs; each
  epoch is a permutation that depends only on ``(seed, epoch)``
  (``numpy.random.default_rng([seed, epoch]).permutation(N)``), and batch ``s`` is
  stream positions ``[s*B, (s+1)*B)``, so a batch may straddle two epochs and no
  example is ever dropped. This is the same contract as Grain's
  ``MapDataset.range(N).shuffle(seed).repeat().batch(B, drop_remainder=True)``,
  but computed per batch with numpy instead of per element in Python (Grain's
  element-wise path delivers ~300 batches/s of 128 indices; this one thousands).
* Per batch: ONE vectorised gather ``images[idx]`` + normalisation, no per-example
  Python work. Each process gathers only its own rows
  ``[process_index*b, (process_index+1)*b)`` with ``b = batch_size // process_count``;
  augmentation parameters are drawn for the whole global batch from
  ``default_rng([seed, tag, step])`` and then sliced, so concatenating the
  processes' batches gives exactly the ``process_count=1`` batch. RandAugment (cifar10/100, see
  ``randaugment``) is per example, from ``randaugment.example_rng(seed, step, global row)``, after the crop.
* One reader thread with a small prefetch buffer: the host is small and XLA
  needs the cores; Grain keeps the order deterministic.
"""

from __future__ import annotations

import sys
import threading

import grain
import numpy as np

from . import image_pipeline, randaugment as randaugment_lib, sources
from .sources import IMAGE_DATASETS

# Mixed into the augmentation RNG seed so it never coincides with a shuffle stream.
_AUGMENT_TAG = 0xA06
# CIFAR augmentation: pad each side by this many pixels, then take a random crop.
CROP_PADDING = 4


class _EpochOrder:
    """Global example indices of each train step; per-epoch permutations cached."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.n, self.b, self.seed = num_examples, batch_size, seed
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                if len(self._cache) >= 3:  # steps go forward: keep only the latest epochs
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return perm

    def __getstate__(self):  # Grain workers get their own lock and cache
        return {"n": self.n, "b": self.b, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["n"], state["b"], state["seed"])

    def at(self, position: int, attempt: int = 0) -> int:
        """The example at ``position`` of the endless stream; ``attempt`` k > 0: the k-th next one of the same
        epoch (the deterministic substitute for a bad example)."""
        epoch, offset = divmod(int(position), self.n)
        return int(self.permutation(epoch)[(offset + attempt) % self.n])

    def __call__(self, step: int) -> np.ndarray:
        epoch, offset = divmod(int(step) * self.b, self.n)
        first = self.permutation(epoch)[offset:offset + self.b]
        if len(first) == self.b:
            return first
        # batch_size <= N, so a batch spans at most two epochs.
        return np.concatenate([first, self.permutation(epoch + 1)[: self.b - len(first)]])


def _crop_flip(x: np.ndarray, oy: np.ndarray, ox: np.ndarray, flip: np.ndarray, pad: int, fill=0) -> np.ndarray:
    """Random crop from a ``fill``-padded batch + horizontal flip, as one fancy-index gather.

    Applied after normalisation, so zero padding = padding with the data set mean (uint8 batches that
    RandAugment takes next are padded with the mean rounded instead).
    """
    b, h, w, c = x.shape
    padded = np.empty((b, h + 2 * pad, w + 2 * pad, c), dtype=x.dtype)
    padded[...] = fill
    padded[:, pad:pad + h, pad:pad + w] = x
    rows = oy[:, None] + np.arange(h)
    cols = ox[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_processes(batch_size, process_index, process_count) -> tuple[int, int]:
    batch_size = _check_int(batch_size, "data.batch_size", 1)
    process_count = _check_int(process_count, "process_count", 1)
    process_index = _check_int(process_index, "process_index", 0)
    if process_index >= process_count:
        raise ValueError(f"process_index={process_index} must be < process_count={process_count}")
    if batch_size % process_count:
        raise ValueError(
            f"data.batch_size={batch_size} is not divisible by the number of processes ({process_count})"
        )
    local = batch_size // process_count
    return process_index * local, (process_index + 1) * local


def train_dataset(name: str, *, batch_size: int, seed: int, data_dir=None, augment: bool = False,
                  process_index: int = 0, process_count: int = 1, image_options=None, randaugment: str = "",
                  **synthetic_kw) -> grain.MapDataset:
    """The train pipeline as a Grain ``MapDataset``: element ``s`` is this process's part
    of the global batch of step ``s`` (random access; ``train_iterator`` iterates it)."""
    return grain.MapDataset.range(sys.maxsize).map(
        _train_loader(name, batch_size=batch_size, seed=seed, data_dir=data_dir, augment=augment,
                      process_index=process_index, process_count=process_count, image_options=image_options,
                      randaugment=randaugment, **synthetic_kw))


def _train_loader(name: str, *, batch_size: int, seed: int, data_dir, augment: bool, process_index: int,
                  process_count: int, image_options, randaugment: str = "", **synthetic_kw):
    """``load(step)`` -> this process's rows of the global batch of ``step``."""
    lo, hi = _check_processes(batch_size, process_index, process_count)
    seed = _check_int(seed, "seed", 0)
    policy = _randaugment_policy(name, randaugment)
    if name in IMAGE_DATASETS:
        opts = image_options or image_pipeline.ImageOptions(augment=augment, randaugment=randaugment)
        source = image_pipeline.open_split(name, data_dir, "train", opts)
        _check_batch_fits(name, batch_size, len(source))
        return image_pipeline.TrainBatches(source, _EpochOrder(len(source), batch_size, seed), seed=seed,
                                           rows=(lo, hi), opts=opts)
    ds_info = sources.info(name, data_dir, **synthetic_kw)
    images, labels = sources.split_arrays(name, "train", data_dir, **synthetic_kw)
    _check_batch_fits(name, batch_size, len(labels))
    order = _EpochOrder(len(labels), batch_size, seed)
    mean = np.asarray(ds_info.mean, dtype=np.float32)
    std = np.asarray(ds_info.std, dtype=np.float32)
    crop = augment and name in ("cifar10", "cifar100")
    pad = np.rint(mean).astype(np.uint8)  # the uint8 stand-in for the mean, where RandAugment needs uint8

    def normalize(x):
        image = x.astype(np.float32)
        image -= mean
        image /= std  # same arithmetic as sources.normalize, bit for bit
        return image

    def load(step):
        idx = order(step)[lo:hi]
        if policy is None:  # crop the normalised batch: zero padding is the mean exactly
            image = normalize(images[idx])
            if crop:
                image = _crop_flip(image, *_crop_draws(seed, step, batch_size, lo, hi), CROP_PADDING)
        else:  # RandAugment takes uint8 images after the crop and flip
            image = images[idx]
            if crop:
                image = _crop_flip(image, *_crop_draws(seed, step, batch_size, lo, hi), CROP_PADDING, fill=pad)
            rngs = [randaugment_lib.example_rng(seed, step, row) for row in range(lo, hi)]
            image = normalize(np.stack([policy(x, rng) for x, rng in zip(image, rngs)]))
        return {"image": image, "label": labels[idx]}

    return load


def _crop_draws(seed: int, step, batch_size: int, lo: int, hi: int) -> tuple:
    """(oy, ox, flip) of rows [lo, hi): drawn for the whole global batch of ``step``, then sliced."""
    rng = np.random.default_rng([seed, _AUGMENT_TAG, int(step)])
    span = 2 * CROP_PADDING + 1
    oy = rng.integers(0, span, size=batch_size)[lo:hi]
    ox = rng.integers(0, span, size=batch_size)[lo:hi]
    flip = (rng.random(batch_size) < 0.5)[lo:hi]
    return oy, ox, flip


def _randaugment_policy(name: str, spec: str):
    """``randaugment.parse(spec)``, refused on the data sets the registry does not list it for."""
    policy = randaugment_lib.parse(spec)
    if policy is not None and "randaugment" not in sources.DATASETS[name].options:
        users = ", ".join(n for n, s in sources.DATASETS.items() if "randaugment" in s.options)
        raise ValueError(f"data.randaugment={spec!r} has no effect on data set {name!r}: RandAugment works on "
                         f"colour uint8 images ({users})")
    return policy


def _check_batch_fits(name: str, batch_size: int, n: int) -> None:
    if batch_size > n:
        raise ValueError(f"data.batch_size={batch_size} is larger than the {name!r} train split ({n} examples)")


class StepIterator:
    """Iterates ``load(s)`` for s = next_index, next_index + 1, ...: Grain with one reader thread, or ``workers``
    processes each holding ``prefetch`` ready elements (element s is computed by worker s mod workers, and
    comes out in order). Its state is ``{"next_index": s}`` (JSON, the same as Grain's own for a MapDataset):
    ``set_state`` starts a fresh Grain pipeline at that index, so a run may resume with another worker count."""

    def __init__(self, load, *, workers: int = 0, prefetch: int = 4, start: int = 0, stop: int = sys.maxsize):
        self._load, self._stop = load, stop
        self._workers = _check_int(workers, "data.workers", 0)
        self._prefetch = _check_int(prefetch, "data.prefetch", 1)
        self._next, self._it = int(start), None

    def _open(self):
        ds = grain.MapDataset.range(self._next, self._stop).map(self._load)
        if not self._workers:
            return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self._prefetch)))
        _absl_flags_parsed()
        mp = grain.MultiprocessingOptions(num_workers=self._workers, per_worker_buffer_size=self._prefetch)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).mp_prefetch(mp))

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._open()
        try:
            element = next(self._it)
        except StopIteration:  # an eval pass is over: stop its workers and free their shared memory now
            self.close()
            raise
        self._next += 1
        if self._workers:  # out of Grain's shared memory, which is then released at once
            element = {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in element.items()}
        return element

    def get_state(self) -> dict:
        return {"next_index": self._next}

    def set_state(self, state: dict) -> None:
        self.close()
        self._next = int(state["next_index"])

    def close(self) -> None:
        """Stops the worker processes (also done when the iterator is garbage collected)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app they are never parsed (an error)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_iterator(name: str, *, batch_size: int, seed: int, data_dir=None, augment: bool = False,
                   process_index: int = 0, process_count: int = 1, image_options=None, workers: int = 0,
                   prefetch: int = 4, randaugment: str = "", **synthetic_kw) -> StepIterator:
    """Infinite iterator of this process's part of each global batch, ``b = batch_size // process_count`` rows:
    ``{"image": float32 (b, H, W, C) normalised, "label": int32 (b,)}`` for the array data sets,
    ``{"image": uint8 (b, S, S, 3), "label", "skipped"}`` for ``folder``/``arrayrecord`` (normalised on the
    device: 4x fewer bytes to send; ``image_options`` says how examples are cut, see ``image_pipeline``).

    ``get_state()`` returns a JSON-serialisable dict and ``set_state(state)`` resumes exactly. ``augment=True``
    (random 4-pixel crop, padded with the mean, + horizontal flip) applies to ``cifar10`` and ``cifar100``; for
    digits, MNIST and synthetic data it is ignored (small grey digits are not flip-invariant, and synthetic data
    is for throughput). ``workers``: decoding processes (image data sets; 0 = one thread of this process).
    ``randaugment``: '' (off), 'N,M' (RandAugment) or 'trivial' (TrivialAugmentWide), on the uint8 images after
    the crop and flip (see ``randaugment``): cifar10/cifar100, and image data sets when ``image_options`` is
    None (otherwise its ``randaugment`` applies); an error on the grayscale and synthetic sets.
    """
    load = _train_loader(name, batch_size=batch_size, seed=seed, data_dir=data_dir, augment=augment,
                         process_index=process_index, process_count=process_count, image_options=image_options,
                         randaugment=randaugment, **synthetic_kw)
    return StepIterator(load, workers=workers if name in IMAGE_DATASETS else 0, prefetch=prefetch)


def eval_batches(name: str, split: str, *, batch_size: int, data_dir=None, image_options=None, workers: int = 0,
                 prefetch: int = 4, randaugment: str = "", **synthetic_kw):
    """One ordered pass over ``split``: ``{"image", "label", "mask"}`` batches, never augmented (``randaugment``
    is accepted, unused, so a caller can pass the train pipeline's loader arguments).

    Every batch has exactly ``batch_size`` rows so a jitted eval step compiles once:
    the last batch is padded with zero images / label 0 and ``mask`` 0 (1 for real rows).
    Arguments are checked now; the data is produced lazily. Image data sets give uint8 images and
    a ``"skipped"`` entry (see ``image_pipeline``), decoded by ``workers`` processes.
    """
    batch_size = _check_int(batch_size, "data.eval_batch_size", 1)
    if name in IMAGE_DATASETS:
        opts = image_options or image_pipeline.ImageOptions()
        sources._check_split(split)
        load = image_pipeline.EvalBatches(image_pipeline.open_split(name, data_dir, split, opts),
                                          batch_size=batch_size, opts=opts)
        return StepIterator(load, workers=workers, prefetch=prefetch, stop=len(load))
    ds_info = sources.info(name, data_dir, **synthetic_kw)
    images, labels = sources.split_arrays(name, split, data_dir, **synthetic_kw)

    def generate():
        for start in range(0, len(labels), batch_size):
            stop = min(start + batch_size, len(labels))
            real = stop - start
            image = sources.normalize(images[start:stop], ds_info)
            label = labels[start:stop]
            mask = np.ones(batch_size, dtype=np.float32)
            if real < batch_size:
                image = np.concatenate([image, np.zeros((batch_size - real, *image.shape[1:]), np.float32)])
                label = np.concatenate([label, np.zeros(batch_size - real, np.int32)])
                mask[real:] = 0.0
            yield {"image": image, "label": np.asarray(label, np.int32).copy(), "mask": mask}

    return generate()
