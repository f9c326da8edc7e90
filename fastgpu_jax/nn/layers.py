"""Dense and Conv: drop-in twins of ``flax.linen.Dense`` / ``flax.linen.Conv`` whose op goes through
``nn.backend``.

Parameter names (``kernel``, ``bias``), shapes, dtypes and initialisers equal flax's, so a checkpoint
trained with one backend (or with plain flax layers) loads into the other and gives the same outputs.
Only 2-D convolution is supported (NHWC inputs, HWIO kernels), which is all the models need.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from fastgpu_jax.nn import backend as _backend

default_kernel_init = nn.initializers.lecun_normal()


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"Conv {name} must be an int or a pair, got {value}")
    return value


def _padding(padding: Any) -> str | tuple[tuple[int, int], ...]:
    """Canonical lax padding: 'SAME' / 'VALID' / ((lo, hi), (lo, hi))."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"Conv padding {padding!r} is not supported; use SAME, VALID, an int or pairs")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    pads = tuple(padding)
    if len(pads) != 2:
        raise ValueError(f"Conv padding must give 2 spatial entries, got {padding}")
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pads)


class Dense(nn.Module):
    """``y = x @ kernel + bias`` over the last axis; the matmul runs on the resolved backend."""

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    backend: str | None = None

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = _backend.matmul(inputs, kernel, precision=self.precision, backend=self.backend)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class Conv(nn.Module):
    """2-D convolution, NHWC inputs; the conv runs on the resolved backend."""

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    backend: str | None = None

    @nn.compact
    def __call__(self, inputs):
        kernel_size = _pair(self.kernel_size, "kernel_size")
        unbatched = inputs.ndim == 3
        if unbatched:
            inputs = inputs[None]
        if inputs.ndim != 4:
            raise ValueError(f"Conv expects NHWC (or HWC) inputs, got shape {inputs.shape}")
        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(f"Conv input channels {in_features} not divisible by "
                             f"feature_group_count={self.feature_group_count}")
        kernel_shape = kernel_size + (in_features // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = _backend.conv2d(inputs, kernel, strides=_pair(self.strides, "strides"),
                            padding=_padding(self.padding),
                            dilation=_pair(self.kernel_dilation, "kernel_dilation"),
                            feature_group_count=self.feature_group_count, precision=self.precision,
                            backend=self.backend)
        if bias is not None:
            y += bias.reshape((1, 1, 1, -1))
        return y[0] if unbatched else y
