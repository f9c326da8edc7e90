"""Evaluation and inference from a workdir: rebuild the model from ``config.json``, restore the newest
good checkpoint, run over a split (``evaluate``) or over user images (``predict``)."""

from __future__ import annotations

import json
import os
from typing import Iterable

import jax
import numpy as np

from fastgpu_jax import checkpoint, config as config_lib, data, nn, steps
from fastgpu_jax.builders import apply_kernel_tuning, build_state, data_kwargs, dataset_info, loader_kwargs
from fastgpu_jax.state import with_shardings


def run_eval(eval_fn, state, batches: Iterable[dict], place=lambda b: b) -> dict:
    """Aggregates ``eval_fn`` sums over ``batches`` exactly (float64 on the host)."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    skipped, pending = 0, []
    for b in batches:
        skipped += len(b.pop("skipped", ()))  # bad examples, masked out (image data sets, on_bad_example=skip)
        pending.append(eval_fn(state, place(b)))
    for m in jax.device_get(pending):
        for k in totals:
            totals[k] += float(m[k])
    n = max(totals["count"], 1.0)
    out = {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n, "count": int(totals["count"])}
    if skipped:
        out["skipped_examples"] = skipped
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


def restore_state(workdir: str, cfg=None):
    """(cfg, state, step): the newest good checkpoint of ``workdir`` restored into a fresh state.

    Read-only: nothing in the workdir is created, moved or deleted. A corrupt newest checkpoint is skipped
    with a warning (the previous one is used); an incompatible or unreadable one is a one-line error.
    """
    cfg = cfg or load_run_config(workdir)
    apply_kernel_tuning(cfg)
    # The restore target is abstract (jax.eval_shape): no init is compiled for values the checkpoint replaces.
    abstract = build_state(cfg, run_dataset_info(workdir, cfg), abstract=True)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.train.keep_checkpoints, read_only=True)
    try:
        restored = ckpt.restore_latest(with_shardings(abstract, jax.tree.map(lambda _: device, abstract)))
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first")
    state, _, _, step = restored
    return cfg, state, step


def evaluate(workdir: str, split: str = "test", *, data_dir: str | None = None) -> dict:
    """{"split", "step", "loss", "accuracy", "count"} of the newest checkpoint on ``split`` (val|test)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split {split!r} is unknown; use train, val or test")
    cfg, state, step = restore_state(workdir)
    d = cfg.data
    batches = data.eval_batches(d.name, split, batch_size=d.eval_batch_size, data_dir=data_dir or d.dir,
                                **data_kwargs(cfg), **loader_kwargs(cfg))
    with nn.default_backend(cfg.model.backend):  # the run's op backend, as in training
        metrics = run_eval(jax.jit(steps.eval_step), state, batches)
    return {"split": split, "step": step, **metrics}


def predict(workdir: str, images: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
    """Logits (N, num_classes) for raw ``images`` in the data set's native pixel scale (e.g. MNIST 0..255,
    digits 0..16), shaped (N, H, W, C) or (N, H, W) for one channel. Normalisation is applied here."""
    cfg = load_run_config(workdir)
    info = run_dataset_info(workdir, cfg)
    x = data.normalize(images, info)  # before the restore: a wrong input fails fast
    cfg, state, _ = restore_state(workdir, cfg)
    bs = batch_size or cfg.data.eval_batch_size
    fn = jax.jit(steps.predict_step)
    with nn.default_backend(cfg.model.backend):
        out = [_predict_chunk(fn, state, x[start:start + bs], bs) for start in range(0, len(x), bs)]
    return np.concatenate(out) if out else np.zeros((0, cfg.model.num_classes), np.float32)


def _predict_chunk(fn, state, chunk: np.ndarray, bs: int) -> np.ndarray:
    pad = bs - len(chunk)  # pad the last batch so the function compiles once
    if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    return np.asarray(fn(state, chunk))[: bs - pad]


