"""The command line end to end: train -> eval -> predict -> plot, MNIST from IDX files, and errors."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import DIGITS, run_cli
import fastgpu_jax as fg
from fastgpu_jax import data

QUIET = ["--config.log.progress_bar=False"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits")
    proc = run_cli("train", "--config", DIGITS + ":quick", "--workdir", str(workdir), *QUIET)
    return workdir, proc


def test_train_writes_logs_checkpoints_and_events(digits_run):
    workdir, proc = digits_run
    assert "train step 20/60" in proc.stdout and "ms/step" in proc.stdout and "ex/s" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 60
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "val"}
    assert [r["step"] for r in rows if r["split"] == "train"] == [20, 40, 60]
    assert all({"loss", "accuracy", "lr", "ms_per_step", "examples_per_s"} <= set(r) for r in rows
               if r["split"] == "train")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["30", "60"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    info = json.loads((workdir / "config.json").read_text())
    assert info["config"]["data.name"] == "digits" and "train" in info["command"]


def test_eval_prints_one_json_object_last(digits_run):
    workdir, _ = digits_run
    out = run_cli("eval", "--workdir", str(workdir), "--split", "test").stdout.strip().splitlines()[-1]
    result = json.loads(out)
    assert set(result) >= {"split", "step", "loss", "accuracy"}
    assert result["split"] == "test" and result["step"] == 60 and result["accuracy"] > 0.8


def test_predict_matches_eval_labels(digits_run, tmp_path):
    workdir, _ = digits_run
    images, labels = data.load_split("digits", "test")
    np.save(tmp_path / "x.npy", images[:50, :, :, 0])  # (N, H, W): the channel axis is optional
    run_cli("predict", "--workdir", str(workdir), "--input", str(tmp_path / "x.npy"), "--output",
            str(tmp_path / "y.npy"), "--batch-size", "16")
    pred = np.load(tmp_path / "y.npy")
    assert pred.shape == (50,) and (pred == labels[:50]).mean() > 0.8
    run_cli("predict", "--workdir", str(workdir), "--input", str(tmp_path / "x.npy"), "--output",
            str(tmp_path / "logits.npy"), "--logits")
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (50, 10) and (logits.argmax(-1) == pred).all()
    # without --output, the predictions are in the one JSON line printed last
    out = run_cli("predict", "--workdir", str(workdir), "--input", str(tmp_path / "x.npy"), "--logits")
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["count"] == 50 and np.allclose(printed["logits"], logits, rtol=1e-6, atol=1e-6)


def test_predict_rejects_wrong_image_shape(digits_run, tmp_path):
    workdir, _ = digits_run
    np.save(tmp_path / "bad.npy", np.zeros((3, 28, 28), np.float32))
    proc = run_cli("predict", "--workdir", str(workdir), "--input", str(tmp_path / "bad.npy"), check=False)
    assert proc.returncode == 2 and "(N, 8, 8, 1)" in proc.stderr and "Traceback" not in proc.stderr


def test_plot_writes_a_png(digits_run):
    import matplotlib.image

    workdir, _ = digits_run
    run_cli("plot", "--workdir", str(workdir))
    img = matplotlib.image.imread(workdir / "curves.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("args, words", [
    (["train", "--config", DIGITS, "--workdir", "w", "--config.optimizer.lrr=1"], ["optimizer.lrr"]),
    (["train", "--config", DIGITS, "--workdir", "w", "--config.train.precision=fp8"], ["train.precision"]),
    (["train", "--config", "missing.py", "--workdir", "w"], ["missing.py"]),
    (["eval", "--workdir", "no/such/run"], ["config.json"]),
    (["plot", "--workdir", "no/such/run"], ["metrics.jsonl"]),
])
def test_errors_are_one_clear_line(args, words, tmp_path):
    args = [str(tmp_path / a) if a in ("w", "no/such/run") else a for a in args]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr


def _write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _learnable_mnist(n, rng):
    """28x28 images whose label is where a bright 7x7 block sits (plus noise): easy, but must be learned."""
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for i, y in enumerate(labels):
        r, c = divmod(int(y), 5)
        images[i, 3 + 12 * r: 10 + 12 * r, 1 + 5 * c: 6 + 5 * c] = 250
    return images, labels


def test_mnist_cnn_config_trains_on_generated_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    x, y = _learnable_mnist(5300, rng)  # the last 5,000 train examples are the val split
    _write_idx(mnist / "train-images-idx3-ubyte.gz", x, 0x803)
    _write_idx(mnist / "train-labels-idx1-ubyte.gz", y, 0x801)
    x, y = _learnable_mnist(200, rng)
    _write_idx(mnist / "t10k-images-idx3-ubyte.gz", x, 0x803)
    _write_idx(mnist / "t10k-labels-idx1-ubyte.gz", y, 0x801)
    workdir = tmp_path / "run"
    run_cli("train", "--config", "configs/mnist_cnn.py", "--workdir", str(workdir), f"--config.data.dir={mnist}",
            "--config.train.steps=40", "--config.train.log_every_steps=20", "--config.train.eval_every_steps=0",
            "--config.data.eval_batch_size=100", *QUIET)
    result = json.loads(run_cli("eval", "--workdir", str(workdir)).stdout.strip().splitlines()[-1])
    assert result["accuracy"] > 0.9


def test_bench_inference_prints_latency_per_batch_size(digits_run):
    workdir, _ = digits_run
    out = run_cli("bench", "--inference", str(workdir), "--steps", "3").stdout
    assert "ms" in out and "256" in out


def test_config_prints_the_resolved_config_and_help_keys_lists_the_schema():
    out = run_cli("config", "--config", DIGITS + ":quick", "--config.optimizer.lr=0.1").stdout
    resolved = json.loads(out)
    assert resolved["optimizer.lr"] == 0.1 and resolved["train.steps"] == 60  # override and :quick both applied
    keys = run_cli("train", "--help-keys").stdout.splitlines()
    assert len(keys) == len(fg.config.SCHEMA)
    line = next(k for k in keys if k.startswith("optimizer.name "))
    assert "default 'adam'" in line and "sgd" in line and "lamb" in line
    bad = run_cli("config", "--config", DIGITS, "--config.optimizer.lrr=0.1", check=False)
    assert bad.returncode == 2 and "did you mean 'optimizer.lr'" in bad.stderr


def test_help_and_package_import_load_no_heavy_library():
    """--help answers before JAX, Flax or scikit-learn are imported; fg.train/fg.evaluate stay the functions
    even after their same-named modules are imported."""
    code = ("import sys, contextlib, io, importlib\n"
            "import fastgpu_jax as fg\n"
            "from fastgpu_jax import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            "        cli.main(['train', '--help'])\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "assert '--workdir' in out.getvalue()\n"
            "heavy = sorted(m for m in ('jax', 'flax', 'sklearn', 'numpy', 'ml_collections') if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "importlib.import_module('fastgpu_jax.train'); importlib.import_module('fastgpu_jax.evaluate')\n"
            "assert callable(fg.train) and callable(fg.evaluate) and not isinstance(fg.train, type(sys))\n"
            "assert fg.nn.Dense and fg.load_config and 'train' in dir(fg)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
