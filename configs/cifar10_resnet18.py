"""ResNet-18 (CIFAR stem: 3x3 conv, no max-pool) on CIFAR-10 from the local *binary* batches
(cifar-10-batches-bin: data_batch_1.bin .. data_batch_5.bin, test_batch.bin), random crop + flip, SGD with
Nesterov momentum, warmup + cosine, weight decay 5e-4, bf16 compute.

Run (GPU; ~30 epochs of 45,000 images at batch 512):
    fastgpu-jax train --config configs/cifar10_resnet18.py --workdir runs/cifar --config.data.dir=PATH/TO/cifar
    fastgpu-jax eval --workdir runs/cifar
    fastgpu-jax bench --config configs/cifar10_resnet18.py   # step time only: no CIFAR files needed
Expected: ~94% test accuracy (not yet measured with this library: no GPU was lent when it was written).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    batch = 512
    c.data = dict(name="cifar10", batch_size=batch, eval_batch_size=1000, augment=True)
    c.model = dict(name="resnet18", num_classes=10, stem="cifar")
    # Linear scaling: lr 0.1 per 128 examples (sweep it again if you sweep the batch size).
    c.optimizer = dict(name="sgd", lr=0.1 * batch / 128, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       schedule="warmup_cosine", warmup_steps=500)
    c.train = dict(steps=2640, precision="bfloat16", log_every_steps=100, eval_every_steps=880,
                   checkpoint_every_steps=880)
    return c
