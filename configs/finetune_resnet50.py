"""Fine-tune a pretrained ResNet-50 (torchvision or timm weights) on your own image folder at 224x224.

Weights: torchvision's `resnet50-11ad3fa6.pth` (IMAGENET1K_V2) or any timm resnet50 `model.safetensors`. A .pth is
read by a restricted unpickler that refuses pickled code; torch is not needed. Convs (OIHW -> HWIO), BatchNorm scale,
bias and running statistics are mapped by name; the head is re-initialised for your class count. Data:
data.dir/train/<class>/*.jpg and data.dir/val/<class>/*.jpg.
Run:
    fastgpu-jax train --config configs/finetune_resnet50.py --workdir runs/ft_r50 --config.data.dir=PATH \
        --config.train.init_from=PATH/resnet50-11ad3fa6.pth --config.model.num_classes=N
    fastgpu-jax eval --workdir runs/ft_r50 --split val --checkpoint best
Recipe: SGD + Nesterov momentum 0.9, lr 0.01 (batch 128) with a short warmup then cosine, weight decay 1e-4 on
kernels, the head at 10x the lr (optimizer.param_rules), label smoothing 0.1, random-resized crop + flip, bf16;
keep the best val checkpoint, stop after 5 evaluations without improvement. Expected: depends on your data; NOT
measured with this library.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="folder", batch_size=128, eval_batch_size=500, image_size=224, augment=True, workers=8)
    c.model = dict(name="resnet50", num_classes=10, stem="imagenet")
    c.optimizer = dict(name="sgd", lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4,
                       schedule="warmup_cosine", warmup_steps=100, param_rules="^head/=lr:10")
    c.train = dict(steps=4000, precision="bfloat16", label_smoothing=0.1, init_from="pretrained/resnet50.pth",
                   keep_best="accuracy", early_stop_patience=5, log_every_steps=50, eval_every_steps=200,
                   checkpoint_every_steps=200)
    if arg:
        raise ValueError(f"unknown variant {arg!r}; this config has none")
    return c
