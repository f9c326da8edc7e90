"""int8 post-training quantization of a trained run.

Weights: every ``kernel`` param with ndim >= 2 (the kernels of ``fg.nn.Dense`` / ``fg.nn.Conv``) is quantized
per output channel (its last axis), symmetric, no zero point::

    scale[c] = max |w[..., c]| / 127          (1.0 for an all-zero channel)
    q        = clip(round(w / scale), -127, 127).astype(int8)

Biases, BatchNorm and LayerNorm params (and any other non-kernel param) stay float32.

Activations (optional, ``calibrate_batches=N > 0``): N training batches go through the float model while an
interceptor records max |input| of every Dense/Conv; ``input_scale = max|x| / 127`` (one per layer, symmetric).
The quantized forward is the SAME flax model run under ``flax.linen.intercept_methods``: the interceptor
replaces ``fg.nn.Dense`` / ``fg.nn.Conv`` ``__call__`` by

    calibrated layer:  xq = clip(round(x / input_scale), -127, 127) int8
                       y  = (xq (int8) . q (int8) -> int32) * (input_scale * scale[c]) + bias
                       (``lax.dot_general`` / ``lax.conv_general_dilated`` with preferred_element_type=int32)
    otherwise:         the layer's own float op with the dequantized kernel q * scale (weight-only int8)

so no model code changes. The int8 op covers 2-D NHWC convs (batched or not) with SAME/VALID/explicit
padding and Dense over the last axis; a calibrated layer outside that (1-D/3-D or extra batch dims,
CIRCULAR/REFLECT/CAUSAL padding, input dilation, a mask, a user-supplied dot_general/conv function) runs
weight-only. Kernels of other modules (none in the built-in models) run weight-only too, since
the params passed to the model hold every quantized kernel dequantized.

Quantized variables (what the forward takes and what is saved) are nested dicts that mirror the params tree:
``{"int8": {.. {"kernel": int8}}, "scales": {.. {"kernel": f32 (C,)}}, "input_scales": {.. {"kernel": f32 ()}},
"float": params without the quantized kernels, "batch_stats": ...}``.

File (``quantize_run`` writes ``WORKDIR/quantized/params.msgpack``; ``save_quantized`` / ``load_quantized``):
one ``flax.serialization.msgpack_serialize`` of the dict above plus ``"format"`` (``fastgpu_jax.quantized/1``),
``"config"`` (the run's flat config as a JSON string, so the file rebuilds its model alone), ``"step"`` and
``"calibrate_batches"`` and ``"dataset"`` (the data set facts: class names, and the mean/std that normalise the
uint8 batches of the image data sets on the device, as in training). ``quantize_run`` also writes
``quantized/metrics.json`` (the returned dict).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterable, Iterator

import flax.linen as flax_nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax

from fastgpu_jax import config as config_lib
from fastgpu_jax import data, steps
from fastgpu_jax.builders import build_model, data_kwargs, loader_kwargs, op_backend
from fastgpu_jax.evaluate import restore_state, run_dataset_info, summarize_sums
from fastgpu_jax.inference import read_payload
from fastgpu_jax.nn.backend import ACTIVATIONS, LayerOp
from fastgpu_jax.nn.layers import Conv, Dense

QMAX = 127
FORMAT = "fastgpu_jax.quantized/1"
QUANTIZED_DIR = "quantized"
QUANTIZED_FILE = "params.msgpack"
COLLECTIONS = ("int8", "scales", "input_scales")


# --------------------------------------------------------------------------- weights


@jax.jit
def _quantize_tensor(w):
    amax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
    scale = jnp.where(amax > 0, amax / QMAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def quantize_tensor(w) -> tuple[jax.Array, jax.Array]:
    """(q int8, scale float32 (C,)): symmetric per-output-channel (last axis) quantization of ``w``."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize_tensor expects a kernel with ndim >= 2, got shape {w.shape}")
    return _quantize_tensor(w)


def dequantize_tensor(q, scale) -> jax.Array:
    """float32 ``q * scale`` (scale broadcast over the last axis)."""
    return jnp.asarray(q, jnp.float32) * jnp.asarray(scale, jnp.float32)


def _is_quantizable(path: tuple, leaf) -> bool:
    return path[-1] == "kernel" and np.ndim(leaf) >= 2


