"""Experiment configs: load a Python config file, apply dotted overrides, validate, freeze.

A config file is a Python module with ``get_config(arg=None)`` returning an ``ml_collections.ConfigDict``
that sets only what differs from the shared defaults (``SCHEMA`` below, the one place defaults live).
``load_config("configs/x.py:arg", overrides=["optimizer.lr=3e-3"])`` merges file values and overrides
onto the defaults, checks every key and type against the schema and every value against its rule, and
returns a ``FrozenConfigDict``. Any mistake fails here with one line naming the key and what is allowed,
long before a model is built.

Allowed ``model.name`` and ``data.name`` values come from the registries (``fastgpu_jax.models``,
``fastgpu_jax.data``), read when a config is validated, so a model registered in a config file's body is
accepted. The registries also say which optional keys each model and data set acts on: a key set away from
its default where it would do nothing (``model.width`` for a ViT, ``data.augment`` for digits) is refused.
Whether a data set's files exist is not checked here but when the data is first needed
(``builders.dataset_info``), so ``bench`` can time a config whose files are absent.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import math
import os
from collections.abc import Sequence as _SequenceABC
from typing import Any, Callable, Sequence

import ml_collections

from fastgpu_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config mistake; the message is one line naming the key."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: default, accepted type(s), and an optional rule on the value."""

    default: Any
    types: tuple
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # what `check` demands, for the error message
    help: str = ""


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _randaugment_ok(v: str) -> bool:
    if v in ("", "trivial"):
        return True
    n, sep, m = v.partition(",")
    return bool(sep) and n.strip().isdigit() and m.strip().isdigit() and int(n) > 0 and 0 <= int(m) <= 30


_INT, _FLOAT, _STR, _BOOL = (int,), (float, int), (str,), (bool,)
_OPT_STR = (str, type(None))


class _RegistryNames(_SequenceABC):
    """The names a registry holds when asked (live: a model registered after this module was imported, say
    by a config file, is in it). ``hint`` ends the error message of a name that is not there."""

    def __init__(self, read: Callable[[], tuple], hint: str = ""):
        self._read, self.hint = read, hint

    def __getitem__(self, index):
        return self._read()[index]

    def __len__(self) -> int:
        return len(self._read())

    def __add__(self, other) -> tuple:
        return tuple(self) + tuple(other)

    def __repr__(self) -> str:
        return repr(tuple(self))


def _model_names() -> tuple:
    from fastgpu_jax import models  # the registries sit above this module; read them only when validating

    return models.names()


def _data_names() -> tuple:
    from fastgpu_jax import data

    return data.DATASET_NAMES


MODEL_NAMES = _RegistryNames(_model_names, hint="(or add one with fastgpu_jax.models.register)")
DATA_NAMES = _RegistryNames(_data_names)

