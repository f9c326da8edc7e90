"""Pallas vs XLA kernel benchmark table (same as `fastgpu-jax bench --kernels`).

    python benchmarks/kernels.py [--tiny] [--iters N] [--json out.json] [--ops matmul,conv]
"""

import sys

from fastgpu_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--kernels", *sys.argv[1:]]))
