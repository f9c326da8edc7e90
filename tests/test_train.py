"""The loop: determinism, exact resume after SIGKILL, corrupt checkpoints, config changes, NaN policy."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fastgpu_jax as fg
from fastgpu_jax.writers import TIMING_KEYS, read_metrics
from conftest import DIGITS, ROOT


def _rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(workdir)]


def _assert_same_params(a, b):
    _, sa, _ = fg.restore_state(str(a))
    _, sb, _ = fg.restore_state(str(b))
    for x, y in zip(jax.tree.leaves((sa.params, sa.opt_state)), jax.tree.leaves((sb.params, sb.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_same_config_gives_bit_identical_runs(tmp_path, quick_digits):
    cfg = quick_digits("model.dropout_rate=0.2")
    fg.train(cfg, str(tmp_path / "a"))
    fg.train(cfg, str(tmp_path / "b"))
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    _assert_same_params(tmp_path / "a", tmp_path / "b")
    info = json.loads((tmp_path / "a" / "config.json").read_text())
    assert info["config"]["model.dropout_rate"] == 0.2 and info["versions"]["jax"] and info["devices"]


def _train_cmd(workdir, steps):
    # log every 7, checkpoint every 25: checkpoints fall mid log-window, so the pending metrics must survive.
    return [sys.executable, "-m", "fastgpu_jax", "train", "--config", DIGITS, "--workdir", str(workdir),
            f"--config.train.steps={steps}", "--config.train.log_every_steps=7",
            "--config.train.eval_every_steps=50", "--config.train.checkpoint_every_steps=25",
            "--config.model.dropout_rate=0.1", "--config.log.progress_bar=False"]


def test_sigkill_and_resume_ends_bit_identical(tmp_path):
    steps = 300  # kill after step 100; test_chaos kills during a save
    env = dict(os.environ, PYTHONPATH=ROOT)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_train_cmd(ref, steps), check=True, env=env, capture_output=True, cwd=ROOT, timeout=600)

    proc = subprocess.Popen(_train_cmd(killed, steps), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(str(killed))
        if rows and rows[-1]["step"] >= 100:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed; raise `steps`"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last_logged = read_metrics(str(killed))[-1]["step"]
    assert 100 <= last_logged < steps

    out = subprocess.run(_train_cmd(killed, steps), check=True, env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert "resuming at step" in out.stdout
    assert _rows(killed) == _rows(ref)
    _assert_same_params(killed, ref)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, quick_digits):
    cfg = quick_digits()  # 60 steps, checkpoints every 30
    fg.train(cfg, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["30", "60"]
    for root, _, files in os.walk(ckpts / "60" / "state"):  # damage every data file of the newest one
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.warns(UserWarning, match="is corrupt.*nothing moved"):
        _, state, step = fg.restore_state(str(tmp_path))
    assert step == 30 and int(state.step) == 30
    assert not (tmp_path / "checkpoints_corrupt").exists()  # read-only: restore_state moves nothing
    with pytest.warns(UserWarning, match="is corrupt.*moved it to"):
        fg.train(cfg, str(tmp_path))  # resumes from 30 and completes 60 again
    assert (tmp_path / "checkpoints_corrupt" / "60").exists()  # set aside by train, not deleted
    assert sorted(os.listdir(ckpts)) == ["30", "60"]


def test_resume_with_changed_config_is_an_error_unless_allowed(tmp_path, quick_digits):
    fg.train(quick_digits(), str(tmp_path))
    with pytest.raises(fg.ConfigError, match="optimizer.lr") as err:
        fg.train(quick_digits("optimizer.lr=0.5"), str(tmp_path))
    assert "--allow-config-change" in str(err.value)
    # logging cadence is not a change of the computation
    fg.train(quick_digits("train.log_every_steps=10"), str(tmp_path))
    summary = fg.train(quick_digits("optimizer.lr=0.5"), str(tmp_path), allow_config_change=True)
    assert summary["step"] == 60


def test_nan_policy_stop_raises_and_skip_completes(tmp_path, quick_digits):
    explode = ["optimizer.name=sgd", "optimizer.lr=1e30", "optimizer.momentum=0.0", "optimizer.schedule=constant"]
    with pytest.raises(FloatingPointError, match="train.nan_policy=stop"):
        fg.train(quick_digits(*explode), str(tmp_path / "stop"))
    summary = fg.train(quick_digits(*explode, "train.nan_policy=skip"), str(tmp_path / "skip"))
    assert summary["step"] == 60
    rows = [r for r in read_metrics(str(tmp_path / "skip")) if r["split"] == "train"]
    assert sum(r.get("nonfinite_steps", 0) for r in rows) > 0
    _, state, _ = fg.restore_state(str(tmp_path / "skip"))
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params))


def test_fresh_run_drops_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path, quick_digits):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "split": "train", "loss": 1.0}) + "\n{\"step\": 6")
    fg.train(quick_digits(), str(tmp_path))
    steps = [r["step"] for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert steps == [20, 40, 60]


def test_evaluate_returns_metrics_of_the_newest_checkpoint(tmp_path, quick_digits):
    cfg = quick_digits()
    summary = fg.train(cfg, str(tmp_path))
    val = fg.evaluate(str(tmp_path), split="val")
    assert val["step"] == 60 and val["count"] == 180
    assert val["accuracy"] == pytest.approx(summary["val"]["accuracy"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        fg.evaluate(str(tmp_path / "nothing"))


def test_start_line_states_the_run_and_notices_surprising_settings(quick_digits):
    import importlib

    from fastgpu_jax import parallel

    train_lib = importlib.import_module("fastgpu_jax.train")  # the package exports train() under that name
    cfg = quick_digits("parallel.strategy=dp", "model.backend=pallas")
    mesh = parallel.make_mesh(cfg)
    text = train_lib._run_description(cfg, mesh)
    for words in ("cnn on digits", "strategy dp", "mesh 1 device", "1 cpu device(s)", "backend pallas"):
        assert words in text, text
    notices = train_lib._notices(cfg, mesh)
    assert len(notices) == 2 and "Pallas interpreter" in notices[0] and "single device" in notices[1]
    assert train_lib._notices(quick_digits(), mesh) == []


def test_a_failed_start_removes_only_a_workdir_it_created(tmp_path, quick_digits):
    cfg = quick_digits("data.name='mnist'")  # no data.dir: refused when the data is first read
    with pytest.raises(fg.ConfigError, match="data.dir"):
        fg.train(cfg, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(fg.ConfigError, match="data.dir"):
        fg.train(cfg, str(mine))
    assert (mine / "notes.txt").read_text() == "the user's"
