"""Pallas GPU kernels: pure functions on arrays (no Flax, no configs, no sharding).

    matmul(a, b, bias=None, activation=None)                       # (..., K) @ (K, N), fused epilogue
    conv2d(x, w, strides=(1, 1), padding="SAME", dilation=(1, 1))  # NHWC x HWIO, implicit GEMM

Both are differentiable (``jax.custom_vjp`` with Pallas backward kernels), take any shape (padding to block
multiples inside), accept float32 and bfloat16 with float32 accumulation, and take block sizes from
``tuning`` (overridable per call with ``blocks=``). ``lowering`` picks Triton or Mosaic GPU per kernel
(``use_lowering("mosaic")`` forces it). On CPU they run in an interpreter. The layers in
``fastgpu_jax.nn`` reach them through ``nn/backend.py``; the backend imports these kernels only
when a ``pallas`` or ``auto`` op is first traced.
"""

from fastgpu_jax.pallas_kernels import lowering, tuning
from fastgpu_jax.pallas_kernels.conv2d import conv2d
from fastgpu_jax.pallas_kernels.lowering import use_lowering
from fastgpu_jax.pallas_kernels.matmul import matmul

__all__ = ["conv2d", "lowering", "matmul", "tuning", "use_lowering"]
