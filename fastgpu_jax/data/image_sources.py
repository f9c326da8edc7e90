"""Sources of encoded images: an image folder, or ArrayRecord shards written by ``fastgpu-jax convert``.

Both are random-access and stream: ``source[i]`` reads one example's encoded bytes from disk, so memory does not
grow with the data set (a folder keeps its file list, ~50 bytes an image, packed in two numpy arrays so that
Grain workers receive it in one cheap pickle).

Folder layout (``data.dir``): ``train/<class>/...``, ``val/<class>/...``, optional ``test/<class>/...``; files
ending in .jpg .jpeg .png .webp .bmp (any case) at any depth under a class folder; other files are not read.
Classes are the sorted folder names of ``train/`` and the labels their positions; ``val``/``test`` may lack a
class but never hold one ``train/`` does not.

ArrayRecord layout: ``manifest.json`` + ``<split>-NNNNN-of-MMMMM.array_record`` shards. A record is
``struct('<IH')`` (label, name length), the UTF-8 name, then the encoded image bytes (see :func:`pack_record`).
The manifest holds the classes, per-split counts, each shard's size and SHA-256, and the train mean/std.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS

# ImageNet's per-channel mean/std in pixel units (0..255): the usual statistics for photos in a folder.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fastgpu_jax.arrayrecord/1"
_GONE = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR)  # files that are bad examples
_RECORD_HEADER = struct.Struct("<IH")


# --------------------------------------------------------------------------- records


def pack_record(label: int, name: str, image: bytes) -> bytes:
    """One ArrayRecord record: label (uint32), name length (uint16), UTF-8 name, encoded image bytes."""
    encoded = name.encode("utf-8")
    return _RECORD_HEADER.pack(int(label), len(encoded)) + encoded + bytes(image)


def unpack_record(record: bytes, where: str) -> tuple[int, str, bytes]:
    """(label, name, image bytes) of a record written by :func:`pack_record`."""
    if len(record) < _RECORD_HEADER.size:
        raise ValueError(f"{where}: record of {len(record)} bytes is shorter than its header; expected records "
                         "written by fastgpu-jax convert")
    label, n = _RECORD_HEADER.unpack_from(record)
    start = _RECORD_HEADER.size
    return label, record[start:start + n].decode("utf-8", "replace"), record[start + n:]


# --------------------------------------------------------------------------- folder


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder: relative file paths packed as one byte string + offsets, and labels."""

    root: str
    classes: tuple
    blob: np.ndarray  # uint8: every relative path, UTF-8, concatenated
    offsets: np.ndarray  # int64 (n + 1,)
    labels: np.ndarray  # int32 (n,)
    empty_classes: tuple = ()  # class folders of this split that hold no image

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8", "surrogateescape")

    def __getitem__(self, i: int) -> tuple[bytes, int, str]:
        """(encoded bytes, label, path) of example ``i``."""
        rel = self.name(i)
        path = os.path.join(self.root, rel)
        try:
            with open(path, "rb") as f:
                return f.read(), int(self.labels[i]), path
        except OSError as err:
            if err.errno in _GONE:  # a deleted or unreadable file: a bad example (skippable)
                raise FileNotFoundError(f"{path}: cannot be read ({err.strerror})") from None
            # anything else (EIO, EMFILE, a stale NFS handle) may pass: stop rather than change the batch
            raise OSError(err.errno, f"{path}: read failed ({err.strerror}); not skipped, as a transient I/O "
                                     "error must not change the data of a step") from None


def _describe(directory: Path) -> str:
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    except OSError:
        return "nothing readable"
    if not entries:
        return "nothing (it is empty)"
    more = f", ... ({len(entries)} entries)" if len(entries) > 8 else ""
    return ", ".join(entries[:8]) + more


def folder_root(data_dir) -> Path:
    if data_dir is None or str(data_dir) == "":
        raise ValueError("data.dir must point to an image folder holding train/<class>/ and val/<class>/ "
                         "subfolders for data.name='folder' (got None)")
    root = Path(os.path.expanduser(str(data_dir)))
    if not root.is_dir():
        raise FileNotFoundError(f"data.dir {str(root)!r} is not a directory; expected an image folder with "
                                "train/<class>/ and val/<class>/ subfolders")
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} has no train/ subfolder (expected train/<class>/ "
                                f"and val/<class>/); it holds: {_describe(root)}")
    return root


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: str) -> list[str]:
    """Image files under ``class_dir`` at any depth, relative to it, sorted (walk order never matters)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, class_dir)
        for f in filenames:
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                out.append(f if rel == "." else os.path.join(rel, f))
    return sorted(out)


@functools.lru_cache(maxsize=8)
def _scan(root: str, split: str, classes: tuple, signature: float) -> FolderSplit:
    del signature  # part of the cache key only: a folder changed on disk is scanned again
    split_dir = Path(root) / split
    found = _class_dirs(split_dir)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{str(split_dir)!r} has class folder(s) {', '.join(unknown[:5])} that train/ does not "
                         f"have; the classes are train/'s subfolders ({len(classes)})")
    names, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        if cls not in found:
            continue
        files = _image_files(str(split_dir / cls))
        if not files:
            empty.append(cls)
        names += [os.path.join(split, cls, f) for f in files]
        labels += [label] * len(files)
    encoded = [n.encode("utf-8", "surrogateescape") for n in names]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), np.uint8).copy()
    return FolderSplit(root, classes, blob, offsets, np.asarray(labels, np.int32), tuple(empty))


def folder_classes(data_dir) -> tuple:
    root = folder_root(data_dir)
    classes = tuple(_class_dirs(root / "train"))
    if not classes:
        raise ValueError(f"{str(root / 'train')!r} holds no class folders (expected train/<class>/ with images); "
                         f"it holds: {_describe(root / 'train')}")
    return classes


def folder_split(data_dir, split: str) -> FolderSplit:
    """The file list of ``split``: scanned once per process while the folder's modification time stays."""
    root = folder_root(data_dir)
    classes = folder_classes(data_dir)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} has no {split}/ subfolder (expected {split}/<class>/ "
                                f"with the same class names as train/); it holds: {_describe(root)}")
    return _scan(str(root), split, classes, split_dir.stat().st_mtime)


