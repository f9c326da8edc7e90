"""ViT-B/16 on synthetic 224x224x3 data (1000 classes), bf16, AdamW, for throughput and MFU measurements
only (the labels are random: accuracy means nothing here).

Run:
    fastgpu-jax train --config configs/imagenet_vit_b16_synthetic.py --workdir runs/vit_b16_synth
    fastgpu-jax bench --config configs/imagenet_vit_b16_synthetic.py       # step time, img/s, MFU
Expected: a throughput figure (ms/step and examples/s in metrics.jsonl, or the bench table); no GPU figure
measured yet. ViT-B/16 has 86,567,656 params and costs 17.6 GMACs (~35 GFLOPs) per 224x224 image forward.
Attention runs through jax.nn.dot_product_attention, which is XLA in jax 0.10 (see
fastgpu_jax/models/vit.py, ``attention_impl``, for cuDNN flash attention).
`:tiny` is a CPU smoke run: 32x32 images (ViT-B/16 sees 2x2 = 4 patches + the class token), batch 8,
float32, 3 steps. The network keeps ViT-B's 86M params, so it is mostly XLA compiling the 12-block
train step (time: the README's "Measured here" table) and writes a ~1 GB checkpoint (params + AdamW state).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="synthetic", batch_size=256, eval_batch_size=256, image_size=224, channels=3,
                  num_examples=2048)
    c.model = dict(name="vit_b16", num_classes=1000)
    c.optimizer = dict(name="adamw", lr=1e-3, weight_decay=0.05, schedule="warmup_cosine", warmup_steps=10,
                       grad_clip_norm=1.0)
    c.train = dict(steps=100, precision="bfloat16", log_every_steps=20, checkpoint_every_steps=1000,
                   eval_every_steps=0)
    c.log = dict(tensorboard=False)
    if arg == "tiny":
        c.data.update(batch_size=8, eval_batch_size=8, image_size=32, num_examples=32)
        c.optimizer.update(warmup_steps=1)
        c.train.update(steps=3, log_every_steps=1, precision="float32")
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use ':tiny' or none")
    return c
