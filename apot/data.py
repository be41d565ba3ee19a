"""MNIST for apot: IDX files, root resolution/download, and a device-resident, per-rank-sharded input path.

Layout (torchvision's): ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` accepted
when the plain file is absent). Files are read by our own IDX parser (`read_idx`), which validates every
header field and the file size, so a truncated or corrupt file fails with one message naming the file.

Training reads batches from `DeviceMNIST`: each split lives once as a uint8 tensor on the training device;
per batch it gathers the images, applies the augmentation (``shift``: a random integer shift in [-2, 2],
zero fill; ``affine``: a random rotation, scale and sub-pixel shift, bilinear; never a flip) and normalises
on the device. Every epoch's permutation is seeded by (seed, epoch) and identical on all ranks;
rank r takes its own slice, so ranks partition the epoch with equal step counts (DDP needs that).

CLI::

    python -m apot.data fetch --data-dir DIR        # download via torchvision, verify, print the paths
    python -m apot.data check --data-dir DIR        # validate the four files, print counts
    python -m apot.data synthetic --data-dir DIR --train N --test M [--seed S]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import math
import os
import socket
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from apot.recipe import AUGMENTS  # the training augmentations (the test split is never augmented)

__all__ = [
    "DEFAULT_DATA_DIR",
    "DeviceMNIST",
    "ENV_DATA_DIR",
    "IMAGE_SIZE",
    "MNISTDataError",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "MAX_SHIFT",
    "AUGMENTS",
    "affine_images",
    "random_affine",
    "NUM_CLASSES",
    "download_mnist",
    "load_split",
    "main",
    "make_synthetic_mnist",
    "normalize",
    "raw_dir",
    "read_idx",
    "resolve_data_dir",
    "shift_images",
    "split_paths",
    "write_idx",
]

ENV_DATA_DIR = "APOT_DATA_DIR"
DEFAULT_DATA_DIR = "./data"
IMAGE_SIZE = 28
NUM_CLASSES = 10
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MAX_SHIFT = 2
AFFINE_ROTATION_DEG = 10.0  # ``affine``: rotation uniform in [-10, 10] degrees,
AFFINE_SCALE = 0.1  # scale uniform in [0.9, 1.1],
AFFINE_SHIFT_PX = 2.0  # shift uniform in [-2, 2] pixels per axis

TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_FILES = (*TRAIN_FILES, *TEST_FILES)
"""The four raw file names, in the order the error message lists them."""

IDX_UBYTE = 0x08
MAGIC_IMAGES = 0x00000803
MAGIC_LABELS = 0x00000801
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


class MNISTDataError(RuntimeError):
    """MNIST files are missing, unreadable or invalid. The message is one line and says what to do."""


# ----------------------------------------------------------------------------------------------------------
# Root resolution and file layout
# ----------------------------------------------------------------------------------------------------------


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


def _find(raw: Path, name: str) -> Path | None:
    """`raw/name` if present, else `raw/name.gz` if present, else None."""
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def split_paths(root: str | os.PathLike[str], train: bool) -> tuple[Path, Path]:
    """(images, labels) paths of a split, plain or ``.gz``. Raises MNISTDataError listing what to stage."""
    raw = raw_dir(root)
    names = TRAIN_FILES if train else TEST_FILES
    found = [_find(raw, name) for name in names]
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


# ----------------------------------------------------------------------------------------------------------
# IDX format
# ----------------------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise MNISTDataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def read_idx(path: str | os.PathLike[str], kind: Literal["images", "labels"] | None = None) -> np.ndarray:
    """Read a uint8 IDX file (``path`` or, if absent, ``path.gz``) into a writable uint8 array.

    Args:
        path: the IDX file.
        kind: ``"images"`` requires magic 0x00000803 and dims (N, 28, 28); ``"labels"`` requires magic
            0x00000801, dims (N,). None accepts any uint8 IDX (magic 0x000008NN, 1 <= NN <= 4).

    Raises:
        MNISTDataError: one line naming the file and what is wrong (missing, bad magic, truncated or
            oversized file, wrong image dims).
    """
    path = Path(path)
    if not path.is_file():
        gz = path.with_name(path.name + ".gz")
        if path.suffix != ".gz" and gz.is_file():
            path = gz
        else:
            raise MNISTDataError(f"{path}: file not found")
    data = _read_bytes(path)
    if len(data) < 4:
        raise MNISTDataError(
            f"{path}: truncated: {len(data)} bytes, shorter than the 4-byte IDX magic number"
        )
    magic = int.from_bytes(data[:4], "big")
    ndim = data[3]
    expected_magic = {"images": MAGIC_IMAGES, "labels": MAGIC_LABELS}.get(kind or "")
    if expected_magic is not None and magic != expected_magic:
        raise MNISTDataError(
            f"{path}: wrong magic number 0x{magic:08X}, expected 0x{expected_magic:08X} "
            f"(uint8 {kind} IDX); not an MNIST {kind} file or corrupt"
        )
    if data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE or not 1 <= ndim <= 4:
        raise MNISTDataError(
            f"{path}: wrong magic number 0x{magic:08X}, expected 0x000008NN (uint8 IDX with 1 to 4 dims, "
            f"e.g. 0x{MAGIC_IMAGES:08X} images, 0x{MAGIC_LABELS:08X} labels); not an IDX file or corrupt"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTDataError(
            f"{path}: truncated: {len(data)} bytes, shorter than the {header}-byte header "
            f"of a {ndim}-dim IDX file"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise MNISTDataError(
            f"{path}: {what}: {len(data)} bytes, but the header's dims {dims} need {expected} "
            f"({header} header + {math.prod(dims)} data)"
        )
    if kind == "images" and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise MNISTDataError(
            f"{path}: wrong image dims {'x'.join(map(str, dims[1:]))}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return array.copy()  # writable, owns its memory (torch.from_numpy warns on read-only buffers)


def write_idx(path: str | os.PathLike[str], array: np.ndarray | torch.Tensor) -> Path:
    """Write a uint8 array with 1 to 4 dims as an IDX file (gzip'ed when `path` ends in ``.gz``).

    Creates parent folders. Values must already be uint8 (no silent casts). Returns the path."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx: array must be uint8, got {array.dtype}")
    if not 1 <= array.ndim <= 4:
        raise ValueError(f"write_idx: array must have 1 to 4 dims, got {array.ndim}")
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=6) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


