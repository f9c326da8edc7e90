"""The one seam between our kernels and a Pallas GPU lowering.

Every kernel launches through ``launch(...)`` here. Today that selects the **Triton** lowering (by passing
``pallas.triton.CompilerParams``): it is the one source that runs in CPU interpret mode (tests) and on
Ampere and Hopper GPUs alike, verified on jax 0.11.x. Pallas 0.11 deprecates the Triton backend in favour
of Mosaic GPU; when it goes, a Mosaic GPU body can be chosen here per kernel without touching callers.

Triton-lowering rules the kernels obey (checked by tests that lower for CUDA on a CPU machine):
every array inside a kernel has power-of-2 dimensions, dot dimensions are >= 16, inputs are padded to block
multiples (interpret mode fills out-of-bounds reads with NaN; a GPU reads garbage), and no output block is
accumulated across a grid axis (the reduction loop runs inside the kernel).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


_for_gpu: contextvars.ContextVar[bool] = contextvars.ContextVar("fastgpu_for_gpu", default=False)


def interpret_default(interpret: bool | None = None) -> bool:
    """Interpret mode unless told otherwise: on CPU (tests, CI) kernels run in the Pallas interpreter,
    except inside ``lower_for_gpu()``."""
    if interpret is not None:
        return interpret
    return jax.default_backend() == "cpu" and not _for_gpu.get()


@contextlib.contextmanager
def lower_for_gpu() -> Iterator[None]:
    """Kernels traced inside are GPU kernels even on a CPU machine, to be lowered with
    ``.lower(lowering_platforms=("cuda",))`` (tests and ``benchmarks/sm90_check.py``; they cannot run here)."""
    token = _for_gpu.set(True)
    try:
        yield
    finally:
        _for_gpu.reset(token)


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
        rows.append(dict(name=name, grid=list(grid), warps=num_warps, stages=num_stages, macs=macs))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret_default(interpret), name=name)


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
