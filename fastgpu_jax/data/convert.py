"""``fastgpu-jax convert``: an image folder, a Hugging Face image set on disk, CIFAR-10 or MNIST as ArrayRecord
shards plus a manifest.

The output is what :class:`fastgpu_jax.data.image_sources.ArrayRecordSplit` reads (``data.name='arrayrecord'``):

* ``<split>-NNNNN-of-MMMMM.array_record`` shards of at most ``shard_size`` records each, written with
  ``group_size:1`` so that every record can be read on its own (random access). A record is
  :func:`~fastgpu_jax.data.image_sources.pack_record` (label, name, encoded image bytes), in the source's order.
* ``manifest.json``, written last and atomically (a temporary file renamed over): its presence means every shard
  is complete. It holds the classes, per-split counts, each shard's size and SHA-256, the train mean/std and how
  the set was made.

Folders: every split among train/val/test that exists (splits without images are left out; train must have
some). Without ``resize_short`` each file's bytes are stored verbatim, so the converted set decodes to exactly the
folder's pixels; every image is still decoded once (at reduced size for JPEGs) so that a file the trainer could not
read stops the conversion here rather than mid-training. Hugging Face sets (``hf``: ``save_to_disk`` folders or
parquet files, see :mod:`.hf_source`) are handled like folders: the encoded bytes of each image cell are stored.
CIFAR-10 and MNIST arrays are stored as lossless PNGs
(MNIST as 8-bit grayscale; readers convert to RGB).
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import hf_source, image_sources, images, sources

KINDS = ("folder", "hf", "cifar10", "mnist")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_CLASSES = tuple(str(d) for d in range(10))
SPLITS = ("train", "val", "test")
STATS_EXAMPLES = 10_000  # train examples the mean/std are computed over (evenly spaced; all when fewer)
SHARD_SUFFIX = ".array_record"
_WRITER_OPTIONS = "group_size:1"


# --------------------------------------------------------------------------- checks


def _check_arguments(kind, input_dir, output_dir, resize_short, quality, shard_size, overwrite) -> tuple[Path, Path]:
    if kind not in KINDS:
        raise ValueError(f"convert: unknown source kind {kind!r}; expected one of {', '.join(KINDS)}")
    if resize_short is not None:
        if kind not in ("folder", "hf"):
            raise ValueError(f"convert: resize_short applies to image folders and hf sets only (got kind {kind!r})")
        if isinstance(resize_short, bool) or not isinstance(resize_short, int) or resize_short <= 0:
            raise ValueError(f"convert: resize_short must be a positive integer number of pixels "
                             f"(got {resize_short!r})")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"convert: quality must be an integer JPEG quality in 1..100 (got {quality!r})")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"convert: shard_size must be a positive integer number of records (got {shard_size!r})")
    if input_dir is None or str(input_dir) == "":
        raise ValueError("convert: an input folder is required")
    src = Path(os.path.expanduser(str(input_dir)))
    if not src.is_dir():
        what = {"folder": "an image folder with train/<class>/ subfolders",
                "hf": "a Hugging Face save_to_disk folder or parquet files"}.get(kind, f"the {kind} files")
        raise FileNotFoundError(f"convert: input {str(src)!r} is not a directory; expected {what}")
    if output_dir is None or str(output_dir) == "":
        raise ValueError("convert: an output folder is required")
    out = Path(os.path.expanduser(str(output_dir)))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"convert: output {str(out)!r} exists and is not a directory; expected a new or "
                              "empty folder for the shards and manifest.json")
    existing = _existing_outputs(out)
    if existing and not overwrite:
        raise FileExistsError(f"convert: output {str(out)!r} already holds a data set ({existing[0]}"
                              f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''}); choose a new "
                              "folder or pass overwrite=True (--overwrite) to replace it")
    return src, out


def _existing_outputs(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return sorted(e.name for e in os.scandir(out) if e.name == image_sources.MANIFEST or e.name.endswith(SHARD_SUFFIX))


def _remove_outputs(out: Path) -> None:
    """The manifest first (a half-removed set is never taken for a complete one), then the shards."""
    for name in sorted(_existing_outputs(out), key=lambda n: n != image_sources.MANIFEST):
        os.remove(out / name)


# --------------------------------------------------------------------------- encoding


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(im, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _resized(data: bytes, name: str, short: int, quality: int) -> bytes:
    """``data`` with its short side brought down to ``short`` (Lanczos), as a JPEG; smaller images are not
    enlarged, and a JPEG that needs no resizing is kept as it is (no second lossy encoding)."""
    from PIL import Image

    header = w, h, kind = images.probe(data, name)
    if min(w, h) <= short:
        if kind != "other":
            images.decode(data, name, min_size=(1, 1), header=header)  # a corrupt file stops the conversion
            return data
        return _jpeg(images.decode(data, name, header=header)[0], quality)
    scale = short / min(w, h)
    size = (short, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short)
    # JPEG: the reduced-DCT decode, still at least `size`
    im, _ = images.decode(data, name, min_size=size, header=header)
    return _jpeg(im.resize(size, Image.LANCZOS), quality)


def _pixel_sums(pixels: np.ndarray) -> np.ndarray:
    """(3, 3) int64: per RGB channel the sum, the sum of squares and the pixel count (exact, order-free)."""
    if pixels.ndim == 2 or pixels.shape[-1] == 1:
        pixels = np.repeat(pixels.reshape(*pixels.shape[:2], 1), 3, axis=-1)
    flat = pixels.reshape(-1, 3).astype(np.int64)
    return np.stack([flat.sum(0), (flat * flat).sum(0), np.full(3, len(flat), np.int64)])


def _stats_indices(n: int) -> set:
    k = min(n, STATS_EXAMPLES)
    return set((np.arange(k, dtype=np.int64) * n // k).tolist())


def _mean_std(sums: np.ndarray) -> tuple[list, list]:
    total, squares, count = (sums[i].astype(np.float64) for i in range(3))
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return [float(m) for m in mean], [float(s) for s in std]


def _ordered(fn, n: int, workers: int):
    """``fn(0), fn(1), ...`` in order, computed by ``workers`` threads (Pillow releases the GIL while it decodes,
    resizes and encodes), at most a few hundred ahead of the consumer."""
    if workers <= 1:
        yield from (fn(i) for i in range(n))
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="convert")
    pending = collections.deque()
    try:
        for i in range(n):
            pending.append(pool.submit(fn, i))
            if len(pending) >= 32 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _folder_item(split: image_sources.FolderSplit, resize_short, quality: int, stats_at: set):
    def item(i: int):
        data, label, path = split[i]
        name = split.name(i).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        stored = data if resize_short is None else _resized(data, path, resize_short, quality)
        sums = None
        if i in stats_at:
            sums = _pixel_sums(np.asarray(images.decode(stored, path)[0]))
        elif resize_short is None:
            images.decode(stored, path, min_size=(1, 1))  # a file the trainer cannot read stops us here
        return label, name, stored, sums

    return item


def _array_item(pixels: np.ndarray, labels: np.ndarray, split: str, stats_at: set):
    def item(i: int):
        sums = _pixel_sums(pixels[i]) if i in stats_at else None  # PNG is lossless: stored == these pixels
        return int(labels[i]), f"{split}/{i:06d}.png", _png(pixels[i]), sums

    return item


# --------------------------------------------------------------------------- writing


def _write_split(out: Path, split: str, count: int, items, shard_size: int, progress: bool, written: list) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    n_shards = math.ceil(count / shard_size)
    shards, sums = [], np.zeros((3, 3), np.int64)
    bar = tqdm(total=count, desc=f"convert {split}", unit="img", disable=None if progress else True,
               dynamic_ncols=True)
    try:
        for s in range(n_shards):
            name = f"{split}-{s:05d}-of-{n_shards:05d}{SHARD_SUFFIX}"
            path = out / name
            k = min(shard_size, count - s * shard_size)
            written.append(path)
            writer = ArrayRecordWriter(str(path), _WRITER_OPTIONS)
            try:
                for _ in range(k):
                    label, record_name, data, item_sums = next(items)
                    writer.write(image_sources.pack_record(label, record_name, data))
                    if item_sums is not None:
                        sums += item_sums
                    bar.update(1)
            finally:
                ok = writer.ok()
                writer.close()
            if not ok:
                raise OSError(f"convert: writing ArrayRecord shard {str(path)!r} failed (disk full or not writable?)")
            shards.append({"file": name, "count": k, "bytes": os.path.getsize(path),
                           "sha256": image_sources.file_sha256(path)})
    finally:
        bar.close()
    return {"count": count, "shards": shards, "_sums": sums}


def convert(kind: str, input_dir, output_dir, *, resize_short: int | None = None, quality: int = 90,
            shard_size: int = 5000, progress: bool = True, overwrite: bool = False,
            workers: int | None = None, image_column: str | None = None, label_column: str | None = None) -> dict:
    """Writes ``input_dir`` (an image folder, or the CIFAR-10 / MNIST files) to ``output_dir`` as ArrayRecord
    shards and ``manifest.json``; returns the manifest.

    ``kind``: 'folder' (``train/<class>/...``, ``val/<class>/...``, optional ``test/<class>/...``; record names
    are the file paths relative to ``input_dir``), 'cifar10' or 'mnist' (the train/val/test splits of
    :func:`fastgpu_jax.data.sources.split_arrays`, val being the last 5,000 train examples; each image a PNG
    named ``<split>/<index:06d>.png``), or 'hf' (a Hugging Face image set on disk, :mod:`.hf_source`; records
    named ``<split>/<index:08d>``; ``image_column``/``label_column`` name the columns when they cannot be told
    from the features).

    ``resize_short`` (folders and hf sets): images whose short side is longer are resized (Pillow's LANCZOS filter,
    aspect ratio kept) so that it is ``resize_short`` pixels, and stored as JPEG at ``quality``; smaller images
    are not enlarged (a JPEG among them is kept as is, anything else is re-encoded as JPEG). Without it, files
    are copied byte for byte.

    ``mean``/``std`` in the manifest: per RGB channel, in pixel units (0..255), over every pixel of up to 10,000
    train examples evenly spaced over the split (all of them when fewer), decoded as stored (after resizing);
    grayscale counts as R = G = B. Integer sums make them deterministic whatever ``workers`` is.

    Refuses (one-line error, nothing written) an unknown ``kind``, a missing ``input_dir``, ``resize_short`` <= 0
    (or given for CIFAR-10/MNIST), ``quality`` outside 1..100, ``shard_size`` <= 0, and an ``output_dir`` that
    already holds ``manifest.json`` or ``.array_record`` files unless ``overwrite`` (which deletes those first).
    A bad image stops the conversion with :class:`~fastgpu_jax.data.images.BadImageError` naming the file; the
    shards written so far are deleted and no manifest is written.

    ``workers``: threads that read, check and encode folder images (default: the CPU count, at most 16).
    ``progress``: a tqdm bar per split, shown on a terminal only.
    """
    src, out = _check_arguments(kind, input_dir, output_dir, resize_short, quality, shard_size, overwrite)
    workers = min(16, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    # reads and checks the input before writing anything
    plan = _plan(kind, src, resize_short, quality, workers, (image_column, label_column))
    if overwrite:
        _remove_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    splits = {}
    tmp = out / f".{image_sources.MANIFEST}.tmp"
    try:
        for split, (count, make_items) in plan["splits"].items():
            items = make_items()
            try:
                splits[split] = _write_split(out, split, count, items, shard_size, progress, written)
            finally:
                getattr(items, "close", lambda: None)()  # a failure stops the reading threads now
        mean, std = _mean_std(splits["train"].pop("_sums"))
        for entry in splits.values():
            entry.pop("_sums", None)
        manifest = {
            "format": image_sources.MANIFEST_FORMAT,
            "classes": list(plan["classes"]),
            "splits": splits,
            "mean": mean,
            "std": std,
            "source": {"from": kind, "resize_short": resize_short,
                       "quality": quality if resize_short is not None else None},
        }
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, out / image_sources.MANIFEST)
    except BaseException:
        for path in written + [tmp]:
            try:
                os.remove(path)
            except OSError:
                pass
        raise
    return manifest


def _plan(kind: str, src: Path, resize_short, quality: int, workers: int, columns=(None, None)) -> dict:
    """{"classes": ..., "splits": {split: (count, () -> iterator of (label, name, bytes, sums or None))}}."""
    plan = {}
    if kind == "hf":
        found = hf_source.hf_splits(src, image_column=columns[0], label_column=columns[1])
        classes = found["train"].classes
        for split in (s for s in SPLITS if s in found and len(found[s])):
            hs = found[split]
            stats_at = _stats_indices(len(hs)) if split == "train" else set()
            item = _folder_item(hs, resize_short, quality, stats_at)
            plan[split] = (len(hs), lambda item=item, n=len(hs): _ordered(item, n, workers))
    elif kind == "folder":
        classes = image_sources.folder_classes(src)
        for split in SPLITS:
            if not (src / split).is_dir():
                continue
            fs = image_sources.folder_split(src, split)
            if len(fs) == 0:
                if split == "train":
                    raise ValueError(f"convert: {str(src / 'train')!r} holds no images (expected train/<class>/ "
                                     f"with files ending in {', '.join(images.IMAGE_EXTENSIONS)})")
                warnings.warn(f"{str(src / split)!r} holds no images; the converted set has no {split} split")
                continue
            stats_at = _stats_indices(len(fs)) if split == "train" else set()
            item = _folder_item(fs, resize_short, quality, stats_at)
            plan[split] = (len(fs), lambda item=item, n=len(fs): _ordered(item, n, workers))
    else:
        classes = CIFAR10_CLASSES if kind == "cifar10" else MNIST_CLASSES
        for split in SPLITS:
            pixels, labels = sources.split_arrays(kind, split, src)
            if len(labels) == 0:
                continue
            stats_at = _stats_indices(len(labels)) if split == "train" else set()
            item = _array_item(pixels, labels, split, stats_at)
            plan[split] = (len(labels), lambda item=item, n=len(labels): (item(i) for i in range(n)))
    return {"classes": classes, "splits": plan}


def verify(output_dir) -> None:
    """Recomputes every shard's size and SHA-256 and compares them with ``manifest.json``; raises ValueError
    naming the first shard that differs (or is missing)."""
    manifest = image_sources.read_manifest(output_dir)
    root = Path(os.path.expanduser(str(output_dir)))
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                raise ValueError(f"ArrayRecord shard {str(path)!r} ({split}) is missing; convert the data set again")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise ValueError(f"ArrayRecord shard {str(path)!r} ({split}) is {size} bytes, the manifest says "
                                 f"{shard['bytes']}; convert the data set again")
            digest = image_sources.file_sha256(path)
            if digest != shard["sha256"]:
                raise ValueError(f"ArrayRecord shard {str(path)!r} ({split}) has SHA-256 {digest}, the manifest "
                                 f"says {shard['sha256']}; the file is corrupt: convert the data set again")