# ----------------------------------------------------------------------------------------------------------
# Splits and download
# ----------------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


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
            f"MNIST download into {raw_dir(root)} failed ({type(e).__name__}: {_one_line(str(e))[:400]}). "
            + _missing_message(root, [n for n in MNIST_FILES if _find(raw_dir(root), n) is None])
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
        (images uint8 (N, 28, 28), labels int64 (N,)), CPU tensors. N is not fixed (synthetic sets are small).

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

# ----------------------------------------------------------------------------------------------------------
# Synthetic, learnable 10-class set in the MNIST layout
# ----------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------
# Device-resident input path
# ----------------------------------------------------------------------------------------------------------


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28), ``(x / 255 - 0.1307) / 0.3081``, on the same device."""
    x = images.unsqueeze(1).to(torch.float32)
    return x.mul_(1.0 / (255.0 * MNIST_STD)).sub_(MNIST_MEAN / MNIST_STD)


def shift_images(images: torch.Tensor, shifts: torch.Tensor, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Shift each image by integer (dy, dx), zero fill: ``out[i, y, x] = images[i, y - dy, x - dx]``.

    Args:
        images: (B, H, W), any dtype, any device.
        shifts: (B, 2) integer (dy, dx) per image, each in [-max_shift, max_shift], same device.
        max_shift: padding width; equals torchvision ``RandomCrop(28, padding=max_shift)`` for random shifts.
    """
    b, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift, max_shift, max_shift, max_shift))
    dy, dx = shifts[:, 0:1], shifts[:, 1:2]
    rows = torch.arange(h, device=images.device).unsqueeze(0) + (max_shift - dy)  # (B, H)
    cols = torch.arange(w, device=images.device).unsqueeze(0) + (max_shift - dx)  # (B, W)
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    return padded[batch, rows.unsqueeze(2), cols.unsqueeze(1)]


