"""Block sizes for the kernels: a table keyed by (GPU kind, op, shape class, dtype), with overrides.

Precedence for the blocks a kernel uses: the call's ``blocks=`` argument > ``with use_blocks(...)`` >
entries loaded from a JSON table (``load_table``, e.g. written by ``autotune``; config ``model.pallas_tuning``)
> the built-in ``TABLE`` below. Whatever is chosen is then clamped to the problem (a block never exceeds the
next power of two of its dimension, and never goes below 16, the Triton dot minimum), so tiny shapes in
tests stay tiny.

``FASTER_THAN_XLA`` holds (GPU kind, op, shape class) entries where a benchmark *measured* Pallas faster
than XLA; ``auto`` picks Pallas only there. It is empty until a GPU run fills it (see BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from fastgpu_jax.pallas_kernels.lowering import next_pow2, round_up


@dataclasses.dataclass(frozen=True)
class MatmulBlocks:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class MosaicMatmulBlocks:
    """The Mosaic GPU matmul (``matmul_mgpu.py``): each of a CTA's two compute warpgroups owns a ``tile_m`` x
    ``tile_n`` accumulator (the CTA tile is tile_m x 2·tile_n), the pipeline keeps ``stages`` K-steps of
    ``tile_k`` in flight, the epilogue stores ``epi_n``-column slices, and CTAs walk tiles in bands of ``group``."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    epi_n: int = 64
    group: int = 8


@dataclasses.dataclass(frozen=True)
class ConvBlocks:
    """Implicit-GEMM conv: ``block_m`` output pixels (over batch, rows and columns jointly) x ``block_n``
    output channels per program, reducing ``block_k`` input channels of one tap per step."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2


_KINDS = ("H200", "H100", "A100", "L4", "cpu")
_kind_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgpu_kind", default=None)


def device_kind() -> str:
    """'H100', 'H200', 'A100', ... or 'cpu'; 'default' for an unknown GPU (``use_device_kind`` overrides)."""
    if _kind_override.get():
        return _kind_override.get()
    if jax.default_backend() == "cpu":
        return "cpu"
    return kind_of(jax.devices()[0].device_kind)


def kind_of(device_name: str) -> str:
    """The table's kind for a device name as jax reports it ("NVIDIA H100 80GB HBM3" -> "H100")."""
    return next((k for k in _KINDS if k.lower() in device_name.lower()), "default")


@contextlib.contextmanager
def use_device_kind(kind: str) -> Iterator[None]:
    """Kernels traced inside take the blocks of GPU ``kind`` (e.g. "H100"): lowering for an H100 from a
    CPU machine (``benchmarks/sm90_check.py``) then compiles exactly what that GPU would run."""
    token = _kind_override.set(kind)
    try:
        yield
    finally:
        _kind_override.reset(token)


def matmul_shape_class(m: int, n: int, k: int) -> str:
    if min(m, n) >= 2048 and k >= 1024:
        return "large"
    if min(m, n) >= 256:
        return "medium"
    return "small"


def conv_shape_class(cin: int, cout: int) -> str:
    if min(cin, cout) >= 128:
        return "large"
    if min(cin, cout) >= 32:
        return "medium"
    return "small"


def dtype_name(dtype) -> str:
    """The table's dtype key: "float32" for 4-byte inputs, "bfloat16" for 2-byte ones (bf16, f16)."""
    return "float32" if jnp.dtype(dtype).itemsize >= 4 else "bfloat16"


