"""Config -> objects: the data set facts, the model, the optimizer and a fresh TrainState.

Shared by the train loop, ``evaluate`` and ``predict`` so that all three build exactly the same thing
from the same config. This is the only module below the loop that reads config values; it hands plain
values to ``models``, ``optim``, ``data`` and ``state``.
"""

from __future__ import annotations

from fastgpu_jax import data, models, optim
from fastgpu_jax.config import ConfigError
from fastgpu_jax.mix import MixOptions
from fastgpu_jax.state import PRECISIONS, StepOptions, TrainState, create_train_state


def data_kwargs(cfg) -> dict:
    """Extra keyword arguments of ``data.info`` and the pipelines (synthetic: its shapes; image sets: the crop
    size)."""
    d = cfg.data
    if d.name in data.IMAGE_DATASETS:
        return {"image_size": d.image_size}
    if d.name != "synthetic":
        return {}
    return {"image_size": d.image_size, "channels": d.channels, "num_examples": d.num_examples,
            "num_classes": cfg.model.num_classes}


def loader_kwargs(cfg) -> dict:
    """How the image data sets cut and decode examples (``image_options``, ``workers``, ``prefetch``); for the
    array data sets ``randaugment`` where the set takes it ({} otherwise). Both the train and the eval pipeline
    accept these (eval batches are never augmented)."""
    d = cfg.data
    if d.name not in data.IMAGE_DATASETS:
        return {"randaugment": d.randaugment} if "randaugment" in data.DATASETS[d.name].options else {}
    from fastgpu_jax.data.image_pipeline import ImageOptions

    opts = ImageOptions(size=d.image_size, augment=d.augment, min_scale=d.crop_min_scale,
                        max_aspect=d.crop_max_aspect, eval_crop=d.eval_crop, on_bad_example=d.on_bad_example,
                        randaugment=d.randaugment)
    return {"image_options": opts, "workers": d.workers, "prefetch": d.prefetch}


def dataset_info(cfg) -> data.DatasetInfo:
    """The data set's facts, reading (and validating) its files. A missing ``data.dir`` is a ConfigError
    here rather than at load time, so that ``bench`` can time a config whose files are absent."""
    spec = data.DATASETS[cfg.data.name]
    if spec.files and not cfg.data.dir:
        raise ConfigError(f"data.dir is required for data.name='{cfg.data.name}' (the folder holding "
                          f"{spec.files})")
    info = data.info(cfg.data.name, cfg.data.dir, **data_kwargs(cfg))
    if info.num_classes > cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} is smaller than the "
                          f"{info.num_classes} classes of data.name='{cfg.data.name}'")
    return info


def build_model(cfg, axis_name: str | None = None):
    m = cfg.model
    return models.build(m.name, num_classes=m.num_classes, width=m.width or None, dropout_rate=m.dropout_rate,
                        stem=m.stem, dtype=PRECISIONS[cfg.train.precision], bn_axis_name=axis_name,
                        drop_path_rate=m.drop_path_rate)


def build_optimizer(cfg):
    """(tx, lr_fn) for ``cfg.optimizer``; the schedule spans ``train.steps`` updates. ``lr_fn`` is the base lr
    (what the logs show): param_rules and layer_decay multiply it per parameter inside ``tx``, which reads the
    param paths when it is initialised, so a layer_decay on a model without ViT blocks fails then."""
    o = cfg.optimizer
    boundaries = optim.parse_step_boundaries(o.step_boundaries) if o.schedule == "step" else ()
    lr_fn = optim.make_schedule(o.schedule, o.lr, cfg.train.steps, o.warmup_steps, boundaries=boundaries,
                                factor=o.step_factor)
    tx = optim.make_optimizer(o.name, lr_fn, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm, b1=o.b1, b2=o.b2,
                              eps=o.eps, param_rules=optim.parse_param_rules(o.param_rules),
                              layer_decay=o.layer_decay, model_name=cfg.model.name)
    return tx, lr_fn


def step_options(cfg, axis_name: str | None = None, info: data.DatasetInfo | None = None) -> StepOptions:
    """The step's static options; ``info``'s mean/std normalise uint8 batches on the device."""
    t = cfg.train
    stats = {"input_mean": tuple(info.mean), "input_std": tuple(info.std)} if info is not None else {}
    d = cfg.data
    mixing = MixOptions(mixup_alpha=d.mixup_alpha, cutmix_alpha=d.cutmix_alpha, switch_prob=d.mixup_switch_prob,
                        prob=d.mixup_prob)
    return StepOptions(grad_accum_steps=t.grad_accum_steps, precision=t.precision, nan_policy=t.nan_policy,
                       loss_scale_period=t.loss_scale_period, axis_name=axis_name, label_smoothing=t.label_smoothing,
                       mix=mixing, ema_decay=t.ema_decay, ema_warmup=t.ema_warmup, **stats)


def op_backend(cfg):
    """The run's op backend and Pallas lowering (``model.backend``, ``model.pallas_lowering``) as a context: the
    train step, eval, quantize and bench trace inside it."""
    from fastgpu_jax import nn

    return nn.default_backend(cfg.model.backend, pallas_lowering=cfg.model.pallas_lowering)


def apply_kernel_tuning(cfg) -> None:
    """Loads ``model.pallas_tuning`` (a block-size table) into the kernels' tuning, if set."""
    if cfg.model.pallas_tuning:
        from fastgpu_jax.pallas_kernels import tuning

        tuning.load_table(cfg.model.pallas_tuning)


def build_state(cfg, info: data.DatasetInfo | None = None, axis_name: str | None = None, *,
                shardings=None, abstract: bool = False) -> TrainState:
    """A freshly initialised TrainState for ``cfg`` (params from ``cfg.seed``). ``axis_name`` is the mapped
    axis of the dp/pmap strategies (None otherwise); it does not change the params. ``shardings``: create
    every leaf directly in these shards (see ``strategy.state_shardings``); ``abstract``: shapes and dtypes
    only, nothing compiled (a restore target). See ``state.create_train_state``."""
    info = info or dataset_info(cfg)
    tx, lr_fn = build_optimizer(cfg)
    return create_train_state(build_model(cfg, axis_name), tx, seed=cfg.seed,
                              input_shape=(1,) + tuple(info.image_shape), lr_fn=lr_fn,
                              options=step_options(cfg, axis_name, info), loss_scale_init=cfg.train.loss_scale_init,
                              shardings=shardings, abstract=abstract)
