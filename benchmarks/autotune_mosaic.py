"""Tries Mosaic GPU tile configurations on this GPU per (op, shape class) and keeps the fastest, as a tuning table.

    python benchmarks/autotune_mosaic.py --table TABLE.json [--ops matmul,conv] [--iters 10]

The table's starting rows (``tuning.TABLE``: 128x128 warpgroup tiles, 4 stages) were chosen without a GPU. Here
each (op, shape class) is timed on one training shape standing for it (below), bf16, with every candidate of
``candidates()``: warpgroup tiles of 64 or 128 rows and columns, K tiles of one or two 128-byte rows, 3 to 6
pipeline stages, all that fit an H100's 227 KB of shared memory by the table's formula (``smem_bytes``, checked
against Mosaic GPU's own lowering check by a test); a candidate that fails to compile is skipped
(``tuning.autotune``). The winners are merged into TABLE.json over what it already holds (e.g. the lowering
verdict's flags from ``benchmarks/lowering_verdict.py``), so one file serves ``model.pallas_tuning``. Matmuls
are timed forward; convs forward + both gradients (their three GEMMs share the conv's row).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp

from fastgpu_jax.pallas_kernels import lowering, tuning
from fastgpu_jax.pallas_kernels.conv2d import conv2d
from fastgpu_jax.pallas_kernels.matmul import matmul

SMEM_LIMIT = 227 * 1024  # an H100's shared memory per block
# One training shape per (op, shape class): (M, K, N) for the matmul; (x NHWC, w HWIO, stride) for the conv.
MATMUL_SHAPES = {"large": (8192, 8192, 8192),  # the 8192^3 target
                 "medium": (256 * 197, 768, 3072),  # ViT-B/16's MLP up-projection at batch 256
                 "small": (256 * 56 * 56, 256, 64)}  # ResNet-50's 1x1 256 -> 64 of stage 1
CONV_SHAPES = {"large": ((256, 14, 14, 256), (3, 3, 256, 256), 1),  # ResNet-50's stage-3 3x3
               "medium": ((256, 56, 56, 64), (3, 3, 64, 64), 1)}  # its stage-1 3x3


def smem_bytes(b: tuning.MosaicMatmulBlocks, itemsize: int = 2) -> int:
    """Shared memory of a CTA (``tuning``'s formula): the pipeline's A and B tiles, plus the epilogue's staging
    (2 warpgroups x 2 slots x 64 rows x epi_n columns)."""
    return b.stages * (b.tile_m + 2 * b.tile_n) * b.tile_k * itemsize + 2 * 2 * 64 * b.epi_n * itemsize


def candidates(itemsize: int = 2) -> list[tuning.MosaicMatmulBlocks]:
    """Every tile configuration tried, smallest shared memory first."""
    row = 128 // itemsize
    out = [tuning.MosaicMatmulBlocks(tile_m=m, tile_n=n, tile_k=k, stages=s, epi_n=64, group=8)
           for m, n, k, s in itertools.product((64, 128), (64, 128), (row, 2 * row), (3, 4, 5, 6))]
    return sorted((b for b in out if smem_bytes(b, itemsize) <= SMEM_LIMIT), key=smem_bytes)


def _matmul(blocks):
    def run(a, b):
        with tuning.use_blocks(matmul_mgpu=blocks), lowering.use_lowering("mosaic"):
            return matmul(a, b)
    return run


def _conv(blocks, stride):
    def run(x, w, dy):
        with tuning.use_blocks(conv2d_mgpu=blocks), lowering.use_lowering("mosaic"):
            y, vjp = jax.vjp(lambda x, w: conv2d(x, w, strides=(stride, stride)), x, w)
            return y, vjp(dy)
    return run


def _problems(ops: tuple[str, ...]):
    """(op, shape class, flops, make_fn, args) per problem, with random bf16 inputs."""
    key = jax.random.PRNGKey(0)
    if "matmul" in ops:
        for shape_class, (m, k, n) in MATMUL_SHAPES.items():
            a, b = (jax.random.normal(key, s, jnp.bfloat16) for s in ((m, k), (k, n)))
            yield "matmul_mgpu", shape_class, 2.0 * m * n * k, _matmul, (a, b)
    if "conv" in ops:
        for shape_class, (x_shape, w_shape, stride) in CONV_SHAPES.items():
            n, h, w_, _ = x_shape
            out = (n, -(-h // stride), -(-w_ // stride), w_shape[3])
            x, w, dy = (jax.random.normal(key, s, jnp.bfloat16) for s in (x_shape, w_shape, out))
            flops = 3 * 2.0 * n * out[1] * out[2] * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3]
            yield "conv2d_mgpu", shape_class, flops, (lambda b, s=stride: _conv(b, s)), (x, w, dy)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help="tuning table to merge the winners into (made if absent)")
    parser.add_argument("--ops", default="matmul,conv", help="comma list of matmul, conv")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("autotune_mosaic.py times kernels on a GPU (sm_90); this machine has "
                         f"{jax.default_backend()}")
    if os.path.exists(args.table):
        tuning.load_table(args.table)
    cands = candidates()
    print(f"{len(cands)} candidates on {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for op, shape_class, flops, make_fn, fn_args in _problems(tuple(args.ops.split(","))):
        kind = tuning.device_kind()
        default = tuning.TABLE.get((kind, op, shape_class, "bfloat16"), tuning.TABLE[("default", op, shape_class,
                                                                                      "bfloat16")])
        candidates_here = [default] + [b for b in cands if b != default]
        best, timings = tuning.autotune(op, shape_class, candidates_here, make_fn, *fn_args, iters=args.iters)
        table_s = timings.get(default, float("nan"))
        print(f"{op} {shape_class}: {len(timings)} of {len(candidates_here)} compiled; the table's "
              f"{flops / table_s / 1e12:.0f} TFLOP/s, best {flops / timings[best] / 1e12:.0f} TFLOP/s "
              f"({table_s / timings[best]:.2f}x) with {dataclasses.asdict(best)}")
        for b, s in sorted(timings.items(), key=lambda kv: kv[1])[:5]:
            print(f"    {s * 1e3:8.3f} ms  {flops / s / 1e12:6.0f} TFLOP/s  {dataclasses.asdict(b)}")
    tuning.save_table(args.table)
    print(f"wrote {args.table} (load with --config.model.pallas_tuning={args.table})")


if __name__ == "__main__":
    main()