_B, _F = "bfloat16", "float32"
# (GPU kind, op, shape class, input dtype) -> blocks. "default" rows apply to any kind without its own row.
# The H100 rows are the ones `benchmarks/sm90_check.py` compiles for sm_90a with zero register spills and
# shared memory under the 227 KB an H100 block gets (f32 tiles stream twice the bytes of bf16 ones, hence
# their shorter block_k); the table it prints is in BENCHMARKS.md.
TABLE: dict[tuple[str, str, str, str], MatmulBlocks | ConvBlocks] = {
    ("default", "matmul", "large", _B): MatmulBlocks(128, 128, 32, 4, 3),
    ("default", "matmul", "medium", _B): MatmulBlocks(128, 128, 32, 4, 3),
    ("default", "matmul", "small", _B): MatmulBlocks(64, 64, 32, 4, 2),
    ("default", "matmul", "large", _F): MatmulBlocks(128, 128, 32, 4, 2),
    ("default", "matmul", "medium", _F): MatmulBlocks(128, 128, 32, 4, 2),
    ("default", "matmul", "small", _F): MatmulBlocks(64, 64, 32, 4, 2),
    ("H100", "matmul", "large", _B): MatmulBlocks(128, 128, 64, 8, 3),
    ("H100", "matmul", "medium", _B): MatmulBlocks(128, 128, 64, 8, 3),
    ("H100", "matmul", "small", _B): MatmulBlocks(64, 64, 64, 4, 3),
    ("H100", "matmul", "large", _F): MatmulBlocks(128, 128, 32, 8, 3),
    ("H100", "matmul", "medium", _F): MatmulBlocks(128, 128, 32, 8, 3),
    ("H100", "matmul", "small", _F): MatmulBlocks(64, 64, 32, 4, 3),
    ("default", "conv2d", "large", _B): ConvBlocks(128, 128, 32, 4, 3),
    ("default", "conv2d", "medium", _B): ConvBlocks(128, 64, 32, 4, 3),
    ("default", "conv2d", "small", _B): ConvBlocks(64, 32, 16, 4, 2),
    ("default", "conv2d", "large", _F): ConvBlocks(128, 128, 32, 4, 2),
    ("default", "conv2d", "medium", _F): ConvBlocks(128, 64, 32, 4, 2),
    ("default", "conv2d", "small", _F): ConvBlocks(64, 32, 16, 4, 2),
    ("H100", "conv2d", "large", _B): ConvBlocks(128, 128, 64, 8, 3),
    ("H100", "conv2d", "medium", _B): ConvBlocks(128, 64, 64, 4, 3),
    ("H100", "conv2d", "small", _B): ConvBlocks(128, 64, 64, 4, 3),  # cin < 32 clamps block_k anyway
    ("H100", "conv2d", "large", _F): ConvBlocks(128, 128, 32, 8, 3),
    ("H100", "conv2d", "medium", _F): ConvBlocks(128, 64, 32, 4, 3),
    ("H100", "conv2d", "small", _F): ConvBlocks(128, 64, 32, 4, 3),
}
# Mosaic GPU matmul (Hopper only; "default" rows serve the interpreter). Shared memory per CTA is
# stages x (tile_m + 2·tile_n) x tile_k x itemsize + 32 KB of epilogue staging (2 warpgroups x 2 slots x 64 rows
# x 128 bytes); tests lower every H100 row for CUDA from CPU, which checks it against the 227 KB limit. f32 is
# read as TF32, 32 to a 128-byte row.
_MOSAIC = MosaicMatmulBlocks
# The Mosaic GPU conv (``conv_mgpu.py``) runs the same GEMM kernel; its rows are keyed by the conv's shape class
# (channels) and start as the matmul's, until a GPU sweep tunes them apart.
TABLE.update({(kind, op, shape_class, dt): _MOSAIC(tile, tile, 64 if dt == _B else 32, 4)
              for kind in ("default", "H100") for dt in (_B, _F) for op in ("matmul_mgpu", "conv2d_mgpu")
              for shape_class, tile in (("large", 128), ("medium", 128), ("small", 64))})
# An H200 is an H100 with more (and faster) HBM: same SMs, same shared memory, same rows.
TABLE.update({("H200", *key[1:]): b for key, b in TABLE.items() if key[0] == "H100"})

FASTER_THAN_XLA: dict[tuple[str, str, str], bool] = {}
# (GPU kind, op, shape class) -> True where a benchmark measured the Triton body faster than the Mosaic GPU one:
# ``auto`` then keeps Triton there on Hopper. Empty until a GPU run fills it (gpu_suite.sh's Mosaic rows).
TRITON_FASTER_THAN_MOSAIC: dict[tuple[str, str, str], bool] = {}
_BLOCK_TYPES = {"matmul": MatmulBlocks, "conv2d": ConvBlocks, "matmul_mgpu": MosaicMatmulBlocks,
                "conv2d_mgpu": MosaicMatmulBlocks}

_LOADED: dict[tuple[str, str, str, str], MatmulBlocks | ConvBlocks] = {}
_override: contextvars.ContextVar[dict] = contextvars.ContextVar("fastgpu_blocks", default={})


