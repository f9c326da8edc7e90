"""The loop: determinism, corrupt checkpoints, config changes, NaN policy (SIGKILL: test_chaos, test_parallel)."""

import json
import os

import jax
import numpy as np
import pytest

import fastgpu_jax as fg
from fastgpu_jax.writers import TIMING_KEYS, read_metrics


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


# Exact resume after SIGKILL is tested where it is hardest: test_chaos kills a run in the middle of a save
# (single device, metrics pending across checkpoints, dropout on) and test_parallel kills an 8-device dp run;
# both compare every logged row, the params and the optimizer state bit for bit with an uninterrupted run.


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
