"""The epilogue math both lowerings share: the activations a matmul fuses and their derivatives.

Plain ``jnp`` on float32 values, so the same function runs inside a Triton kernel, a Mosaic GPU kernel and XLA
(the split-K epilogue): one definition, one set of tolerances.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_SQRT_HALF = 0.7071067811865476
# erf(x) = x * P(x²) / Q(x²) on [-4, 4] (Eigen's and XLA's float32 approximation, a few ulp): the Triton
# lowering has no erf, and ViT's MLP uses the exact (erf) GELU.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _erf(x):
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = functools.reduce(lambda acc, c: acc * x2 + c, _ERF_P[1:], jnp.full_like(x, _ERF_P[0]))
    q = functools.reduce(lambda acc, c: acc * x2 + c, _ERF_Q[1:], jnp.full_like(x, _ERF_Q[0]))
    return x * p / q


def activate(z, activation):
    if activation == "relu":
        return jnp.maximum(z, 0.0)
    if activation == "gelu":
        return jax.nn.gelu(z, approximate=True)  # flax.linen.gelu's default
    if activation == "gelu_exact":
        return 0.5 * z * (1.0 + _erf(z * _SQRT_HALF))
    return z


def act_grad(dy, saved, activation):
    """dZ = dY * act'(·) in float32: ``saved`` is the output for relu and the pre-activation for gelu."""
    dy = dy.astype(jnp.float32)
    if activation == "relu":
        return jnp.where(saved.astype(jnp.float32) > 0, dy, 0.0)
    if activation == "gelu":
        z = saved.astype(jnp.float32)
        c = 0.7978845608028654  # sqrt(2 / pi)
        t = jnp.tanh(c * (z + 0.044715 * z * z * z))
        return dy * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z))
    if activation == "gelu_exact":
        z = saved.astype(jnp.float32)
        return dy * (0.5 * (1.0 + _erf(z * _SQRT_HALF)) + z * jnp.exp(-0.5 * z * z) * 0.3989422804014327)
    return dy