@contextlib.contextmanager
def use_blocks(*, matmul: MatmulBlocks | None = None, conv2d: ConvBlocks | None = None,
               matmul_mgpu: MosaicMatmulBlocks | None = None,
               conv2d_mgpu: MosaicMatmulBlocks | None = None) -> Iterator[None]:
    """Kernels traced inside the block use these blocks (unless a call passes ``blocks=``)."""
    new = dict(_override.get())
    new.update({k: v for k, v in (("matmul", matmul), ("conv2d", conv2d), ("matmul_mgpu", matmul_mgpu),
                                  ("conv2d_mgpu", conv2d_mgpu)) if v is not None})
    token = _override.set(new)
    try:
        yield
    finally:
        _override.reset(token)


def _lookup(op: str, shape_class: str, dtype):
    kind, dt = device_kind(), dtype_name(dtype)
    for key in ((kind, op, shape_class, dt), ("default", op, shape_class, dt)):
        if key in _LOADED:
            return _LOADED[key]
        if key in TABLE:
            return TABLE[key]
    raise KeyError(f"no tuning entry for op {op!r}, shape class {shape_class!r}, dtype {dt}")


def _clamp(block: int, dim: int) -> int:
    return max(16, min(block, next_pow2(dim)))


def _clamp_padding(block: int, dim: int) -> int:
    """Like ``_clamp``, then halved (down to 16) while padding ``dim`` to it would waste over 10% of the
    work: K = 147 (a 7x7 RGB stem) takes blocks of 32 (160, 8% padding), not 64 (192, 23%). Dimensions
    of 64 and up in multiples of 64 (every ResNet/ViT width) keep the table's block."""
    block = _clamp(block, dim)
    while block > 16 and round_up(dim, block) > 1.1 * dim:
        block //= 2
    return block


def matmul_blocks(m: int, n: int, k: int, blocks: MatmulBlocks | None = None, *,
                  dtype=jnp.bfloat16) -> MatmulBlocks:
    """The blocks a matmul of (m, k) @ (k, n) in ``dtype`` uses."""
    b = blocks or _override.get().get("matmul") or _lookup("matmul", matmul_shape_class(m, n, k), dtype)
    return dataclasses.replace(b, block_m=_clamp_padding(b.block_m, m), block_n=_clamp_padding(b.block_n, n),
                               block_k=_clamp_padding(b.block_k, k))


def mosaic_matmul_blocks(m: int, n: int, k: int, blocks: MosaicMatmulBlocks | None = None, *,
                         dtype=jnp.bfloat16, narrow_n: bool = False) -> MosaicMatmulBlocks:
    """The tiles the Mosaic GPU matmul uses for (m, k) @ (k, n): the table's, shrunk for small problems to what
    wgmma allows (tile_m 64 or 128: one or two 64-row wgmma steps; tile_n a multiple of 64; tile_k one 128-byte
    swizzled row), so tiny test shapes stay tiny. ``narrow_n``: B is laid out so that a warpgroup may own 32
    columns (``matmul_mgpu.narrow_columns``), else 64 at least."""
    b = blocks or _override.get().get("matmul_mgpu") or _lookup("matmul_mgpu", matmul_shape_class(m, n, k), dtype)
    return fit_mosaic(b, m, n, k, dtype, narrow_n)


def mosaic_conv_blocks(cin: int, cout: int, blocks: MosaicMatmulBlocks | None = None, *,
                       dtype=jnp.bfloat16) -> MosaicMatmulBlocks:
    """The table's tiles for a Mosaic GPU conv of ``cin`` -> ``cout`` channels (``conv_mgpu`` fits them to each
    of its GEMMs with ``fit_mosaic``)."""
    return blocks or _override.get().get("conv2d_mgpu") or _lookup("conv2d_mgpu", conv_shape_class(cin, cout), dtype)


