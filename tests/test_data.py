"""Tests for fastgpu_jax.data: file formats against arrays we write ourselves, splits,
normalisation, and the determinism / resumability contract of the train pipeline."""

import gzip
import json
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from fastgpu_jax import data
from conftest import ROOT

N_IDX_TRAIN = data.VAL_SIZE + 12  # the last VAL_SIZE train examples are the val split
N_IDX_TEST = 7
IDX_HW = (3, 4)  # tiny images: the IDX header carries the dims


# --------------------------------------------------------------------------- writers


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_file(path, payload: bytes, gz: bool = False):
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_idx_arrays(seed=1):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_IDX_TRAIN, *IDX_HW), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, N_IDX_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_IDX_TEST, *IDX_HW), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, N_IDX_TEST, dtype=np.uint8),
    }


def write_idx_dir(directory, arrays, gz=False, overrides=None):
    """Write the four IDX files; ``overrides`` maps a base name to raw bytes to write instead."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for base, arr in arrays.items():
        payload = (overrides or {}).get(base, None)
        paths[base] = write_file(directory / base, idx_bytes(arr) if payload is None else payload, gz)
    return paths


CIFAR_PER_FILE = 1002  # 5 files -> 5010 train records -> 10 train + 5000 val
CIFAR_TEST = 6


def cifar_record_bytes(images_hwc: np.ndarray, *label_columns: np.ndarray) -> bytes:
    """CIFAR binary records: the label bytes (CIFAR-10: label; CIFAR-100: coarse, fine), then R, G, B planes."""
    chw = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)
    labels = [np.asarray(c).astype(np.uint8)[:, None] for c in label_columns]
    return np.concatenate([*labels, chw], axis=1).tobytes()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """CIFAR-10 binary files in data_dir/cifar-10-batches-bin, plus the reference arrays."""
    root = tmp_path_factory.mktemp("cifar")
    d = root / "cifar-10-batches-bin"
    d.mkdir()
    rng = np.random.default_rng(2)
    train_x = rng.integers(0, 256, (5 * CIFAR_PER_FILE, 32, 32, 3), dtype=np.uint8)
    train_y = rng.integers(0, 10, 5 * CIFAR_PER_FILE).astype(np.int32)
    for i in range(5):
        sl = slice(i * CIFAR_PER_FILE, (i + 1) * CIFAR_PER_FILE)
        (d / f"data_batch_{i + 1}.bin").write_bytes(cifar_record_bytes(train_x[sl], train_y[sl]))
    test_x = rng.integers(0, 256, (CIFAR_TEST, 32, 32, 3), dtype=np.uint8)
    test_y = rng.integers(0, 10, CIFAR_TEST).astype(np.int32)
    (d / "test_batch.bin").write_bytes(cifar_record_bytes(test_x, test_y))
    return root, (train_x, train_y), (test_x, test_y)


def copy_cifar(src_root, dst):
    dst.mkdir()
    for f in (src_root / "cifar-10-batches-bin").iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_loads_exactly_what_was_written(tmp_path, gz, name):
    arrays = make_idx_arrays()
    write_idx_dir(tmp_path, arrays, gz=gz)
    tx, ty = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    cut = N_IDX_TRAIN - data.VAL_SIZE
    expected = {
        "train": (tx[:cut], ty[:cut]),
        "val": (tx[cut:], ty[cut:]),
        "test": (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
    }
    for split, (ex, ey) in expected.items():
        x, y = data.load_split(name, split, data_dir=str(tmp_path))
        assert x.dtype == np.uint8 and y.dtype == np.int32
        assert x.shape == (len(ey), *IDX_HW, 1)
        np.testing.assert_array_equal(x[..., 0], ex)
        np.testing.assert_array_equal(y, ey.astype(np.int32))
    info = data.info(name, tmp_path)
    assert info.image_shape == (*IDX_HW, 1) and info.num_classes == 10
    assert info.split_sizes == {"train": cut, "val": data.VAL_SIZE, "test": N_IDX_TEST}
    m = 0.1307 if name == "mnist" else 0.2860
    assert info.mean == pytest.approx((m * 255,))


def test_load_split_returns_writable_copies(tmp_path):
    write_idx_dir(tmp_path, make_idx_arrays())
    x, _ = data.load_split("mnist", "test", tmp_path)
    x[:] = 0  # must not corrupt what the next caller sees
    x2, _ = data.load_split("mnist", "test", tmp_path)
    np.testing.assert_array_equal(x2[..., 0], make_idx_arrays()["t10k-images-idx3-ubyte"])


def _bad_idx_cases():
    a = make_idx_arrays()
    img, lab = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
    good = idx_bytes(a[img])
    return {
        "wrong_magic": (img, b"\x00\x00\x08\x01" + good[4:], False, "magic"),
        "labels_with_image_magic": (lab, b"\x00\x00\x08\x03" + idx_bytes(a[lab])[4:], False, "magic"),
        "truncated": (img, good[:-5], False, "truncated"),
        "extra_bytes": (img, good + b"\x00", False, "longer"),
        "header_only_partial": (img, good[:9], False, "truncated"),
        "count_mismatch": (lab, idx_bytes(a[lab][:-1]), False, "same count"),
        "label_out_of_range": (lab, idx_bytes(np.r_[a[lab][:-1], 10]), False, "out of range"),
        "corrupt_gz": (img, None, True, "gzip"),
    }


@pytest.mark.parametrize("case", sorted(_bad_idx_cases()))
def test_idx_bad_files_name_the_file(tmp_path, case):
    base, payload, corrupt_gz, words = _bad_idx_cases()[case]
    arrays = make_idx_arrays()
    if corrupt_gz:
        paths = write_idx_dir(tmp_path, arrays, gz=True)
        raw = bytearray(paths[base].read_bytes())
        raw[len(raw) // 2:] = b"\xff" * (len(raw) - len(raw) // 2)  # keep the gzip header, garble the rest
        paths[base].write_bytes(bytes(raw))
    else:
        write_idx_dir(tmp_path, arrays, overrides={base: payload})
    with pytest.raises(ValueError, match=re.escape(base)) as exc:
        data.load_split("mnist", "train", tmp_path)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_idx_missing_file_and_missing_dir(tmp_path):
    paths = write_idx_dir(tmp_path / "d", make_idx_arrays())
    paths["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_split("mnist", "train", tmp_path / "d")
    with pytest.raises(ValueError, match=r"data\.dir must point to .*train-images-idx3-ubyte\[\.gz\]"):
        data.info("mnist", None)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.info("fashion_mnist", tmp_path / "nope")


def test_idx_too_few_train_examples_for_val(tmp_path):
    arrays = make_idx_arrays()
    arrays["train-images-idx3-ubyte"] = arrays["train-images-idx3-ubyte"][:100]
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:100]
    write_idx_dir(tmp_path, arrays)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*more than 5000"):
        data.info("mnist", tmp_path)


# --------------------------------------------------------------------------- CIFAR


def test_cifar_loads_exactly_and_finds_subdir(cifar):
    root, (tx, ty), (sx, sy) = cifar
    cut = len(ty) - data.VAL_SIZE
    for split, (ex, ey) in {"train": (tx[:cut], ty[:cut]), "val": (tx[cut:], ty[cut:]),
                            "test": (sx, sy)}.items():
        x, y = data.load_split("cifar10", split, root)  # files live in root/cifar-10-batches-bin
        assert x.dtype == np.uint8 and x.shape == (len(ey), 32, 32, 3) and y.dtype == np.int32
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    info = data.info("cifar10", root / "cifar-10-batches-bin")  # or directly
    assert info.image_shape == (32, 32, 3)
    assert info.split_sizes == {"train": cut, "val": data.VAL_SIZE, "test": CIFAR_TEST}
    assert info.mean == (125.3, 123.0, 113.9) and info.std == (63.0, 62.1, 66.7)


def test_cifar_channel_major_layout(tmp_path):
    # One record whose R plane is all 1, G all 2, B all 3: HWC pixels must be (1, 2, 3).
    rec = np.concatenate([[7], np.repeat(np.arange(1, 4, dtype=np.uint8), 1024)]).astype(np.uint8)
    f = tmp_path / "one.bin"
    f.write_bytes(rec.tobytes())
    x, y = data.read_cifar_bin(f)
    assert y.tolist() == [7]
    assert (x[0] == np.array([1, 2, 3], np.uint8)).all()


@pytest.mark.parametrize("case", ["size", "label", "missing", "empty"])
def test_cifar_bad_files_name_the_file(cifar, tmp_path, case):
    d = copy_cifar(cifar[0], tmp_path / "c")
    target = d / "data_batch_3.bin"
    raw = target.read_bytes()
    if case == "size":
        target.write_bytes(raw[:-1])
        err, words = ValueError, "multiple of 3073"
    elif case == "label":
        target.write_bytes(bytes([11]) + raw[1:])
        err, words = ValueError, "out of range"
    elif case == "empty":
        target.write_bytes(b"")
        err, words = ValueError, "multiple of 3073"
    else:
        target.unlink()
        err, words = FileNotFoundError, "missing"
    with pytest.raises(err, match=re.escape("data_batch_3.bin")) as exc:
        data.load_split("cifar10", "test", d)
    assert words in str(exc.value)
    with pytest.raises(ValueError, match=r"data\.dir must point to .*data_batch_1\.bin"):
        data.load_split("cifar10", "train")


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    """CIFAR-100 binary files in data_dir/cifar-100-binary (coarse + fine label bytes), with the reference."""
    root = tmp_path_factory.mktemp("cifar100")
    d = root / "cifar-100-binary"
    d.mkdir()
    rng = np.random.default_rng(3)
    n = data.VAL_SIZE + 12
    train_x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    train_fine = rng.integers(0, 100, n)
    (d / "train.bin").write_bytes(cifar_record_bytes(train_x, train_fine // 5, train_fine))
    test_x = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    test_fine = np.array([0, 99, 5, 17, 42, 63, 88])
    (d / "test.bin").write_bytes(cifar_record_bytes(test_x, test_fine // 5, test_fine))
    return root, (train_x, train_fine), (test_x, test_fine)


def test_cifar100_loads_the_fine_labels_exactly(cifar100):
    root, (tx, ty), (sx, sy) = cifar100
    cut = len(ty) - data.VAL_SIZE
    for split, (ex, ey) in {"train": (tx[:cut], ty[:cut]), "val": (tx[cut:], ty[cut:]), "test": (sx, sy)}.items():
        x, y = data.load_split("cifar100", split, root)  # found in root/cifar-100-binary
        assert x.dtype == np.uint8 and y.dtype == np.int32
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    info = data.info("cifar100", root / "cifar-100-binary")
    assert info.num_classes == 100 and info.image_shape == (32, 32, 3) and info.split_sizes["test"] == 7
    plain = take(data.train_iterator("cifar100", batch_size=4, seed=1, data_dir=root), 2)
    aug = take(data.train_iterator("cifar100", batch_size=4, seed=1, data_dir=root, augment=True), 2)
    for p, a in zip(plain, aug):  # crop + flip moves pixels, never labels
        np.testing.assert_array_equal(p["label"], a["label"])
        assert not np.array_equal(p["image"], a["image"])


@pytest.mark.parametrize("case", ["size", "label", "missing"])
def test_cifar100_bad_files_name_the_file(cifar100, tmp_path, case):
    d = tmp_path / "c100"
    d.mkdir()
    for f in (cifar100[0] / "cifar-100-binary").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    raw = (d / "test.bin").read_bytes()
    if case == "size":
        (d / "test.bin").write_bytes(raw[:-3])
        err, words = ValueError, "multiple of 3074"
    elif case == "label":
        (d / "test.bin").write_bytes(raw[:1] + bytes([100]) + raw[2:])  # fine label 100: out of 0..99
        err, words = ValueError, "out of range 0..99"
    else:
        (d / "test.bin").unlink()
        err, words = FileNotFoundError, "missing CIFAR-100 file"
    with pytest.raises(err, match=re.escape("test.bin")) as exc:
        data.load_split("cifar100", "test", d)
    assert words in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- digits / synthetic / misc


def test_digits_are_read_as_scikit_learn_loads_them_without_importing_it():
    from sklearn.datasets import load_digits

    from fastgpu_jax.data import sources

    images, labels = sources._digits_arrays()
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(labels, ref.target)
    code = ("import sys\nfrom fastgpu_jax import data\nx, y = data.load_split('digits', 'test')\n"
            "assert x.shape == (360, 8, 8, 1) and 'sklearn' not in sys.modules, sorted(sys.modules)[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_digits_splits_fixed_and_disjoint():
    from sklearn.datasets import load_digits

    sizes = {"train": 1257, "val": 180, "test": 360}
    info = data.info("digits")
    assert info.split_sizes == sizes and info.image_shape == (8, 8, 1) and info.num_classes == 10
    parts = {}
    for split, n in sizes.items():
        x, y = data.load_split("digits", split)
        x2, y2 = data.load_split("digits", split)
        assert x.shape == (n, 8, 8, 1) and y.shape == (n,) and y.dtype == np.int32
        assert 0 <= x.min() and x.max() <= 16
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
        parts[split] = (x, y)
    # The three splits together are exactly the 1,797 digits (a partition).
    allx = np.concatenate([parts[s][0].reshape(-1, 64) for s in sizes])
    ally = np.concatenate([parts[s][1] for s in sizes])
    ref = load_digits()
    rows = np.concatenate([allx, ally[:, None]], axis=1)
    ref_rows = np.concatenate([ref.images.reshape(-1, 64), ref.target[:, None]], axis=1)
    np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(ref_rows, axis=0))
    assert len(rows) == len(ref_rows)
    # mean/std come from the train split.
    assert info.mean[0] == pytest.approx(parts["train"][0].mean(), rel=1e-6)
    assert info.std[0] == pytest.approx(parts["train"][0].std(), rel=1e-5)


def test_synthetic_is_fixed_and_shaped():
    kw = dict(image_size=5, channels=2, num_classes=3, num_examples=30)
    x, y = data.load_split("synthetic", "train", **kw)
    x2, y2 = data.load_split("synthetic", "test", **kw)
    assert x.shape == (30, 5, 5, 2) and x.dtype == np.float32 and y.dtype == np.int32
    assert set(np.unique(y)) <= {0, 1, 2}
    np.testing.assert_array_equal(x, x2)  # documented: same examples in every split
    np.testing.assert_array_equal(y, y2)
    info = data.info("synthetic", **kw)
    assert info.image_shape == (5, 5, 2) and info.num_classes == 3
    assert info.split_sizes == {"train": 30, "val": 30, "test": 30}
    assert info.mean == (0.0, 0.0) and info.std == (1.0, 1.0)


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="digits.*mnist.*fashion_mnist.*cifar10.*synthetic"):
        data.info("imagenet")
    with pytest.raises(ValueError, match="train, val, test"):
        data.load_split("digits", "dev")
    with pytest.raises(TypeError, match="bogus"):
        data.load_split("synthetic", "train", bogus=1)


def test_normalize():
    info = data.info("digits")
    x, _ = data.load_split("digits", "train")
    z = data.normalize(x, info)
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_allclose(z, (x - info.mean[0]) / info.std[0], rtol=1e-6, atol=1e-6)
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4
    np.testing.assert_array_equal(data.normalize(x[..., 0].astype(np.uint8), info),
                                  data.normalize(x.astype(np.uint8), info))  # (N, H, W) when C == 1
    with pytest.raises(ValueError, match=re.escape("(N, 8, 8, 1)") + r".*\(4, 8, 8, 3\)"):
        data.normalize(np.zeros((4, 8, 8, 3)), info)
    cinfo = data.DatasetInfo("c", (2, 2, 3), 10, {}, (1.0, 2.0, 3.0), (1.0, 2.0, 4.0))
    np.testing.assert_allclose(data.normalize(np.full((1, 2, 2, 3), 5, np.uint8), cinfo)[0, 0, 0], [4, 1.5, 0.5])
    with pytest.raises(ValueError, match=re.escape("(N, 2, 2, 3)")):
        data.normalize(np.zeros((1, 2, 2)), cinfo)  # (N, H, W) only when C == 1


# --------------------------------------------------------------------------- train pipeline


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


SYN = dict(image_size=2, channels=1, num_classes=5, num_examples=40)


def stream_indices(batches, kw=SYN):
    """Map each row of the batches back to its train example (synthetic images are unique)."""
    x, _ = data.load_split("synthetic", "train", **kw)
    lookup = {row.tobytes(): i for i, row in enumerate(x)}
    assert len(lookup) == len(x)
    return np.array([lookup[row.tobytes()] for b in batches for row in b["image"]])


def test_train_iterator_shapes_and_values():
    it = data.train_iterator("digits", batch_size=32, seed=0)
    b = next(it)
    assert b["image"].shape == (32, 8, 8, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    # Every row is a normalised train example with its own label.
    info = data.info("digits")
    x, y = data.load_split("digits", "train")
    table = {row.tobytes(): lab for row, lab in zip(data.normalize(x, info), y)}
    for row, lab in zip(b["image"], b["label"]):
        assert table[row.tobytes()] == lab


def test_train_iterator_deterministic_per_seed():
    a = take(data.train_iterator("digits", batch_size=64, seed=3), 25)  # > 1 epoch
    b = take(data.train_iterator("digits", batch_size=64, seed=3), 25)
    c = take(data.train_iterator("digits", batch_size=64, seed=4), 25)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"]) or not np.array_equal(a[0]["image"], c[0]["image"])
    # Random access by step gives the same batches: the batch is a function of (seed, step).
    ds = data.train_dataset("digits", batch_size=64, seed=3)
    assert_batches_equal([ds[s] for s in (0, 19, 24)], [a[0], a[19], a[24]])


def test_epochs_are_distinct_permutations():
    n = SYN["num_examples"]
    batches = take(data.train_iterator("synthetic", batch_size=12, seed=7, **SYN), 10)  # 120 = 3 epochs
    stream = stream_indices(batches)  # batches straddle epoch boundaries: nothing dropped
    epochs = stream.reshape(3, n)
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # The order of an epoch depends only on (seed, epoch), not on the batch size.
    other = stream_indices(take(data.train_iterator("synthetic", batch_size=8, seed=7, **SYN), 10))
    np.testing.assert_array_equal(other, stream[:80])


def test_get_state_set_state_resumes_exactly():
    reference = take(data.train_iterator("digits", batch_size=128, seed=1), 30)
    it = data.train_iterator("digits", batch_size=128, seed=1)
    take(it, 12)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert_batches_equal(take(it, 18), reference[12:])
    resumed = data.train_iterator("digits", batch_size=128, seed=1)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 18), reference[12:])


@pytest.mark.parametrize("augment", [False, True])
def test_global_batch_independent_of_process_count(cifar, augment):
    root = cifar[0]
    kw = dict(batch_size=8, seed=5, data_dir=root, augment=augment)
    whole = take(data.train_iterator("cifar10", **kw), 4)
    parts = [take(data.train_iterator("cifar10", process_index=p, process_count=2, **kw), 4) for p in (0, 1)]
    for s in range(4):
        assert parts[0][s]["image"].shape == (4, 32, 32, 3)
        joined = {k: np.concatenate([parts[0][s][k], parts[1][s][k]]) for k in whole[s]}
        assert_batches_equal([joined], [whole[s]])


def test_batch_size_errors():
    with pytest.raises(ValueError, match=r"data\.batch_size=10 .*3"):
        data.train_iterator("digits", batch_size=10, seed=0, process_count=3)
    with pytest.raises(ValueError, match=r"data\.batch_size=2000 .*1257"):
        data.train_iterator("digits", batch_size=2000, seed=0)
    with pytest.raises(ValueError, match="process_index"):
        data.train_iterator("digits", batch_size=8, seed=0, process_index=2, process_count=2)


def test_cifar_augment_is_deterministic_crop_flip(cifar):
    root = cifar[0]
    info = data.info("cifar10", root)
    plain = take(data.train_iterator("cifar10", batch_size=8, seed=2, data_dir=root), 3)
    aug = take(data.train_iterator("cifar10", batch_size=8, seed=2, data_dir=root, augment=True), 3)
    again = take(data.train_iterator("cifar10", batch_size=8, seed=2, data_dir=root, augment=True), 3)
    assert_batches_equal(aug, again)  # deterministic per (seed, step)
    ds = data.train_dataset("cifar10", batch_size=8, seed=2, data_dir=root, augment=True)
    assert_batches_equal([ds[2]], [aug[2]])
    assert not all(np.array_equal(p["image"], a["image"]) for p, a in zip(plain, aug))
    pad = data.CROP_PADDING
    for p, a in zip(plain, aug):
        assert a["image"].shape == p["image"].shape and a["image"].dtype == np.float32
        np.testing.assert_array_equal(a["label"], p["label"])
        # Each row is some crop (offset 0..2*pad) of the mean-padded image, maybe flipped.
        for src, out in zip(p["image"], a["image"]):
            padded = np.pad(src, ((pad, pad), (pad, pad), (0, 0)))  # 0 == the mean after normalising
            candidates = [
                c[:, ::-1] if flip else c
                for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)
                for c in [padded[dy:dy + 32, dx:dx + 32]]
            ]
            assert any(np.array_equal(out, c) for c in candidates)
    assert info.image_shape == (32, 32, 3)


def test_augment_ignored_for_other_sets():
    a = take(data.train_iterator("digits", batch_size=16, seed=0, augment=True), 2)
    b = take(data.train_iterator("digits", batch_size=16, seed=0), 2)
    assert_batches_equal(a, b)


# --------------------------------------------------------------------------- eval


@pytest.mark.parametrize("batch_size", [64, 90, 360, 500])
def test_eval_batches_cover_split_once_with_mask(batch_size):
    info = data.info("digits")
    x, y = data.load_split("digits", "test")
    batches = list(data.eval_batches("digits", "test", batch_size=batch_size))
    assert len(batches) == -(-360 // batch_size)
    for b in batches:
        assert b["image"].shape == (batch_size, 8, 8, 1) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32 and b["mask"].shape == (batch_size,)
    mask = np.concatenate([b["mask"] for b in batches])
    real = len(x)
    assert mask[:real].all() and not mask[real:].any()
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(images[:real], data.normalize(x, info))
    np.testing.assert_array_equal(labels[:real], y)
    assert not images[real:].any() and not labels[real:].any()


def test_eval_batches_checks_arguments_eagerly():
    with pytest.raises(ValueError, match="eval_batch_size"):
        data.eval_batches("digits", "val", batch_size=0)
    with pytest.raises(ValueError, match="unknown split"):
        data.eval_batches("digits", "dev", batch_size=8)
