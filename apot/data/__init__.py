"""MNIST for apot, one module per idea:

- `apot.data.idx`: the IDX file format (`read_idx` validates every header field and the size, `write_idx`);
- `apot.data.mnist`: the data root, the four raw files, download, loading and checking a split;
- `apot.data.transforms`: normalisation and the training augmentation (shift), per batch;
- `apot.data.pipeline`: `DeviceMNIST`, the splits on the training device, seeded per-rank shards;
- `apot.data.cli`: ``python -m apot.data fetch|check``.

The names other modules use are re-exported here.
"""

from apot.data.cli import main
from apot.data.idx import IMAGE_SIZE, MNISTDataError, read_idx, write_idx
from apot.data.mnist import (
    DEFAULT_DATA_DIR,
    ENV_DATA_DIR,
    MNIST_FILES,
    NUM_CLASSES,
    download_mnist,
    ensure_mnist,
    load_split,
    raw_dir,
    resolve_data_dir,
    split_paths,
)
from apot.data.pipeline import DeviceMNIST
from apot.data.transforms import (
    MAX_SHIFT,
    MNIST_MEAN,
    MNIST_STD,
    normalize,
    shift_images,
)
from apot.recipe import AUGMENTS  # the training augmentations (the test split is never augmented)

__all__ = [
    "AUGMENTS",
    "DEFAULT_DATA_DIR",
    "DeviceMNIST",
    "ENV_DATA_DIR",
    "IMAGE_SIZE",
    "MAX_SHIFT",
    "MNISTDataError",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "NUM_CLASSES",
    "download_mnist",
    "ensure_mnist",
    "load_split",
    "main",
    "normalize",
    "raw_dir",
    "read_idx",
    "resolve_data_dir",
    "shift_images",
    "split_paths",
    "write_idx",
]
