"""ResNet-50 (ImageNet stem) on synthetic 224x224x3 data, for throughput and MFU measurements only
(the labels are random: accuracy means nothing here).

Run:
    fastgpu-jax train --config configs/imagenet_resnet50_synthetic.py --workdir runs/r50_synth
Reference: a plain Flax linen ResNet-50 step with bf16 and batch 256 ran 5,667 img/s on one H100.
`:tiny` shrinks it to 32x32 images and batch 8 so a CPU can run a few steps.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="synthetic", batch_size=256, eval_batch_size=256, image_size=224, channels=3,
                  num_examples=2048)
    c.model = dict(name="resnet50", num_classes=1000, stem="imagenet")
    c.optimizer = dict(name="sgd", lr=0.1, momentum=0.9, schedule="constant")
    c.train = dict(steps=100, precision="bfloat16", log_every_steps=20, checkpoint_every_steps=1000,
                   eval_every_steps=0)
    c.log = dict(tensorboard=False)
    if arg == "tiny":
        c.data.update(batch_size=8, eval_batch_size=8, image_size=32, num_examples=32)
        c.train.update(steps=4, log_every_steps=2, precision="float32")
    return c
