"""ViT-S/4 (width 384, depth 12, 6 heads; 8x8 = 64 patches of 4x4 + the class token) trained from scratch on
CIFAR-10 from the local *binary* batches (cifar-10-batches-bin: data_batch_1.bin .. data_batch_5.bin,
test_batch.bin) with the DeiT-style recipe scaled to CIFAR: random crop + flip + RandAugment (2 ops, magnitude 9),
mixup 0.8 / cutmix 1.0, label smoothing 0.1, stochastic depth 0.1, AdamW (DeiT's lr 5e-4 per 512 examples, weight
decay 0.05), 5 epochs of linear warmup then cosine decay, gradient clipping at 1.0, weight EMA 0.999 (evaluated as
val_ema; eval/predict use it), the best val_ema checkpoint kept, bf16 compute.

Run (GPU; 100 epochs of 45,000 images at batch 512 = 8,700 steps):
    fastgpu-jax train --config configs/cifar10_vit_s4.py --workdir runs/cifar_vit --config.data.dir=PATH/TO/cifar
    fastgpu-jax eval --workdir runs/cifar_vit --split test
    fastgpu-jax bench --config configs/cifar10_vit_s4.py     # step time only: no CIFAR files needed
Expected: roughly 90% test accuracy (an estimate from published ViT-on-CIFAR results with this kind of recipe;
NOT measured with this library). With only crop + flip (`--config.data.randaugment= --config.data.mixup_alpha=0
--config.data.cutmix_alpha=0 --config.train.label_smoothing=0 --config.model.drop_path_rate=0`) ViTs trained from
scratch stay near 80%.
`:smoke` is a CIFAR-free CPU smoke run: the same network on synthetic 32x32x3 data, batch 8, float32,
3 steps (mostly XLA compiling the train step; its time on a 2-core CPU is in the README's
"Measured here" table).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    batch = 512
    steps_per_epoch = 45_000 // batch  # 87
    c.data = dict(name="cifar10", batch_size=batch, eval_batch_size=1000, augment=True, randaugment="2,9",
                  mixup_alpha=0.8, cutmix_alpha=1.0)
    c.model = dict(name="vit_s4", num_classes=10, drop_path_rate=0.1)
    c.optimizer = dict(name="adamw", lr=5e-4 * batch / 512, weight_decay=0.05, schedule="warmup_cosine",
                       warmup_steps=5 * steps_per_epoch, grad_clip_norm=1.0)
    c.train = dict(steps=100 * steps_per_epoch, precision="bfloat16", log_every_steps=100, label_smoothing=0.1,
                   ema_decay=0.999, keep_best="ema_accuracy", eval_every_steps=10 * steps_per_epoch,
                   checkpoint_every_steps=10 * steps_per_epoch)
    if arg == "smoke":
        c.data = dict(name="synthetic", batch_size=8, eval_batch_size=8, image_size=32, channels=3,
                      num_examples=32, augment=False, randaugment="", mixup_alpha=0.8, cutmix_alpha=1.0)
        c.optimizer.update(warmup_steps=1)
        c.train.update(steps=3, log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=3,
                       precision="float32")
        c.log = dict(tensorboard=False)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use ':smoke' or none")
    return c
