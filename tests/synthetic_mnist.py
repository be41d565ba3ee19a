"""A small learnable 10-class set in the MNIST layout, for tests: real IDX files, no download.

Class c is the seven-segment glyph of digit c. `make_synthetic_mnist` writes the four raw files under
``<root>/MNIST/raw``, so everything downstream (`apot.data.load_split`, ``--data-dir``) reads it as MNIST.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from apot.data.idx import IMAGE_SIZE, write_idx
from apot.data.mnist import NUM_CLASSES, TEST_FILES, TRAIN_FILES, raw_dir
from apot.data.transforms import MAX_SHIFT

# Seven-segment glyphs (segments a..g: top, top-right, bottom-right, bottom, bottom-left, top-left, middle).
_SEVEN_SEGMENT = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")


def _segment_masks() -> dict[str, np.ndarray]:
    """Seven 28x28 float masks of 3-px-thick strokes in a 10x20 box centred on the canvas."""
    top, mid, bottom, left, right, t = 4, 13, 22, 9, 18, 3
    boxes = {  # (row0, row1, col0, col1), exclusive ends
        "a": (top, top + t, left, right + t),
        "b": (top, mid + t, right, right + t),
        "c": (mid, bottom + t, right, right + t),
        "d": (bottom, bottom + t, left, right + t),
        "e": (mid, bottom + t, left, left + t),
        "f": (top, mid + t, left, left + t),
        "g": (mid, mid + t, left, right + t),
    }
    masks = {}
    for name, (r0, r1, c0, c1) in boxes.items():
        m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
        m[r0:r1, c0:c1] = 1.0
        masks[name] = m
    return masks


def _synthetic_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    masks = _segment_masks()
    templates = np.stack([np.clip(sum(masks[s] for s in glyph), 0, 1) for glyph in _SEVEN_SEGMENT])
    # A class-specific offset keeps location informative too; plus a random per-image shift in [-2, 2].
    class_offset = np.array([(dy, dx) for dy in (-1, 1) for dx in (-2, -1, 0, 1, 2)])  # (10, 2)
    labels = rng.integers(0, NUM_CLASSES, size=n)
    shifts = class_offset[labels] + rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(n, 2))
    pad = 5
    padded = np.pad(templates, ((0, 0), (pad, pad), (pad, pad)))
    ar = np.arange(IMAGE_SIZE)
    rows = ar[None, :] + pad - shifts[:, :1]  # (n, 28)
    cols = ar[None, :] + pad - shifts[:, 1:]
    images = padded[labels[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, 28, 28)
    intensity = rng.uniform(0.6, 1.0, size=(n, 1, 1)).astype(np.float32)
    dropout = rng.random(images.shape, dtype=np.float32) < 0.05
    noise = rng.normal(0.0, 0.05, size=images.shape).astype(np.float32)
    pixels = np.clip(images * intensity * ~dropout + noise, 0.0, 1.0)
    return np.round(pixels * 255).astype(np.uint8), labels.astype(np.uint8)


def make_synthetic_mnist(
    root: str | os.PathLike[str], n_train: int = 2000, n_test: int = 500, seed: int = 0
) -> Path:
    """Write a small learnable 10-class set as the four MNIST IDX files under ``<root>/MNIST/raw``.

    Class c is the seven-segment glyph of digit c (3-px strokes) at a class-specific offset, plus a random
    shift in [-2, 2], random intensity, 5% stroke dropout and Gaussian noise; a tiny conv net gets well above
    chance in one short epoch. Deterministic in `seed`. Returns the root."""
    if n_train < 1 or n_test < 1:
        raise ValueError(f"make_synthetic_mnist: n_train and n_test must be >= 1, got {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    raw = raw_dir(root)
    for (images_name, labels_name), n in ((TRAIN_FILES, n_train), (TEST_FILES, n_test)):
        images, labels = _synthetic_split(n, rng)
        write_idx(raw / images_name, images)
        write_idx(raw / labels_name, labels)
    return Path(root)
