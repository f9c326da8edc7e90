"""Evaluation and inference from a workdir: rebuild the model from ``config.json``, restore the newest
good checkpoint, run over a split (``evaluate``) or over user images (``predict``)."""

from __future__ import annotations

import json
import os
from typing import Iterable

import jax
import numpy as np

from fastgpu_jax import checkpoint, config as config_lib, data, steps
from fastgpu_jax.builders import (apply_kernel_tuning, build_state, data_kwargs, dataset_info, loader_kwargs,
                                  op_backend)
from fastgpu_jax.state import with_shardings


def run_eval(eval_fn, state, batches: Iterable[dict], place=lambda b: b) -> dict:
    """Aggregates ``eval_fn`` sums over ``batches`` exactly (float64 on the host): loss, accuracy, top5_accuracy
    (more than 5 classes), count."""
    skipped, pending = 0, []
    for b in batches:
        skipped += len(b.pop("skipped", ()))  # bad examples, masked out (image data sets, on_bad_example=skip)
        pending.append(eval_fn(state, place(b)))
    out = summarize_sums(jax.device_get(pending))
    if skipped:
        out["skipped_examples"] = skipped
    return out


def summarize_sums(sums: Iterable[dict]) -> dict:
    """Per-batch eval sums (``steps.compute_metrics``) -> {loss, accuracy, [top5_accuracy,] count}, in float64."""
    totals = {}
    for m in sums:
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = max(totals.get("count", 0.0), 1.0)
    out = {"loss": totals.get("loss_sum", 0.0) / n, "accuracy": totals.get("correct", 0.0) / n}
    if "top5_correct" in totals:
        out["top5_accuracy"] = totals["top5_correct"] / n
    out["count"] = int(totals.get("count", 0.0))
    return out


def load_run_config(workdir: str):
    """The validated config of the run in ``workdir`` (from its ``config.json``)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: '{workdir}' is not a fastgpu_jax workdir (train first)")
    with open(path) as f:
        return config_lib.from_flat_dict(json.load(f)["config"])


def run_dataset_info(workdir: str, cfg) -> data.DatasetInfo:
    """The data set facts of the run: those recorded in its config.json for an image data set (its class names
    and statistics, so a run can be evaluated with moved data and used for prediction without any), else
    read from the data as the config says."""
    if cfg.data.name in data.IMAGE_DATASETS:
        with open(os.path.join(workdir, "config.json")) as f:
            recorded = json.load(f).get("dataset")
        if recorded:
            return data.info_from_json(recorded)
    return dataset_info(cfg)


PARAMS_CHOICES = ("auto", "raw", "ema")
CHECKPOINT_CHOICES = ("latest", "best")


def uses_ema(cfg, params: str) -> bool:
    """Whether ``params`` (auto|raw|ema) means the run's weight EMA: auto does when the run kept one."""
    return params == "ema" or (params == "auto" and bool(cfg.train.ema_decay))


def restore_state(workdir: str, cfg=None, *, params: str = "auto", which: str = "latest"):
    """(cfg, state, step): the newest good checkpoint of ``workdir`` restored into a fresh state.

    ``params``: "raw" keeps the trained params; "ema" puts the weight EMA (``train.ema_decay`` > 0) in their
    place, so everything downstream (eval, predict, export, quantize) uses it; "auto" is "ema" when the run has
    one, else "raw". ``which``: "latest" (``checkpoints/``) or "best" (``checkpoints_best/``, kept by
    ``train.keep_best``).

    Read-only: nothing in the workdir is created, moved or deleted. A corrupt newest checkpoint is skipped
    with a warning (the previous one is used); an incompatible or unreadable one is a one-line error.
    """
    if params not in PARAMS_CHOICES or which not in CHECKPOINT_CHOICES:
        raise ValueError(f"params={params!r}, which={which!r}: choose params from {PARAMS_CHOICES} and which from "
                         f"{CHECKPOINT_CHOICES}")
    cfg = cfg or load_run_config(workdir)
    if params == "ema" and not cfg.train.ema_decay:
        raise ValueError(f"--params ema: the run in {workdir} kept no weight EMA (train.ema_decay was 0); use "
                         "--params raw")
    apply_kernel_tuning(cfg)
    # The restore target is abstract (jax.eval_shape): no init is compiled for values the checkpoint replaces.
    abstract = build_state(cfg, run_dataset_info(workdir, cfg), abstract=True)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    folder = checkpoint.BEST_DIR if which == "best" else checkpoint.LATEST_DIR
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.train.keep_checkpoints, read_only=True, subdir=folder)
    try:
        restored = ckpt.restore_latest(with_shardings(abstract, jax.tree.map(lambda _: device, abstract)))
    finally:
        ckpt.close()
    if restored is None:
        hint = "train with train.keep_best=METRIC" if which == "best" else "train first"
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, folder)}: {hint}")
    state, _, _, step = restored
    if uses_ema(cfg, params):
        state = steps.ema_view(state)
    return cfg, state, step


def evaluate(workdir: str, split: str = "test", *, data_dir: str | None = None, params: str = "auto",
             which: str = "latest") -> dict:
    """{"split", "step", "params", "loss", "accuracy", ["top5_accuracy",] "count"} of the newest (or best)
    checkpoint on ``split`` (train|val|test); ``params``/``which`` as ``restore_state``."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split {split!r} is unknown; use train, val or test")
    cfg, state, step = restore_state(workdir, params=params, which=which)
    d = cfg.data
    batches = data.eval_batches(d.name, split, batch_size=d.eval_batch_size, data_dir=data_dir or d.dir,
                                **data_kwargs(cfg), **loader_kwargs(cfg))
    with op_backend(cfg):  # the run's op backend, as in training
        metrics = run_eval(jax.jit(steps.eval_step), state, batches)
    return {"split": split, "step": step, "params": "ema" if uses_ema(cfg, params) else "raw", **metrics}


def predict(workdir: str, images: np.ndarray, *, batch_size: int | None = None, params: str = "auto",
            which: str = "latest") -> np.ndarray:
    """Logits (N, num_classes) for raw ``images`` in the data set's native pixel scale (e.g. MNIST 0..255,
    digits 0..16), shaped (N, H, W, C) or (N, H, W) for one channel. Normalisation is applied here.
    ``params``/``which`` as ``restore_state``."""
    cfg = load_run_config(workdir)
    info = run_dataset_info(workdir, cfg)
    x = data.normalize(images, info)  # before the restore: a wrong input fails fast
    cfg, state, _ = restore_state(workdir, cfg, params=params, which=which)
    bs = batch_size or cfg.data.eval_batch_size
    fn = jax.jit(steps.predict_step)
    with op_backend(cfg):
        out = [_predict_chunk(fn, state, x[start:start + bs], bs) for start in range(0, len(x), bs)]
    return np.concatenate(out) if out else np.zeros((0, cfg.model.num_classes), np.float32)


def _predict_chunk(fn, state, chunk: np.ndarray, bs: int) -> np.ndarray:
    pad = bs - len(chunk)  # pad the last batch so the function compiles once
    if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    return np.asarray(fn(state, chunk))[: bs - pad]


