"""Pallas GPU kernels (matmul, conv2d). Kernels register themselves with ``fastgpu_jax.nn.backend``.

No kernel ships in this version yet: ``model.backend=pallas`` raises a clear NotImplementedError, and
``auto`` resolves to XLA.
"""
