"""The one place that decides which implementation runs each op (matmul, conv2d).

``fg.nn.Dense`` / ``fg.nn.Conv`` are flax's own layers whose default ``dot_general`` /
``conv_general_dilated`` are ``dot_general`` / ``conv_general_dilated`` below: lax's signatures, so flax
does its own padding, masking, dtype promotion and batch-dim handling first. A call shaped like one of our
ops (``x (..., K) @ (K, N)``; a 2-D NHWC x HWIO conv without input dilation) becomes that op and follows the
resolution below; any other call (1-D/3-D convs, input dilation, other dimension numbers) is lax's on XLA.

Resolution order, first hit wins:
  1. a module's ``backend=`` attribute (``fg.nn.Dense(10, backend="pallas")``),
  2. ``with fg.nn.use_backend("pallas"):``,
  3. the run's default, set by the train loop from config ``model.backend`` via ``default_backend``,
  4. ``"xla"``.

Values: ``"xla"`` (lax/jnp), ``"pallas"`` (our kernels; interpret mode on CPU), ``"auto"`` (Pallas only where
the tuning table measured it faster on this GPU kind; XLA elsewhere and always on CPU).

Under ``pallas`` (or ``auto``) a call the kernels do not cover runs on XLA instead of failing: dtypes other
than float32/bfloat16 (complex, integer, float16, float64) or mixed, grouped convs, zero-size or empty
results, padding strings other than SAME/VALID/SAME_LOWER (see ``_matmul_unsupported`` /
``_conv2d_unsupported``). ``record_ops`` shows the backend each call got and, for such a call, why.

The choice is made when a function is *traced*: a jitted function keeps the backend it was traced with.
Build (or re-jit) the step after changing the backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fastgpu_jax.nn import per_shard

BACKENDS = ("xla", "pallas", "auto")
OPS = ("matmul", "conv2d")  # the ops that have a Pallas kernel; other lax calls are recorded under lax's name
# What the Pallas kernels are written and tested for (both inputs the same dtype; float32 accumulation).
KERNEL_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgpu_backend", default=None)
_default: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgpu_default", default=None)
# The run's Pallas lowering (config ``model.pallas_lowering``); None or "auto": whatever
# ``pallas_kernels.use_lowering`` says around the call (default auto).
_lowering: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgpu_default_lowering", default=None)

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
def default_backend(name: str | None, pallas_lowering: str | None = None) -> Iterator[None]:
    """The run-wide default (from config ``model.backend``); ``use_backend`` and modules override it.
    ``pallas_lowering`` (config ``model.pallas_lowering``) is the lowering the Pallas kernels use: "triton" or
    "mosaic" force it for the run; "auto"/None leave it to ``pallas_kernels.use_lowering`` (default auto)."""
    token = _default.set(_check(name))
    token_l = _lowering.set(None if pallas_lowering == "auto" else pallas_lowering)
    try:
        yield
    finally:
        _lowering.reset(token_l)
        _default.reset(token)


def resolve(module_backend: str | None = None) -> str:
    """The backend name an op traced now will use (before ``auto`` is settled per op)."""
    return _check(module_backend) or _override.get() or _default.get() or "xla"


def register(op: str, backend: str, fn: Callable, auto_rule: Callable[..., bool] | None = None) -> None:
    """Installs ``fn`` as ``op`` on ``backend``; ``auto_rule(**shapes)`` says where it is faster.
    A "matmul" ``fn(x, kernel, *, precision, preferred_element_type, bias, activation)`` also applies the
    epilogue of ``dense`` (bias None or (N,), activation None or a key of ``ACTIVATIONS``)."""
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
    lowering = importlib.import_module("fastgpu_jax.pallas_kernels.lowering")

    def run_lowering():
        """The run's ``model.pallas_lowering`` around a kernel call (both ops: a conv may route to the matmul)."""
        name = _lowering.get()
        return lowering.use_lowering(name) if name else contextlib.nullcontext()

    def pallas_matmul(x, kernel, *, precision=None, preferred_element_type=None, bias=None, activation=None):
        with run_lowering():
            return pk_matmul.matmul(x, kernel, bias, activation, out_dtype=preferred_element_type)

    def pallas_conv2d(x, kernel, **kwargs):
        with run_lowering():
            return pk_conv2d.conv2d(x, kernel, **kwargs)


    def matmul_faster(shape, dtype, **_):
        (x_shape, (k, n)) = shape
        m = 1
        for d in x_shape[:-1]:
            m *= d
        return tuning.pallas_is_faster("matmul", tuning.matmul_shape_class(m, n, k))

    def conv_faster(shape, dtype, strides, feature_group_count, **_):
        (_, _, _, cin), (_, _, _, cout) = shape
        return feature_group_count == 1 and tuning.pallas_is_faster("conv2d", tuning.conv_shape_class(cin, cout))

    register("matmul", "pallas", pallas_matmul, auto_rule=matmul_faster)
    register("conv2d", "pallas", pallas_conv2d, auto_rule=conv_faster)


