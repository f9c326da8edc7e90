"""fastgpu_jax: functional JAX/Flax training for image classification on GPUs.

    import fastgpu_jax as fg
    cfg = fg.load_config("configs/digits_cnn.py", overrides=["train.steps=300"])
    summary = fg.train(cfg, workdir="runs/digits")
    metrics = fg.evaluate("runs/digits", split="test")
"""

from fastgpu_jax import checkpoint, data, errors, models, nn, parallel, pallas_kernels
from fastgpu_jax.builders import build_model, build_optimizer, build_state
from fastgpu_jax.config import ConfigError, build_config, load_config
from fastgpu_jax.evaluate import evaluate, predict, restore_state
from fastgpu_jax.inference import benchmark_inference, export_params, load_exported, load_model
from fastgpu_jax.plot import plot_curves
from fastgpu_jax.quantize import evaluate_quantized, load_quantized, quantize_run
from fastgpu_jax.state import StepOptions, TrainState, create_train_state
from fastgpu_jax.steps import compute_metrics, eval_step, predict_step, train_step
from fastgpu_jax.train import train

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "errors", "StepOptions", "TrainState", "build_config", "build_model", "build_optimizer", "build_state",
    "compute_metrics", "create_train_state", "data", "eval_step", "evaluate", "load_config", "models", "nn",
    "pallas_kernels", "parallel", "plot_curves", "predict", "predict_step", "restore_state", "train",
    "train_step",
    "benchmark_inference", "evaluate_quantized", "export_params", "load_exported", "load_model", "load_quantized",
    "quantize_run",
]
