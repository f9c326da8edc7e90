"""TFDS data sets prepared in the ``array_record`` file format, read directly (``data.name='tfds'``): no
TensorFlow and no ``tensorflow_datasets`` import, only Grain's ArrayRecord reader.

``data.dir`` is a prepared TFDS version folder, e.g. ``~/tensorflow_datasets/imagenette/full-size-v2/1.0.0``,
holding ``dataset_info.json`` (``fileFormat: array_record``, the splits and their shard lengths),
``features.json`` and ``<name>-<split>.array_record-NNNNN-of-MMMMM`` shards whose records are serialized
``tf.train.Example`` protos. The image is the bytes feature ``image`` (its encoded PNG/JPEG), the label the int64
feature ``label``; class names come from ``label.labels.txt`` (else ``"0"``, ``"1"``, ...). TFDS's
``validation`` split is our ``val``. Normalisation uses the ImageNet mean/std, as for folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .image_sources import RecordShards

SPLITS = {"train": "train", "val": "validation", "test": "test"}  # ours -> TFDS's
IMAGE_KEY, LABEL_KEY = "image", "label"


# --------------------------------------------------------------------------- tf.train.Example, by hand


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message: ints for varints, bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
            if pos > len(buf):
                raise ValueError("truncated field")
        elif wire in (1, 5):  # fixed64 / fixed32
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
            if pos > len(buf):
                raise ValueError("truncated field")
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _messages(buf: bytes, number: int):
    """The embedded messages (length-delimited fields) numbered ``number``; any other wire type is corrupt."""
    for n, wire, value in _fields(buf):
        if n == number:
            if wire != 2:
                raise ValueError(f"field {number} has wire type {wire}, expected a message")
            yield value


def parse_example(record: bytes) -> dict:
    """``{key: list of bytes | list of int}`` of the bytes_list and int64_list features of a serialized
    ``tf.train.Example`` (float features are skipped)."""
    out = {}
    for features in _messages(record, 1):  # Example.features = 1
        for entry in _messages(features, 1):  # Features.feature = 1: map<string, Feature> entries
            key = b"".join(_messages(entry, 1)).decode("utf-8", "replace")
            for feature in _messages(entry, 2):
                for kind, wire, values in _fields(feature):  # Feature: bytes_list = 1, int64_list = 3
                    if kind == 1 and wire == 2:
                        out[key] = list(_messages(values, 1))
                    elif kind == 3 and wire == 2:
                        out[key] = _int64s(values)
    return out


def _int64s(values: bytes) -> list:
    ints = []
    for f, wire, v in _fields(values):
        if f != 1:
            continue
        if wire == 2:  # packed
            pos = 0
            while pos < len(v):
                x, pos = _varint(v, pos)
                ints.append(x)
        else:
            ints.append(v)
    return [x - (1 << 64) if x >= 1 << 63 else x for x in ints]


# --------------------------------------------------------------------------- the data set


def _root(data_dir) -> Path:
    if data_dir is None:
        raise ValueError("data.name='tfds' reads a prepared TFDS folder (…/<name>/<config>/<version>/ with "
                         "dataset_info.json and .array_record-* shards); set data.dir (got None)")
    return Path(os.path.expanduser(str(data_dir)))


def dataset_info(data_dir) -> dict:
    path = _root(data_dir) / "dataset_info.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found; data.name='tfds' needs data.dir to be a prepared TFDS "
                                "version folder (e.g. ~/tensorflow_datasets/imagenette/full-size-v2/1.0.0)")
    info = json.loads(path.read_text())
    fmt = info.get("fileFormat", "tfrecord")
    if fmt != "array_record":
        raise ValueError(f"{str(path)!r}: the data set was prepared as {fmt!r}; data.name='tfds' reads the "
                         "array_record format (prepare it with tfds.builder(name, file_format='array_record'))")
    return info


def _shards(data_dir, info: dict, tfds_split: str) -> tuple[list[str], int]:
    entry = next((s for s in info.get("splits", []) if s.get("name") == tfds_split), None)
    if entry is None:
        raise FileNotFoundError(f"{str(_root(data_dir))!r} has no {tfds_split!r} split (it has "
                                f"{', '.join(s.get('name', '?') for s in info.get('splits', []))})")
    lengths = [int(n) for n in entry.get("shardLengths", [])]
    n = len(lengths)
    files = [str(_root(data_dir) / f"{info['name']}-{tfds_split}.array_record-{i:05d}-of-{n:05d}") for i in range(n)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"TFDS shard {missing[0]!r} is missing ({len(missing)} of {n} for {tfds_split!r})")
    return files, sum(lengths)


def classes(data_dir) -> tuple:
    info = dataset_info(data_dir)
    labels = _root(data_dir) / f"{LABEL_KEY}.labels.txt"
    if labels.is_file():
        return tuple(line.strip() for line in labels.read_text().splitlines() if line.strip())
    features = _root(data_dir) / "features.json"
    if features.is_file():
        feats = json.loads(features.read_text()).get("featuresDict", {}).get("features", {})
        n = feats.get(LABEL_KEY, {}).get("classLabel", {}).get("numClasses")
        if n:
            return tuple(str(i) for i in range(int(n)))
    raise ValueError(f"{str(_root(data_dir))!r}: no {LABEL_KEY}.labels.txt and no ClassLabel in features.json; "
                     f"cannot tell the classes (data set {info.get('name')!r})")


def split_sizes(data_dir) -> dict:
    info = dataset_info(data_dir)
    have = {s.get("name"): s for s in info.get("splits", [])}
    return {ours: sum(int(n) for n in have[theirs].get("shardLengths", []))
            for ours, theirs in SPLITS.items() if theirs in have}


class TFDSSplit(RecordShards):
    """One split of a prepared TFDS set: ``split[i] -> (encoded image bytes, label, name)``."""

    def __init__(self, data_dir, split: str):
        info = dataset_info(data_dir)
        self.root, self.split = _root(data_dir), split
        self.shards, self.count = _shards(data_dir, info, SPLITS.get(split, split))
        self.classes = classes(data_dir)
        self.empty_classes = ()

    def name(self, i: int) -> str:
        return f"{self.split}/{int(i):08d}"

    def __getitem__(self, i: int) -> tuple[bytes, int, str]:
        where = f"{self.root} {self.name(i)}"
        try:
            example = parse_example(self._records()[int(i)])
        except ValueError as err:
            raise ValueError(f"{where}: not a tf.train.Example record ({err})") from None
        image, label = example.get(IMAGE_KEY), example.get(LABEL_KEY)
        if not image or not label or not isinstance(image[0], bytes) or not isinstance(label[0], int):
            raise ValueError(f"{where}: the record has no {IMAGE_KEY!r} bytes or no {LABEL_KEY!r} int64 feature "
                             f"(it has {sorted(example)})")
        if not 0 <= label[0] < len(self.classes):
            raise ValueError(f"{where}: label {label[0]} is out of range for {len(self.classes)} classes")
        return image[0], int(label[0]), self.name(i)