# Shared schema and defaults. Config files set only what differs.
SCHEMA: dict[str, Key] = {
    "seed": Key(0, _INT, check=_non_negative, rule=">= 0"),
    # data
    "data.name": Key("digits", _STR, choices=DATA_NAMES),
    "data.dir": Key(None, _OPT_STR, help="folder with the data set's files (mnist, fashion_mnist, cifar10, cifar100; "
                                         "folder: train/<class>/ + val/<class>/; arrayrecord: convert's output)"),
    "data.batch_size": Key(128, _INT, check=_positive, rule="> 0", help="global batch size"),
    "data.eval_batch_size": Key(256, _INT, check=_positive, rule="> 0"),
    "data.augment": Key(False, _BOOL, help="cifar10/cifar100: 4-pixel random crop + flip; folder/arrayrecord/tfds: "
                                           "random-resized crop + flip (off: the eval crop)"),
    "data.image_size": Key(32, _INT, check=_positive, rule="> 0",
                           help="synthetic: image side; folder/arrayrecord/tfds: side of the crops the model sees"),
    "data.workers": Key(0, _INT, check=_non_negative, rule=">= 0",
                        help="folder/arrayrecord/tfds: decoding processes (0: one thread of the train process)"),
    "data.prefetch": Key(2, _INT, check=_positive, rule="> 0",
                         help="folder/arrayrecord/tfds: batches ready per worker"),
    "data.crop_min_scale": Key(0.08, _FLOAT, check=lambda v: 0 < v <= 1, rule="in (0, 1]",
                               help="random-resized crop: smallest area fraction of the image"),
    "data.crop_max_aspect": Key(4 / 3, _FLOAT, check=lambda v: v >= 1, rule=">= 1",
                                help="random-resized crop: aspect ratios in [1/x, x]"),
    "data.eval_crop": Key(0.875, _FLOAT, check=lambda v: 0 < v <= 1, rule="in (0, 1]",
                          help="eval: resize the short side to image_size / eval_crop, then center-crop"),
    "data.on_bad_example": Key("error", _STR, choices=("error", "skip"),
                               help="a corrupt/unreadable image: stop naming it, or skip it (counted, logged)"),
    "data.channels": Key(3, _INT, check=_positive, rule="> 0", help="synthetic only"),
    "data.num_examples": Key(1024, _INT, check=_positive, rule="> 0", help="synthetic only"),
    "data.randaugment": Key("", _STR, check=_randaugment_ok, rule="'' (off), 'N,M' (RandAugment: N ops of "
                            "magnitude M in 0..30, e.g. '2,9') or 'trivial' (TrivialAugment)",
                            help="host-side augmentation of the training images, after crop and flip"),
    "data.mixup_alpha": Key(0.0, _FLOAT, check=_non_negative, rule=">= 0 (0: off)",
                            help="mixup on the device: Beta(alpha, alpha) mixing weight per example"),
    "data.cutmix_alpha": Key(0.0, _FLOAT, check=_non_negative, rule=">= 0 (0: off)",
                             help="cutmix on the device: Beta(alpha, alpha) kept-area fraction per example"),
    "data.mixup_switch_prob": Key(0.5, _FLOAT, check=lambda v: 0 <= v <= 1, rule="in [0, 1]",
                                  help="with both mixup and cutmix on: the chance an example uses cutmix"),
    "data.mixup_prob": Key(1.0, _FLOAT, check=lambda v: 0 <= v <= 1, rule="in [0, 1]",
                           help="the chance an example is mixed at all (mixup or cutmix on)"),
    # model
    "model.name": Key("cnn", _STR, choices=MODEL_NAMES),
    "model.num_classes": Key(10, _INT, check=lambda v: v >= 2, rule=">= 2"),
    "model.backend": Key("xla", _STR, choices=("xla", "pallas", "auto")),
    "model.pallas_tuning": Key("", _STR, help="JSON block-size table (pallas_kernels.tuning.save_table)"),
    "model.pallas_lowering": Key("auto", _STR, choices=("auto", "triton", "mosaic"),
                                 help="Pallas GPU lowering: auto = Mosaic GPU on Hopper where a kernel has a "
                                      "body, else Triton (pallas_kernels/lowering.py)"),
    "model.width": Key(0, _INT, check=_non_negative, rule=">= 0 (0: the model's usual width)",
                       help="base channels (cnn 32, resnet 64) or hidden units (mlp 256); not vit"),
    "model.stem": Key("imagenet", _STR, choices=("imagenet", "cifar"), help="resnet stem"),
    "model.dropout_rate": Key(0.0, _FLOAT, check=lambda v: 0 <= v < 1, rule="in [0, 1)",
                              help="cnn/mlp: after hidden layers; resnet: before the head; vit: see models/vit.py"),
    "model.drop_path_rate": Key(0.0, _FLOAT, check=lambda v: 0 <= v < 1, rule="in [0, 1)",
                                help="stochastic depth (resnet, vit): the last block's drop rate, linear from 0"),
    # train
    "train.steps": Key(1000, _INT, check=_positive, rule="> 0"),
    "train.log_every_steps": Key(50, _INT, check=_positive, rule="> 0"),
    "train.eval_every_steps": Key(0, _INT, check=_non_negative, rule=">= 0 (0: only at the end)"),
    "train.eval_split": Key("val", _STR, choices=("val", "test")),
    "train.checkpoint_every_steps": Key(500, _INT, check=_positive, rule="> 0"),
    "train.keep_checkpoints": Key(3, _INT, check=_positive, rule="> 0"),
    "train.grad_accum_steps": Key(1, _INT, check=_positive, rule="> 0"),
    "train.precision": Key("float32", _STR, choices=("float32", "bfloat16", "float16")),
    "train.loss_scale_init": Key(2.0 ** 15, _FLOAT, check=_positive, rule="> 0", help="float16 only"),
    "train.loss_scale_period": Key(2000, _INT, check=_positive, rule="> 0",
                                   help="float16: good steps before the loss scale doubles"),
    "train.nan_policy": Key("stop", _STR, choices=("stop", "skip")),
    "train.deterministic": Key(False, _BOOL),
    "train.label_smoothing": Key(0.0, _FLOAT, check=lambda v: 0 <= v < 1, rule="in [0, 1)"),
    "train.ema_decay": Key(0.0, _FLOAT, check=lambda v: 0 <= v < 1, rule="in [0, 1) (0: off)",
                           help="weight EMA of the params (and BatchNorm stats), evaluated as val_ema"),
    "train.ema_warmup": Key(True, _BOOL, help="EMA decay min(ema_decay, (1 + step) / (10 + step)), as TensorFlow's "
                                              "ExponentialMovingAverage(num_updates)"),
    "train.keep_best": Key("", _STR, choices=("", "accuracy", "top5_accuracy", "loss", "ema_accuracy",
                                              "ema_top5_accuracy", "ema_loss"),
                           help="keep the checkpoint with the best eval value of this metric beside the latest"),
    "train.early_stop_patience": Key(0, _INT, check=_non_negative, rule=">= 0 (0: off)",
                                     help="stop after this many evaluations without a better train.keep_best "
                                          "metric (accuracy when unset)"),
    "train.init_from": Key("", _STR, help="start from these weights: a run's workdir, an exported .msgpack, or "
                                          "a torchvision/timm .safetensors/.pth checkpoint"),
    "train.profile_steps": Key("", _STR, help="'START-END': jax.profiler trace of those steps into "
                                             "workdir/profile (open with TensorBoard's profile plugin)"),
    # optimizer
    "optimizer.name": Key("adam", _STR, choices=("sgd", "adam", "adamw", "lamb", "lars", "lion")),
    "optimizer.lr": Key(1e-3, _FLOAT, check=_positive, rule="> 0"),
    "optimizer.schedule": Key("constant", _STR, choices=("constant", "cosine", "warmup_cosine", "step",
                                                          "one_cycle")),
    "optimizer.step_boundaries": Key("", _STR, help="schedule=step: comma-separated fractions of train.steps "
                                                    "where the lr is multiplied by step_factor, e.g. '0.5,0.75'"),
    "optimizer.step_factor": Key(0.1, _FLOAT, check=lambda v: 0 < v <= 1, rule="in (0, 1]"),
    "optimizer.warmup_steps": Key(0, _INT, check=_non_negative, rule=">= 0",
                                  help="linear warmup 0 -> lr over these steps, before any schedule"),
    "optimizer.weight_decay": Key(0.0, _FLOAT, check=_non_negative, rule=">= 0"),
    "optimizer.momentum": Key(0.9, _FLOAT, check=lambda v: 0 <= v < 1, rule="in [0, 1)"),
    "optimizer.nesterov": Key(False, _BOOL),
    "optimizer.b1": Key(None, (float, int, type(None)), check=lambda v: 0 <= v < 1, rule="in [0, 1)",
                        help="adam/adamw/lamb/lion first-moment decay (None: the optimizer's default)"),
    "optimizer.b2": Key(None, (float, int, type(None)), check=lambda v: 0 <= v < 1, rule="in [0, 1)",
                        help="adam/adamw/lamb/lion second-moment decay (None: the optimizer's default)"),
    "optimizer.eps": Key(None, (float, int, type(None)), check=_positive, rule="> 0",
                         help="adam/adamw/lamb epsilon (None: the optimizer's default)"),
    "optimizer.layer_decay": Key(1.0, _FLOAT, check=lambda v: 0 < v <= 1, rule="in (0, 1] (1: off)",
                                 help="vit: layer-wise lr decay, block i of L scaled by layer_decay ** (L - i)"),
    "optimizer.param_rules": Key("", _STR, help="'regex=lr:MULT,wd:DECAY;...': per-parameter-group lr multiplier "
                                                "and weight decay, first matching regex on the param path wins"),
    "optimizer.grad_clip_norm": Key(0.0, _FLOAT, check=_non_negative, rule=">= 0 (0: off)"),
    # parallel (the multi-device strategies land with the parallel layer)
    "parallel.strategy": Key("none", _STR, choices=("none", "dp", "fsdp", "pmap")),
    "parallel.mesh": Key("", _STR, help="e.g. 'data=8' or 'data=2,fsdp=4' (empty: dp/pmap/none put all "
                                        "devices on data, fsdp on fsdp); no strategy uses a model axis yet"),
    "parallel.coordinator": Key("", _STR),
    "parallel.num_processes": Key(1, _INT, check=_positive, rule="> 0"),
    "parallel.process_id": Key(0, _INT, check=_non_negative, rule=">= 0"),
    "parallel.init_timeout_s": Key(300, _INT, check=_positive, rule="> 0",
                                   help="seconds to wait for every process to join"),
    "parallel.fsdp_rules": Key(r".*=auto", _STR,
                               help="'regex=auto|spec;...': which params/optimizer state fsdp shards, how "
                                    "(default: every leaf on its largest dimension that the fsdp axis divides)"),
    # logging
    "log.tensorboard": Key(True, _BOOL),
    "log.wandb": Key(False, _BOOL, help="Weights & Biases writer (pip install wandb; WANDB_MODE=offline works "
                                        "without network)"),
    "log.wandb_project": Key("fastgpu_jax", _STR),
    "log.progress_bar": Key(True, _BOOL, help="tqdm bar on a TTY; plain lines otherwise"),
}

