"""Hugging Face image data sets on disk, read with pyarrow (no ``datasets`` import): the input of
``fastgpu-jax convert --from hf``.

Two layouts are understood:

* ``DatasetDict.save_to_disk(D)``: ``D/<split>/data-*.arrow`` (Arrow IPC streams, memory-mapped here) with
  ``D/<split>/dataset_info.json``;
* parquet files anywhere under ``D`` (the Hub's ``data/train-00000-of-00002.parquet`` or
  ``<config>/train/0000.parquet``), the split named by a folder or by the file name's first word.

Split names ``train``, ``validation``/``valid``/``val`` (→ ``val``) and ``test``. The image column is the feature
of type ``Image`` (a struct of encoded ``bytes`` and ``path``); the label column the ``ClassLabel`` feature, whose
``names`` become the classes (else ``label``/``labels`` of integers, classes ``"0"``, ``"1"``, ...). Both can be
named instead. A split whose labels are all -1 (unlabelled test sets) is left out with a warning.

A split is random access by index like :class:`image_sources.FolderSplit` (``split[i] -> (bytes, label, name)``,
``split.name(i)``); parquet row groups are read on demand and a few kept, so memory stays flat in the set's size.
"""

from __future__ import annotations

import json
import threading
import warnings
from bisect import bisect_right
from pathlib import Path

import numpy as np

SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
LABEL_NAMES = ("label", "labels")
_CACHED_CHUNKS = 4


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("convert --from hf reads Arrow/parquet files with pyarrow, which is not installed: "
                          "pip install -e '.[hf]' (or pip install pyarrow)") from None
    return pyarrow


def _split_of(rel: Path) -> str | None:
    """The split a parquet file belongs to, from its folders (innermost first) or its file name's first word."""
    for part in reversed(rel.parts[:-1]):
        if part.lower() in SPLIT_NAMES:
            return SPLIT_NAMES[part.lower()]
    word = rel.name.split(".")[0].replace("_", "-").split("-")[0].lower()
    return SPLIT_NAMES.get(word)


