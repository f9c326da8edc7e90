"""fastgpu_jax: functional JAX/Flax training for image classification on GPUs.

    import fastgpu_jax as fg
    cfg = fg.load_config("configs/digits_cnn.py", overrides=["train.steps=300"])
    summary = fg.train(cfg, workdir="runs/digits")
    metrics = fg.evaluate("runs/digits", split="test")

Every name below is imported on first use (PEP 562), so ``import fastgpu_jax`` and ``fastgpu-jax --help`` do
not pay for JAX, Flax or scikit-learn. ``fg.train`` and ``fg.evaluate`` are the functions, as they always were,
even though modules of the same names exist (``importlib.import_module("fastgpu_jax.train")`` gives the module).
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_SUBMODULES = ("checkpoint", "config", "data", "errors", "models", "nn", "optim", "pallas_kernels", "parallel", "state",
               "steps")
# public name -> the module that defines it
_EXPORTS = {
    "build_model": "builders", "build_optimizer": "builders", "build_state": "builders",
    "ConfigError": "config", "build_config": "config", "load_config": "config",
    "evaluate": "evaluate", "predict": "evaluate", "restore_state": "evaluate",
    "benchmark_inference": "inference", "export_params": "inference", "load_exported": "inference",
    "load_model": "inference", "predict_files": "inference",
    "plot_curves": "plot",
    "evaluate_quantized": "quantize", "load_quantized": "quantize", "quantize_run": "quantize",
    "StepOptions": "state", "TrainState": "state", "create_train_state": "state",
    "compute_metrics": "steps", "eval_step": "steps", "predict_step": "steps", "train_step": "steps",
    "train": "train",
}
__all__ = sorted(_SUBMODULES + tuple(_EXPORTS))


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``fg.train``/``fg.evaluate`` the functions: importing the submodule ``fastgpu_jax.train`` makes
    Python bind the module onto the package under the same name, which this refuses for those two names."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
