"""Sharded training on 8 fake CPU devices and 2 local processes against the single-device run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

import fastgpu_jax as fg
from fastgpu_jax import parallel
from fastgpu_jax.writers import TIMING_KEYS, read_metrics
from conftest import DIGITS, ROOT
from parallel_worker import config, train_losses

WORKER = os.path.join(ROOT, "tests", "parallel_worker.py")


def _env(devices: int) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}",
                                                                *flags]))


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def _params_rel(workdir_a, workdir_b, params: str = "auto") -> float:
    """Largest difference of a parameter leaf relative to the leaf's largest value; leaves that stay near zero
    (a BatchNorm bias whose gradient nearly cancels: |values| < 1e-3) are measured against 1e-3 instead, so
    rounding at the 1e-9 level in a 1e-6-sized leaf does not read as a 1e-3 disagreement."""
    _, a, _ = fg.restore_state(str(workdir_a), params=params)
    _, b, _ = fg.restore_state(str(workdir_b), params=params)
    return max(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-3))
               for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))


@pytest.fixture(scope="module")
def one_device_cnn(tmp_path_factory):
    """The cnn worker config (dropout on, plain SGD) trained in this process, on its single CPU device:
    (workdir, train losses), the reference of every cnn agreement test here."""
    workdir = tmp_path_factory.mktemp("one_device") / "cnn"
    fg.train(config("cnn"), str(workdir))
    return workdir, train_losses(str(workdir))


# The cnn (dropout on) runs dp, pmap and fsdp on 2 and 4 devices below; on all 8 devices the resnet (BatchNorm,
# every conv kind, and the research recipes: mixup/cutmix, drop path, label smoothing, EMA) runs dp and fsdp.
# Running the cnn on 8 as well cost ~110 s of suite time for no new path, and the legacy pmap on 8 ~40 s more.
def test_dp_fsdp_pmap_follow_the_single_device_curve(tmp_path):
    # The reference is trained by the worker too (strategy none), on one of the 8 devices.
    proc = subprocess.run([sys.executable, WORKER, str(tmp_path), "resnet", "none,dp,fsdp"], env=_env(8),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(curves["none"]) == 20
    for strategy in ("dp", "fsdp"):
        assert _max_rel(curves[strategy], curves["none"]) < 1e-5, strategy
        for params in ("raw", "ema"):
            assert _params_rel(tmp_path / f"resnet-{strategy}", tmp_path / "resnet-none", params) < 1e-4, strategy
    info = json.loads((tmp_path / "resnet-fsdp" / "config.json").read_text())
    assert info["mesh"] == {"data": 1, "fsdp": 8, "model": 1} and len(info["devices"]) == 8


@pytest.mark.parametrize("devices, strategies", [(2, "dp,pmap"), (4, "fsdp,dp")])
def test_2_and_4_devices_follow_the_1_device_curve_with_dropout(devices, strategies, one_device_cnn, tmp_path):
    proc = subprocess.run([sys.executable, WORKER, str(tmp_path), "cnn", strategies], env=_env(devices),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = json.loads(proc.stdout.strip().splitlines()[-1])
    for strategy in strategies.split(","):
        assert _max_rel(curves[strategy], one_device_cnn[1]) < 1e-5, (devices, strategy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(workdir, overrides, steps=None):
    cmd = [sys.executable, "-m", "fastgpu_jax", "train", "--config", DIGITS, "--workdir", str(workdir)]
    base = config("cnn")  # the worker's shared settings, as CLI overrides
    flat = {k: v for k, v in fg.config.to_flat_dict(base).items()}
    for key in ("train.steps", "train.log_every_steps", "train.eval_every_steps", "train.checkpoint_every_steps",
                "model.dropout_rate", "model.width", "data.batch_size", "data.eval_batch_size",
                "optimizer.name", "optimizer.lr", "optimizer.momentum", "optimizer.schedule",
                "optimizer.warmup_steps", "log.tensorboard",
                "log.progress_bar"):
        cmd.append(f"--config.{key}={flat[key]}")
    if steps:
        cmd.append(f"--config.train.steps={steps}")
    return cmd + [f"--config.{o}" for o in overrides]


def test_two_local_processes_match_the_single_process_run(tmp_path, one_device_cnn):
    port = _free_port()
    procs = [subprocess.Popen(_cli(tmp_path / "multi", ["parallel.strategy=dp",
                                                          f"parallel.coordinator=127.0.0.1:{port}",
                                                          "parallel.num_processes=2", f"parallel.process_id={i}"]),
                              env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single, single_losses = one_device_cnn
    assert _max_rel(train_losses(str(tmp_path / "multi")), single_losses) < 1e-5
    assert _params_rel(tmp_path / "multi", single) < 1e-4
    info = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert info["process_count"] == 2 and len(info["devices"]) == 4


def test_a_peer_that_never_joins_is_a_clear_error(tmp_path):
    cmd = _cli(tmp_path / "alone", ["parallel.strategy=dp", f"parallel.coordinator=127.0.0.1:{_free_port()}",
                                    "parallel.num_processes=2", "parallel.process_id=0",
                                    "parallel.init_timeout_s=3"])
    start = time.time()
    proc = subprocess.run(cmd, env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.time() - start < 60
    assert "parallel.init_timeout_s=3" in proc.stderr and "process 0 of 2" in proc.stderr


def _rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(str(workdir))]


def test_sigkill_and_resume_on_8_devices_is_bit_identical(tmp_path):
    steps = 150  # killed past step 50 (two checkpoints and an eval in), resumed with 100 steps still to go
    args = ["parallel.strategy=dp", "train.log_every_steps=7", "train.checkpoint_every_steps=25",
            "train.eval_every_steps=50"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cli(ref, args, steps), env=_env(8), cwd=ROOT, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cli(killed, args, steps), env=_env(8), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(str(killed))
        if rows and rows[-1]["step"] >= 50:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed; raise `steps`"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_cli(killed, args, steps), env=_env(8), cwd=ROOT, check=True, capture_output=True,
                             text=True, timeout=600)
    match = re.search(r"resuming at step (\d+)/", resumed.stdout)
    assert match and int(match.group(1)) > 0, resumed.stdout[-2000:]  # resumed, did not start over
    assert _rows(killed) == _rows(ref)
    _, a, _ = fg.restore_state(str(killed))
    _, b, _ = fg.restore_state(str(ref))
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoints_reshard_8_to_4_to_1_devices(tmp_path):
    run = tmp_path / "reshard"
    for devices, strategy, steps in ((8, "fsdp", 10), (4, "fsdp", 20), (1, "none", 30)):
        proc = subprocess.run(_cli(run, [f"parallel.strategy={strategy}"], steps), env=_env(devices), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (f"resuming at step {steps - 10}" in proc.stdout) == (steps > 10)
    info = json.loads((run / "config.json").read_text())
    assert len(info["devices"]) == 1
    fg.train(config("cnn", "train.steps=30"), str(tmp_path / "straight"))
    assert _max_rel(train_losses(str(run)), train_losses(str(tmp_path / "straight"))) < 1e-5
    assert _params_rel(run, tmp_path / "straight") < 1e-4


def _fake_mesh(**sizes):
    return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "model": 1, **sizes})


@pytest.mark.parametrize("call, words", [
    (lambda: parallel.parse_mesh("data=3", 8), ["parallel.mesh='data=3'", "3 devices", "8"]),
    (lambda: parallel.parse_mesh("dat=8", 8), ["dat=8", "data, fsdp, model"]),
    (lambda: parallel.parse_mesh("data=0", 8), ["data=0"]),
    (lambda: parallel.get_strategy("dp", _fake_mesh(data=8), batch_size=100),
     ["data.batch_size=100", "8 devices"]),
    (lambda: parallel.get_strategy("fsdp", _fake_mesh(fsdp=8), batch_size=64, eval_batch_size=100),
     ["data.eval_batch_size=100", "8 devices"]),
    (lambda: parallel.get_strategy("dp", _fake_mesh(data=2, fsdp=4), batch_size=64), ["strategy=dp", "fsdp"]),
    (lambda: parallel.get_strategy("tp", _fake_mesh()), ["tp", "dp, fsdp, pmap"]),
    (lambda: parallel.parse_rules("kernel"), ["kernel", "regex=auto"]),
])
def test_bad_mesh_and_batch_configs_are_clear_errors(call, words):
    with pytest.raises(ValueError) as err:
        call()
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_fsdp_rules_shard_kernels_and_their_optimizer_state():
    # Adam has no momentum key: put the CNN's plain-SGD momentum back at its default.
    state = fg.build_state(config("cnn", "optimizer.name=adam", "optimizer.momentum=0.9"))
    specs = parallel.partition_specs({"params": state.params, "opt": state.opt_state},
                                     parallel.parse_rules(r"kernel$=auto"), fsdp_size=8)
    kernel_spec = specs["params"]["hidden"]["kernel"]
    assert "fsdp" in tuple(kernel_spec)
    assert tuple(specs["params"]["hidden"]["bias"]) == ()  # biases stay replicated
    mu = [s for path, s in jax.tree_util.tree_flatten_with_path(specs["opt"])[0]
          if "hidden" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
    assert mu and all(s == kernel_spec for s in mu)


def test_fsdp_state_is_born_and_restored_sharded(tmp_path):
    """A ViT under fsdp on 8 devices: every leaf with a dimension that 8 divides is 1/8 per device right after
    init and after a restore, and the compiled step's per-device arguments are ~1/8 of the unsharded ones."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fsdp_worker.py"), str(tmp_path / "w"),
                           "tiny", "--compile"], env=_env(8), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for when in ("after_init", "after_restore"):
        shares = out[when]
        assert len(shares) > 50 and any(k.startswith("[0]") and "kernel" in k for k in shares)
        for path, (share, divisible) in shares.items():
            assert share == (0.125 if divisible else 1.0), (when, path, share)
    assert out["device0_bytes"] < 0.13 * out["state_bytes"]
    batch_bytes = 16 * 16 * 16 * 3 * 4 + 16 * 4
    assert out["fsdp_argument_bytes"] < out["state_bytes"] / 8 + batch_bytes / 8 + 4096
    assert out["none_argument_bytes"] >= out["state_bytes"]


def test_only_params_are_all_gathered_under_fsdp_and_nothing_under_dp():
    """The compiled cnn train step on 8 devices: fsdp all-gathers parameters (whole shapes) and never an
    activation, on XLA and with the Pallas kernels (run per batch shard); dp gathers nothing."""
    proc = subprocess.run([sys.executable, WORKER, "-", "hlo", "fsdp,dp", "xla,pallas"], env=_env(8),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for backend in ("xla", "pallas"):
        fsdp = out[f"fsdp-{backend}"]
        assert fsdp["gathered"], backend  # the params are sharded, so they are gathered
        assert all(shape in fsdp["params"] for shape in fsdp["gathered"]), (backend, fsdp["gathered"])
        assert out[f"dp-{backend}"]["gathered"] == [], backend


def test_pallas_kernels_under_dp_and_fsdp_follow_the_single_device_curve(tmp_path):
    proc = subprocess.run([sys.executable, WORKER, str(tmp_path), "cnn", "none,dp,fsdp", "model.backend=pallas",
                           "train.steps=4", "train.eval_every_steps=0"], env=_env(8), capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(curves["none"]) == 4
    for strategy in ("dp", "fsdp"):
        assert _max_rel(curves[strategy], curves["none"]) < 1e-5, strategy
