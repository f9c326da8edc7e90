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
    resolved backend; ``backend=`` ("xla" | "pallas" | "auto" | None) overrides it for this layer."""

    backend: str | None = None

    def __post_init__(self):
        _bind_default_op(self, "dot_general", _backend.dot_general)
        super().__post_init__()


class Conv(nn.Conv):
    """``flax.linen.Conv`` (channels-last: (*batch, *spatial, features)) whose convolution runs on the
    resolved backend when it is 2-D (NHWC/HWIO) and on XLA otherwise; ``backend=`` overrides the backend
    for this layer."""

    backend: str | None = None

    def __post_init__(self):
        _bind_default_op(self, "conv_general_dilated", _backend.conv_general_dilated)
        super().__post_init__()