_recording: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastgpu_record", default=None)


@contextlib.contextmanager
def record_ops() -> Iterator[list]:
    """Records every op traced inside the block as (op, backend, info): for benchmarks, FLOP counts and to
    see where a call ran, e.g. ``with record_ops() as calls: jax.eval_shape(model.init, key, x)``.

    ``op`` is "matmul" or "conv2d" (``info``: shape=(x shape, kernel shape), dtype, and for conv2d strides,
    padding, dilation, feature_group_count), or "dot_general" / "conv_general_dilated" for a layer call
    that is neither (always xla; ``info``: shape, dtype). When ``pallas``/``auto`` was asked for and the
    call ran on XLA because no kernel covers it, ``info["xla_because"]`` says why."""
    calls: list = []
    token = _recording.set(calls)
    try:
        yield calls
    finally:
        _recording.reset(token)


def _choose(op: str, module_backend: str | None, unsupported: str | None, info: dict) -> str:
    """The backend ``op`` runs on, decided now (at trace time) and recorded. ``unsupported`` says why no
    kernel covers this call (None: a kernel does): such a call runs on XLA whatever was asked for."""
    requested = resolve(module_backend)
    name = requested
    if name == "auto":
        name = "xla"
        if unsupported is None and jax.default_backend() != "cpu":
            _load_kernels()
            rule = _AUTO_RULES.get(op)
            if rule is not None and "pallas" in _IMPLS[op] and rule(**info):
                name = "pallas"
    elif name == "pallas" and unsupported is not None:
        name = "xla"
    if name == "pallas" and "pallas" not in _IMPLS[op]:
        _load_kernels()
        if "pallas" not in _IMPLS[op]:
            raise NotImplementedError(f"backend 'pallas' has no kernel for op '{op}'; use model.backend=xla")
    calls = _recording.get()
    if calls is not None:
        entry = dict(info)
        if unsupported is not None and requested != "xla":
            entry["xla_because"] = unsupported
        calls.append((op, name, entry))
    return name


# --- what the kernels cover ------------------------------------------------------------------------------
# Static (not registered with the lazily imported kernels) so that the decision never depends on whether
# the kernels were imported yet. Each returns None when the kernel covers the call, else the reason.

def _dtype_unsupported(x, kernel, preferred_element_type) -> str | None:
    if x.dtype != kernel.dtype:
        return f"mixed input dtypes {x.dtype} and {kernel.dtype}"
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (kernels: float32, bfloat16)"
    if preferred_element_type is not None and np.dtype(preferred_element_type) not in KERNEL_DTYPES:
        return f"preferred_element_type {np.dtype(preferred_element_type)}"
    if 0 in x.shape or 0 in kernel.shape:
        return "a zero-size dimension"
    return None


def _matmul_unsupported(x, kernel, preferred_element_type=None) -> str | None:
    return _dtype_unsupported(x, kernel, preferred_element_type)


_PADDING_STRINGS = ("SAME", "VALID", "SAME_LOWER")


def _conv2d_unsupported(x, kernel, strides, padding, dilation, feature_group_count,
                        preferred_element_type=None) -> str | None:
    reason = _dtype_unsupported(x, kernel, preferred_element_type)
    if reason is not None:
        return reason
    if feature_group_count != 1:
        return f"feature_group_count={feature_group_count} (grouped conv)"
    if x.shape[3] != kernel.shape[2]:
        return f"input channels {x.shape[3]} != kernel input channels {kernel.shape[2]}"
    if len(strides) != 2 or len(dilation) != 2 or min(strides) < 1 or min(dilation) < 1:
        return f"strides {strides} / dilation {dilation} are not two positive ints"
    if isinstance(padding, str):
        if padding not in _PADDING_STRINGS:
            return f"padding {padding!r}"
        eff = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:2], dilation)]
        pads = lax.padtype_to_pads(x.shape[1:3], eff, strides, padding)
    elif isinstance(padding, tuple) and len(padding) == 2:
        pads = padding
    else:
        return f"padding {padding!r}"
    out = [(size + lo + hi - (k - 1) * d - 1) // s + 1
           for size, (lo, hi), k, s, d in zip(x.shape[1:3], pads, kernel.shape[:2], strides, dilation)]
    if min(out) < 1:
        return f"an empty output (spatial size {tuple(out)})"
    return None


