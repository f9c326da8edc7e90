"""Raw data set loaders: digits, IDX (MNIST / Fashion-MNIST), CIFAR-10/100 binary, synthetic.

Everything here returns plain numpy arrays in the data set's native pixel scale
(digits 0..16, MNIST/CIFAR uint8 0..255, synthetic float32 N(0, 1)) so that the
same numbers a user feeds to ``predict`` are the ones the model was trained on
after :func:`normalize`.

File formats are parsed with numpy only (no pickle, no extra packages) and
validated strictly: a truncated, corrupt or mismatched file raises one clear
error naming the file and the expected format; partial data is never returned.

Splits are fixed and independent of any user seed, so a val/test score always
refers to the same examples:

* digits: ``default_rng(0)`` permutation of the 1,797 examples; test = first
  360, val = next 180, train = remaining 1,257. mean/std are computed from the
  train split (deterministic, so they never change between runs).
* mnist / fashion_mnist / cifar10 / cifar100: val = the LAST 5,000 examples of the train
  files, train = the rest, test = the official test file(s).
* synthetic: one fixed ``default_rng(0)`` draw; train, val and test are the SAME
  examples (it exists to measure throughput, not generalisation).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import math
import os
import zlib
from pathlib import Path

import numpy as np

from . import image_sources

SPLITS = ("train", "val", "test")
# Held-out validation examples taken from the end of the train files (IDX, CIFAR).
VAL_SIZE = 5000

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim
# Standard normalisation constants, in raw pixel units (0..255).
_IDX_STATS = {
    "mnist": ((0.1307 * 255,), (0.3081 * 255,)),
    "fashion_mnist": ((0.2860 * 255,), (0.3530 * 255,)),
}

_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch.bin"
_CIFAR_SUBDIR = "cifar-10-batches-bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_MEAN = (125.3, 123.0, 113.9)
_CIFAR_STD = (63.0, 62.1, 66.7)
_NUM_CLASSES = 10
# CIFAR-100 binary version: train.bin / test.bin, records of coarse label, fine label, 3x32x32 pixels.
_CIFAR100_TRAIN_FILE, _CIFAR100_TEST_FILE = "train.bin", "test.bin"
_CIFAR100_SUBDIR = "cifar-100-binary"
_CIFAR100_MEAN = (129.3, 124.1, 112.4)  # 255 x (0.5071, 0.4865, 0.4409), the usual train-set statistics
_CIFAR100_STD = (68.2, 65.4, 70.4)  # 255 x (0.2673, 0.2564, 0.2762)

_SYNTHETIC_DEFAULTS = {"image_size": 32, "channels": 3, "num_classes": 10, "num_examples": 1024}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What is known of a data set before reading it: the registry entry behind ``DATASETS``.

    ``image_shape``/``num_classes``: its usual (H, W, C) and class count (None for ``synthetic``, whose
    options set them). ``files``: what ``data.dir`` must hold ("" when the set needs no files).
    ``options``: the ``data.*`` config keys, beyond name, dir and the batch sizes, that act on this set;
    a config setting any other of them away from its default is refused (it would do nothing).
    """

    image_shape: tuple | None
    num_classes: int | None
    files: str = ""
    options: tuple = ()


_IMAGE_OPTIONS = ("augment", "image_size", "workers", "prefetch", "crop_min_scale", "crop_max_aspect", "eval_crop",
                  "on_bad_example", "randaugment")
