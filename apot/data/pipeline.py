"""The device-resident input pipeline: MNIST splits held on the training device, batches made there.

Each split lives once as a uint8 tensor on the training device; per batch `DeviceMNIST` gathers the images,
applies the training augmentation (`apot.data.transforms`) and normalises on the device. Every epoch's
permutation is seeded by (seed, epoch) and identical on all ranks; rank r takes its own slice, so ranks
partition the epoch with equal step counts (DDP needs that).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch

from apot.data.idx import IMAGE_SIZE
from apot.data.mnist import load_split
from apot.data.transforms import MAX_SHIFT, normalize
from apot.recipe import AUGMENTS  # the training augmentations (the test split is never augmented)


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
    """MNIST held on the training device as uint8; batches normalised (and augmented) on the device.

    Batches are ``(x float32 (B, 1, 28, 28) normalised, y int64 (B,))`` on `device`. The same code on CPU
    and GPU: the order and the shifts come from CPU generators, so both draw the same images, labels and
    augmentations for a given seed and epoch. (What the model then computes on a GPU:
    `apot.distributed.CUDA_NUMERICS`.)

    Args:
        train_images, train_labels, test_images, test_labels: uint8 (N, 28, 28) and int64 (N,) tensors.
        device: where the splits live and batches are produced.
        train_subset: use only the first N training images (quick runs); None uses all.
        max_shift: random shift range [-max_shift, max_shift] per axis in `train_batches`; 0 disables.
        augment: the training augmentation (`AUGMENTS`): ``shift`` (by ``max_shift``) or ``none``.
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
        if not augment or self.augment == "none" or self.max_shift == 0:
            for idx in indices:
                yield normalize(self.train_images[idx]), self.train_labels[idx]
            return
        gen = _generator(seed, epoch, rank, _AUGMENT_STREAM)
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

