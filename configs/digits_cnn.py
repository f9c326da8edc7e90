"""Default experiment: the small CNN on scikit-learn's embedded 8x8 `digits` (1,257 train images).

Run (no download; times on a 2-core CPU: the README's "Measured here" table):
    fastgpu-jax train --config configs/digits_cnn.py --workdir runs/digits
    fastgpu-jax eval --workdir runs/digits --split test
Test accuracy: >= 0.97 is checked by the tests; the measured figure is in the README's table.
`configs/digits_cnn.py:quick` is a 60-step smoke variant for tests.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="digits", batch_size=64, eval_batch_size=360)
    c.model = dict(name="cnn", num_classes=10, width=32, dropout_rate=0.1)
    # ~20 epochs of 1,257 images; Adam with a cosine decay to 0 over the run.
    c.optimizer = dict(name="adam", lr=3e-3, schedule="warmup_cosine", warmup_steps=20)
    c.train = dict(steps=400, log_every_steps=50, eval_every_steps=100, checkpoint_every_steps=200)
    if arg == "quick":
        c.train.update(steps=60, log_every_steps=20, eval_every_steps=30, checkpoint_every_steps=30)
    return c
