"""The one seam between our kernels and a Pallas GPU lowering: which lowering a kernel launches on.

Two lowerings, chosen per kernel here and nowhere else (``chosen``):

* **Mosaic GPU** (``launch_mosaic``, ``plgpu.kernel``): Hopper-native (TMA, wgmma, warp specialisation,
  persistent grids); sm_90 only. Kernels with a Mosaic body: the matmul (``matmul_mgpu.py``) and the
  implicit-GEMM conv (``conv_mgpu.py``, on the matmul's kernel).
* **Triton** (``launch``, ``pl.pallas_call`` with ``pallas.triton.CompilerParams``): runs on Ampere and Hopper;
  deprecated since jax 0.11 ("to be removed in a future version"), so it is the fallback: pre-Hopper GPUs, kernels
  without a Mosaic body, and (op, shape class) pairs where a GPU run measured Triton faster.

``model.pallas_lowering`` / ``use_lowering(...)`` = ``auto`` (default: Mosaic on Hopper (sm_90) where a kernel has
a body, unless ``tuning.TRITON_FASTER_THAN_MOSAIC`` records Triton faster for that op and shape class; Triton
elsewhere; on CPU the Triton interpreter, the fast one), ``triton`` or ``mosaic`` (forced; a kernel without a
Mosaic body still uses Triton, and Mosaic on a non-Hopper GPU is an error). The Mosaic bodies are built on
``wgmma``, which exists on sm_90 only (Blackwell replaced it with tcgen05), hence Hopper and not "sm_90+".
On CPU each lowering runs in its own interpreter: Triton in Pallas' ``interpret=True``, Mosaic in the Mosaic
GPU interpreter (private in jax 0.10-0.12, reached only through ``mosaic_interpreter()`` with a version guard).

Triton's deprecation warning is filtered here by its exact text and nothing else.

Triton-lowering rules the kernels obey (checked by tests that lower for CUDA on a CPU machine):
every array inside a kernel has power-of-2 dimensions, dot dimensions are >= 16, inputs are padded to block
multiples (interpret mode fills out-of-bounds reads with NaN; a GPU reads garbage), and no output block is
accumulated across a grid axis (the reduction loop runs inside the kernel). Mosaic GPU lowering from CPU checks
shared memory against the H100's limit ("exceeds available shared memory"), which the tuning tests rely on.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


TRITON_DEPRECATION = ("The Pallas Triton backend is deprecated and will be removed in a future JAX version. To "
                      "keep using Pallas on GPU, please migrate to the Mosaic GPU backend.")


def _install_warning_filter() -> None:
    """jax >= 0.11 warns each time a Triton kernel lowers; the seam already sends Hopper to Mosaic GPU and
    Triton is what pre-Hopper GPUs have, so that one warning (its exact text, its category) is silenced."""
    warnings.filterwarnings("ignore", message=re.escape(TRITON_DEPRECATION), category=DeprecationWarning)


_install_warning_filter()

LOWERINGS = ("auto", "triton", "mosaic")
MOSAIC_BODIES = frozenset({"matmul", "conv2d"})  # kernels with a Mosaic GPU body
_lowering: contextvars.ContextVar[str] = contextvars.ContextVar("fastgpu_lowering", default="auto")


def check_lowering(name: str) -> str:
    if name not in LOWERINGS:
        raise ValueError(f"model.pallas_lowering={name!r} is not one of {LOWERINGS}")
    return name


def current() -> str:
    """The lowering requested here ("auto" unless ``use_lowering`` says otherwise)."""
    return _lowering.get()


@contextlib.contextmanager
def use_lowering(name: str) -> Iterator[None]:
    """Kernels traced inside use lowering ``name`` ("auto", "triton" or "mosaic")."""
    token = _lowering.set(check_lowering(name))
    try:
        yield
    finally:
        _lowering.reset(token)


def is_hopper(kind: str) -> bool:
    """sm_90 (wgmma's only generation): the GPU kind the tuning table names (H100/H200, also when lowering for
    one from CPU), else the device's compute capability."""
    if kind in ("H100", "H200"):
        return True
    if kind == "cpu" or jax.default_backend() != "gpu":
        return False
    return 9.0 <= float(getattr(jax.devices()[0], "compute_capability", "0")) < 10.0


def chosen(op: str, kind: str, measured_triton_faster: bool = False) -> str:
    """"mosaic" or "triton" for a kernel ``op`` on GPU ``kind`` under the requested lowering."""
    want = _lowering.get()
    if op not in MOSAIC_BODIES or want == "triton":
        return "triton"
    if want == "mosaic":
        if kind != "cpu" and not is_hopper(kind):
            raise ValueError(f"pallas_lowering='mosaic' needs an sm_90 GPU (Hopper); this is a {kind!r}: "
                             f"use 'auto' or 'triton'")
        return "mosaic"
    on_gpu = kind != "cpu" and (_for_gpu.get() or jax.default_backend() == "gpu")
    return "mosaic" if on_gpu and is_hopper(kind) and not measured_triton_faster else "triton"


def describe(kind: str, name: str | None = None) -> str:
    """"<requested>: matmul=<lowering> conv2d=<lowering>" on GPU ``kind``: what bench and train print."""
    with use_lowering(name) if name else contextlib.nullcontext():
        try:
            ops = " ".join(f"{op}={chosen(op, kind)}" for op in ("matmul", "conv2d"))
        except ValueError as e:
            ops = f"error: {e}"
        return f"{_lowering.get()}: {ops}"


_for_gpu: contextvars.ContextVar[bool] = contextvars.ContextVar("fastgpu_for_gpu", default=False)


