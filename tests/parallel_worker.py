"""Runs in a subprocess with N fake CPU devices (set XLA_FLAGS before jax loads): trains one config under
several strategies and prints {strategy: train losses per step} as JSON on its last line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_worker.py WORKDIR MODEL S1,S2,.. [KEY=VALUE ..]

``... parallel_worker.py - hlo fsdp,dp xla,pallas`` prints instead which shapes the compiled cnn train step
all-gathers under each strategy and backend.
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastgpu_jax as fg  # noqa: E402
from conftest import TINY_RESNET, register_tiny_resnet  # noqa: E402
from fastgpu_jax.writers import read_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Plain SGD: unlike Adam, it is not blind to a gradient scaled by the device count (psum for pmean).
COMMON = ["train.steps=20", "train.log_every_steps=1", "train.eval_every_steps=10",
          "train.checkpoint_every_steps=10", "log.tensorboard=False", "log.progress_bar=False",
          "data.batch_size=32", "optimizer.schedule=constant", "optimizer.warmup_steps=0",
          "optimizer.name=sgd"]
MODELS = {
    # Dropout on (0.1, the default): the masks of example i must not depend on which device holds it.
    "cnn": ["model.width=16", "data.eval_batch_size=360", "optimizer.lr=0.1", "optimizer.momentum=0.0"],
    # Synthetic 16x16 inputs: on 8x8 digits a ResNet's last stage is 1x1 and BatchNorm over 32 values makes the
    # curve chaotic (rounding-level differences grow), which would test the data, not the strategies.
    "resnet": [f"model.name={TINY_RESNET}", "model.width=8", "model.stem=cifar", "data.name=synthetic",
               "data.image_size=16", "data.num_examples=256", "data.eval_batch_size=128", "model.dropout_rate=0.0",
               "optimizer.lr=0.01", "optimizer.momentum=0.9",
               # The research recipes' per-example draws (mixup/cutmix pairs, stochastic depth) and the EMA must
               # not depend on the device count either.
               "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "model.drop_path_rate=0.2",
               "train.label_smoothing=0.1", "train.ema_decay=0.9"],
}


register_tiny_resnet()  # the 'resnet' runs train it


def config(model: str, *extra: str):
    return fg.load_config(os.path.join(ROOT, "configs", "digits_cnn.py"), COMMON + MODELS[model] + list(extra))


def train_losses(workdir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(workdir) if r["split"] == "train"]


def gathered_shapes(strategy: str, backend: str) -> dict:
    """The shapes every all-gather in the compiled cnn train step produces, and the params' shapes."""
    import jax
    import numpy as np

    from fastgpu_jax import nn, parallel, steps

    jax.config.update("jax_threefry_partitionable", True)
    cfg = config("cnn", f"parallel.strategy={strategy}", "data.batch_size=40", f"model.backend={backend}")
    s = parallel.get_strategy(strategy, parallel.make_mesh(cfg), batch_size=40, fsdp_rules=cfg.parallel.fsdp_rules)
    state = s.place_state(fg.build_state(cfg, axis_name=s.axis_name))
    batch = s.place_batch({"image": np.zeros((40, 8, 8, 1), np.float32), "label": np.zeros((40,), np.int32)})
    with nn.default_backend(backend):
        hlo = s.compile_train(steps.train_step).lower(state, batch).compile().as_text()
    shapes = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", hlo)
    return {"gathered": [[int(d) for d in x.split(",") if d] for x in shapes],
            "params": [list(p.shape) for p in jax.tree.leaves(state.params)]}


if __name__ == "__main__":
    root, model = sys.argv[1], sys.argv[2]
    if model == "hlo":  # tests/parallel_worker.py - hlo fsdp,dp xla,pallas
        print(json.dumps({f"{s}-{b}": gathered_shapes(s, b) for s in sys.argv[3].split(",")
                          for b in sys.argv[4].split(",")}))
        sys.exit(0)
    strategies, extra = sys.argv[3].split(","), sys.argv[4:]  # extra: config overrides for every run
    out = {}
    for strategy in strategies:
        workdir = os.path.join(root, f"{model}-{strategy}")
        fg.train(config(model, f"parallel.strategy={strategy}", *extra), workdir)
        out[strategy] = train_losses(workdir)
    print(json.dumps(out))
