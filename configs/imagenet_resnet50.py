"""ResNet-50 on ImageNet-1k (ILSVRC-2012): the standard 90-epoch recipe on 224x224 random-resized crops.

Data, either
    an image folder: data.dir/train/<wnid>/*.JPEG and data.dir/val/<wnid>/*.JPEG (val sorted into class folders), or
    `:arrayrecord`: the same converted once with
        fastgpu-jax convert --from folder --input IMAGENET --output IMAGENET_AR --resize-short 256 --quality 90
Run:
    fastgpu-jax train --config configs/imagenet_resnet50.py --workdir runs/r50 --config.data.dir=PATH
    fastgpu-jax eval --workdir runs/r50 --split val
    fastgpu-jax bench --data --config configs/imagenet_resnet50.py --config.data.dir=PATH   # input pipeline speed
Recipe (Goyal et al. 2017): SGD + Nesterov momentum 0.9, lr 0.1 x batch / 256 with 5 warmup epochs then cosine,
weight decay 1e-4, bf16 compute, batch 1024; train: random-resized crop (8%-100% of the area, aspect 3/4-4/3) +
flip; eval: short side 256, center 224 crop. Expected ~76% top-1 on val (the published result of this recipe):
NOT measured with this library; no ImageNet run was made here. `data.workers` decoding processes per host: the
decoder measured ~370-480 img/s per core on ImageNet-sized JPEGs (BENCHMARKS.md), so a GPU that trains at N img/s
needs about N / 400 workers; `bench --data` prints the pipeline's speed next to the train step's on your machine.
"""

import ml_collections

TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    batch, epochs = 1024, 90
    c.data = dict(name="arrayrecord" if arg == "arrayrecord" else "folder", batch_size=batch, eval_batch_size=1000,
                  image_size=224, augment=True, crop_min_scale=0.08, eval_crop=0.875, workers=14, prefetch=2)
    c.model = dict(name="resnet50", num_classes=1000, stem="imagenet")
    steps_per_epoch = TRAIN_IMAGES // batch
    c.optimizer = dict(name="sgd", lr=0.1 * batch / 256, momentum=0.9, nesterov=True, weight_decay=1e-4,
                       schedule="warmup_cosine", warmup_steps=5 * steps_per_epoch)
    c.train = dict(steps=epochs * steps_per_epoch, precision="bfloat16", log_every_steps=100,
                   eval_every_steps=5 * steps_per_epoch, checkpoint_every_steps=steps_per_epoch)
    c.parallel = dict(strategy="dp")
    return c