def _canonical_padding(padding) -> Any:
    """'SAME'/'VALID'/'SAME_LOWER' (upper case) or a tuple of (lo, hi) int pairs; anything else as given
    (lax rejects it with its own error)."""
    if isinstance(padding, str):
        return padding.upper()
    try:
        return tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        return padding


# --- XLA implementations: exactly what flax.linen.Dense / flax.linen.Conv compute. ---------------------

# The activations a matmul op can fuse (``dense``): the epilogue of ``fg.nn.Dense(..., activation=...)``.
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=True),
               "gelu_exact": functools.partial(jax.nn.gelu, approximate=False)}


def _xla_matmul(x, kernel, *, precision=None, preferred_element_type=None, bias=None, activation=None):
    """flax's Dense (dot_general, then the bias broadcast over the last axis), then the activation."""
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                        precision=precision, preferred_element_type=preferred_element_type)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return ACTIVATIONS[activation](y) if activation else y


def _xla_conv2d(x, kernel, *, strides, padding, dilation, feature_group_count=1, precision=None,
                preferred_element_type=None):
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                    rhs_dilation=dilation, dimension_numbers=dn,
                                    feature_group_count=feature_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)


register("matmul", "xla", _xla_matmul)
register("conv2d", "xla", _xla_conv2d)


# --- the ops ---------------------------------------------------------------------------------------------

def _run(fn: Callable, name: str, x, kernel, **kwargs):
    """A kernel runs per batch shard under fsdp (``per_shard``: XLA cannot partition a custom call); XLA's
    own ops are partitioned by XLA."""
    if name == "pallas":
        return per_shard.run(fn, x, kernel, **kwargs)
    return fn(x, kernel, **kwargs)


def matmul(x, kernel, *, backend: str | None = None, **kwargs):
    """x (..., K) @ kernel (K, N) -> (..., N) on the resolved backend (XLA where no kernel covers it).
    ``kwargs``: precision, preferred_element_type."""
    unsupported = _matmul_unsupported(x, kernel, kwargs.get("preferred_element_type"))
    name = _choose("matmul", backend, unsupported, {"shape": (x.shape, kernel.shape), "dtype": x.dtype})
    return _run(_IMPLS["matmul"][name], name, x, kernel, **kwargs)


def dense(x, kernel, bias=None, activation: str | None = None, *, backend: str | None = None):
    """``act(x @ kernel + bias)``: the ``matmul`` op with its epilogue. On ``pallas`` the bias and activation
    are fused into the matmul kernel (and its backward computes act' inside the gradient kernels), so the
    pre-activation never makes a round trip through HBM; on XLA it is flax's Dense then the activation.
    ``activation``: None or a key of ``ACTIVATIONS``."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"dense activation {activation!r} is unknown; use one of {sorted(ACTIVATIONS)}")
    unsupported = _matmul_unsupported(x, kernel)
    if unsupported is None and bias is not None and bias.dtype != x.dtype:
        unsupported = f"bias dtype {bias.dtype} differs from input dtype {x.dtype}"
    name = _choose("matmul", backend, unsupported, {"shape": (x.shape, kernel.shape), "dtype": x.dtype,
                                                    "epilogue": (bias is not None, activation)})
    impl = _IMPLS["matmul"][name]
    if name == "pallas":  # per batch shard under fsdp: kernel and bias enter whole, their grads are summed
        return per_shard.run(lambda x, kb, **kw: impl(x, kb[0], bias=kb[1], **kw), x, (kernel, bias),
                             activation=activation)
    return impl(x, kernel, bias=bias, activation=activation)


def conv2d(x, kernel, *, strides=(1, 1), padding="SAME", dilation=(1, 1), feature_group_count=1,
           backend: str | None = None, **kwargs):
    """NHWC x, HWIO kernel -> NHWC, on the resolved backend (XLA where no kernel covers it).
    ``padding``: SAME, VALID, SAME_LOWER or ((lo, hi), (lo, hi)); ``kwargs``: precision,
    preferred_element_type."""
    strides, dilation, padding = tuple(strides), tuple(dilation), _canonical_padding(padding)
    unsupported = _conv2d_unsupported(x, kernel, strides, padding, dilation, feature_group_count,
                                      kwargs.get("preferred_element_type"))
    name = _choose("conv2d", backend, unsupported, dict(
        shape=(x.shape, kernel.shape), dtype=x.dtype, strides=strides, feature_group_count=feature_group_count,
        padding=padding, dilation=dilation))
    return _run(_IMPLS["conv2d"][name], name, x, kernel, strides=strides, padding=padding, dilation=dilation,
                feature_group_count=feature_group_count, **kwargs)


# --- lax-signature entry points: the default ops of fg.nn.Dense / fg.nn.Conv ----------------------------

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _lax_call(op: str, backend: str | None, why: str, fn: Callable, lhs, rhs, *args, **kwargs):
    """A call no op of ours covers: lax's own function on XLA, recorded under lax's name."""
    _choose(op, backend, why, {"shape": (lhs.shape, rhs.shape), "dtype": lhs.dtype})
    return fn(lhs, rhs, *args, **kwargs)


def _not_matmul(lhs, rhs, dimension_numbers, kwargs) -> str | None:
    """Why a ``lax.dot_general`` call is not our matmul op x (..., K) @ (K, N) (None: it is)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_contract = tuple(d + lhs.ndim if d < 0 else d for d in lhs_contract)
    rhs_contract = tuple(d + rhs.ndim if d < 0 else d for d in rhs_contract)
    if (rhs.ndim != 2 or lhs.ndim < 1 or tuple(lhs_batch) or tuple(rhs_batch)
            or lhs_contract != (lhs.ndim - 1,) or rhs_contract != (0,)):
        return f"dimension numbers {dimension_numbers} are not (..., K) @ (K, N)"
    extra = [k for k, v in kwargs.items() if v is not None]
    if extra:
        return f"arguments {extra}"
    return None


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                backend: str | None = None, **kwargs):
    """``lax.dot_general`` whose ``x (..., K) @ (K, N)`` calls (what ``flax.linen.Dense`` makes) are our
    ``matmul`` op on the resolved backend; any other call is lax's on XLA. ``kwargs`` go to lax."""
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    why = _not_matmul(lhs, rhs, dimension_numbers, kwargs)
    if why is None:
        return matmul(lhs, rhs, precision=precision, preferred_element_type=preferred_element_type,
                      backend=backend)
    return _lax_call("dot_general", backend, why, lax.dot_general, lhs, rhs, dimension_numbers,
                     precision=precision, preferred_element_type=preferred_element_type, **kwargs)


