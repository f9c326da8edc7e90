"""Model registry: ``build(name, num_classes=..., ...)`` returns a flax.linen Module.

Every model maps ``(images (N, H, W, C), train: bool) -> logits (N, num_classes)`` and is built from
``fastgpu_jax.nn`` layers, so the op backend applies to all of them.

The registry is also the one place that knows which model acts on which of the optional ``model.*`` config
keys (``OPTIONAL_KEYS``: width, stem, dropout_rate, drop_path_rate). The config takes the allowed
``model.name`` values and these facts from here (``names``, ``accepted_keys``, ``why_ignored``): a model added
with ``register`` — in a config file's body, say — is usable by name, and a config that sets a key its model
would ignore is refused at load time instead of silently doing nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax.numpy as jnp

from fastgpu_jax.models.cnn import CNN, MLP
from fastgpu_jax.models.resnet import ResNet, ResNet18, ResNet34, ResNet50
from fastgpu_jax.models.vit import ViT, build_vit

# The model.* config keys a model may or may not act on. Every model acts on num_classes, on the op backend
# (model.backend: its nn layers) and on train.precision (dtype).
OPTIONAL_KEYS = ("width", "stem", "dropout_rate", "drop_path_rate")


def _resnet(cls):
    def make(num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None, drop_path_rate=0.0):
        return cls(num_classes=num_classes, width=width, stem=stem, dropout_rate=dropout_rate, dtype=dtype,
                   bn_axis_name=bn_axis_name, drop_path_rate=drop_path_rate)

    return make


def _vit(variant, patch):
    # ViT has no BatchNorm and a fixed width per variant: ``width``, ``stem`` and ``bn_axis_name`` are ignored.
    def make(num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None, drop_path_rate=0.0):
        return build_vit(variant, patch, num_classes=num_classes, dropout_rate=dropout_rate, dtype=dtype,
                         drop_path_rate=drop_path_rate)

    return make


def _cnn(cls):
    def make(num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None):
        return cls(num_classes, width, dropout_rate, dtype)

    return make


_REGISTRY: dict[str, Callable[..., Any]] = {}
# name -> (the OPTIONAL_KEYS its factory acts on, {key it ignores: why} (built-in models only))
_KEYS: dict[str, tuple[frozenset, dict[str, str]]] = {}
_USUAL_WIDTH = {"cnn": 32, "mlp": 256}  # what ``width=None`` means; 64 otherwise (the ResNets)


def _add(name: str, factory, accepts: Iterable[str], why: dict[str, str] | None = None) -> None:
    _REGISTRY[name] = factory
    _KEYS[name] = (frozenset(accepts), dict(why or {}))


_NO_STEM = {"stem": "only the ResNets have a choice of stem",
            "drop_path_rate": "stochastic depth needs residual blocks (resnet*, vit_*)"}
for _name, _cls in (("cnn", CNN), ("mlp", MLP)):
    _add(_name, _cnn(_cls), ("width", "dropout_rate"), _NO_STEM)
for _name, _cls in (("resnet18", ResNet18), ("resnet34", ResNet34), ("resnet50", ResNet50)):
    _add(_name, _resnet(_cls), OPTIONAL_KEYS)
for _patch in (16, 4):
    for _variant in ("Ti", "S", "B"):
        _add(f"vit_{_variant.lower()}{_patch}", _vit(_variant, _patch), ("dropout_rate", "drop_path_rate"), {
            "width": "a ViT's width is fixed by its variant (vit_ti*, vit_s*, vit_b*)",
            "stem": f"a ViT's stem is its {_patch}x{_patch} patch embedding, fixed by the name (vit_*4 for "
                    "32x32 inputs, vit_*16 for 224x224)"})
del _name, _cls, _patch, _variant

MODEL_NAMES = tuple(_REGISTRY)  # the built-in models; ``names()`` includes registered ones


def register(name: str, factory: Callable[..., Any], *, accepts: Iterable[str] = ()) -> None:
    """Adds (or replaces) model ``name``; a config can set ``model.name`` to it once this has run, so it
    may be called in a config file's body.

    ``factory(num_classes, width, dropout_rate, stem, dtype, bn_axis_name=None) -> Module`` (``dtype``:
    compute dtype from ``train.precision``; ``bn_axis_name``: the mapped axis BatchNorm statistics are
    averaged over under dp/pmap, None otherwise). ``width`` is None unless the config sets it.

    ``accepts`` names which of ``OPTIONAL_KEYS`` ("width", "stem", "dropout_rate", "drop_path_rate") the factory
    acts on; a factory that accepts "drop_path_rate" is called with ``drop_path_rate=`` as a keyword.
    The default, none, suits a model that takes only ``num_classes`` and ``dtype``: a config that then
    sets ``model.width``, ``model.stem`` or ``model.dropout_rate`` away from its default is refused at load
    time, naming the key, because the model would silently ignore it. A factory that uses, say, width and
    dropout declares ``accepts=("width", "dropout_rate")``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"the factory of model {name!r} must be callable, got {type(factory).__name__}")
    if isinstance(accepts, str):
        raise ValueError(f"accepts of model {name!r} must be a tuple of key names, e.g. ({accepts!r},), "
                         f"not the string {accepts!r}")
    accepts = tuple(accepts)
    unknown = [k for k in accepts if k not in OPTIONAL_KEYS]
    if unknown:
        raise ValueError(f"accepts of model {name!r} names {', '.join(map(repr, unknown))}; choose among "
                         f"{', '.join(OPTIONAL_KEYS)} (every model takes num_classes and dtype)")
    _add(name, factory, accepts)


def names() -> tuple[str, ...]:
    """Every model ``build`` knows now: the built-in ones, then the registered ones."""
    return tuple(_REGISTRY)


def accepted_keys(name: str) -> frozenset:
    """The ``OPTIONAL_KEYS`` model ``name`` acts on (none for a model added without ``register``)."""
    return _KEYS[name][0] if name in _KEYS else frozenset()


def why_ignored(name: str, key: str) -> str:
    """Why model ``name`` ignores optional key ``key``: one clause, for an error message."""
    if name not in _KEYS:
        return f"model {name!r} was added without register(..., accepts=...), so it accepts none"
    accepts, why = _KEYS[name]
    if key in why:
        return why[key]
    declared = tuple(sorted(accepts))
    return f"model {name!r} was registered with accepts={declared!r} (add {key!r} there if its factory uses it)"


def build(name: str, *, num_classes: int = 10, width: int | None = None, dropout_rate: float = 0.0,
          stem: str = "imagenet", dtype: Any = jnp.float32, bn_axis_name: str | None = None,
          drop_path_rate: float = 0.0):
    """The model ``name``; ``width`` None means the model's usual width (cnn 32, mlp 256, resnet 64).
    Keys the model does not accept are passed on and ignored here; the config refuses them."""
    if name not in _REGISTRY:
        raise ValueError(f"model {name!r} is unknown; known models: {', '.join(_REGISTRY)}")
    if width is None and name in MODEL_NAMES:
        width = _USUAL_WIDTH.get(name, 64)
    extra = {"drop_path_rate": drop_path_rate} if "drop_path_rate" in accepted_keys(name) else {}
    return _REGISTRY[name](num_classes, width, dropout_rate, stem, dtype, bn_axis_name=bn_axis_name, **extra)


__all__ = ["CNN", "MLP", "ResNet", "ResNet18", "ResNet34", "ResNet50", "ViT", "MODEL_NAMES", "OPTIONAL_KEYS",
           "accepted_keys", "build", "names", "register", "why_ignored"]
