"""Data sets and input pipelines for fastgpu_jax.

Takes plain values only (names, paths, sizes, seeds): it knows nothing of
configs, models or the train loop, so it can be tested and reused alone.

    DATASETS[name] -> DatasetSpec (usual image shape, classes, files, the data.* options it uses):
        the registry the config takes allowed data.name values from
    files_missing(name, data_dir=None) -> "" or why its files cannot be found
    info(name, data_dir=None, *, image_size=32, channels=3, num_classes=10, num_examples=1024)
    load_split(name, split, data_dir=None, **synthetic_kw) -> (images, labels)
    normalize(images, info) -> float32
    train_iterator(name, *, batch_size, seed, data_dir=None, augment=False, randaugment='',
                   process_index=0, process_count=1, **synthetic_kw)
    eval_batches(name, split, *, batch_size, data_dir=None, **synthetic_kw)
    randaugment: RandAugment / TrivialAugment of uint8 train images (torchvision's ops), for data.randaugment
"""

from .pipeline import CROP_PADDING, eval_batches, train_dataset, train_iterator
from .sources import (
    IMAGE_DATASETS,
    DATASET_NAMES,
    DATASETS,
    SPLITS,
    VAL_SIZE,
    DatasetInfo,
    DatasetSpec,
    files_missing,
    info,
    info_from_json,
    info_to_json,
    load_split,
    normalize,
    read_cifar_bin,
    read_idx,
)

__all__ = [
    "IMAGE_DATASETS",
    "CROP_PADDING",
    "DATASET_NAMES",
    "DATASETS",
    "SPLITS",
    "VAL_SIZE",
    "DatasetInfo",
    "DatasetSpec",
    "eval_batches",
    "files_missing",
    "info",
    "info_from_json",
    "info_to_json",
    "load_split",
    "normalize",
    "read_cifar_bin",
    "read_idx",
    "train_dataset",
    "train_iterator",
]
