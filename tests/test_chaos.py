"""Faults injected on purpose: kills mid-save, incompatible or unreadable checkpoints, two writers, exploding
learning rates, broken config files, a full disk. Each must end in a one-line error or an exact resume, and
never in lost checkpoints or metrics."""

import errno
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
from fastgpu_jax import checkpoint, cli, workdir as workdir_lib
from fastgpu_jax.errors import CheckpointIncompatible, CheckpointUnreadable, NonFiniteError, WorkdirError
from fastgpu_jax.writers import TIMING_KEYS, read_metrics
from conftest import DIGITS, ROOT, run_cli

QUIET = ["--config.log.progress_bar=False", "--config.log.tensorboard=False"]


def _rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(str(workdir))]


def _snapshot(workdir):
    """Every file under the workdir with its size: 'nothing moved or deleted' is this staying equal."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(root, f)
            if f != workdir_lib.LOCK_FILE:
                out[os.path.relpath(path, workdir)] = os.path.getsize(path)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 60-step digits run with checkpoints at 30 and 60 (copied per test with `copy_run`)."""
    workdir = tmp_path_factory.mktemp("finished")
    fg.train(fg.load_config(DIGITS + ":quick", overrides=["log.tensorboard=False", "log.progress_bar=False"]),
             str(workdir))
    return workdir


@pytest.fixture
def copy_run(finished_run, tmp_path):
    import shutil

    def make():
        dest = tmp_path / "run"
        shutil.copytree(finished_run, dest)
        return dest

    return make


def _quick(*overrides):
    return fg.load_config(DIGITS + ":quick", overrides=["log.tensorboard=False", "log.progress_bar=False",
                                                         *overrides])


# --- restores that fail safe -------------------------------------------------------------------------------