# --------------------------------------------------------------------------- ArrayRecord


def read_manifest(data_dir) -> dict:
    if data_dir is None or str(data_dir) == "":
        raise ValueError("data.dir must point to a folder written by `fastgpu-jax convert` (manifest.json + "
                         ".array_record shards) for data.name='arrayrecord' (got None)")
    root = Path(os.path.expanduser(str(data_dir)))
    path = root / MANIFEST
    if not path.is_file():
        what = _describe(root) if root.is_dir() else "nothing (it is not a directory)"
        raise FileNotFoundError(f"{str(path)!r} not found; data.name='arrayrecord' reads a folder written by "
                                f"`fastgpu-jax convert`; data.dir holds: {what}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); rewrite it with `fastgpu-jax convert`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{str(path)!r} is not a {MANIFEST_FORMAT} manifest; rewrite it with `fastgpu-jax convert`")
    return manifest


class RecordShards:
    """Random access over ``self.shards`` (ArrayRecord files, ``self.count`` records) through Grain's source,
    opened on first use: each decoding worker process opens its own readers."""

    shards: list
    count: int
    _source = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def _records(self):
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.shards)
            if len(self._source) != self.count:
                raise ValueError(f"the ArrayRecord shards of {str(self.root)!r} hold {len(self._source)} records, "
                                 f"the metadata says {self.count}; write (convert or prepare) the data set again")
        return self._source


class ArrayRecordSplit(RecordShards):
    """One split of a converted data set: random access over its shards (Grain's ArrayRecord source)."""

    def __init__(self, data_dir, split: str):
        manifest = read_manifest(data_dir)
        self.root = Path(os.path.expanduser(str(data_dir)))
        self.classes = tuple(manifest["classes"])
        entry = manifest["splits"].get(split)
        if entry is None:
            raise FileNotFoundError(f"{str(self.root / MANIFEST)!r} has no {split!r} split (it has "
                                    f"{', '.join(manifest['splits'])})")
        self.shards = [str(self.root / s["file"]) for s in entry["shards"]]
        for shard, s in zip(self.shards, entry["shards"]):
            size = os.path.getsize(shard) if os.path.isfile(shard) else None
            if size != s["bytes"]:
                state = "missing" if size is None else f"{size} bytes, the manifest says {s['bytes']}"
                raise ValueError(f"ArrayRecord shard {shard!r} is {state}; convert the data set again")
        self.count = int(entry["count"])
        self.empty_classes = ()

    def __getitem__(self, i: int) -> tuple[bytes, int, str]:
        label, name, image = unpack_record(self._records()[int(i)], f"{self.root} record {int(i)}")
        if label >= len(self.classes):
            raise ValueError(f"{name} ({self.root} record {int(i)}): label {label} is out of range for "
                             f"{len(self.classes)} classes")
        return image, label, name


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- both


def open_split(name: str, data_dir, split: str):
    """``FolderSplit``, ``ArrayRecordSplit`` or ``TFDSSplit`` for data set ``name`` ('folder', 'arrayrecord' or
    'tfds')."""
    if name == "tfds":
        from . import tfds_source

        return tfds_source.TFDSSplit(data_dir, split)
    return folder_split(data_dir, split) if name == "folder" else ArrayRecordSplit(data_dir, split)


def classes_and_stats(name: str, data_dir) -> tuple[tuple, tuple, tuple]:
    """(classes, mean, std): ImageNet statistics for a folder or a TFDS set, the manifest's for a converted set."""
    if name == "folder":
        return folder_classes(data_dir), IMAGENET_MEAN, IMAGENET_STD
    if name == "tfds":
        from . import tfds_source

        return tfds_source.classes(data_dir), IMAGENET_MEAN, IMAGENET_STD
    m = read_manifest(data_dir)
    return tuple(m["classes"]), tuple(m["mean"]), tuple(m["std"])


def split_sizes(name: str, data_dir) -> dict:
    """{split: examples} of the splits present (train always)."""
    if name == "tfds":
        from . import tfds_source

        return tfds_source.split_sizes(data_dir)
    if name == "folder":
        root = folder_root(data_dir)
        return {s: len(folder_split(data_dir, s)) for s in ("train", "val", "test") if (root / s).is_dir()}
    return {s: int(e["count"]) for s, e in read_manifest(data_dir)["splits"].items()}
