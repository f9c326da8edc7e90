"""The classic MNIST CNN (conv3x3-32 + ReLU + pool, conv3x3-64 + ReLU + pool, dense 128, dense 10), Adam,
cross-entropy, on the local IDX files (download them yourself: no network access is assumed).

Run:
    fastgpu-jax train --config configs/mnist_cnn.py --workdir runs/mnist --config.data.dir=PATH/TO/mnist
    fastgpu-jax eval --workdir runs/mnist
PATH/TO/mnist holds train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz]
and t10k-labels-idx1-ubyte[.gz]. Expected (not measured here: no IDX files on the test machines): ~99% test accuracy after 2 epochs
(~1,700 steps of 64; the step time on a 2-core CPU is in the README's "Measured here" table). Use
`data.name=fashion_mnist` for Fashion-MNIST (expected ~91%).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="mnist", batch_size=64, eval_batch_size=500)
    c.model = dict(name="cnn", num_classes=10, width=32)
    c.optimizer = dict(name="adam", lr=1e-3)
    c.train = dict(steps=1700, log_every_steps=100, eval_every_steps=500, checkpoint_every_steps=500)
    return c