def test_sigkill_during_a_save_then_resume_ends_bit_identical(tmp_path):
    # 60 steps, a save every 5: the kill lands in a save at step >= 20 (after an eval, metrics pending across
    # checkpoints), the resume starts mid-run and passes through the evals at 40 and 60.
    steps, every = 60, 5
    cmd = lambda w: ["train", "--config", DIGITS + ":quick", "--workdir", str(w), *QUIET,  # noqa: E731
                     f"--config.train.steps={steps}", f"--config.train.checkpoint_every_steps={every}",
                     "--config.train.log_every_steps=7", "--config.train.eval_every_steps=20"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=ROOT)
    start = lambda w: subprocess.Popen([sys.executable, "-m", "fastgpu_jax", *cmd(w)], env=env, cwd=ROOT,  # noqa
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reference, proc = start(ref), start(killed)  # the uninterrupted reference runs alongside
    ckpts, caught, deadline = killed / "checkpoints", None, time.time() + 300
    while caught is None and proc.poll() is None and time.time() < deadline:
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        tmp = [n for n in names if "tmp" in n and int(n.split(".")[0]) >= 20]
        if tmp:
            proc.send_signal(signal.SIGKILL)
            caught = tmp[0]
        time.sleep(0.0005)
    proc.wait()
    assert reference.wait(timeout=300) == 0
    assert caught is not None, "no in-progress save was caught; the run ended or never saved"
    assert any("tmp" in n for n in os.listdir(ckpts)), "the kill should leave Orbax's temporary folder behind"
    out = run_cli(*cmd(killed))
    assert "resuming at step" in out.stdout
    assert _rows(killed) == _rows(ref)
    _, a, _ = fg.restore_state(str(killed))
    _, b, _ = fg.restore_state(str(ref))
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_shape_incompatible_resume_is_an_error_and_moves_nothing(copy_run):
    run = copy_run()
    before, rows = _snapshot(run), _rows(run)
    with pytest.raises(CheckpointIncompatible) as err:
        fg.train(_quick("model.width=64"), str(run), allow_config_change=True)
    msg = str(err.value)
    assert "params/conv0/bias" in msg and "(32,) float32" in msg and "(64,) float32" in msg and "\n" not in msg
    assert _snapshot(run) == before and _rows(run) == rows
    assert not (run / "checkpoints_corrupt").exists()
    with pytest.raises(CheckpointIncompatible):  # read-only commands say the same, and move nothing either
        fg.restore_state(str(run), _quick("model.width=64"))
    assert _snapshot(run) == before


def test_optimizer_change_names_the_missing_slot(copy_run):
    run = copy_run()
    with pytest.raises(CheckpointIncompatible, match="opt_state/.* is in the (checkpoint|model) but not"):
        fg.train(_quick("optimizer.name=sgd", "optimizer.momentum=0.0"), str(run), allow_config_change=True)


def test_unreadable_file_is_an_error_and_moves_nothing(copy_run, monkeypatch):
    run = copy_run()
    before = _snapshot(run)
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("manifest.ocdbt"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", failing_open, raising=False)
    with pytest.raises(CheckpointUnreadable, match="manifest.ocdbt.*Input/output error.*nothing was moved"):
        fg.train(_quick(), str(run))
    with pytest.raises(CheckpointUnreadable):
        fg.evaluate(str(run))
    assert _snapshot(run) == before


def test_transient_error_inside_orbax_is_not_corruption(copy_run, monkeypatch):
    run = copy_run()
    before = _snapshot(run)

    def flaky_restore(self, step, args=None):
        raise ValueError("tensorstore read failed: UNAVAILABLE: connection reset")

    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky_restore)
    with pytest.raises(CheckpointUnreadable, match="UNAVAILABLE.*may pass"):
        fg.train(_quick(), str(run))
    assert _snapshot(run) == before


# A child that, when started as root, imports and warms up everything first and then drops to an unprivileged
# user, so that a chmod-000 file is unreadable to it (root reads one anyway).
_UNPRIVILEGED = """
import os, sys
import jax, fastgpu_jax, fastgpu_jax.cli, fastgpu_jax.quiet
from fastgpu_jax import data
# Load the package before dropping privileges: the checkout may be unreadable to the unprivileged user.
[getattr(fastgpu_jax, name) for name in fastgpu_jax.__all__]
jax.devices()
for split in ("train", "val", "test"):
    data.load_split("digits", split)
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(fastgpu_jax.cli.main(sys.argv[1:]))
"""


@pytest.fixture
def world_writable_dir():
    """A folder that the unprivileged user can reach too (pytest's tmp_path is private to root)."""
    import pathlib
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="fastgpu-chaos-")
    os.chmod(path, 0o777)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_permission_denied_files_are_an_error_and_move_nothing(finished_run, world_writable_dir):
    import shutil

    run = world_writable_dir / "run"
    shutil.copytree(finished_run, run)
    for root, dirs, files in os.walk(run):
        os.chmod(root, 0o777)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666)
    locked = run / "checkpoints" / "60" / "state" / "manifest.ocdbt"
    os.chmod(locked, 0o000)
    before = _snapshot(run)
    env = dict(os.environ, PYTHONPATH=ROOT)
    config = world_writable_dir / "digits_cnn.py"  # the checkout itself may be private to its owner
    shutil.copy(DIGITS, config)
    os.chmod(config, 0o644)
    for args in (["train", "--config", f"{config}:quick", "--workdir", str(run), *QUIET],
                 ["eval", "--workdir", str(run)]):
        proc = subprocess.run([sys.executable, "-c", _UNPRIVILEGED, *args], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Permission denied" in proc.stderr and "manifest.ocdbt" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _snapshot(run) == before


def test_eval_on_a_corrupt_newest_checkpoint_uses_the_previous_and_moves_nothing(copy_run):
    run = copy_run()
    for root, _, files in os.walk(run / "checkpoints" / "60" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    before = _snapshot(run)
    proc = run_cli("eval", "--workdir", str(run))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoints/60 is corrupt" in lines[0] and "nothing moved" in lines[0], lines
    assert _snapshot(run) == before


def test_only_proven_corruption_is_set_aside_and_never_a_silent_restart(copy_run):
    run = copy_run()
    for step in ("30", "60"):  # damage the data of both checkpoints, metadata intact: readable, fits, broken
        for root, _, files in os.walk(run / "checkpoints" / step / "state" / "d"):
            for f in files:
                path = os.path.join(root, f)
                data = bytearray(open(path, "rb").read())
                data[len(data) // 2:] = b"\x00" * (len(data) - len(data) // 2)
                open(path, "wb").write(bytes(data))
    rows = _rows(run)
    with pytest.warns(checkpoint.CheckpointWarning):
        with pytest.raises(fg.errors.CheckpointError, match="--restart"):
            fg.train(_quick(), str(run))
    assert sorted(os.listdir(run / "checkpoints_corrupt")) == ["30", "60"]  # set aside, never deleted
    assert _rows(run) == rows  # no metric row lost to a restart that did not happen
    summary = fg.train(_quick(), str(run), restart=True)
    assert summary["step"] == 60
    kept = run / "restarted" / "1"
    assert sorted(os.listdir(kept / "checkpoints_corrupt")) == ["30", "60"]
    assert _rows(kept) == rows
    assert sorted(os.listdir(run / "checkpoints")) == ["30", "60"] and not (run / "checkpoints_corrupt").exists()


def test_rows_cut_by_a_resume_are_kept_in_a_backup(copy_run):
    run = copy_run()
    import shutil

    shutil.rmtree(run / "checkpoints" / "60")  # as if killed after logging step 60 but before its save
    full, rows = (run / "metrics.jsonl").read_text(), _rows(run)
    fg.train(_quick(), str(run))
    assert (run / "metrics.jsonl.1.bak").read_text() == full  # the rows past step 30, kept before the cut
    assert _rows(run) == rows  # and the resumed run wrote them again, identically


def test_checkpoints_that_is_a_file_is_one_line_and_touches_nothing(tmp_path, capsys):
    (tmp_path / "checkpoints").write_text("not a folder")
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "split": "train", "loss": 1.0}\n')
    start = time.time()
    rc = cli.main(["train", "--config", DIGITS + ":quick", "--workdir", str(tmp_path), *QUIET])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoints is not a directory" in err and len(err.strip().splitlines()) == 1
    assert time.time() - start < 60
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 5, "split": "train", "loss": 1.0}\n'


# --- one writer per workdir --------------------------------------------------------------------------------

def test_a_second_train_on_a_locked_workdir_is_refused(tmp_path):
    with workdir_lib.WorkdirLock(str(tmp_path)):
        proc = run_cli("train", "--config", DIGITS + ":quick", "--workdir", str(tmp_path), *QUIET, check=False)
    assert proc.returncode == 2
    assert f"PID {os.getpid()}" in proc.stderr and "in use" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_the_lock_dies_with_its_process(tmp_path):
    code = ("import sys, time; from fastgpu_jax import workdir as w; l = w.WorkdirLock(sys.argv[1]).__enter__(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirError, match=f"PID {holder.pid}"):
        workdir_lib.WorkdirLock(str(tmp_path)).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workdir_lib.WorkdirLock(str(tmp_path)):  # kill -9 leaves no stale lock
        pass


# --- non-finite values ---------------------------------------------------------------------------------------

def test_exploding_lr_stops_before_a_later_checkpoint_and_the_newest_is_finite(tmp_path):
    cfg = _quick("optimizer.lr=1e6", "train.checkpoint_every_steps=1", "train.log_every_steps=50")
    with pytest.raises(NonFiniteError, match=r"at step (\d+)") as err:
        fg.train(cfg, str(tmp_path))
    bad = int(err.value.args[0].split("at step ")[1].split()[0])
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert saved and saved[-1] == bad - 1, (saved, bad)  # every step before the bad one, none after
    _, state, step = fg.restore_state(str(tmp_path))
    assert step == bad - 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((state.params, state.opt_state)))


def test_overflowing_gradient_norm_with_finite_elements_skips_the_update():
    import flax.linen as linen
    import optax

    class Linear(linen.Module):
        @linen.compact
        def __call__(self, x, train=False):
            return linen.Dense(10)(x.reshape(x.shape[0], -1))

    state = fg.create_train_state(Linear(), optax.sgd(1e-3), seed=0, input_shape=(1, 8, 8, 1))
    # inputs of 1e30: every gradient element is about 1e30 (finite), their squares overflow float32
    batch = {"image": np.full((4, 8, 8, 1), 1e30, np.float32), "label": np.zeros(4, np.int32)}
    new, metrics = jax.jit(fg.train_step)(state, batch)
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        state.apply_fn({"params": p}, batch["image"]), batch["label"]).mean())(state.params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))  # the elements are finite
    assert not np.isfinite(float(metrics["grad_norm"])) and int(metrics["nonfinite"]) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(new.step) == 1