# randaugment (see randaugment.py) is for colour uint8 images: not digits (0..16 floats), MNIST and
# Fashion-MNIST (grayscale 28x28: torchvision's op table is tuned on colour photos) or synthetic (float noise).
# The data set registry: config.py takes the allowed ``data.name`` values and per-set options from here.
DATASETS = {
    "digits": DatasetSpec((8, 8, 1), 10),
    "mnist": DatasetSpec((28, 28, 1), 10, files="the MNIST IDX files"),
    "fashion_mnist": DatasetSpec((28, 28, 1), 10, files="the Fashion-MNIST IDX files"),
    "cifar10": DatasetSpec((32, 32, 3), 10, files="the CIFAR-10 binary batches", options=("augment", "randaugment")),
    "cifar100": DatasetSpec((32, 32, 3), 100, files="the CIFAR-100 binary files",
                            options=("augment", "randaugment")),
    "synthetic": DatasetSpec(None, None, options=("image_size", "channels", "num_examples")),
    # Encoded images, decoded per batch (see image_sources / image_pipeline): any size and class count.
    "folder": DatasetSpec(None, None, files="an image folder (train/<class>/..., val/<class>/...)",
                          options=_IMAGE_OPTIONS),
    "arrayrecord": DatasetSpec(None, None, files="a data set written by `fastgpu-jax convert` (manifest.json + "
                                                 "ArrayRecord shards)", options=_IMAGE_OPTIONS),
    "tfds": DatasetSpec(None, None, files="a TFDS data set prepared as array_record (dataset_info.json + shards)",
                        options=_IMAGE_OPTIONS),
}
DATASET_NAMES = tuple(DATASETS)
# Data sets of encoded image files: streamed, decoded on the host, sent to the device as uint8.
IMAGE_DATASETS = ("folder", "arrayrecord", "tfds")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a data set, needed to build a model and to normalise inputs.

    ``mean``/``std`` are per channel in RAW pixel units, so ``normalize`` can be
    applied to exactly what a user passes to ``predict``.
    """

    name: str
    image_shape: tuple  # (H, W, C)
    num_classes: int
    split_sizes: dict  # {"train": n, "val": n, "test": n}
    mean: tuple
    std: tuple
    classes: tuple = ()  # class names by label, where the data set has them (folder, arrayrecord, tfds)


# --------------------------------------------------------------------------- helpers


def _check_name(name: str) -> str:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASET_NAMES)}")
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _synthetic_options(kw: dict) -> tuple:
    """Validate synthetic kwargs; they are accepted (and ignored) for every data set
    so a caller can always pass its config values through."""
    unknown = sorted(set(kw) - set(_SYNTHETIC_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {unknown}; synthetic options are "
            f"{sorted(_SYNTHETIC_DEFAULTS)}"
        )
    opts = {**_SYNTHETIC_DEFAULTS, **{k: v for k, v in kw.items() if v is not None}}
    for key, value in opts.items():
        if int(value) != value or int(value) <= 0:
            raise ValueError(f"synthetic option {key} must be a positive integer, got {value!r}")
    return tuple(int(opts[k]) for k in ("image_size", "channels", "num_classes", "num_examples"))


def _resolve_dir(name: str, data_dir, expected: str) -> Path:
    if data_dir is None or str(data_dir) == "":
        raise ValueError(
            f"data.dir must point to a directory containing {expected} for data set {name!r} (got None)"
        )
    path = Path(os.path.expanduser(str(data_dir)))
    if not path.is_dir():
        raise FileNotFoundError(
            f"data.dir {str(path)!r} is not a directory; it must contain {expected} for data set {name!r}"
        )
    return path


def _readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _signature(paths) -> tuple:
    """Cache key: a file that changes on disk is read again."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


# --------------------------------------------------------------------------- digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8), labels) as ``sklearn.datasets.load_digits`` returns them, read from the CSV file
    scikit-learn ships without importing scikit-learn: that import (scipy.stats included) was ~2 s of every
    ``eval`` and ``predict``. Falls back to ``load_digits`` if the file is not where it has always been."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        raw = np.loadtxt(path, delimiter=",")
        return raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@functools.lru_cache(maxsize=1)
