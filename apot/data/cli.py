"""``python -m apot.data``: stage and check MNIST.

    python -m apot.data fetch --data-dir DIR        # download via torchvision, verify, print the paths
    python -m apot.data check --data-dir DIR        # validate the four files, print counts
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from apot.data.idx import MNISTDataError
from apot.data.mnist import (
    DEFAULT_DATA_DIR,
    ENV_DATA_DIR,
    NUM_CLASSES,
    download_mnist,
    load_split,
    missing_files,
    raw_dir,
    resolve_data_dir,
    split_paths,
)
from apot.errors import exit_with_error


def _summary(root: Path) -> list[str]:
    lines = []
    for train in (True, False):
        images, labels = load_split(root, train=train)
        images_path, labels_path = split_paths(root, train)
        counts = torch.bincount(labels, minlength=NUM_CLASSES).tolist()
        lines.append(
            f"{'train' if train else 'test'}: {images.shape[0]} images {tuple(images.shape[1:])}, "
            f"labels per class {counts}"
        )
        lines.append(f"  {images_path}")
        lines.append(f"  {labels_path}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apot.data {fetch,check}``; errors print one line to stderr and return 1."""
    parser = argparse.ArgumentParser(prog="python -m apot.data", description="MNIST data for apot.")
    sub = parser.add_subparsers(dest="command", required=True)
    data_dir_help = f"MNIST root (default: ${ENV_DATA_DIR} or {DEFAULT_DATA_DIR}); files go in ROOT/MNIST/raw"
    fetch = sub.add_parser("fetch", help="download MNIST via torchvision, verify it, print the paths")
    check = sub.add_parser("check", help="validate the four IDX files and print counts")
    for p in (fetch, check):
        p.add_argument("--data-dir", default=None, help=data_dir_help)
    args = parser.parse_args(argv)
    root = resolve_data_dir(args.data_dir, None)
    try:
        if args.command == "fetch" and missing_files(root):
            download_mnist(root)
        lines = _summary(root)
        print(f"MNIST root {root} ({raw_dir(root)})")
        print("\n".join(lines))
    except (MNISTDataError, ValueError, OSError) as e:
        return exit_with_error(e, code=1)
    return 0