def interpret_default(interpret: bool | None = None) -> bool:
    """Interpret mode unless told otherwise: on CPU (tests, CI) kernels run in the Pallas interpreter,
    except inside ``lower_for_gpu()``."""
    if interpret is not None:
        return interpret
    return jax.default_backend() == "cpu" and not _for_gpu.get()


@contextlib.contextmanager
def lower_for_gpu(device_name: str = "NVIDIA H100 80GB HBM3") -> Iterator[None]:
    """Kernels traced inside are GPU kernels even on a CPU machine, to be lowered with
    ``.lower(lowering_platforms=("cuda",))`` inside this block (tests and ``benchmarks/sm90_check.py``; they cannot
    run here). On a CPU machine it also declares GPU ``device_name`` as jax's abstract device: from jax 0.11 the
    Triton lowering asks for the GPU it compiles for and, with none, raises "No supported GPU devices found"."""
    token = _for_gpu.set(True)
    try:
        with _abstract_gpu(device_name):
            yield
    finally:
        _for_gpu.reset(token)


def _abstract_gpu(device_name: str) -> contextlib.AbstractContextManager:
    """A one-device abstract mesh whose device is GPU ``device_name`` (CPU machines only: on a GPU the real
    device answers)."""
    if jax.default_backend() != "cpu":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind=device_name, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("_gpu",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


_launches: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastgpu_launches", default=None)


@contextlib.contextmanager
def record_launches() -> Iterator[list]:
    """Collects a dict per kernel launch traced inside: name, grid, warps, stages and ``macs`` = (useful
    multiply-adds, multiply-adds executed including block padding): what ``benchmarks/sm90_check.py``
    reports as padding waste."""
    rows: list = []
    token = _launches.set(rows)
    try:
        yield rows
    finally:
        _launches.reset(token)


def launch(kernel, *, out_shape, grid, in_specs, out_specs, num_warps: int, num_stages: int,
           interpret: bool | None = None, name: str | None = None, macs: tuple[int, int] | None = None):
    """``pl.pallas_call`` on the Triton lowering (or the interpreter); returns the callable: ``launch(...)(*args)``.
    ``macs`` (useful, executed) only feeds ``record_launches``."""
    if (rows := _launches.get()) is not None:
        rows.append(dict(name=name, lowering="triton", grid=list(grid), warps=num_warps, stages=num_stages, macs=macs))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret_default(interpret), name=name)


def plgpu():
    """``jax.experimental.pallas.mosaic_gpu``, imported on first use (it pulls in the Mosaic GPU compiler)."""
    from jax.experimental.pallas import mosaic_gpu
    return mosaic_gpu


MOSAIC_INTERPRETER_MISSING = ("the Mosaic GPU interpreter (jax._src.pallas.mosaic_gpu.interpret, private) is not "
                              "in jax {}: Mosaic GPU kernels cannot run on CPU here")


def mosaic_interpreter():
    """The Mosaic GPU interpreter's params (simulated threads, TMA and barriers on CPU), or None where this jax
    lacks that private module (it exists in jax 0.10.2 through 0.12; its path may move). Its happens-before race
    detector is on (no measurable cost here): a kernel that reads shared memory before waiting on its copy's
    barrier, or refills a buffer a consumer has not released, is reported (printed, and ``races_found``), where
    the interpreter alone would compute the right answer; the tests fail on it (``no_mosaic_races``). TMA copies
    are spread over 16 simulated copy threads (jax's default is 1 or 5): copies sharing a thread are ordered, so
    waiting on a later copy's barrier hid a missing wait on the bias copy; with 16 it is reported."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        return None
    return InterpretGPUParams(detect_races=True, num_tma_threads_per_device=16)


_SMS = {"H100": 132, "H200": 132}
INTERPRET_SMS = 2  # CTAs the interpreter simulates: enough to exercise the persistent loop, still quick


def num_sms(kind: str, interpret: bool) -> int:
    """CTAs in a persistent grid: one per SM."""
    if interpret:
        return INTERPRET_SMS
    if jax.default_backend() == "gpu" and not _for_gpu.get():  # the device's own count where jax reports one
        return getattr(jax.devices()[0], "core_count", None) or _SMS.get(kind, 132)
    return _SMS.get(kind, 132)


def launch_mosaic(kernel, *, out_shape, sms: int, interpret: bool, name: str,
                  macs: tuple[int, int] | None = None):
    """A persistent, warp-specialised Mosaic GPU kernel: ``sms`` CTAs (grid axis "sm") of three warpgroups
    (axis "wg": two compute, one memory). Returns the callable, like ``launch``."""
    if (rows := _launches.get()) is not None:
        rows.append(dict(name=name, lowering="mosaic", grid=[sms], warps=12, stages=None, macs=macs))
    mgpu = plgpu()
    params = None
    if interpret:
        params = mosaic_interpreter()
        if params is None:
            raise RuntimeError(MOSAIC_INTERPRETER_MISSING.format(jax.__version__))
    return mgpu.kernel(kernel, out_type=out_shape, grid=(sms,), grid_names=("sm",), num_threads=3,
                       thread_name="wg", interpret=params,
                       compiler_params=mgpu.CompilerParams(lowering_semantics=mgpu.LoweringSemantics.Warpgroup))


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads ``axis`` of ``x`` up to a multiple of ``multiple`` (no copy if already one)."""
    size = x.shape[axis]
    extra = round_up(size, multiple) - size
    if extra == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads)


def div_mod(x, d: int):
    """(x // d, x % d) for a static positive int ``d``, in int32. Works around two Triton-lowering gaps:
    ``%`` of a weakly typed loop index by a literal (the literal is typed as a boolean), and ops by 1."""
    x = lax.convert_element_type(x, jnp.int32)
    return (x, 0) if d == 1 else (x // d, x % d)