def quantize_params(params) -> dict:
    """{"int8", "scales", "float"} of a params tree: every kernel with ndim >= 2 quantized, the rest kept."""
    flat = flatten_dict(params)
    q_tree, s_tree, f_tree = {}, {}, {}
    for path, leaf in flat.items():
        if _is_quantizable(path, leaf):
            q_tree[path], s_tree[path] = quantize_tensor(leaf)
        else:
            f_tree[path] = leaf
    return {"int8": unflatten_dict(q_tree), "scales": unflatten_dict(s_tree), "float": unflatten_dict(f_tree)}


def dequantized_params(qvars: dict) -> dict:
    """The full float params tree: the remaining float params plus every kernel dequantized."""
    flat = flatten_dict(dict(qvars.get("float") or {}))
    scales = flatten_dict(dict(qvars["scales"]))
    for path, q in flatten_dict(dict(qvars["int8"])).items():
        flat[path] = dequantize_tensor(q, scales[path])
    return unflatten_dict(flat)


# --------------------------------------------------------------------------- calibration


def _is_layer_call(context) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, (Dense, Conv))


@contextlib.contextmanager
def record_input_absmax() -> Iterator[dict]:
    """Inside the block, every fg.nn.Dense/Conv call records max |input| (a traced scalar) under its module
    path (a tuple); a layer called more than once keeps the max. Use inside the traced function."""
    record: dict[tuple, Any] = {}

    def interceptor(next_fun, args, kwargs, context):
        if _is_layer_call(context):
            path = tuple(context.module.scope.path)
            amax = jnp.max(jnp.abs(jnp.asarray(args[0], jnp.float32)))
            record[path] = amax if path not in record else jnp.maximum(record[path], amax)
        return next_fun(*args, **kwargs)

    with flax_nn.intercept_methods(interceptor):
        yield record


def model_images(images, stats: tuple | None):
    """The model's input: uint8 images (the image data sets' batches) normalised with ``stats = (mean, std)``
    exactly as the train step does (``steps.model_input``); float images are normalised already."""
    if images.dtype != jnp.uint8:
        return images
    if stats is None:
        raise ValueError("uint8 images need the data set's (mean, std) to be normalised; pass stats")
    return steps.normalize_uint8(images, *stats)


def calibrate(model, variables: dict, batches: Iterable[dict], stats: tuple | None = None) -> dict:
    """Per-layer input scales ``max|x| / 127`` over ``batches`` (dicts with "image": normalised float, or uint8
    normalised with ``stats = (mean, std)``), as a tree ``{.. {"kernel": f32 ()}}`` mirroring the params.
    ``variables`` are the float model's variables."""

    @jax.jit
    def absmax(variables, images):
        with record_input_absmax() as record:
            model.apply(variables, model_images(images, stats), train=False)
        return {"/".join(p): v for p, v in record.items()}

    total: dict[str, float] = {}
    for batch in batches:
        for key, v in jax.device_get(absmax(variables, batch["image"])).items():
            total[key] = max(total.get(key, 0.0), float(v))
    if not total:
        raise ValueError("calibration saw no fg.nn.Dense/Conv layer and no batch; nothing to calibrate")
    return unflatten_dict({tuple(k.split("/")) + ("kernel",): np.float32(v / QMAX if v > 0 else 1.0)
                           for k, v in total.items()})


# --------------------------------------------------------------------------- the int8 forward


def _quantize_input(x, input_scale):
    return jnp.clip(jnp.round(x.astype(jnp.float32) / input_scale), -QMAX, QMAX).astype(jnp.int8)


def _out_dtype(module, x):
    return module.dtype if module.dtype is not None else jnp.promote_types(x.dtype, module.param_dtype)