def test_metrics_stay_strict_json_when_values_are_not_finite(tmp_path):
    from fastgpu_jax.writers import MetricWriter

    w = MetricWriter(str(tmp_path), total_steps=1, tensorboard=False, progress_bar=False)
    w.write(1, "train", {"loss": float("nan"), "grad_norm": float("inf"), "accuracy": 0.5})
    line = (tmp_path / "metrics.jsonl").read_text()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert row["loss"] is None and row["grad_norm"] is None and row["accuracy"] == 0.5
    assert row["nonfinite_values"] == ["loss", "grad_norm"]


@pytest.mark.parametrize("value", ["1e999", "-inf", "nan", "inf"])
def test_config_rejects_non_finite_numbers(value):
    with pytest.raises(fg.ConfigError, match="optimizer.lr.*finite"):
        fg.load_config(DIGITS, overrides=[f"optimizer.lr={value}"])
    with pytest.raises(fg.ConfigError, match="optimizer.weight_decay.*finite"):  # from a config file's values
        fg.build_config({"optimizer": {"weight_decay": float(value)}})


# --- every user error is one line, exit 2 ----------------------------------------------------------------------

CONFIG_MISTAKES = {
    "syntax.py": ("def get_config(:\n    pass\n", "", "syntax error at line 1"),
    "imports.py": ("import no_such_module_here\n", "", "ModuleNotFoundError: No module named 'no_such_module_here'"),
    "raises.py": ("def get_config():\n    return {'a': 1 / 0}\n", "", "ZeroDivisionError"),
    "not_callable.py": ("get_config = {'seed': 1}\n", "", "not a function"),
    "no_arg.py": ("def get_config():\n    return {}\n", ":quick", "takes no argument"),
    "missing.py": (None, "", "does not exist"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_MISTAKES))