def _features(schema, info_file: Path | None) -> dict:
    """The ``datasets`` features dict from the schema's ``huggingface`` metadata, else ``dataset_info.json``."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        feats = json.loads(meta).get("info", {}).get("features")
        if feats:
            return feats
    if info_file is not None and info_file.is_file():
        return json.loads(info_file.read_text()).get("features") or {}
    return {}


def _columns(schema, features: dict, image_column, label_column, where: str) -> tuple[str, str, list | None]:
    """(image column, label column, class names or None)."""
    names = schema.names
    if image_column is None:
        typed = [k for k, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
        structs = [f.name for f in schema if getattr(f.type, "num_fields", 0)
                   and "bytes" in [f.type.field(i).name for i in range(f.type.num_fields)]]
        found = typed or structs
        if not found:
            raise ValueError(f"{where}: no image column (a feature of type Image, or a struct with 'bytes') among "
                             f"{names}; name it with --image-column")
        image_column = found[0]
    if label_column is None:
        typed = [k for k, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"]
        found = typed or [n for n in LABEL_NAMES if n in names]
        if not found:
            raise ValueError(f"{where}: no label column (a ClassLabel feature, or 'label'/'labels') among {names}; "
                             "name it with --label-column")
        label_column = found[0]
    for what, col in (("image", image_column), ("label", label_column)):
        if col not in names:
            raise ValueError(f"{where}: {what} column {col!r} not found; the columns are {names}")
    feat = features.get(label_column)
    classes = list(feat["names"]) if isinstance(feat, dict) and feat.get("names") else None
    return image_column, label_column, classes


class HFSplit:
    """One split of a Hugging Face image set on disk: ``split[i] -> (encoded bytes, label, name)``."""

    def __init__(self, split: str, chunks: list, columns: tuple[str, str], labels: np.ndarray, classes):
        self.split, self._chunks, self._columns = split, chunks, columns  # chunks: [(rows, loader)]
        self._starts = np.cumsum([0] + [n for n, _ in chunks]).tolist()
        self.labels, self.classes = labels, classes
        self._cache: dict[int, object] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _chunk(self, k: int):
        with self._lock:
            table = self._cache.get(k)
            if table is None:
                table = self._chunks[k][1]()
                if len(self._cache) >= _CACHED_CHUNKS:
                    self._cache.pop(min(self._cache))  # reads go forward: drop the oldest chunk
                self._cache[k] = table
            return table

    def name(self, i: int) -> str:
        return f"{self.split}/{i:08d}"

    def __getitem__(self, i: int):
        k = bisect_right(self._starts, i) - 1
        cell = self._chunk(k).column(self._columns[0])[i - self._starts[k]].as_py()
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            where = cell.get("path") if isinstance(cell, dict) else None
            raise ValueError(f"{self.name(i)}: the image cell holds no encoded bytes"
                             + (f" (only a path, {where!r}: load and save the data set with its images embedded)"
                                if where else ""))
        return bytes(data), int(self.labels[i]), self.name(i)


def _parquet_chunks(files: list[Path], image_column, label_column, root: Path):
    pa = _pyarrow()
    chunks, labels, meta = [], [], None
    for f in files:
        pf = pa.parquet.ParquetFile(f)
        if meta is None:
            meta = _columns(pf.schema_arrow, _features(pf.schema_arrow, None), image_column, label_column,
                            str(f.relative_to(root)))
        labels.append(pf.read(columns=[meta[1]]).column(0).to_numpy(zero_copy_only=False))
        for g in range(pf.num_row_groups):
            def load(f=f, g=g, col=meta[0]):
                return pa.parquet.ParquetFile(f).read_row_group(g, columns=[col])
            chunks.append((pf.metadata.row_group(g).num_rows, load))
    return chunks, labels, meta


def _arrow_chunks(files: list[Path], image_column, label_column, info_file: Path):
    pa = _pyarrow()
    chunks, labels, meta = [], [], None
    for f in files:
        table = pa.ipc.open_stream(pa.memory_map(str(f))).read_all()  # memory-mapped: pages read on use
        if meta is None:
            meta = _columns(table.schema, _features(table.schema, info_file), image_column, label_column, str(f))
        labels.append(table.column(meta[1]).to_numpy(zero_copy_only=False))
        chunks.append((table.num_rows, lambda table=table: table))
    return chunks, labels, meta


def hf_splits(root, *, image_column: str | None = None, label_column: str | None = None) -> dict:
    """{split: HFSplit} of the Hugging Face set at ``root``; classes agree across splits."""
    root = Path(root)
    groups: dict[str, list] = {}
    arrow_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_NAMES
                  and list(d.glob("*.arrow"))] if root.is_dir() else []
    if arrow_dirs:
        for d in arrow_dirs:
            groups.setdefault(SPLIT_NAMES[d.name.lower()], []).append(
                _arrow_chunks(sorted(d.glob("*.arrow")), image_column, label_column, d / "dataset_info.json"))
    else:
        for f in sorted(root.rglob("*.parquet")):
            split = _split_of(f.relative_to(root))
            if split is None:
                raise ValueError(f"convert --from hf: cannot tell the split of {str(f)!r} (expected a folder or a "
                                 f"file name starting with one of {', '.join(SPLIT_NAMES)})")
            groups.setdefault(split, []).append(f)
        groups = {s: [_parquet_chunks(fs, image_column, label_column, root)] for s, fs in groups.items()}
    if "train" not in groups:
        held = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise ValueError(f"convert --from hf: {str(root)!r} holds no train split (expected a save_to_disk folder "
                         f"with train/*.arrow, or train-*.parquet files); it holds {held}")
    return _assemble(groups)


def _assemble(groups: dict) -> dict:
    out, classes = {}, None
    for split, parts in groups.items():
        chunks = [c for part in parts for c in part[0]]
        columns, names = parts[0][2][:2], parts[0][2][2]
        try:
            labels = np.concatenate([np.asarray(x, np.int64) for part in parts for x in part[1]])
        except (TypeError, ValueError):
            raise ValueError(f"convert --from hf: the {split} split's label column {columns[1]!r} does not hold "
                             "integers (missing values or strings?); name another with --label-column") from None
        if len(labels) and (labels == -1).all():
            warnings.warn(f"convert --from hf: the {split} split has no labels (all -1); it is left out")
            continue
        if len(labels) and labels.min() < 0:
            raise ValueError(f"convert --from hf: the {split} split has negative labels (min {labels.min()})")
        if names is not None:
            if classes is not None and names != classes:
                raise ValueError(f"convert --from hf: the {split} split's class names differ from another split's")
            classes = names
        out[split] = HFSplit(split, chunks, columns, labels, names)
    if not len(out.get("train", ())):
        raise ValueError("convert --from hf: the train split has no labelled examples; nothing to train on")
    top = max(int(s.labels.max()) for s in out.values() if len(s.labels))
    classes = classes or [str(i) for i in range(top + 1)]
    if top >= len(classes):
        raise ValueError(f"convert --from hf: label {top} is out of range for the {len(classes)} class names")
    for s in out.values():
        s.classes = tuple(classes)
    return out