def int8_dense(module: Dense, x, q, scale, input_scale, bias=None):
    """int8 x int8 -> int32 matmul over the last axis of ``x``, rescaled to float, plus bias."""
    xq = _quantize_input(x, input_scale)
    acc = lax.dot_general(xq, q, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * (input_scale * scale)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y.astype(_out_dtype(module, x))


def _pair(value) -> tuple[int, ...]:
    """A flax conv's strides/dilation field as a tuple (None and ints broadcast over the 2 spatial dims)."""
    value = 1 if value is None else value
    return (value, value) if isinstance(value, int) else tuple(value)


def _int8_conv_padding(module: Conv, x, q):
    """The lax padding of a conv layer the int8 op computes exactly, or None (it then runs weight-only)."""
    if q.ndim != 4 or x.ndim not in (3, 4) or module.mask is not None or _pair(module.input_dilation) != (1, 1):
        return None
    padding = canonicalize_padding(module.padding, 2)
    if isinstance(padding, str):
        return padding.upper() if padding.upper() in ("SAME", "VALID") else None
    return tuple(tuple(p) for p in padding)


def _own_op(module) -> bool:
    """Whether the layer runs its default op (not a user-supplied dot_general/conv function)."""
    if isinstance(module, Dense):
        return module.dot_general_cls is None and isinstance(module.dot_general, LayerOp)
    return module.conv_general_dilated_cls is None and isinstance(module.conv_general_dilated, LayerOp)


def int8_conv(module: Conv, x, q, scale, input_scale, bias=None):
    """int8 x int8 -> int32 NHWC x HWIO convolution with the module's strides/padding/dilation/groups,
    rescaled to float, plus bias. Symmetric quantization keeps zero padding exact. Only for the layers
    ``_int8_conv_padding`` accepts."""
    padding = _int8_conv_padding(module, x, q)
    if padding is None:
        raise ValueError(f"int8_conv covers 2-D NHWC convs with SAME/VALID/explicit padding, no mask or input "
                         f"dilation; got kernel {q.shape}, input {x.shape}, padding {module.padding!r}")
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    xq = _quantize_input(x, input_scale)
    dn = lax.conv_dimension_numbers(xq.shape, q.shape, ("NHWC", "HWIO", "NHWC"))
    acc = lax.conv_general_dilated(xq, q, window_strides=_pair(module.strides), padding=padding,
                                   rhs_dilation=_pair(module.kernel_dilation),
                                   dimension_numbers=dn, feature_group_count=module.feature_group_count,
                                   preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * (input_scale * scale)
    if bias is not None:
        y = y + bias.reshape((1, 1, 1, -1))
    y = y.astype(_out_dtype(module, x))
    return y[0] if unbatched else y


def _int8_interceptor(next_fun, args, kwargs, context):
    """Replaces a calibrated fg.nn.Dense/Conv call by its int8 computation; anything else runs as is."""
    if not _is_layer_call(context):
        return next_fun(*args, **kwargs)
    m = context.module
    if not (m.has_variable("int8", "kernel") and m.has_variable("input_scales", "kernel")):
        return next_fun(*args, **kwargs)  # weight-only: the module's float op on the dequantized kernel
    q, scale = m.get_variable("int8", "kernel"), m.get_variable("scales", "kernel")
    if not _own_op(m) or (isinstance(m, Conv) and _int8_conv_padding(m, args[0], q) is None):
        return next_fun(*args, **kwargs)  # outside what the int8 op computes exactly: weight-only
    input_scale = jnp.asarray(m.get_variable("input_scales", "kernel"), jnp.float32)
    bias = m.get_variable("params", "bias") if m.use_bias else None
    if isinstance(m, Conv):
        return int8_conv(m, args[0], q, scale, input_scale, bias)
    y = int8_dense(m, args[0], q, scale, input_scale, bias)
    return ACTIVATIONS[m.activation](y) if m.activation else y  # Dense(..., activation=) applies it last


@contextlib.contextmanager
def int8_layers() -> Iterator[None]:
    """Inside the block (at trace time), fg.nn.Dense/Conv calls whose scope holds ``int8`` and
    ``input_scales`` variables run in int8; other calls are unchanged."""
    with flax_nn.intercept_methods(_int8_interceptor):
        yield


def quantized_variables(qvars: dict) -> dict:
    """The flax variables dict the quantized forward applies: dequantized params (used by weight-only layers)
    + the int8/scales/input_scales collections (+ batch_stats)."""
    variables = {"params": dequantized_params(qvars), "int8": qvars["int8"], "scales": qvars["scales"]}
    if qvars.get("input_scales"):
        variables["input_scales"] = qvars["input_scales"]
    if qvars.get("batch_stats"):
        variables["batch_stats"] = qvars["batch_stats"]
    return variables


def quantized_apply(model, qvars: dict, images) -> jax.Array:
    """float32 logits of the quantized model (inference mode). Pure: jit it with ``model`` closed over."""
    with int8_layers():
        return model.apply(quantized_variables(qvars), images, train=False).astype(jnp.float32)


def quantize_variables(params, batch_stats=None, input_scales=None) -> dict:
    """The quantized variables of a float model (``input_scales`` from ``calibrate``; None = weight-only)."""
    qvars = quantize_params(params)
    qvars["input_scales"] = input_scales or {}
    qvars["batch_stats"] = batch_stats or {}
    return qvars


# --------------------------------------------------------------------------- sizes, save, load


def _nbytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def float_param_bytes(params) -> int:
    """Bytes of all params stored as float32."""
    return int(sum(np.size(x) * 4 for x in jax.tree.leaves(params)))


def quantized_param_bytes(qvars: dict) -> int:
    """Bytes of the stored weights: int8 kernels + float32 scales + input scales + remaining float params."""
    return sum(_nbytes(qvars.get(k) or {}) for k in ("int8", "scales", "input_scales", "float"))


def save_quantized(path: str, qvars: dict, cfg, *, step: int = 0, calibrate_batches: int = 0,
                   ds_info: data.DatasetInfo | None = None) -> str:
    """Writes the quantized variables + the flat config (+ the data set facts) to ``path`` (one msgpack file);
    returns ``path``."""
    payload = {k: jax.device_get(qvars.get(k) or {}) for k in COLLECTIONS + ("float", "batch_stats")}
    payload.update(format=FORMAT, config=json.dumps(config_lib.to_flat_dict(cfg)), step=int(step),
                   calibrate_batches=int(calibrate_batches))
    if ds_info is not None:
        payload["dataset"] = json.dumps(data.info_to_json(ds_info))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)
    return path


def quantized_path(workdir_or_file: str) -> str:
    """The quantized file of a workdir (``WORKDIR/quantized/params.msgpack``), or the file itself."""
    if os.path.isdir(workdir_or_file):
        return os.path.join(workdir_or_file, QUANTIZED_DIR, QUANTIZED_FILE)
    return workdir_or_file


def load_quantized(workdir_or_file: str) -> tuple[Any, dict, dict]:
    """(cfg, qvars, meta) from a quantized file (or a workdir's ``quantized/params.msgpack``)."""
    path = quantized_path(workdir_or_file)
    payload = read_payload(path, FORMAT, "quantized", "run `fastgpu-jax quantize --workdir WORKDIR` first")
    cfg = config_lib.from_flat_dict(json.loads(payload["config"]))
    qvars = {k: payload.get(k) or {} for k in COLLECTIONS + ("float", "batch_stats")}
    meta = {"step": int(payload["step"]), "calibrate_batches": int(payload["calibrate_batches"]), "path": path,
            "dataset": data.info_from_json(json.loads(payload["dataset"])) if "dataset" in payload else None}
    return cfg, qvars, meta


# --------------------------------------------------------------------------- whole runs


def _eval_fns(model, stats: tuple | None):
    float_eval = jax.jit(steps.eval_step)  # its state's StepOptions carry the mean/std

    @jax.jit
    def int8_eval(qvars, batch):
        return steps.compute_metrics(quantized_apply(model, qvars, model_images(batch["image"], stats)),
                                     batch["label"], batch.get("mask"))

    return float_eval, int8_eval


def _aggregate(sums: list) -> dict:
    """Exact float64 aggregation of eval sums, as ``evaluate.run_eval``."""
    return summarize_sums(jax.device_get(sums))


def _arrays(batch: dict) -> dict:
    """The batch without the image sets' "skipped" names (bad examples are masked out already)."""
    return {k: v for k, v in batch.items() if k != "skipped"}


def _eval_batches(cfg, split: str, data_dir: str | None):
    d = cfg.data
    batches = data.eval_batches(d.name, split, batch_size=d.eval_batch_size, data_dir=data_dir or d.dir,
                                **data_kwargs(cfg), **loader_kwargs(cfg))
    return map(_arrays, batches)


def _calibration_batches(cfg, n: int, data_dir: str | None) -> list[dict]:
    d = cfg.data
    it = data.train_iterator(d.name, batch_size=d.batch_size, seed=cfg.seed, data_dir=data_dir or d.dir,
                             **data_kwargs(cfg), **loader_kwargs(cfg))
    try:
        return [_arrays(next(it)) for _ in range(n)]
    finally:
        getattr(it, "close", lambda: None)()  # decoding workers, if any


def _stats(ds_info) -> tuple | None:
    return None if ds_info is None else (tuple(ds_info.mean), tuple(ds_info.std))


def evaluate_quantized(workdir_or_file: str, split: str = "test", *, data_dir: str | None = None) -> dict:
    """{"split", "step", "loss", "accuracy", "count"} of a saved quantized model."""
    cfg, qvars, meta = load_quantized(workdir_or_file)
    _, int8_eval = _eval_fns(build_model(cfg), _stats(meta["dataset"]))
    with op_backend(cfg):
        sums = [int8_eval(qvars, b) for b in _eval_batches(cfg, split, data_dir)]
    return {"split": split, "step": meta["step"], **_aggregate(sums)}


def quantize_run(workdir: str, *, calibrate_batches: int = 4, split: str = "test",
                 data_dir: str | None = None) -> dict:
    """Quantizes the newest checkpoint of ``workdir`` to int8, saves ``workdir/quantized/params.msgpack``,
    evaluates float and int8 on ``split`` (same batches) and returns {"float_accuracy", "int8_accuracy",
    "accuracy_drop", "float_bytes", "int8_bytes", "compression", ...}.

    ``calibrate_batches`` training batches calibrate the activation scales (int8 x int8 -> int32 layers);
    0 gives weight-only int8.
    """
    if isinstance(calibrate_batches, bool) or int(calibrate_batches) != calibrate_batches or calibrate_batches < 0:
        raise ValueError(f"calibrate_batches must be an integer >= 0, got {calibrate_batches!r}")
    cfg, state, step = restore_state(workdir)
    model = build_model(cfg)
    ds_info = run_dataset_info(workdir, cfg)
    input_scales = None
    with op_backend(cfg):
        if calibrate_batches:
            batches = _calibration_batches(cfg, int(calibrate_batches), data_dir)
            input_scales = calibrate(model, state.variables, batches, _stats(ds_info))
        qvars = quantize_variables(state.params, state.batch_stats, input_scales)
        float_eval, int8_eval = _eval_fns(model, _stats(ds_info))
        float_sums, int8_sums = [], []
        for batch in _eval_batches(cfg, split, data_dir):  # the same batches for both models
            float_sums.append(float_eval(state, batch))
            int8_sums.append(int8_eval(qvars, batch))
    float_m, int8_m = _aggregate(float_sums), _aggregate(int8_sums)
    path = save_quantized(os.path.join(workdir, QUANTIZED_DIR, QUANTIZED_FILE), qvars, cfg, step=step,
                          calibrate_batches=int(calibrate_batches), ds_info=ds_info)
    float_bytes, int8_bytes = float_param_bytes(state.params), quantized_param_bytes(qvars)
    result = {
        "split": split, "step": int(step), "count": int8_m["count"],
        "mode": "int8 weights+activations" if calibrate_batches else "int8 weights only",
        "calibrate_batches": int(calibrate_batches),
        "quantized_layers": len(flatten_dict(dict(qvars["int8"]))),
        "float_accuracy": float_m["accuracy"], "int8_accuracy": int8_m["accuracy"],
        "accuracy_drop": float_m["accuracy"] - int8_m["accuracy"],
        "float_loss": float_m["loss"], "int8_loss": int8_m["loss"],
        "float_bytes": float_bytes, "int8_bytes": int8_bytes, "compression": float_bytes / int8_bytes,
        "path": path,
    }
    with open(os.path.join(os.path.dirname(path), "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def format_table(result: dict) -> str:
    """A short text table of a ``quantize_run`` result."""
    rows = [("float32", result["float_bytes"], result["float_accuracy"], result["float_loss"]),
            (result["mode"], result["int8_bytes"], result["int8_accuracy"], result["int8_loss"])]
    lines = [f"{'model':<26} {'bytes':>10} {'accuracy':>9} {'loss':>8}"]
    lines += [f"{name:<26} {b:>10,} {acc:>9.4f} {loss:>8.4f}" for name, b, acc, loss in rows]
    lines.append(f"compression {result['compression']:.2f}x, accuracy drop {result['accuracy_drop']:+.4f} "
                 f"({result['split']}, {result['count']} examples, step {result['step']}, "
                 f"{result['quantized_layers']} layers) -> {result['path']}")
    return "\n".join(lines)