def test_config_file_mistakes_are_one_line_exit_2(name, tmp_path, capsys):
    text, arg, words = CONFIG_MISTAKES[name]
    if text is not None:
        (tmp_path / name).write_text(text)
    rc = cli.main(["train", "--config", str(tmp_path / name) + arg, "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and err.startswith("fastgpu-jax: error:"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


@pytest.mark.parametrize("args, words", [
    (["--config.train.steps"], "needs a value"),
    (["stray"], "unrecognized argument 'stray'"),
])
def test_malformed_command_lines_are_one_line_exit_2(args, words, tmp_path, capsys):
    rc = cli.main(["train", "--config", DIGITS, "--workdir", str(tmp_path / "w"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1


def test_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    rc = cli.main(["train", "--config", DIGITS + ":quick", "--workdir", str(tmp_path / "f")])
    assert rc == 2 and "is a file, not a directory" in capsys.readouterr().err


def test_traceback_flag_shows_the_traceback(tmp_path):
    proc = run_cli("train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "w"),
                   "--traceback", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "does not exist" in proc.stderr


def test_full_disk_names_the_error_and_the_intact_checkpoint(tmp_path):
    """RLIMIT_FSIZE makes every write past 256 KiB fail with EFBIG ('File too large'), as a full disk does
    with ENOSPC: the checkpoint data file is larger, metrics lines are not."""
    limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024)); "
               "sys.argv[0] = 'fastgpu-jax'; runpy.run_module('fastgpu_jax', run_name='__main__')")
    args = ["train", "--config", DIGITS + ":quick", "--workdir", str(tmp_path), *QUIET]
    proc = subprocess.run([sys.executable, "-c", limited, *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "checkpoint" in lines[0], lines
    if "no checkpoint is complete" in lines[0]:
        assert not fg.checkpoint.Checkpointer(str(tmp_path), read_only=True).steps()
    else:  # the step it calls intact is a finished checkpoint that restores
        intact = int(lines[0].split("newest intact checkpoint is step ")[1].split()[0])
        assert fg.restore_state(str(tmp_path))[2] == intact


# --- bad inputs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("images, words", [
    (np.full((2, 8, 8), np.nan, np.float32), "NaN or infinite"),
    (np.full((2, 8, 8), np.inf, np.float32), "NaN or infinite"),
    (np.zeros((2, 8, 8), np.complex64), "real numbers"),
])
def test_predict_rejects_non_finite_or_complex_images_before_restoring(images, words, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"config": fg.config.to_flat_dict(_quick())}))
    with pytest.raises(ValueError, match=words):  # no checkpoint: the input check comes first
        fg.predict(str(tmp_path), images)


def test_idx_header_with_huge_dimensions_reports_a_positive_size(tmp_path):
    import struct

    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">I", 0x803) + struct.pack(">III", 2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1))
    with pytest.raises(ValueError) as err:
        fg.data.sources.read_idx(path, magic=0x803)
    assert "-" not in str(err.value).split("need")[1] and str((2 ** 32 - 1) ** 3 + 16) in str(err.value)


def test_a_finished_run_says_so_and_reports_its_last_metrics(copy_run, capsys):
    run = copy_run()
    before = _snapshot(run)
    summary = fg.train(_quick(), str(run))
    assert "already finished at step 60/60" in capsys.readouterr().out
    last = {r["split"]: r for r in read_metrics(str(run))}
    assert summary["step"] == 60 and summary["train"]["loss"] == last["train"]["loss"]
    assert summary["val"]["accuracy"] == last["val"]["accuracy"]
    assert _snapshot(run) == before  # nothing rewritten
