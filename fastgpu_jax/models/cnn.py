"""Small convolutional and fully connected classifiers for digits / MNIST-sized inputs."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fastgpu_jax.nn import Conv, Dense


class CNN(nn.Module):
    """The classic small CNN: [conv3x3 + ReLU + maxpool2] x2, dense + ReLU, dropout, dense.

    ``width`` is the first conv's channels (the second has 2x); the hidden dense has 4x.
    Works on any input at least 4x4 (8x8 digits, 28x28 MNIST, 32x32 CIFAR).
    """

    num_classes: int = 10
    width: int = 32
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        for i, ch in enumerate((self.width, 2 * self.width)):
            x = Conv(ch, (3, 3), dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = Dense(4 * self.width, dtype=self.dtype, activation="relu", name="hidden")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class MLP(nn.Module):
    """Two hidden layers of ``width`` units on the flattened image."""

    num_classes: int = 10
    width: int = 256
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype).reshape((x.shape[0], -1))
        for i in range(2):
            x = Dense(self.width, dtype=self.dtype, activation="relu", name=f"hidden{i}")(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return Dense(self.num_classes, dtype=self.dtype, name="head")(x)
