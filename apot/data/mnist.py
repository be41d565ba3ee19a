"""Where MNIST lives and how it gets there: the data root, the four raw files, download, loading a split.

Layout (torchvision's): ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` accepted
when the plain file is absent). A missing, unreadable or invalid file raises `MNISTDataError`: one line
naming the file and, when files are missing, how to stage them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from apot.data.idx import MNISTDataError, read_idx
from apot.errors import one_line

ENV_DATA_DIR = "APOT_DATA_DIR"
DEFAULT_DATA_DIR = "./data"
NUM_CLASSES = 10

TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_FILES = (*TRAIN_FILES, *TEST_FILES)
"""The four raw file names, in the order the error message lists them."""

DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


def resolve_data_dir(cli_value: str | None, config_value: str | None) -> Path:
    """The MNIST root. Precedence: `cli_value` (``--data-dir``) > env ``APOT_DATA_DIR`` > `config_value` >
    ``./data``. Empty strings count as unset. ``~`` is expanded; the path is not required to exist."""
    for value in (cli_value, os.environ.get(ENV_DATA_DIR), config_value):
        if value:
            return Path(value).expanduser()
    return Path(DEFAULT_DATA_DIR)


def raw_dir(root: str | os.PathLike[str]) -> Path:
    """The folder the four IDX files belong in: ``<root>/MNIST/raw``."""
    return Path(root) / "MNIST" / "raw"


def _find_file(raw: Path, name: str) -> Path | None:
    """`raw/name` if present, else `raw/name.gz` if present, else None."""
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def missing_files(root: str | os.PathLike[str]) -> list[str]:
    """The names in `MNIST_FILES` that ``<root>/MNIST/raw`` lacks (neither plain nor ``.gz``)."""
    return [name for name in MNIST_FILES if _find_file(raw_dir(root), name) is None]


def split_paths(root: str | os.PathLike[str], train: bool) -> tuple[Path, Path]:
    """(images, labels) paths of a split, plain or ``.gz``. Raises MNISTDataError listing what to stage."""
    raw = raw_dir(root)
    names = TRAIN_FILES if train else TEST_FILES
    found = [_find_file(raw, name) for name in names]
    missing = [name for name, path in zip(names, found, strict=True) if path is None]
    if missing:
        raise MNISTDataError(_missing_message(root, missing))
    return found[0], found[1]  # type: ignore[return-value]


def _missing_message(root: str | os.PathLike[str], missing: Sequence[str]) -> str:
    raw = raw_dir(root)
    return (
        f"MNIST not found: missing {', '.join(missing)} in {raw}. "
        f"Expected the four raw IDX files {', '.join(MNIST_FILES)} (plain or .gz) in {raw}. "
        "To stage them: on a machine with internet run `python -m apot.data fetch --data-dir DIR` and copy "
        f"DIR/MNIST to {Path(root) / 'MNIST'}, or copy the four raw IDX files into {raw}; "
        f"or point --data-dir / {ENV_DATA_DIR} at a root that has them, or enable download when online."
    )


def download_mnist(root: str | os.PathLike[str], train: bool = True) -> Path:
    """Download the four MNIST files into ``<root>/MNIST/raw`` via torchvision; returns that folder.

    torchvision's download progress goes to stderr. Network failures (URLError, RuntimeError, OSError, with
    a socket timeout so an unreachable mirror cannot hang) become one MNISTDataError line."""
    from urllib.error import URLError

    try:
        from torchvision import datasets
    except ImportError as e:
        raise MNISTDataError(
            f"cannot download MNIST: torchvision not importable ({e}). " + _missing_message(root, MNIST_FILES)
        ) from None
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            datasets.MNIST(str(root), train=train, download=True)
    except (URLError, RuntimeError, OSError) as e:
        raise MNISTDataError(
            f"MNIST download into {raw_dir(root)} failed ({type(e).__name__}: {one_line(e)[:400]}). "
            + _missing_message(root, missing_files(root))
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return raw_dir(root)


def load_split(
    root: str | os.PathLike[str], train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one MNIST split from ``<root>/MNIST/raw`` with our IDX parser.

    Args:
        root: the data root (see `resolve_data_dir`).
        train: the 60k training split (True) or the 10k test split (False).
        download: fetch via torchvision if the split's files are missing (needs internet).

    Returns:
        (images uint8 (N, 28, 28), labels int64 (N,)), CPU tensors. N is not fixed (any N >= 1 loads).

    Raises:
        MNISTDataError: files missing (message lists the four files, the folder and how to stage them),
            unreadable or invalid, image/label count mismatch, labels outside 0..9.
    """
    try:
        images_path, labels_path = split_paths(root, train)
    except MNISTDataError:
        if not download:
            raise
        download_mnist(root, train=train)
        images_path, labels_path = split_paths(root, train)
    images = read_idx(images_path, kind="images")
    labels = read_idx(labels_path, kind="labels")
    if images.shape[0] != labels.shape[0]:
        raise MNISTDataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels: "
            "counts must match"
        )
    if images.shape[0] == 0:
        raise MNISTDataError(f"{images_path}: split is empty (0 images)")
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        bad = int(np.flatnonzero(labels >= NUM_CLASSES)[0])
        raise MNISTDataError(
            f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range 0..{NUM_CLASSES - 1}"
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def ensure_mnist(root: str | os.PathLike[str], download: bool = True) -> None:
    """Check both splits parse (downloading missing files when ``download``); raise MNISTDataError if not.

    The sweep calls this before Ray starts, so bad or missing data fails in a second, not in every trial."""
    for train in (True, False):
        load_split(root, train=train, download=download)
