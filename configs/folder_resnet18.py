"""ResNet-18 on any image folder of classes: your own photos, or a 10-class subset of ImageNet (Imagenette).

Layout: data.dir/train/<class>/*.{jpg,png,webp,bmp}, data.dir/val/<class>/..., optional data.dir/test/<class>/...
(class names are the sorted folder names of train/; they are saved with the run, so `predict` prints them).
Run:
    fastgpu-jax train --config configs/folder_resnet18.py --workdir runs/photos --config.data.dir=PHOTOS \
        --config.model.num_classes=N
    fastgpu-jax eval --workdir runs/photos --split val
    fastgpu-jax predict --workdir runs/photos --input some_photo.jpg --top-k 3
Recipe: 160x160 random-resized crops + flip, SGD + Nesterov, lr 0.1 x batch / 256, warmup then cosine, bf16,
4 decoding workers. Set `train.steps` to ~30-100 epochs of your data (steps = epochs x images / batch).
No accuracy is claimed: it depends on your data (the tests train a drawn 3-class folder to >= 90% here).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    batch = 128
    c.data = dict(name="folder", batch_size=batch, eval_batch_size=256, image_size=160, augment=True, workers=4)
    c.model = dict(name="resnet18", num_classes=10, stem="imagenet")
    c.optimizer = dict(name="sgd", lr=0.1 * batch / 256, momentum=0.9, nesterov=True, weight_decay=5e-5,
                       schedule="warmup_cosine", warmup_steps=300)
    c.train = dict(steps=6000, precision="bfloat16", log_every_steps=50, eval_every_steps=1000,
                   checkpoint_every_steps=1000)
    return c