def _not_conv2d(lhs, rhs, lhs_dilation, dimension_numbers, batch_group_count, kwargs) -> str | None:
    """Why a ``lax.conv_general_dilated`` call is not our conv2d op (None: it is)."""
    if lhs.ndim != rhs.ndim:
        return f"input rank {lhs.ndim} != kernel rank {rhs.ndim}"
    if lhs.ndim != 4:
        return f"a {lhs.ndim - 2}-D convolution (kernels: 2-D)"
    if dimension_numbers is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC:
        return f"dimension numbers {dimension_numbers} are not NHWC/HWIO/NHWC"
    if lhs_dilation is not None and any(d != 1 for d in np.atleast_1d(lhs_dilation)):
        return f"input dilation {tuple(np.atleast_1d(lhs_dilation).tolist())}"
    if batch_group_count != 1:
        return f"batch_group_count={batch_group_count}"
    extra = [k for k, v in kwargs.items() if v is not None]
    if extra:
        return f"arguments {extra}"
    return None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, *, backend: str | None = None, **kwargs):
    """``lax.conv_general_dilated`` whose 2-D NHWC/HWIO/NHWC calls without input dilation (what
    ``flax.linen.Conv`` makes for 2-D kernels) are our ``conv2d`` op on the resolved backend; any other
    call (1-D/3-D, input dilation, other layouts) is lax's on XLA. ``kwargs`` go to lax."""
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    why = _not_conv2d(lhs, rhs, lhs_dilation, dimension_numbers, batch_group_count, kwargs)
    if why is None:
        return conv2d(lhs, rhs, strides=window_strides, padding=padding,
                      dilation=(1, 1) if rhs_dilation is None else rhs_dilation,
                      feature_group_count=feature_group_count, precision=precision,
                      preferred_element_type=preferred_element_type, backend=backend)
    return _lax_call("conv_general_dilated", backend, why, lax.conv_general_dilated, lhs, rhs, window_strides,
                     padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                     dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                     batch_group_count=batch_group_count, precision=precision,
                     preferred_element_type=preferred_element_type, **kwargs)


@dataclasses.dataclass(frozen=True)
class LayerOp:
    """``dot_general`` or ``conv_general_dilated`` above with a layer's ``backend=`` bound: the default
    ``dot_general`` of ``fg.nn.Dense`` and ``conv_general_dilated`` of ``fg.nn.Conv``. Hashable and
    comparable, as flax module fields must be."""

    fn: Callable
    backend: str | None = None

    def __call__(self, *args, **kwargs):
        return self.fn(*args, backend=self.backend, **kwargs)

    def __repr__(self) -> str:
        return f"fastgpu_jax.nn.backend.{self.fn.__name__}(backend={self.backend!r})"
