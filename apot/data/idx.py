"""The IDX file format MNIST ships in: a big-endian header, then raw uint8 values.

Header: magic ``0x000008NN`` (two zero bytes, type 0x08 = uint8, NN = number of dims), then NN big-endian
uint32 dims; the file holds exactly ``prod(dims)`` data bytes after it. `read_idx` validates every header
field and the file size, so a truncated or corrupt file fails with one line naming the file. A file ending in
``.gz`` is read and written gzip'ed.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

IMAGE_SIZE = 28
"""MNIST images are IMAGE_SIZE x IMAGE_SIZE; an ``"images"`` IDX file must have dims (N, 28, 28)."""

IDX_UBYTE = 0x08
MAGIC_IMAGES = 0x00000803
MAGIC_LABELS = 0x00000801


class MNISTDataError(RuntimeError):
    """MNIST files are missing, unreadable or invalid. The message is one line and says what to do."""


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
