"""Model registry: ``build(name, num_classes=..., ...)`` returns a flax.linen Module.

Every model maps ``(images (N, H, W, C), train: bool) -> logits (N, num_classes)`` and is built from
``fastgpu_jax.nn`` layers, so the op backend applies to all of them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from fastgpu_jax.models.cnn import CNN, MLP
from fastgpu_jax.models.resnet import ResNet, ResNet18, ResNet34, ResNet50
from fastgpu_jax.models.vit import ViT, build_vit

def _resnet(cls):
    def make(num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None):
        return cls(num_classes=num_classes, width=width, stem=stem, dtype=dtype, bn_axis_name=bn_axis_name)

    return make


def _vit(variant, patch):
    # ViT has no BatchNorm and a fixed width per variant: ``width``, ``stem`` and ``bn_axis_name`` are ignored.
    def make(num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None):
        return build_vit(variant, patch, num_classes=num_classes, dropout_rate=dropout_rate, dtype=dtype)

    return make


_REGISTRY: dict[str, Callable[..., Any]] = {
    "cnn": lambda num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None: CNN(
        num_classes, width, dropout_rate, dtype),
    "mlp": lambda num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None: MLP(
        num_classes, width, dropout_rate, dtype),
    "resnet18": _resnet(ResNet18),
    "resnet34": _resnet(ResNet34),
    "resnet50": _resnet(ResNet50),
    **{f"vit_{v.lower()}{p}": _vit(v, p) for p in (16, 4) for v in ("Ti", "S", "B")},
}

MODEL_NAMES = tuple(_REGISTRY)


def register(name: str, factory: Callable[..., Any]) -> None:
    """Adds a model: ``factory(num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None) -> Module``
    (``bn_axis_name``: the mapped axis BatchNorm statistics are averaged over under dp/pmap)."""
    _REGISTRY[name] = factory


def build(name: str, *, num_classes: int = 10, width: int | None = None, dropout_rate: float = 0.0,
          stem: str = "imagenet", dtype: Any = jnp.float32, bn_axis_name: str | None = None):
    """The model ``name``; ``width`` None means the model's usual width (cnn 32, mlp 256, resnet 64)."""
    if name not in _REGISTRY:
        raise ValueError(f"model {name!r} is unknown; known models: {', '.join(_REGISTRY)}")
    if width is None:
        width = {"cnn": 32, "mlp": 256}.get(name, 64)
    return _REGISTRY[name](num_classes, width, dropout_rate, stem, dtype, bn_axis_name=bn_axis_name)


__all__ = ["CNN", "MLP", "ResNet", "ResNet18", "ResNet34", "ResNet50", "ViT", "MODEL_NAMES", "build",
           "register"]
