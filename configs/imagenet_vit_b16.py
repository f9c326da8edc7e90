"""ViT-B/16 on ImageNet-1k from scratch with the DeiT recipe (Touvron et al. 2021, "DeiT-B" without distillation).

Data, either an image folder (data.dir/train/<wnid>/*.JPEG, data.dir/val/<wnid>/*.JPEG) or `:arrayrecord`, made once
with `fastgpu-jax convert --from folder --input IMAGENET --output IMAGENET_AR --resize-short 256 --quality 90`.
Run:
    fastgpu-jax train --config configs/imagenet_vit_b16.py --workdir runs/vit_b16 --config.data.dir=PATH
    fastgpu-jax eval --workdir runs/vit_b16 --split val                       # EMA weights (--params raw: the others)
    fastgpu-jax eval --workdir runs/vit_b16 --split val --checkpoint best     # the best val_ema evaluation
Recipe: AdamW (lr 5e-4 x batch / 512, weight decay 0.05 on kernels), 5 warmup epochs then cosine over 300 epochs,
batch 1024, label smoothing 0.1, mixup 0.8 + cutmix 1.0 (switch 0.5), RandAugment 2 ops at magnitude 9, stochastic
depth 0.1, random-resized crop + flip, weight EMA 0.99996, bf16 compute, dp over all devices. DeiT's repeated
augmentation and random erasing are not in this library. Expected: DeiT-B reports 81.8% top-1 on val with this
recipe; NOT measured with this library (no ImageNet run was made here). About 375k steps: plan for days on 8 GPUs.
"""

import ml_collections

TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    batch, epochs = 1024, 300
    steps_per_epoch = TRAIN_IMAGES // batch
    c.data = dict(name="arrayrecord" if arg == "arrayrecord" else "folder", batch_size=batch, eval_batch_size=1000,
                  image_size=224, augment=True, crop_min_scale=0.08, eval_crop=0.875, workers=14,
                  randaugment="2,9", mixup_alpha=0.8, cutmix_alpha=1.0, mixup_switch_prob=0.5)
    c.model = dict(name="vit_b16", num_classes=1000, drop_path_rate=0.1)
    c.optimizer = dict(name="adamw", lr=5e-4 * batch / 512, weight_decay=0.05, schedule="warmup_cosine",
                       warmup_steps=5 * steps_per_epoch)
    c.train = dict(steps=epochs * steps_per_epoch, precision="bfloat16", label_smoothing=0.1, ema_decay=0.99996,
                   keep_best="ema_accuracy", log_every_steps=100, eval_every_steps=5 * steps_per_epoch,
                   checkpoint_every_steps=steps_per_epoch)
    c.parallel = dict(strategy="dp")
    if arg not in (None, "", "arrayrecord"):
        raise ValueError(f"unknown variant {arg!r}; use ':arrayrecord' or none")
    return c