def random_affine(n: int, generator: torch.Generator, rotation_deg: float = AFFINE_ROTATION_DEG,
                  scale: float = AFFINE_SCALE, shift_px: float = AFFINE_SHIFT_PX) -> torch.Tensor:
    """(n, 2, 3) float32 ``F.affine_grid`` matrices (output -> input coordinates, in [-1, 1] units): a
    rotation by r ~ U(-rotation_deg, rotation_deg), a zoom s ~ U(1 - scale, 1 + scale) and a shift
    t ~ U(-shift_px, shift_px) pixels per axis of the image content, drawn from ``generator`` (CPU)."""
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64) * 2 - 1  # U(-1, 1)
    angle = u[:, 0] * math.radians(rotation_deg)
    zoom = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    shift = u[:, 2:] * (2 * shift_px / IMAGE_SIZE)  # pixels -> normalised units
    rows = (torch.stack([cos, -sin, -shift[:, 0]], 1), torch.stack([sin, cos, -shift[:, 1]], 1))
    theta = torch.stack(rows, 1)
    return theta.to(torch.float32)


def affine_images(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) warped by ``theta`` (B, 2, 3) (bilinear, zero fill) -> normalised float32
    (B, 1, 28, 28), as `normalize` would return for the warped image."""
    x = images.unsqueeze(1).to(torch.float32)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x.mul_(1.0 / (255.0 * MNIST_STD)).sub_(MNIST_MEAN / MNIST_STD)


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (SeedSequence), the same on every host."""
    if any(p < 0 for p in parts):
        raise ValueError(f"seed parts must be non-negative, got {parts}")
    state = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    # CPU generator on purpose: CPU and CUDA generators differ, so this keeps batches device-independent.
    return torch.Generator(device="cpu").manual_seed(_seed(*parts))


_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1


