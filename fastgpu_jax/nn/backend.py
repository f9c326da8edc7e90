"""The one place that decides which implementation runs each op (matmul, conv2d).

Resolution order, first hit wins:
  1. a module's ``backend=`` attribute (``fg.nn.Dense(10, backend="pallas")``),
  2. ``with fg.nn.use_backend("pallas"):``,
  3. the run's default, set by the train loop from config ``model.backend`` via ``default_backend``,
  4. ``"xla"``.

Values: ``"xla"`` (lax/jnp), ``"pallas"`` (our kernels; interpret mode on CPU), ``"auto"`` (Pallas only where
the tuning table measured it faster on this GPU kind; XLA elsewhere and always on CPU).

The choice is made when a function is *traced*: a jitted function keeps the backend it was traced with.
Build (or re-jit) the step after changing the backend.
"""

from __future__ import annotations

import contextlib
import importlib
import contextvars
from typing import Callable, Iterator

import jax
from jax import lax

BACKENDS = ("xla", "pallas", "auto")
OPS = ("matmul", "conv2d")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgpu_backend", default=None)
_default: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgpu_default", default=None)

# op -> backend -> implementation. Kernel modules register "pallas" here when imported.
_IMPLS: dict[str, dict[str, Callable]] = {op: {} for op in OPS}
# op -> predicate(shape/dtype kwargs) -> bool: "Pallas measured faster here". Empty until measured.
_AUTO_RULES: dict[str, Callable[..., bool]] = {}


def _check(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend {name!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs ops traced inside the block on ``name`` unless a module sets its own ``backend=``."""
    token = _override.set(_check(name))
    try:
        yield
    finally:
        _override.reset(token)


@contextlib.contextmanager
def default_backend(name: str | None) -> Iterator[None]:
    """The run-wide default (from config ``model.backend``); ``use_backend`` and modules override it."""
    token = _default.set(_check(name))
    try:
        yield
    finally:
        _default.reset(token)


def resolve(module_backend: str | None = None) -> str:
    """The backend name an op traced now will use (before ``auto`` is settled per op)."""
    return _check(module_backend) or _override.get() or _default.get() or "xla"


def register(op: str, backend: str, fn: Callable, auto_rule: Callable[..., bool] | None = None) -> None:
    """Installs ``fn`` as ``op`` on ``backend``; ``auto_rule(**shapes)`` says where it is faster."""
    if op not in _IMPLS:
        raise ValueError(f"op {op!r} is unknown; ops: {', '.join(OPS)}")
    _IMPLS[op][backend] = fn
    if auto_rule is not None:
        _AUTO_RULES[op] = auto_rule


def _load_kernels() -> None:
    """Imports the Pallas kernels lazily (the xla path never pays for them) and registers them here.

    The kernels know nothing of this module: the adapters below map the op signatures onto them.
    """
    if "pallas" in _IMPLS["matmul"]:
        return
    pk_matmul = importlib.import_module("fastgpu_jax.pallas_kernels.matmul")
    pk_conv2d = importlib.import_module("fastgpu_jax.pallas_kernels.conv2d")
    tuning = importlib.import_module("fastgpu_jax.pallas_kernels.tuning")

    def pallas_matmul(x, kernel, *, precision=None, preferred_element_type=None):
        return pk_matmul.matmul(x, kernel, out_dtype=preferred_element_type)

    def pallas_conv2d(x, kernel, **kwargs):
        return pk_conv2d.conv2d(x, kernel, **kwargs)

    def matmul_faster(shape, dtype):
        (x_shape, (k, n)) = shape
        m = 1
        for d in x_shape[:-1]:
            m *= d
        return tuning.pallas_is_faster("matmul", tuning.matmul_shape_class(m, n, k))

    def conv_faster(shape, dtype, strides, feature_group_count, **_):
        (_, _, w, cin), (_, _, _, cout) = shape
        return feature_group_count == 1 and tuning.pallas_is_faster(
            "conv2d", tuning.conv_shape_class(w // strides[1], cin, cout))

    register("matmul", "pallas", pallas_matmul, auto_rule=matmul_faster)
    register("conv2d", "pallas", pallas_conv2d, auto_rule=conv_faster)


_recording: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastgpu_record", default=None)


@contextlib.contextmanager
def record_ops() -> Iterator[list]:
    """Records every op traced inside the block as (op, backend, shape_info): for benchmarks and FLOP
    counts, e.g. ``with record_ops() as calls: jax.eval_shape(model.init, key, x)``."""
    calls: list = []
    token = _recording.set(calls)
    try:
        yield calls
    finally:
        _recording.reset(token)


def _pick(op: str, module_backend: str | None, **shape_info) -> Callable:
    name = resolve(module_backend)
    if name == "auto":
        if jax.default_backend() == "cpu":
            name = "xla"
        else:
            _load_kernels()
            rule = _AUTO_RULES.get(op)
            name = "pallas" if (rule is not None and "pallas" in _IMPLS[op] and rule(**shape_info)) else "xla"
    if name == "pallas" and "pallas" not in _IMPLS[op]:
        _load_kernels()
        if "pallas" not in _IMPLS[op]:
            raise NotImplementedError(f"backend 'pallas' has no kernel for op '{op}'; use model.backend=xla")
    calls = _recording.get()
    if calls is not None:
        calls.append((op, name, shape_info))
    return _IMPLS[op][name]


# --- XLA implementations: exactly what flax.linen.Dense / flax.linen.Conv compute. ---------------------

def _xla_matmul(x, kernel, *, precision=None, preferred_element_type=None):
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=preferred_element_type)


def _xla_conv2d(x, kernel, *, strides, padding, dilation, feature_group_count=1, precision=None,
                preferred_element_type=None):
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                    rhs_dilation=dilation, dimension_numbers=dn,
                                    feature_group_count=feature_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)


register("matmul", "xla", _xla_matmul)
register("conv2d", "xla", _xla_conv2d)


def matmul(x, kernel, *, backend: str | None = None, **kwargs):
    """x (..., K) @ kernel (K, N) -> (..., N) on the resolved backend."""
    fn = _pick("matmul", backend, shape=(x.shape, kernel.shape), dtype=x.dtype)
    return fn(x, kernel, **kwargs)


def conv2d(x, kernel, *, strides=(1, 1), padding="SAME", dilation=(1, 1), feature_group_count=1,
           backend: str | None = None, **kwargs):
    """NHWC x, HWIO kernel -> NHWC, on the resolved backend. ``padding``: SAME, VALID or ((lo, hi), (lo, hi))."""
    fn = _pick("conv2d", backend, shape=(x.shape, kernel.shape), dtype=x.dtype, strides=tuple(strides),
               feature_group_count=feature_group_count, padding=padding, dilation=tuple(dilation))
    return fn(x, kernel, strides=tuple(strides), padding=padding, dilation=tuple(dilation),
              feature_group_count=feature_group_count, **kwargs)
