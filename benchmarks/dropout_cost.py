"""What per-example dropout masks cost: a jitted train step with flax's single-draw Dropout vs the per-example
masks the train step uses (``fastgpu_jax.nn.per_example``), same model, same batch. Prints a table.

    python benchmarks/dropout_cost.py [--steps 20] [--batch 64]

Models: the digits CNN (dropout 0.1 on one hidden layer) and a ViT-Ti/4 on 32x32x3 (dropout 0.1 after the
embedding, in every attention and MLP block: 37 Dropout calls per forward).
"""

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import fastgpu_jax as fg
from fastgpu_jax import steps


def _time(fn, state, batch, n: int) -> float:
    state, m = fn(state, batch)  # compile
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(n):
        state, m = fn(state, batch)
    jax.block_until_ready(m)
    return 1000 * (time.perf_counter() - start) / n


def _row(name: str, overrides: list[str], image: tuple, batch_size: int, n: int) -> tuple:
    cfg = fg.load_config("configs/digits_cnn.py", overrides + [f"data.batch_size={batch_size}"])
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((batch_size,) + image, np.float32)),
             "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
    state = fg.build_state(cfg) if image == (8, 8, 1) else None
    if state is None:
        model = fg.models.build(cfg.model.name, num_classes=10, dropout_rate=cfg.model.dropout_rate)
        tx, lr_fn = fg.build_optimizer(cfg)
        state = fg.create_train_state(model, tx, seed=0, input_shape=(1,) + image, lr_fn=lr_fn)
    per_example = _time(jax.jit(steps.train_step), state, batch, n)
    with _single_draw():
        single = _time(jax.jit(steps.train_step), state, batch, n)
    return name, batch_size, single, per_example


@contextlib.contextmanager
def _single_draw():
    """flax's own Dropout: the per-example interceptor turned into a pass-through."""
    original = steps.per_example_dropout
    steps.per_example_dropout = lambda ids: contextlib.nullcontext()
    try:
        yield
    finally:
        steps.per_example_dropout = original


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    jax.config.update("jax_threefry_partitionable", True)  # as fg.train sets it
    rows = [_row("digits cnn (dropout 0.1)", [], (8, 8, 1), args.batch, args.steps),
            _row("vit_ti4 32x32 (dropout 0.1)", ["model.name=vit_ti4", "model.width=0", "model.dropout_rate=0.1"],
                 (32, 32, 3), args.batch, max(args.steps // 4, 3))]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'model':30} {'batch':>5} {'flax single draw ms':>20} {'per-example ms':>15} {'cost':>7}")
    for name, bs, single, per in rows:
        print(f"{name:30} {bs:5d} {single:20.2f} {per:15.2f} {per / single - 1:+7.1%}")


if __name__ == "__main__":
    main()