def _digits_splits() -> dict:
    images, labels = _digits_arrays()
    images = np.asarray(images, dtype=np.float32)[..., None]  # (1797, 8, 8, 1), 0..16
    labels = np.asarray(labels, dtype=np.int32)
    perm = np.random.default_rng(0).permutation(len(labels))
    parts = {"test": perm[:360], "val": perm[360:540], "train": perm[540:]}
    return {k: _readonly(np.ascontiguousarray(images[idx]), labels[idx].copy()) for k, idx in parts.items()}


# --------------------------------------------------------------------------- IDX


def _find_idx(directory: Path, base: str) -> Path:
    for candidate in (directory / base, directory / (base + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"missing IDX file {str(directory / base)!r} (also looked for {base}.gz); "
        "expected the MNIST-style IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (plain or .gz)"
    )


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{str(path)!r} is not a valid gzip file ({e}); expected a gzip-compressed IDX file") from None


def read_idx(path, *, magic: int) -> np.ndarray:
    """Parse one IDX file (plain or .gz) into a uint8 array with the header's dims.

    Header: 4-byte big-endian magic (0x00000803 images, 0x00000801 labels), one
    big-endian uint32 per dimension, then the raw uint8 data, which must fill the
    file exactly.
    """
    path = Path(path)
    buf = _read_bytes(path)
    what = "images (magic 0x00000803, 3 dims)" if magic == _IDX_IMAGES_MAGIC else "labels (magic 0x00000801, 1 dim)"
    if len(buf) < 4:
        raise ValueError(f"{str(path)!r} is too short ({len(buf)} bytes) to be an IDX {what} file")
    got = int.from_bytes(buf[:4], "big")
    if got != magic:
        raise ValueError(f"{str(path)!r} has magic 0x{got:08x}; expected an IDX {what} file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{str(path)!r} is truncated: {len(buf)} bytes, header alone needs {header} (IDX {what})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)  # Python ints: a forged header cannot overflow
    if len(buf) != expected:
        state = "truncated" if len(buf) < expected else "longer than its header says"
        raise ValueError(
            f"{str(path)!r} is {state}: header dims {dims} need {expected} bytes, file has {len(buf)} (IDX {what})"
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims)


def _idx_labels(path: Path) -> np.ndarray:
    labels = read_idx(path, magic=_IDX_LABELS_MAGIC)
    if labels.size and labels.max() >= _NUM_CLASSES:
        raise ValueError(
            f"{str(path)!r} has label {int(labels.max())} out of range 0..{_NUM_CLASSES - 1} (IDX labels file)"
        )
    return labels.astype(np.int32)


@functools.lru_cache(maxsize=2)
def _idx_splits_cached(name: str, directory: str, signature: tuple) -> dict:
    del signature  # only part of the cache key
    d = Path(directory)
    paths = {k: _find_idx(d, base) for k, base in _IDX_FILES.items()}
    arrays = {}
    for prefix in ("train", "test"):
        img_path, lab_path = paths[f"{prefix}_images"], paths[f"{prefix}_labels"]
        images = read_idx(img_path, magic=_IDX_IMAGES_MAGIC)
        labels = _idx_labels(lab_path)
        if len(images) != len(labels):
            raise ValueError(
                f"{str(img_path)!r} holds {len(images)} images but {str(lab_path)!r} holds {len(labels)} labels; "
                "IDX image and label files must have the same count"
            )
        arrays[prefix] = (images[..., None], labels)  # (N, H, W, 1)
    if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
        raise ValueError(
            f"{str(paths['test_images'])!r} has images of shape {arrays['test'][0].shape[1:3]} but "
            f"{str(paths['train_images'])!r} has {arrays['train'][0].shape[1:3]}; both must match"
        )
    return _split_train_val(arrays["train"], arrays["test"], paths["train_images"])


def _split_train_val(train, test, train_file: Path) -> dict:
    images, labels = train
    n = len(labels)
    if n <= VAL_SIZE:
        raise ValueError(
            f"{str(train_file)!r} holds {n} train examples; need more than {VAL_SIZE} "
            f"(the last {VAL_SIZE} are held out as the val split)"
        )
    cut = n - VAL_SIZE
    return {
        "train": _readonly(images[:cut], labels[:cut]),
        "val": _readonly(images[cut:], labels[cut:]),
        "test": _readonly(*test),
    }


def _idx_paths(name: str, data_dir) -> tuple:
    expected = ", ".join(f"{b}[.gz]" for b in _IDX_FILES.values()) + " (IDX format)"
    d = _resolve_dir(name, data_dir, expected)
    return d, [_find_idx(d, base) for base in _IDX_FILES.values()]


def _idx_splits(name: str, data_dir) -> dict:
    d, paths = _idx_paths(name, data_dir)
    return _idx_splits_cached(name, str(d), _signature(paths))


# --------------------------------------------------------------------------- CIFAR-10


def read_cifar_bin(path, *, fine: bool | None = None) -> tuple:
    """Parse one CIFAR binary file, returned as HWC uint8 + int32 labels. CIFAR-10 records are 1 label byte +
    3072 pixel bytes (R, G, B planes of 32x32, channel-major); ``fine=True`` reads CIFAR-100 records (coarse
    label byte, fine label byte, pixels) and returns the 100 fine labels."""
    path = Path(path)
    label_bytes, classes, what = (2, 100, "CIFAR-100") if fine else (1, _NUM_CLASSES, "CIFAR-10")
    record = label_bytes + 3 * 32 * 32
    buf = path.read_bytes()
    if len(buf) == 0 or len(buf) % record:
        raise ValueError(
            f"{str(path)!r} has {len(buf)} bytes, not a positive multiple of {record}; expected {what} binary "
            f"records ({label_bytes} label byte{'s' if label_bytes > 1 else ''} + 3x32x32 pixel bytes)"
        )
    rec = np.frombuffer(buf, dtype=np.uint8).reshape(-1, record)
    labels = rec[:, label_bytes - 1].astype(np.int32)
    if labels.max() >= classes:
        bad = int(np.argmax(labels >= classes))
        raise ValueError(
            f"{str(path)!r} record {bad} has label byte {int(labels[bad])}, out of range 0..{classes - 1} "
            f"({what} binary format)"
        )
    images = np.ascontiguousarray(rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _cifar_dir(data_dir) -> Path:
    expected = ", ".join(_CIFAR_TRAIN_FILES + (_CIFAR_TEST_FILE,)) + " (CIFAR-10 binary version)"
    d = _resolve_dir("cifar10", data_dir, expected + f" (directly or in {_CIFAR_SUBDIR}/)")
    if not (d / _CIFAR_TRAIN_FILES[0]).is_file() and (d / _CIFAR_SUBDIR).is_dir():
        d = d / _CIFAR_SUBDIR
    for f in _CIFAR_TRAIN_FILES + (_CIFAR_TEST_FILE,):
        if not (d / f).is_file():
            raise FileNotFoundError(
                f"missing CIFAR-10 file {str(d / f)!r}; expected {expected} in data.dir or data.dir/{_CIFAR_SUBDIR}"
            )
    return d


@functools.lru_cache(maxsize=1)
def _cifar_splits_cached(directory: str, signature: tuple) -> dict:
    del signature
    d = Path(directory)
    parts = [read_cifar_bin(d / f) for f in _CIFAR_TRAIN_FILES]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return _split_train_val(train, read_cifar_bin(d / _CIFAR_TEST_FILE), d / _CIFAR_TRAIN_FILES[-1])


def _cifar_splits(data_dir) -> dict:
    d = _cifar_dir(data_dir)
    files = [d / f for f in _CIFAR_TRAIN_FILES + (_CIFAR_TEST_FILE,)]
    return _cifar_splits_cached(str(d), _signature(files))


def _cifar100_dir(data_dir) -> Path:
    expected = f"{_CIFAR100_TRAIN_FILE}, {_CIFAR100_TEST_FILE} (CIFAR-100 binary version)"
    d = _resolve_dir("cifar100", data_dir, expected + f" (directly or in {_CIFAR100_SUBDIR}/)")
    if not (d / _CIFAR100_TRAIN_FILE).is_file() and (d / _CIFAR100_SUBDIR).is_dir():
        d = d / _CIFAR100_SUBDIR
    for f in (_CIFAR100_TRAIN_FILE, _CIFAR100_TEST_FILE):
        if not (d / f).is_file():
            raise FileNotFoundError(f"missing CIFAR-100 file {str(d / f)!r}; expected {expected} in data.dir or "
                                    f"data.dir/{_CIFAR100_SUBDIR}")
    return d


@functools.lru_cache(maxsize=1)
def _cifar100_splits_cached(directory: str, signature: tuple) -> dict:
    del signature
    d = Path(directory)
    train = read_cifar_bin(d / _CIFAR100_TRAIN_FILE, fine=True)
    return _split_train_val(train, read_cifar_bin(d / _CIFAR100_TEST_FILE, fine=True), d / _CIFAR100_TRAIN_FILE)


def _cifar100_splits(data_dir) -> dict:
    d = _cifar100_dir(data_dir)
    return _cifar100_splits_cached(str(d), _signature([d / _CIFAR100_TRAIN_FILE, d / _CIFAR100_TEST_FILE]))


# --------------------------------------------------------------------------- synthetic


@functools.lru_cache(maxsize=2)
def _synthetic_arrays(image_size: int, channels: int, num_classes: int, num_examples: int) -> tuple:
    rng = np.random.default_rng(0)  # fixed: every call sees the same examples
    images = rng.standard_normal((num_examples, image_size, image_size, channels), dtype=np.float32)
    labels = rng.integers(0, num_classes, size=num_examples, dtype=np.int32)
    return _readonly(images, labels)


# --------------------------------------------------------------------------- public


def _splits(name: str, data_dir, synthetic_kw: dict) -> dict:
    """All three splits as read-only arrays (cached; shared with the pipelines)."""
    _check_name(name)
    opts = _synthetic_options(synthetic_kw)
    if name == "digits":
        return _digits_splits()
    if name in ("mnist", "fashion_mnist"):
        return _idx_splits(name, data_dir)
    if name == "cifar10":
        return _cifar_splits(data_dir)
    if name == "cifar100":
        return _cifar100_splits(data_dir)
    if name in IMAGE_DATASETS:
        raise ValueError(f"data set {name!r} streams encoded images; read it with data.train_iterator / eval_batches")
    arrays = _synthetic_arrays(*opts)
    return {s: arrays for s in SPLITS}


def files_missing(name: str, data_dir=None) -> str:
    """Why the files of data set ``name`` cannot be found (one line), or "" when they are all there or the
    set needs none. Only presence is checked: a present but corrupt file is for ``info``/``load_split`` to
    report. Lets a caller that needs only the shapes (a speed benchmark) tell "absent" from "broken"."""
    _check_name(name)
    if not DATASETS[name].files:
        return ""
    try:
        if name in IMAGE_DATASETS:
            image_sources.classes_and_stats(name, data_dir)
        elif name == "cifar10":
            _cifar_dir(data_dir)
        elif name == "cifar100":
            _cifar100_dir(data_dir)
        else:
            _idx_paths(name, data_dir)
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    return ""


def split_arrays(name: str, split: str, data_dir=None, **synthetic_kw) -> tuple:
    """Read-only (images, labels) of a split without copying: for the pipelines."""
    _check_split(split)
    return _splits(name, data_dir, synthetic_kw)[split]


def load_split(name: str, split: str, data_dir=None, **synthetic_kw) -> tuple:
    """Raw ``(images (N, H, W, C), labels int32 (N,))`` of one split, in native pixel scale.

    Returns writable copies, so callers may modify them without corrupting the
    cache the pipelines share.
    """
    images, labels = split_arrays(name, split, data_dir, **synthetic_kw)
    return images.copy(), labels.copy()


def info(name: str, data_dir=None, *, image_size: int = 32, channels: int = 3, num_classes: int = 10,
         num_examples: int = 1024) -> DatasetInfo:
    """Static facts of data set ``name``. File-backed sets read (and validate) their files.

    ``image_size``, ``channels``, ``num_classes`` and ``num_examples`` only apply to
    ``synthetic`` and are ignored otherwise.
    """
    kw = dict(image_size=image_size, channels=channels, num_classes=num_classes, num_examples=num_examples)
    if name in IMAGE_DATASETS:
        classes, mean, std = image_sources.classes_and_stats(name, data_dir)
        return DatasetInfo(name=name, image_shape=(int(image_size), int(image_size), 3), num_classes=len(classes),
                           split_sizes=image_sources.split_sizes(name, data_dir), mean=tuple(map(float, mean)),
                           std=tuple(map(float, std)), classes=tuple(classes))
    splits = _splits(name, data_dir, kw)
    sizes = {s: int(len(splits[s][1])) for s in SPLITS}
    shape = tuple(int(d) for d in splits["train"][0].shape[1:])
    if name == "digits":
        train = splits["train"][0].astype(np.float64)
        mean, std = (float(train.mean()),), (float(train.std()),)
        n_cls = _NUM_CLASSES
    elif name in _IDX_STATS:
        mean, std = _IDX_STATS[name]
        n_cls = _NUM_CLASSES
    elif name == "cifar10":
        mean, std = _CIFAR_MEAN, _CIFAR_STD
        n_cls = _NUM_CLASSES
    elif name == "cifar100":
        mean, std = _CIFAR100_MEAN, _CIFAR100_STD
        n_cls = 100
    else:
        c = shape[-1]
        mean, std = (0.0,) * c, (1.0,) * c
        n_cls = _synthetic_options(kw)[2]
    return DatasetInfo(name=name, image_shape=shape, num_classes=n_cls, split_sizes=sizes,
                       mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def info_to_json(info: DatasetInfo) -> dict:
    """The facts a trained model needs from its data set, and its split sizes (a resume checks them), as JSON."""
    return {"name": info.name, "image_shape": list(info.image_shape), "num_classes": info.num_classes,
            "mean": list(info.mean), "std": list(info.std), "classes": list(info.classes),
            "split_sizes": {k: int(v) for k, v in info.split_sizes.items()}}


def info_from_json(d: dict) -> DatasetInfo:
    return DatasetInfo(name=d["name"], image_shape=tuple(d["image_shape"]), num_classes=int(d["num_classes"]),
                       split_sizes=dict(d.get("split_sizes", {})), mean=tuple(d["mean"]), std=tuple(d["std"]),
                       classes=tuple(d.get("classes", ())))


def normalize(images, info: DatasetInfo) -> np.ndarray:
    """``(raw - mean) / std`` per channel as float32.

    Accepts ``(N, H, W, C)``, or ``(N, H, W)`` when C == 1 (the channel axis is
    added), so ``predict`` can take raw pixels in the data set's native scale.
    """
    x = np.asarray(images)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
        raise ValueError(f"images for data set {info.name!r} must be real numbers (an integer or float array); "
                         f"got dtype {x.dtype}")
    h, w, c = info.image_shape
    if x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (h, w, c):
        alt = f" or (N, {h}, {w})" if c == 1 else ""
        raise ValueError(
            f"images for data set {info.name!r} must have shape (N, {h}, {w}, {c}){alt}; got {tuple(x.shape)}"
        )
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(f"images for data set {info.name!r} hold {bad} NaN or infinite value(s); "
                         "a prediction for them would be meaningless")
    mean = np.asarray(info.mean, dtype=np.float32)
    std = np.asarray(info.std, dtype=np.float32)
    return (x.astype(np.float32) - mean) / std
