"""ResNet-18/34/50 (v1.5: stride on the 3x3 conv of bottleneck blocks) with BatchNorm.

``stem="imagenet"``: 7x7/2 conv + 3x3/2 max-pool (224x224 inputs); ``stem="cifar"``: one 3x3/1 conv, no pool
(32x32 inputs). Parameter count of ResNet-50 on 1000 classes: 25,557,032, as torchvision's.
BatchNorm runs in float32 statistics whatever the compute dtype; the last BN of each residual branch is
zero-initialised (a common trick that helps large-batch training; set ``zero_init_residual=False`` to undo).
``dropout_rate`` > 0 drops pooled features before the head in training (``train=True``, drawing from the
'dropout' rng); it adds no parameters, so a checkpoint loads whatever the rate.
``drop_path_rate`` > 0 is stochastic depth (Huang et al. 2016, as timm's ResNet): in training each example skips
block b's residual branch with probability ``drop_path_rate * b / (blocks - 1)`` (linear from 0 at the first
block), the kept branches scaled by 1 / keep. Its draws are per example (``fastgpu_jax.nn.DropPath``), so a run
is the same on any device count.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fastgpu_jax.nn import Conv, Dense, DropPath


# torchvision's padding of every 3x3 conv: one pixel on each side. flax's "SAME" pads a stride-2 conv on an even
# input by (0, 1) instead, which shifts the sampling grid and makes pretrained torchvision/timm weights give other
# logits (7% off on ResNet-50 at 224x224). The output shapes are the same either way.
_PAD3 = ((1, 1), (1, 1))


def _last_bn_init(zero_init_residual: bool):
    return nn.initializers.zeros_init() if zero_init_residual else nn.initializers.ones_init()


class BasicBlock(nn.Module):
    filters: int
    strides: int
    conv: Any
    norm: Any
    zero_init_residual: bool = True
    drop_path_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD3)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3), padding=_PAD3)(y)
        y = self.norm(scale_init=_last_bn_init(self.zero_init_residual))(y)
        if residual.shape != y.shape:
            residual = self.norm(name="proj_bn")(
                self.conv(self.filters, (1, 1), self.strides, name="proj_conv")(residual))
        return nn.relu(residual + DropPath(self.drop_path_rate, deterministic=not self.train)(y))


class BottleneckBlock(nn.Module):
    filters: int
    strides: int
    conv: Any
    norm: Any
    zero_init_residual: bool = True
    drop_path_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides, padding=_PAD3)(y)))
        y = self.conv(4 * self.filters, (1, 1))(y)
        y = self.norm(scale_init=_last_bn_init(self.zero_init_residual))(y)
        if residual.shape != y.shape:
            residual = self.norm(name="proj_bn")(
                self.conv(4 * self.filters, (1, 1), self.strides, name="proj_conv")(residual))
        return nn.relu(residual + DropPath(self.drop_path_rate, deterministic=not self.train)(y))


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block: Any
    num_classes: int = 1000
    width: int = 64
    stem: str = "imagenet"
    dtype: Any = jnp.float32
    zero_init_residual: bool = True
    bn_axis_name: str | None = None  # dp/pmap: BatchNorm statistics averaged over this mapped axis
    dropout_rate: float = 0.0  # on the pooled features, before the head (train mode only)
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear from 0), train mode only

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype, param_dtype=jnp.float32, axis_name=self.bn_axis_name)
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(self.width, (7, 7), 2, padding=((3, 3), (3, 3)), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "cifar":
            x = nn.relu(norm(name="stem_bn")(conv(self.width, (3, 3), padding=_PAD3, name="stem_conv")(x)))
        else:
            raise ValueError(f"ResNet stem {self.stem!r} is unknown; use imagenet or cifar")
        blocks, index = sum(self.stage_sizes), 0
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                rate = self.drop_path_rate * index / max(blocks - 1, 1)
                x = self.block(self.width * 2 ** i, strides, conv=conv, norm=norm,
                               zero_init_residual=self.zero_init_residual, drop_path_rate=rate, train=train,
                               name=f"stage{i}_block{j}")(x)
                index += 1
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return Dense(self.num_classes, dtype=self.dtype, name="head")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BottleneckBlock)
