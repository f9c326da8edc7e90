"""Fine-tune a pretrained ViT-S/16 (timm weights) on your own image folder at 224x224.

Weights: any timm ViT-S/16 checkpoint as .safetensors (or .pth), e.g. timm's
`vit_small_patch16_224.augreg_in21k_ft_in1k` `model.safetensors` from the Hugging Face hub. The loader maps timm's
names onto ours, resizes the position embedding if data.image_size differs from the checkpoint's, and re-initialises
the head for your class count (it
prints every tensor it could not map). Data: data.dir/train/<class>/*.jpg and data.dir/val/<class>/*.jpg.
Run:
    fastgpu-jax train --config configs/finetune_vit_s16.py --workdir runs/ft_vits16 --config.data.dir=PATH \
        --config.train.init_from=PATH/model.safetensors --config.model.num_classes=N
    fastgpu-jax eval --workdir runs/ft_vits16 --split val --checkpoint best
Recipe (the usual ViT transfer settings of big_vision/BEiT): AdamW lr 1e-4 (batch 256), weight decay 0.05, layer-wise
lr decay 0.75, 1 epoch-ish warmup then cosine, label smoothing 0.1, stochastic depth 0.1, light mixup (0.2) and
RandAugment 2,9; gradient clipping 1.0; keep the best val checkpoint, stop after 5 evaluations without improvement.
Expected: depends on your data; NOT measured with this library (a few points above training from scratch is usual).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="folder", batch_size=256, eval_batch_size=500, image_size=224, augment=True, workers=8,
                  randaugment="2,9", mixup_alpha=0.2)
    c.model = dict(name="vit_s16", num_classes=10, drop_path_rate=0.1)
    c.optimizer = dict(name="adamw", lr=1e-4, weight_decay=0.05, layer_decay=0.75, schedule="warmup_cosine",
                       warmup_steps=200, grad_clip_norm=1.0)
    c.train = dict(steps=5000, precision="bfloat16", label_smoothing=0.1, init_from="pretrained/vit_s16.safetensors",
                   keep_best="accuracy", early_stop_patience=5, log_every_steps=50, eval_every_steps=250,
                   checkpoint_every_steps=250)
    if arg:
        raise ValueError(f"unknown variant {arg!r}; this config has none")
    return c
