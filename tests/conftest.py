"""Shared test helpers. Everything runs on CPU; multi-device tests start their own subprocesses."""

import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_compilations() -> None:
    """One persistent XLA compilation cache for the whole session, its subprocesses and its xdist workers:
    dozens of tests train the same digits CNN, and each fg.train jits its step afresh. A cached executable is
    the one the compiler would build again (its key covers the program, flags and devices), so no claim a test
    makes changes; set JAX_COMPILATION_CACHE_DIR yourself to keep (or FASTGPU_TEST_CACHE=0 to skip) it."""
    if os.environ.get("FASTGPU_TEST_CACHE") == "0" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import atexit
    import shutil
    import tempfile

    cache = tempfile.mkdtemp(prefix="fastgpu-jax-test-xla-cache-")  # the controller's; workers inherit it
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


_share_compilations()


FAST_COMPILE = "--xla_backend_optimization_level=1"


def _compile_fast() -> None:
    """CPU runs compile at XLA's backend optimization level 1, not 2: most of a test's time is XLA compiling
    a model's init and train step, not running its few steps (measured on 2 cores: the jitted init of the
    two-stage ResNet 14 s -> 1.6 s, of the digits CNN 5 s -> 0.8 s, its train step 8 s -> 2.4 s; step times
    unchanged). Level 1 keeps the numerics level 2 gives wherever a test compares two code paths exactly (level
    0 does not: test_flax_twins' Dense == DenseGeneral on Pallas differs by 2e-8). Subprocesses inherit the
    flag (test_parallel's ``_env`` keeps it); FASTGPU_TEST_XLA_OPT=1 compiles at the default level."""
    if os.environ.get("JAX_PLATFORMS") != "cpu" or os.environ.get("FASTGPU_TEST_XLA_OPT") == "1":
        return
    if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()


_compile_fast()

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits_cnn.py")


def run_cli(*args, check=True, timeout=600, env=None):
    """Runs ``python -m fastgpu_jax ARGS`` in a subprocess; returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "fastgpu_jax", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"fastgpu-jax {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


TINY_RESNET = "resnet_2x1"


def register_tiny_resnet() -> str:
    """Registers (once) and names a two-stage ResNet, one BasicBlock each, the second striding and projecting:
    every BatchNorm and convolution situation of a ResNet-18 (stem, 3x3 stride 1 and 2, zero-init last BN,
    1x1 projection shortcut) at a quarter of its compile time. Tests whose claim is about those situations,
    not about depth, train this one."""
    import functools

    from fastgpu_jax import models
    from fastgpu_jax.models.resnet import BasicBlock, ResNet

    if TINY_RESNET not in models.names():
        factory = models._resnet(functools.partial(ResNet, stage_sizes=(1, 1), block=BasicBlock))
        models.register(TINY_RESNET, factory, accepts=models.OPTIONAL_KEYS)
    return TINY_RESNET


@pytest.fixture
def quick_digits():
    """A validated tiny digits config (pass extra overrides as arguments)."""
    import fastgpu_jax as fg

    def make(*overrides):
        base = ["log.tensorboard=False", "log.progress_bar=False"]
        return fg.load_config(DIGITS + ":quick", overrides=base + list(overrides))

    return make


TRAINED_STEPS = 200  # length of the shared `trained_digits` run


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """One digits CNN run (200 steps, one checkpoint), shared by the inference and quantization tests."""
    import fastgpu_jax as fg

    workdir = tmp_path_factory.mktemp("digits_200")
    overrides = [f"train.steps={TRAINED_STEPS}", f"train.checkpoint_every_steps={TRAINED_STEPS}",
                 f"train.eval_every_steps={TRAINED_STEPS}",
                 "train.log_every_steps=100", "log.tensorboard=False", "log.progress_bar=False"]
    fg.train(fg.load_config(DIGITS + ":quick", overrides=overrides), str(workdir))
    return workdir


@pytest.fixture
def mosaic_race_detectors(monkeypatch):
    """The race detectors of every Mosaic GPU kernel the test interprets (``lowering.mosaic_interpreter`` turns
    detection on; the interpreter makes a fresh detector per kernel run, so each one made is kept here).
    Empty where this jax has no Mosaic GPU interpreter."""
    made: list = []
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:
        yield made
        return
    name = next(n for n in ("GPURaceDetectionState", "RaceDetectionState") if hasattr(gpu_callbacks, n))
    make = getattr(gpu_callbacks, name)

    def keep(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(gpu_callbacks, name, keep)
    yield made


MOSAIC_TEST_LIMIT_S = 300  # the slowest interpreted Mosaic GPU test takes ~25 s on 2 cores


@pytest.fixture
def no_mosaic_races(mosaic_race_detectors):
    """Fails the test when a Mosaic GPU kernel it interpreted raced: read shared memory before the barrier of
    its copy was waited, or overwrote a buffer another warpgroup had not released. On a GPU that corrupts
    results now and then; the interpreter alone would compute the right answer and pass.

    Also a watchdog: a kernel bug the interpreter raises on (e.g. a barrier completed twice) leaves its other
    simulated warpgroups waiting forever, so past MOSAIC_TEST_LIMIT_S the process prints every thread's
    traceback and exits (under xdist: that worker's test fails and a new worker goes on) instead of hanging."""
    import faulthandler

    faulthandler.dump_traceback_later(MOSAIC_TEST_LIMIT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
    raced = sum(r.races_found for r in mosaic_race_detectors)
    assert not raced, f"the Mosaic GPU interpreter found races in {raced} kernel run(s) (details printed above)"