class DeviceMNIST:
    """MNIST held on the training device as uint8; batches normalised (and shift-augmented) on the device.

    Batches are ``(x float32 (B, 1, 28, 28) normalised, y int64 (B,))`` on `device`. The same code on CPU
    and GPU: the order, shifts and affine parameters come from CPU generators, so both draw the same images,
    labels and augmentations for a given seed and epoch; ``affine``'s bilinear resampling may then differ in
    the last bits between devices. (What the model then computes on a GPU: `apot.train.CUDA_NUMERICS`.)

    Args:
        train_images, train_labels, test_images, test_labels: uint8 (N, 28, 28) and int64 (N,) tensors.
        device: where the splits live and batches are produced.
        train_subset: use only the first N training images (quick runs); None uses all.
        max_shift: random shift range [-max_shift, max_shift] per axis in `train_batches`; 0 disables.
        augment: the training augmentation (`AUGMENTS`): ``shift`` (by ``max_shift``), ``affine``
            (`random_affine`) or ``none``.
    """

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        test_images: torch.Tensor,
        test_labels: torch.Tensor,
        device: str | torch.device = "cpu",
        train_subset: int | None = None,
        max_shift: int = MAX_SHIFT,
        augment: str = "shift",
    ) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"DeviceMNIST: augment {augment!r} is not one of {', '.join(AUGMENTS)}")
        self.augment = augment
        splits = (("train", train_images, train_labels), ("test", test_images, test_labels))
        for name, images, labels in splits:
            shape = tuple(images.shape)
            if (
                images.dtype != torch.uint8
                or len(shape) != 3
                or shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)
                or shape[0] == 0
            ):
                raise ValueError(
                    f"DeviceMNIST: {name} images must be uint8 (N >= 1, 28, 28), got "
                    f"{images.dtype} {tuple(images.shape)}"
                )
            if labels.shape != (images.shape[0],):
                raise ValueError(
                    f"DeviceMNIST: {name} labels must be ({images.shape[0]},), got {tuple(labels.shape)}"
                )
        if train_subset is not None:
            if not 1 <= train_subset <= train_images.shape[0]:
                raise ValueError(
                    f"DeviceMNIST: train_subset must be in 1..{train_images.shape[0]}, got {train_subset}"
                )
            train_images, train_labels = train_images[:train_subset], train_labels[:train_subset]
        if max_shift < 0:
            raise ValueError(f"DeviceMNIST: max_shift must be >= 0, got {max_shift}")
        self.device = torch.device(device)
        self.max_shift = max_shift
        # Stored zero-padded by max_shift once, so a batch's gather and shift are one indexing op.
        pad = (max_shift,) * 4
        self._train_padded = torch.nn.functional.pad(train_images.to(self.device), pad).contiguous()
        self.train_images = self._train_padded[
            :, max_shift : max_shift + IMAGE_SIZE, max_shift : max_shift + IMAGE_SIZE
        ]
        self.train_labels = train_labels.to(self.device, torch.int64)
        self.test_images = test_images.to(self.device).contiguous()
        self.test_labels = test_labels.to(self.device, torch.int64)

    @classmethod
    def from_root(
        cls,
        root: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        download: bool = False,
        train_subset: int | None = None,
        max_shift: int = MAX_SHIFT,
        augment: str = "shift",
    ) -> DeviceMNIST:
        """Load both splits with `load_split` (MNISTDataError if missing/invalid), move them to `device`."""
        train = load_split(root, train=True, download=download)
        test = load_split(root, train=False, download=download)
        return cls(*train, *test, device=device, train_subset=train_subset, max_shift=max_shift,
                   augment=augment)

    @property
    def num_train(self) -> int:
        """Training images in use (after `train_subset`)."""
        return self.train_images.shape[0]

    @property
    def num_test(self) -> int:
        return self.test_images.shape[0]

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Training steps per epoch on every rank: ``num_train // (world_size * batch_size)`` (>= 1)."""
        _check_rank(0, world_size, batch_size)
        steps = self.num_train // (world_size * batch_size)
        if steps < 1:
            raise ValueError(
                f"DeviceMNIST: {self.num_train} training images are fewer than world_size * batch_size = "
                f"{world_size} * {batch_size}; no full step per epoch"
            )
        return steps

    def epoch_permutation(self, epoch: int, seed: int) -> torch.Tensor:
        """The epoch's permutation of ``range(num_train)`` (CPU int64), from a generator seeded by
        (seed, epoch): identical on all ranks and devices."""
        return torch.randperm(self.num_train, generator=_generator(seed, epoch, _PERMUTATION_STREAM))

    def train_indices(
        self, epoch: int, seed: int, rank: int, world_size: int, batch_size: int
    ) -> torch.Tensor:
        """Rank `rank`'s training indices of the epoch, (steps_per_epoch, batch_size) CPU int64.

        The permutation's first ``steps * world_size * batch_size`` entries are split into contiguous
        per-rank blocks; the remainder (< world_size * batch_size images) is dropped this epoch."""
        _check_rank(rank, world_size, batch_size)
        steps = self.steps_per_epoch(world_size, batch_size)
        per_rank = steps * batch_size
        perm = self.epoch_permutation(epoch, seed)
        return perm[rank * per_rank : (rank + 1) * per_rank].view(steps, batch_size)

    def train_batches(
        self, epoch: int, seed: int, rank: int, world_size: int, batch_size: int, augment: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rank `rank`'s training batches of `epoch`: `steps_per_epoch` batches of exactly `batch_size`.

        Args:
            epoch, seed: ints >= 0; select the permutation (same on all ranks) and, with `rank`, the
                shifts; the same (seed, epoch, rank, world_size, batch_size) always gives the same batches
                (exact resume). Any epoch numbering works if it is used consistently (e.g. 0-based).
            rank, world_size: this process's DDP rank and the number of ranks (1 without DDP).
            batch_size: the per-rank batch size.
            augment: apply the dataset's augmentation (``self.augment``; never a flip) when True.
        """
        indices = self.train_indices(epoch, seed, rank, world_size, batch_size).to(self.device)
        if not augment or self.augment == "none" or (self.augment == "shift" and self.max_shift == 0):
            for idx in indices:
                yield normalize(self.train_images[idx]), self.train_labels[idx]
            return
        gen = _generator(seed, epoch, rank, _AUGMENT_STREAM)
        if self.augment == "affine":
            thetas = random_affine(indices.numel(), gen).view(*indices.shape, 2, 3).to(self.device)
            for step, idx in enumerate(indices):
                yield affine_images(self.train_images[idx], thetas[step]), self.train_labels[idx]
            return
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (*indices.shape, 2), generator=gen)
        # out[b, y, x] = padded[idx[b], y + max_shift - dy[b], x + max_shift - dx[b]] (see shift_images),
        # with the row/column indices of the whole epoch computed once.
        offsets = (self.max_shift - shifts).to(self.device)
        base = torch.arange(IMAGE_SIZE, device=self.device)
        rows = (offsets[..., 0:1] + base).unsqueeze(-1)  # (steps, B, 28, 1)
        cols = (offsets[..., 1:2] + base).unsqueeze(-2)  # (steps, B, 1, 28)
        for step, idx in enumerate(indices):
            images = self._train_padded[idx.view(-1, 1, 1), rows[step], cols[step]]
            yield normalize(images), self.train_labels[idx]

    def test_batches(
        self, rank: int = 0, world_size: int = 1, batch_size: int = 1000
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rank `rank`'s disjoint shard of the full test split, normalised, unaugmented, in order.

        Across ranks every test image is yielded exactly once. Every rank yields the same number of
        batches, ``ceil(ceil(num_test / world_size) / batch_size)``; sizes are <= batch_size and may differ
        by one image; a rank yields empty batches only if num_test < that count * world_size. Sum
        correct/total counts over ranks (all-reduce) for the accuracy."""
        _check_rank(rank, world_size, batch_size)
        steps = math.ceil(math.ceil(self.num_test / world_size) / batch_size)
        shard = torch.tensor_split(torch.arange(self.num_test), world_size)[rank]
        for idx in torch.tensor_split(shard, steps):
            lo = int(idx[0]) if idx.numel() else 0  # contiguous indices: a slice, no gather
            hi = lo + idx.numel()
            yield normalize(self.test_images[lo:hi]), self.test_labels[lo:hi]


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


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
    """``python -m apot.data {fetch,check,synthetic}``; errors print one line to stderr and return 1."""
    parser = argparse.ArgumentParser(prog="python -m apot.data", description="MNIST data for apot.")
    sub = parser.add_subparsers(dest="command", required=True)
    data_dir_help = f"MNIST root (default: ${ENV_DATA_DIR} or {DEFAULT_DATA_DIR}); files go in ROOT/MNIST/raw"
    fetch = sub.add_parser("fetch", help="download MNIST via torchvision, verify it, print the paths")
    check = sub.add_parser("check", help="validate the four IDX files and print counts")
    synth = sub.add_parser("synthetic", help="write a small learnable synthetic set in the MNIST layout")
    for p in (fetch, check, synth):
        p.add_argument("--data-dir", default=None, help=data_dir_help)
    synth.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    synth.add_argument("--test", type=int, default=500, help="test images (default 500)")
    synth.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = resolve_data_dir(args.data_dir, None)
    try:
        if args.command == "fetch":
            if any(_find(raw_dir(root), n) is None for n in MNIST_FILES):
                download_mnist(root)
        elif args.command == "synthetic":
            make_synthetic_mnist(root, n_train=args.train, n_test=args.test, seed=args.seed)
        lines = _summary(root)
        print(f"MNIST root {root} ({raw_dir(root)})")
        print("\n".join(lines))
    except (MNISTDataError, ValueError, OSError) as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
