"""Inference without the training machinery: a jitted predict function over params only, a one-file export,
and a latency/throughput table.

    predict_fn, info = load_model(workdir)          # newest checkpoint; no optimizer state kept
    logits = predict_fn(raw_images)                 # raw pixels in the data set's scale, (N, H, W[, C])
    export_params(workdir, "model.msgpack")         # {params, batch_stats, config, dataset} in ONE file
    predict_fn = load_exported("model.msgpack")     # rebuilds the model from the embedded config
    rows = benchmark_inference(workdir)             # median ms per batch and images/s, printed as a table
    rows = predict_files(workdir, ["a.jpg", "photos/"], top_k=5)   # image files -> class names (image runs)

``predict_fn`` normalises raw images (``data.normalize`` with the data set's mean/std), cuts them into batches
of ``batch_size`` (default ``data.eval_batch_size``) and pads the last one, so the jitted forward compiles once
per batch size. It holds the flax variables ({params, batch_stats}) and the jitted forward, nothing else; the
forward takes the variables as an argument (not baked into the program as constants). Logits equal
``fg.predict``'s bit for bit (same model, same variables, same padding, same op backend).

Export file: one ``flax.serialization.msgpack_serialize`` of ``{"format": "fastgpu_jax.export/1", "params",
"batch_stats", "config": flat config as a JSON string, "dataset": {name, image_shape, num_classes, mean, std,
classes} as a JSON string, "step"}``. The data set facts are embedded so a file predicts without the data files.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fastgpu_jax import config as config_lib
from fastgpu_jax import data, nn
from fastgpu_jax.builders import build_model
from fastgpu_jax.evaluate import restore_state, run_dataset_info

FORMAT = "fastgpu_jax.export/1"


def _variables(params, batch_stats) -> dict:
    """The flax variables dict, as ``TrainState.variables`` builds it."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_predict_fn(model, variables: dict, ds_info: data.DatasetInfo, *, batch_size: int,
                    backend: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``predict_fn(raw_images) -> float32 logits (N, classes)`` for ``model`` with ``variables``."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch_size = int(batch_size)

    @jax.jit
    def forward(variables, images):
        return model.apply(variables, images, train=False).astype(jnp.float32)

    num_classes = int(getattr(model, "num_classes", ds_info.num_classes))

    def predict_fn(raw_images) -> np.ndarray:
        x = data.normalize(np.asarray(raw_images), ds_info)
        out = []
        with nn.default_backend(backend):  # the run's op backend, fixed when ``forward`` is traced
            for start in range(0, len(x), batch_size):
                chunk = x[start:start + batch_size]
                pad = batch_size - len(chunk)  # pad the last batch: one compilation per batch size
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
                out.append(np.asarray(forward(variables, chunk))[: batch_size - pad])
        return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)

    predict_fn.forward = forward  # the jitted (variables, normalised images) -> logits, for benchmarks
    predict_fn.variables = variables
    predict_fn.batch_size = batch_size
    return predict_fn


def _param_count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def load_model(workdir: str, *, batch_size: int | None = None, params: str = "auto",
               which: str = "latest") -> tuple[Callable, dict]:
    """(predict_fn, info) for the newest (``which="best"``: the best) checkpoint of ``workdir``; ``params``: raw,
    ema, or auto (the EMA when the run kept one). Only params and batch_stats are kept.

    ``info``: {"step", "model", "num_classes", "image_shape", "batch_size", "param_count", "backend",
    "dataset"}."""
    cfg, state, step = restore_state(workdir, params=params, which=which)
    variables = _variables(state.params, state.batch_stats)
    del state  # drop the optimizer state
    return _build(cfg, variables, run_dataset_info(workdir, cfg), step=step, batch_size=batch_size)


def _build(cfg, variables, ds_info, *, step: int, batch_size: int | None):
    bs = batch_size or cfg.data.eval_batch_size
    predict_fn = make_predict_fn(build_model(cfg), variables, ds_info, batch_size=bs, backend=cfg.model.backend)
    info = {"step": int(step), "model": cfg.model.name, "num_classes": cfg.model.num_classes,
            "image_shape": list(ds_info.image_shape), "batch_size": int(bs),
            "param_count": _param_count(variables["params"]), "backend": cfg.model.backend,
            "dataset": ds_info.name, "classes": list(ds_info.classes)}
    predict_fn.info = info
    predict_fn.config = cfg
    return predict_fn, info


def export_params(workdir: str, path: str, *, params: str = "auto", which: str = "latest") -> dict:
    """Writes {params, batch_stats} of the newest (or best) checkpoint + the flat config + the data set's
    normalisation facts to ONE msgpack file at ``path``; ``params`` raw|ema|auto as ``evaluate.restore_state``.
    Returns {"output", "bytes", "step", "param_count"}."""
    cfg, state, step = restore_state(workdir, params=params, which=which)
    ds_info = run_dataset_info(workdir, cfg)
    payload = {
        "format": FORMAT,
        "params": jax.device_get(state.params),
        "batch_stats": jax.device_get(state.batch_stats) or {},
        "config": json.dumps(config_lib.to_flat_dict(cfg)),
        "dataset": json.dumps(data.info_to_json(ds_info)),
        "step": int(step),
    }
    blob = flax.serialization.msgpack_serialize(payload)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return {"output": path, "bytes": len(blob), "step": int(step), "param_count": _param_count(state.params)}


