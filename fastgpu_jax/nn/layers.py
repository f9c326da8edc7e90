"""Dense and Conv: ``flax.linen.Dense`` / ``flax.linen.Conv`` whose op goes through ``nn.backend``.

They are subclasses of flax's layers, so every field, default, auto-name (``Dense_0``, ``Conv_0``), param
name, shape, dtype and initialiser is flax's own, and so is the computation around the op: 1-D/2-D/3-D
convolutions (an int ``kernel_size`` is 1-D, as in flax), every padding mode (SAME, VALID, CIRCULAR,
REFLECT, CAUSAL, ints, pairs), ``mask``, ``input_dilation``, extra or missing batch dims,
``promote_dtype``, complex dtypes. A checkpoint trained with either backend (or with plain flax layers)
loads into the other and gives the same outputs.

The one difference: when no ``dot_general`` / ``conv_general_dilated`` is given (flax's default, lax),
the op is ``nn.backend.dot_general`` / ``nn.backend.conv_general_dilated`` with the layer's ``backend=``
bound, which runs the calls our kernels cover on the resolved backend and everything else on XLA. A
function (or ``*_cls``) the user passes is used as in flax, always on their terms.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from fastgpu_jax.nn import backend as _backend


def _bind_default_op(module: nn.Module, field: str, fn: Callable) -> None:
    """Sets ``module.<field>`` to ``fn`` with the module's backend bound, unless the user gave their own.
    Runs on every construction, clones included, so ``clone(backend=...)`` re-binds."""
    value = getattr(module, field)
    if value is None or isinstance(value, _backend.LayerOp):
        # Modules are frozen once built; this is still construction (before flax's __post_init__).
        object.__setattr__(module, field, _backend.LayerOp(fn, module.backend))


class Dense(nn.Dense):
    """``flax.linen.Dense`` (``y = x @ kernel + bias`` over the last axis) whose matmul runs on the
    resolved backend; ``backend=`` ("xla" | "pallas" | "auto" | None) overrides it for this layer.

    ``activation`` (None | "relu" | "gelu" | "gelu_exact", i.e. ``jax.nn.relu``, ``jax.nn.gelu`` with
    approximate True / False) is applied to the output: ``Dense(n, activation="relu")(x)`` equals
    ``nn.relu(Dense(n)(x))`` with the same params, and on the ``pallas`` backend bias and activation run in
    the matmul kernel's epilogue (``nn.backend.dense``), forward and backward."""

    backend: str | None = None
    activation: str | None = None

    def __post_init__(self):
        _bind_default_op(self, "dot_general", _backend.dot_general)
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs):
        fusable = (isinstance(self.dot_general, _backend.LayerOp) and self.dot_general_cls is None
                   and self.precision is None)
        if self.activation is None or not fusable:
            y = super().__call__(inputs)  # flax's own path (a user's dot_general or a precision included)
            return _backend.ACTIVATIONS[self.activation](y) if self.activation else y
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        return _backend.dense(inputs, kernel, bias, self.activation, backend=self.backend)


class Conv(nn.Conv):
    """``flax.linen.Conv`` (channels-last: (*batch, *spatial, features)) whose convolution runs on the
    resolved backend when it is 2-D (NHWC/HWIO) and on XLA otherwise; ``backend=`` overrides the backend
    for this layer."""

    backend: str | None = None

    def __post_init__(self):
        _bind_default_op(self, "conv_general_dilated", _backend.conv_general_dilated)
        super().__post_init__()


class DropPath(nn.Module):
    """Stochastic depth (drop path) for a residual branch: in training each example's whole branch is zeroed with
    probability ``rate`` and the kept ones are scaled by 1 / (1 - rate), as timm's ``DropPath``.

    It is a ``flax.linen.Dropout`` broadcast over every non-batch axis, so it draws from the 'dropout' rng and the
    train step's per-example draws (``nn.per_example``) apply: example i is dropped or kept alike on any device
    count. ``rate`` 0 (or ``deterministic``) returns the input untouched.
    """

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic)