def fit_mosaic(b: MosaicMatmulBlocks, m: int, n: int, k: int, dtype, narrow_n: bool = False) -> MosaicMatmulBlocks:
    """``b`` shrunk to an (m, k) @ (k, n) GEMM (see ``mosaic_matmul_blocks``)."""
    row = 128 // jnp.dtype(dtype).itemsize  # elements in a 128-byte swizzle row (narrower K tiles fail to lower)
    least = 32 if narrow_n else 64  # each warpgroup holds half of the CTA's columns
    tile_n = max(least, min(b.tile_n, round_up(-(-n // 2), least)))
    return dataclasses.replace(b, tile_m=64 if m <= 64 else b.tile_m, tile_n=tile_n, epi_n=min(b.epi_n, tile_n),
                               tile_k=max(row, min(b.tile_k, round_up(k, row))))


def conv_blocks(pixels: int, cin: int, cout: int, blocks: ConvBlocks | None = None, *,
                dtype=jnp.bfloat16) -> ConvBlocks:
    """The blocks a conv with ``pixels`` output pixels (N*OH*OW), ``cin`` -> ``cout`` channels uses."""
    b = blocks or _override.get().get("conv2d") or _lookup("conv2d", conv_shape_class(cin, cout), dtype)
    return dataclasses.replace(b, block_m=_clamp(b.block_m, pixels), block_n=_clamp_padding(b.block_n, cout),
                               block_k=_clamp_padding(b.block_k, cin))


def pallas_is_faster(op: str, shape_class: str) -> bool:
    """True only where a benchmark measured Pallas faster than XLA on this GPU kind."""
    return FASTER_THAN_XLA.get((device_kind(), op, shape_class), False)


def triton_is_faster(op: str, shape_class: str) -> bool:
    """True only where a benchmark measured the Triton body faster than the Mosaic GPU one on this GPU kind."""
    return TRITON_FASTER_THAN_MOSAIC.get((device_kind(), op, shape_class), False)


def load_table(path: str) -> None:
    """Merges a JSON table (as written by ``save_table`` or ``benchmarks/lowering_verdict.py``) over the built-in
    one: blocks and the measured flags."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tuning table {path} not found (expected a JSON file written by save_table)")
    with open(path) as f:
        rows = json.load(f)
    for row in rows.get("blocks", []):
        cls = _BLOCK_TYPES.get(row["op"])
        if cls is None:
            raise ValueError(f"tuning table {path}: op {row['op']!r} is not one of {sorted(_BLOCK_TYPES)}")
        fields = [f.name for f in dataclasses.fields(cls)]
        if set(row["blocks"]) - set(fields):
            raise ValueError(f"tuning table {path}: {row['op']} blocks {sorted(row['blocks'])} are not "
                             f"{cls.__name__} fields {fields} (tables from before the conv redesign used "
                             f"block_w; write them again with save_table)")
        for dt in [row["dtype"]] if "dtype" in row else [_B, _F]:  # a row without a dtype serves both
            _LOADED[(row["kind"], row["op"], row["shape_class"], dt)] = cls(**row["blocks"])
    for name, flags in (("faster_than_xla", FASTER_THAN_XLA), ("triton_faster_than_mosaic", TRITON_FASTER_THAN_MOSAIC)):
        for row in rows.get(name, []):
            flags[(row["kind"], row["op"], row["shape_class"])] = bool(row["faster"])


def save_table(path: str) -> None:
    """Writes the loaded/autotuned entries and the measured flags (faster than XLA, Triton faster than Mosaic
    GPU) to ``path``."""
    rows = {
        "blocks": [{"kind": k, "op": o, "shape_class": s, "dtype": d, "blocks": dataclasses.asdict(b)}
                   for (k, o, s, d), b in _LOADED.items()],
        "faster_than_xla": [{"kind": k, "op": o, "shape_class": s, "faster": v}
                            for (k, o, s), v in FASTER_THAN_XLA.items()],
        "triton_faster_than_mosaic": [{"kind": k, "op": o, "shape_class": s, "faster": v}
                                      for (k, o, s), v in TRITON_FASTER_THAN_MOSAIC.items()],
    }
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)


def time_fn(fn: Callable, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds per call of ``fn(*args)`` after ``warmup`` calls (blocks until ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def autotune(op: str, shape_class: str, candidates: Sequence, make_fn: Callable, *args,
             iters: int = 10, dtype=jnp.bfloat16) -> tuple:
    """Times ``make_fn(blocks)(*args)`` for each candidate on this GPU, records the winner for
    (this GPU kind, op, shape_class, dtype) and returns (best blocks, {blocks: seconds}). Candidates that fail to
    compile are skipped."""
    if jax.default_backend() == "cpu":
        raise RuntimeError("autotune times kernels on a GPU; on CPU the kernels run in interpret mode")
    timings = {}
    for blocks in candidates:
        try:
            timings[blocks] = time_fn(jax.jit(make_fn(blocks)), *args, iters=iters)
        except Exception:  # noqa: BLE001 - a candidate that does not compile is just not a winner
            continue
    if not timings:
        raise RuntimeError(f"no candidate blocks compiled for {op} ({shape_class})")
    best = min(timings, key=timings.get)
    _LOADED[(device_kind(), op, shape_class, dtype_name(dtype))] = best
    return best, timings
