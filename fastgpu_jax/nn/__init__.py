"""Layers whose ops dispatch to XLA or Pallas: ``Dense``, ``Conv``, ``use_backend``; and ``DropPath``."""

from fastgpu_jax.nn.backend import BACKENDS, default_backend, resolve, use_backend
from fastgpu_jax.nn.layers import Conv, Dense, DropPath

__all__ = ["BACKENDS", "Conv", "Dense", "DropPath", "default_backend", "resolve", "use_backend"]