def read_payload(path: str, fmt: str, kind: str, hint: str) -> dict:
    """The dict in a flax-msgpack file of ours, checked to carry ``format == fmt`` (export, quantized)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {hint}")
    with open(path, "rb") as f:
        payload = flax.serialization.msgpack_restore(f.read())
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path} is not a fastgpu_jax {kind} file (format {fmt})")
    return payload


def load_exported(path: str, *, batch_size: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``predict_fn`` (with ``.info``) from a file written by ``export_params``; the model is rebuilt from the
    embedded config, normalisation from the embedded data set facts (no data files needed)."""
    payload = read_payload(path, FORMAT, "export",
                           f"write it with `fastgpu-jax export --workdir D --output {path}`")
    cfg = config_lib.from_flat_dict(json.loads(payload["config"]))
    ds_info = data.info_from_json(json.loads(payload["dataset"]))
    variables = _variables(payload["params"], payload.get("batch_stats") or {})
    predict_fn, _ = _build(cfg, variables, ds_info, step=int(payload["step"]), batch_size=batch_size)
    return predict_fn


def image_files(inputs) -> list[str]:
    """The image files named by ``inputs`` (files, or folders walked for .jpg .jpeg .png .webp .bmp, sorted)."""
    from fastgpu_jax.data.images import IMAGE_EXTENSIONS

    out = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(item) for f in files
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"{item}: folder holds no image files (.jpg .jpeg .png .webp .bmp)")
            out += found
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return out


def predict_files(workdir: str, inputs, *, top_k: int = 1, batch_size: int | None = None, params: str = "auto",
                  which: str = "latest") -> list[dict]:
    """Classifies image files with the run's eval transform (resize the short side, center crop: exactly what
    its eval split saw). One dict per file: ``{"file", "top": [[class name, probability], ...]}`` (``top_k``
    best first). For runs trained on an image data set (``folder``/``arrayrecord``/``tfds``), whose class names were
    recorded at training; a run on arrays takes arrays (``fg.predict``)."""
    from fastgpu_jax.builders import loader_kwargs
    from fastgpu_jax.data import images as image_lib

    predict_fn, info = load_model(workdir, batch_size=batch_size, params=params, which=which)
    cfg = predict_fn.config
    if cfg.data.name not in data.IMAGE_DATASETS:
        raise ValueError(f"{workdir} was trained on data.name={cfg.data.name!r}: predict on image files needs a run "
                         "trained on folder, arrayrecord or tfds data (pass a .npy array of raw pixels instead)")
    names = info["classes"] or [str(i) for i in range(info["num_classes"])]
    names = names[:info["num_classes"]]
    if isinstance(top_k, bool) or int(top_k) != top_k or not 1 <= top_k <= len(names):
        raise ValueError(f"top_k must be an integer in 1..{len(names)} (the data set's classes), got {top_k!r}")
    opts = loader_kwargs(cfg)["image_options"]
    files = image_files(inputs)
    rows, chunk = [], info["batch_size"]  # decode one batch at a time: a large folder never sits in memory
    for start in range(0, len(files), chunk):
        part = files[start:start + chunk]
        pixels = np.stack([image_lib.eval_transform(open(f, "rb").read(), f, size=opts.size, crop=opts.eval_crop)
                           for f in part])
        # the model's probabilities; outputs beyond the data set's classes (model.num_classes larger) never win
        probs = np.asarray(jax.nn.softmax(predict_fn(pixels), axis=-1))[:, :len(names)]
        for f, p in zip(part, probs):
            best = np.argsort(-p, kind="stable")[:top_k]
            rows.append({"file": f, "top": [[names[i], float(p[i])] for i in best]})
    return rows


def benchmark_inference(workdir: str, batch_sizes: Sequence[int] = (1, 32, 256), iters: int = 20, *,
                        print_table: bool = True) -> list[dict]:
    """Median latency (ms) and images/s of the jitted forward per batch size (device-resident normalised
    inputs, ``block_until_ready``; compile and one warm-up call excluded). Prints a table unless told not to."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    predict_fn, info = load_model(workdir)
    forward, variables = predict_fn.forward, predict_fn.variables
    h, w, c = info["image_shape"]
    rng = np.random.default_rng(0)
    rows = []
    with nn.default_backend(info["backend"]):
        for bs in batch_sizes:
            x = jax.device_put(rng.standard_normal((int(bs), h, w, c)).astype(np.float32))
            t0 = time.perf_counter()
            forward(variables, x).block_until_ready()  # compile
            compile_ms = (time.perf_counter() - t0) * 1e3
            forward(variables, x).block_until_ready()  # warm-up
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                forward(variables, x).block_until_ready()
                times.append(time.perf_counter() - t0)
            median = statistics.median(times)
            rows.append({"batch_size": int(bs), "latency_ms": median * 1e3, "images_per_s": bs / median,
                         "compile_ms": compile_ms, "iters": int(iters), "device": jax.devices()[0].device_kind})
    if print_table:
        print(format_benchmark(rows))
    return rows


def format_benchmark(rows: list[dict]) -> str:
    lines = [f"{'batch':>6} {'latency ms':>11} {'images/s':>12} {'compile ms':>11}"]
    lines += [f"{r['batch_size']:>6} {r['latency_ms']:>11.3f} {r['images_per_s']:>12,.0f} {r['compile_ms']:>11.1f}"
              for r in rows]
    if rows:
        lines.append(f"(median of {rows[0]['iters']} calls on {rows[0]['device']}, jitted forward, "
                     "block_until_ready)")
    return "\n".join(lines)