# Keys that may change when a run resumes without changing what it computes up to the saved step.
RESUMABLE_CHANGES = frozenset({
    "train.steps", "train.log_every_steps", "train.eval_every_steps", "train.eval_split",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "data.dir", "data.eval_batch_size",
    "data.workers", "data.prefetch", "train.keep_best", "train.early_stop_patience",
    "train.init_from",  # read only when a run starts from step 0; a resume restores its own checkpoint
    "log.tensorboard", "log.wandb", "log.wandb_project", "log.progress_bar", "train.profile_steps",
    # Same math within float tolerance (tested): a run may resume on the other op backend, or on another
    # device count / strategy / process layout (checkpoints reshard on restore).
    "model.backend", "model.pallas_tuning", "model.pallas_lowering", "parallel.strategy", "parallel.mesh",
    "parallel.coordinator", "parallel.num_processes", "parallel.process_id", "parallel.init_timeout_s", "parallel.fsdp_rules",
})


def default_config() -> ml_collections.ConfigDict:
    """A fresh, unlocked ConfigDict holding every key's default."""
    cfg = ml_collections.ConfigDict()
    for dotted, key in SCHEMA.items():
        section, _, name = dotted.rpartition(".")
        node = cfg
        if section:
            if section not in node:
                node[section] = ml_collections.ConfigDict()
            node = node[section]
        node[name] = key.default
    return cfg


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    items = tree.items() if hasattr(tree, "items") else []
    for name, value in items:
        dotted = f"{prefix}{name}"
        if isinstance(value, (dict, ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


# Names other libraries use for our keys: a near-miss suggestion that spelling alone would not find.
_SYNONYMS = {"learning_rate": "lr", "base_lr": "lr", "num_steps": "steps", "total_steps": "steps",
             "batch": "batch_size", "dropout": "dropout_rate", "num_workers": "workers", "wd": "weight_decay",
             "warmup": "warmup_steps", "arch": "name", "dataset": "name"}


def _suggest(word: str, candidates) -> str:
    """' (did you mean X?)' for the nearest candidate, or ''."""
    candidates = [str(c) for c in candidates]
    close = difflib.get_close_matches(str(word), candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _close_keys(dotted: str) -> str:
    """' (did you mean K?); known keys here: ...' for an unknown key: a synonym or the nearest spelling."""
    section, _, leaf = dotted.rpartition(".")
    guess = f"{section}.{_SYNONYMS[leaf]}" if leaf in _SYNONYMS else None
    if guess not in SCHEMA:
        close = difflib.get_close_matches(dotted, list(SCHEMA), n=1, cutoff=0.6)
        guess = close[0] if close else None
    same = [k for k in SCHEMA if k.rpartition(".")[0] == section]
    known = ", ".join(same) if same else ", ".join(sorted({k.split(".")[0] for k in SCHEMA}))
    return (f" (did you mean '{guess}'?)" if guess else "") + f"; known keys here: {known}"


def _check_type(dotted: str, value: Any) -> Any:
    """Returns value coerced to the key's type (int -> float only), or raises ConfigError."""
    if dotted not in SCHEMA:
        raise ConfigError(f"unknown config key '{dotted}'{_close_keys(dotted)}")
    key = SCHEMA[dotted]
    ok = isinstance(value, key.types) and not (isinstance(value, bool) and bool not in key.types)
    if not ok:
        names = " or ".join("None" if t is type(None) else t.__name__ for t in key.types)
        raise ConfigError(f"config key '{dotted}' must be {names}, got {value!r} ({type(value).__name__})")
    if float in key.types and isinstance(value, int):
        value = float(value) if abs(value) < 2 ** 1000 else math.inf
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{dotted}' must be a finite number, got {value!r}")
    return value


def _check_value(dotted: str, value: Any) -> None:
    key = SCHEMA[dotted]
    if key.choices is not None and value not in key.choices:
        hint = getattr(key.choices, "hint", "")
        raise ConfigError(f"config key '{dotted}'={value!r} is not allowed{_suggest(value, key.choices)}; "
                          "choose one of: " + ", ".join(map(str, key.choices)) + (f" {hint}" if hint else ""))
    if key.check is not None and value is not None and not key.check(value):
        raise ConfigError(f"config key '{dotted}'={value!r} is impossible; it must be {key.rule}")


def _validate_recipe(flat: dict[str, Any]) -> None:
    """The research-recipe keys that need another key to mean anything."""
    best = flat["train.keep_best"]
    if best.startswith("ema_") and not flat["train.ema_decay"]:
        raise ConfigError(f"train.keep_best={best!r} compares EMA evaluations, but train.ema_decay=0 keeps no EMA; "
                          "set train.ema_decay (e.g. 0.9999) or keep_best without 'ema_'")
    if "top5" in best and flat["model.num_classes"] <= 5:
        raise ConfigError(f"train.keep_best={best!r} needs more than 5 classes; model.num_classes="
                          f"{flat['model.num_classes']}")
    if flat["train.early_stop_patience"] and not flat["train.eval_every_steps"]:
        raise ConfigError(f"train.early_stop_patience={flat['train.early_stop_patience']} counts evaluations, but "
                          "train.eval_every_steps=0 evaluates only at the end; set train.eval_every_steps")
    mixing = flat["data.mixup_alpha"] or flat["data.cutmix_alpha"]
    per_micro_batch = flat["data.batch_size"] // flat["train.grad_accum_steps"]
    if mixing and per_micro_batch % 2:
        raise ConfigError(f"data.mixup_alpha/cutmix_alpha mix neighbouring examples in pairs, so data.batch_size / "
                          "train.grad_accum_steps must be even (and divisible by 2 x devices); it is "
                          f"{per_micro_batch}")


def _validate_combinations(flat: dict[str, Any]) -> None:
    """Rules that tie several keys together."""
    from fastgpu_jax import optim  # the parsers that read optimizer strings for real, imported only here

    bs, accum = flat["data.batch_size"], flat["train.grad_accum_steps"]
    if bs % accum:
        raise ConfigError(f"data.batch_size={bs} is not divisible by train.grad_accum_steps={accum}")
    if flat["optimizer.warmup_steps"] and flat["optimizer.warmup_steps"] >= flat["train.steps"]:
        raise ConfigError(f"optimizer.warmup_steps={flat['optimizer.warmup_steps']} must be smaller than "
                          f"train.steps={flat['train.steps']}")
    _validate_recipe(flat)
    optim.check_settings(schedule=flat["optimizer.schedule"], steps=flat["train.steps"],
                         warmup_steps=flat["optimizer.warmup_steps"],
                         step_boundaries=flat["optimizer.step_boundaries"], param_rules=flat["optimizer.param_rules"])
    profile = flat["train.profile_steps"]
    if profile:
        start, sep, end = profile.partition("-")
        if not (sep and start.isdigit() and end.isdigit() and 0 < int(start) <= int(end)):
            raise ConfigError(f"train.profile_steps={profile!r} must look like 'START-END' with 0 < START <= END")
    if flat["parallel.process_id"] >= flat["parallel.num_processes"]:
        raise ConfigError(f"parallel.process_id={flat['parallel.process_id']} must be < "
                          f"parallel.num_processes={flat['parallel.num_processes']}")
    mesh = flat["parallel.mesh"]
    for part in mesh.split(","):
        axis, _, size = (t.strip() for t in part.partition("="))
        if axis == "model" and size.isdigit() and int(size) > 1:
            raise ConfigError(f"parallel.mesh={mesh!r} puts {int(size)} devices on the model axis, but no "
                              "strategy uses the model axis yet; spread the devices over data= and fsdp=")


def _ignored_keys(flat: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, why) for each optional key set away from its default that the chosen model or data set would
    ignore. The registries (fastgpu_jax.models, fastgpu_jax.data) say which keys act on what."""
    from fastgpu_jax import data, models

    out = []
    name = flat["model.name"]
    accepted = models.accepted_keys(name)
    for key in models.OPTIONAL_KEYS:
        dotted = f"model.{key}"
        if key not in accepted and flat[dotted] != SCHEMA[dotted].default:
            out.append((dotted, f"has no effect on model.name='{name}': {models.why_ignored(name, key)}"))
    name = flat["data.name"]
    spec = data.DATASETS[name]
    for key in dict.fromkeys(o for s in data.DATASETS.values() for o in s.options):
        dotted = f"data.{key}"
        if key in spec.options or flat[dotted] == SCHEMA[dotted].default:
            continue
        users = ", ".join(n for n, s in data.DATASETS.items() if key in s.options)
        if key == "augment":
            why = f"it has no augmentation (data sets with augmentation: {users})"
        elif key == "randaugment":
            why = f"its images are grayscale or synthetic ({dotted} applies to {users} only)"
        elif key in ("image_size", "channels", "num_examples"):
            shape = "x".join(map(str, spec.image_shape)) if spec.image_shape else "fixed"
            why = f"its images are {shape} ({dotted} applies to {users} only)"
        else:
            why = f"it decodes no image files ({dotted} applies to {users} only)"
        out.append((dotted, f"has no effect on data.name='{name}': {why}"))
    if flat["data.dir"] is not None and not spec.files:
        readers = ", ".join(n for n, s in data.DATASETS.items() if s.files)
        out.append(("data.dir", f"has no effect on data.name='{name}': it reads no files (data.dir is for "
                                f"{readers})"))
    for dotted, applies, why in _CONDITIONAL_KEYS:
        if not applies(flat) and flat[dotted] != SCHEMA[dotted].default:
            out.append((dotted, f"has no effect here: {why}"))
    return out


# (key, when it acts, why it does not otherwise): optimizer and precision keys that only some settings read.
_CONDITIONAL_KEYS = (
    ("optimizer.momentum", lambda f: f["optimizer.name"] in ("sgd", "lars"),
     "only optimizer.name=sgd or lars uses momentum"),
    ("optimizer.nesterov", lambda f: f["optimizer.name"] in ("sgd", "lars"),
     "only optimizer.name=sgd or lars uses nesterov"),
    ("optimizer.b1", lambda f: f["optimizer.name"] in ("adam", "adamw", "lamb", "lion"),
     "only optimizer.name=adam, adamw, lamb or lion uses b1"),
    ("optimizer.b2", lambda f: f["optimizer.name"] in ("adam", "adamw", "lamb", "lion"),
     "only optimizer.name=adam, adamw, lamb or lion uses b2"),
    ("optimizer.eps", lambda f: f["optimizer.name"] in ("adam", "adamw", "lamb"),
     "only optimizer.name=adam, adamw or lamb uses eps"),
    ("optimizer.step_boundaries", lambda f: f["optimizer.schedule"] == "step",
     "only optimizer.schedule=step uses step_boundaries"),
    ("optimizer.step_factor", lambda f: f["optimizer.schedule"] == "step",
     "only optimizer.schedule=step uses step_factor"),
    ("data.mixup_switch_prob", lambda f: f["data.mixup_alpha"] > 0 and f["data.cutmix_alpha"] > 0,
     "the switch between mixup and cutmix needs both data.mixup_alpha and data.cutmix_alpha > 0"),
    ("data.mixup_prob", lambda f: f["data.mixup_alpha"] > 0 or f["data.cutmix_alpha"] > 0,
     "it needs data.mixup_alpha or data.cutmix_alpha > 0"),
    ("train.ema_warmup", lambda f: f["train.ema_decay"] > 0, "it needs train.ema_decay > 0"),
    ("train.loss_scale_init", lambda f: f["train.precision"] == "float16",
     "loss scaling runs only with train.precision=float16"),
    ("train.loss_scale_period", lambda f: f["train.precision"] == "float16",
     "loss scaling runs only with train.precision=float16"),
)


def parse_override(text: str) -> tuple[str, Any]:
    """'optimizer.lr=3e-3' -> ('optimizer.lr', 0.003). Values are Python literals, else strings."""
    dotted, sep, raw = text.partition("=")
    dotted = dotted.strip().removeprefix("--config.").removeprefix("config.")
    if not sep or not dotted:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optimizer.lr=3e-3")
    raw = raw.strip()
    key = SCHEMA.get(dotted)
    if raw in ("None", "none", "null") and (key is None or type(None) in key.types):
        return dotted, None  # ('none' stays a string where None is not allowed: parallel.strategy=none)
    if raw.lower() in ("true", "false"):
        return dotted, raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = raw
        if raw.lower().lstrip("+-") in ("inf", "infinity", "nan") and key is not None and key.types == _FLOAT:
            value = float(raw)  # so the finite-number check, not a type error, explains the mistake
    # "1e-3" parses as float already; keep quoted or bare strings as strings.
    if dotted in SCHEMA and str in SCHEMA[dotted].types and not isinstance(value, str) and value is not None:
        value = raw
    return dotted, value


def _load_file(path: str) -> ml_collections.ConfigDict:
    """Runs the config file and its ``get_config``; any mistake in them is one ConfigError line."""
    path, _, arg = path.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    spec = importlib.util.spec_from_file_location(f"_fastgpu_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"config file '{path}' has a syntax error at line {err.lineno}: {err.msg}") from err
    except Exception as err:  # noqa: BLE001 - whatever the file raises, the user must fix the file
        raise ConfigError(f"config file '{path}' failed to load: {_one_line(err)}") from err
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file '{path}' has no get_config() function")
    get_config = module.get_config
    if not callable(get_config):
        raise ConfigError(f"get_config in config file '{path}' is a {type(get_config).__name__}, not a function")
    takes_arg = _accepts_one_argument(get_config)
    if arg and not takes_arg:
        raise ConfigError(f"config file '{path}' was given ':{arg}' but its get_config() takes no argument")
    try:
        cfg = get_config(arg) if arg else get_config()
    except Exception as err:  # noqa: BLE001
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"{call} in '{path}' raised {_one_line(err)}") from err
    if not isinstance(cfg, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"get_config() in '{path}' must return a ConfigDict, got {type(cfg).__name__}")
    return cfg


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _accepts_one_argument(fn) -> bool:
    try:
        inspect.signature(fn).bind("arg")
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): let the call decide
        return True
    return True


def build_config(values: dict | ml_collections.ConfigDict | None = None,
                 overrides: Sequence[str] = ()) -> ml_collections.FrozenConfigDict:
    """Defaults <- values (nested or dotted) <- overrides; validated and frozen."""
    return _build(values, overrides, reset_ignored=False)


def _build(values, overrides: Sequence[str], reset_ignored: bool) -> ml_collections.FrozenConfigDict:
    flat = {k: key.default for k, key in SCHEMA.items()}
    for dotted, value in _flatten(values or {}).items():
        flat[dotted] = _check_type(dotted, value)
    for text in overrides:
        dotted, value = parse_override(text)
        flat[dotted] = _check_type(dotted, value)
    for dotted, value in flat.items():
        _check_value(dotted, value)
    _validate_combinations(flat)
    for dotted, why in _ignored_keys(flat):
        if not reset_ignored:
            default = SCHEMA[dotted].default
            raise ConfigError(f"{dotted}={flat[dotted]!r} {why}; leave it at the default {default!r}")
        flat[dotted] = SCHEMA[dotted].default
    cfg = default_config()
    for dotted, value in flat.items():
        section, _, name = dotted.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    return ml_collections.FrozenConfigDict(cfg)


def describe_keys() -> str:
    """Every config key, one line each: type, default, allowed values or rule, help (``--help-keys``)."""
    lines = []
    for name, key in SCHEMA.items():
        types = " or ".join("None" if t is type(None) else t.__name__ for t in key.types)
        allowed = f"; one of {', '.join(map(str, key.choices))}" if key.choices is not None else (
            f"; {key.rule}" if key.rule else "")
        lines.append(f"{name}  ({types}, default {key.default!r}{allowed})" + (f"  {key.help}" if key.help else ""))
    return "\n".join(lines)


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.FrozenConfigDict:
    """Loads ``path`` (optionally ``file.py:arg``), applies ``overrides``, validates, freezes."""
    return build_config(_load_file(path), overrides)


def to_flat_dict(cfg) -> dict[str, Any]:
    """The config as {dotted key: value}: for config.json and for comparing two configs."""
    return _flatten(cfg)


def from_flat_dict(flat: dict[str, Any]) -> ml_collections.FrozenConfigDict:
    """Rebuilds a validated config from ``to_flat_dict`` output (e.g. a workdir's config.json). A key the
    model or data set ignores (saved by an older version that accepted it) goes back to its default: it never
    had an effect, and the run stays readable."""
    return _build({k: v for k, v in flat.items()}, (), reset_ignored=True)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ and that would change what a resumed run computes."""
    allowed = set(RESUMABLE_CHANGES)
    if new.get("optimizer.schedule") != "constant":
        allowed.discard("train.steps")  # the schedule spans train.steps: changing it changes every lr
    keys = set(old) | set(new)
    # A key the old config lacks was added since that run was written; its default keeps what the run computed.
    was = lambda k: old[k] if k in old or k not in SCHEMA else SCHEMA[k].default  # noqa: E731
    return sorted(k for k in keys if was(k) != new.get(k) and k not in allowed)
