"""Tests for apot.data: IDX parsing/validation, root resolution, DeviceMNIST sharding and augmentation, the
`python -m apot.data` CLI, and the tests' own synthetic set (tests/synthetic_mnist.py). Every file read here
is written by the test itself, except the optional check of the staged real MNIST root."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import types
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from synthetic_mnist import make_synthetic_mnist

from apot.data import (
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    DeviceMNIST,
    MNISTDataError,
    load_split,
    main,
    normalize,
    raw_dir,
    read_idx,
    resolve_data_dir,
    shift_images,
    write_idx,
)

STAGED_MNIST = Path("/work/shared/data/mnist")
REPO_ROOT = Path(__file__).resolve().parents[1]
X_MIN = (0.0 - MNIST_MEAN) / MNIST_STD
X_MAX = (1.0 - MNIST_MEAN) / MNIST_STD


def _write_split(root: Path, images: np.ndarray, labels: np.ndarray, train: bool = True) -> None:
    prefix = "train" if train else "t10k"
    write_idx(raw_dir(root) / f"{prefix}-images-idx3-ubyte", images)
    write_idx(raw_dir(root) / f"{prefix}-labels-idx1-ubyte", labels)


def _random_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`: float (B, 1, 28, 28) -> uint8 (B, 28, 28)."""
    return ((x.squeeze(1) * MNIST_STD + MNIST_MEAN) * 255).round().clamp(0, 255).to(torch.uint8)


def _device_mnist(n_train: int = 1000, n_test: int = 103, **kw) -> DeviceMNIST:
    """Random images; test image i encodes i in its first two pixels (to check coverage)."""
    tr_x, tr_y = _random_split(n_train, seed=1)
    te_x, te_y = _random_split(n_test, seed=2)
    te_x[:, 0, 0] = np.arange(n_test) % 256
    te_x[:, 0, 1] = np.arange(n_test) // 256
    t = torch.from_numpy
    return DeviceMNIST(t(tr_x), t(tr_y).long(), t(te_x), t(te_y).long(), **kw)


# ---------------------------------------------------------------------------------------------- IDX format


@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (3, 4, 5, 6)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, shape: tuple[int, ...], suffix: str) -> None:
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = write_idx(tmp_path / f"x-idx{suffix}", array)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == shape and out.flags.writeable
    np.testing.assert_array_equal(out, array)


def test_idx_header_bytes(tmp_path: Path) -> None:
    data = write_idx(tmp_path / "l", np.arange(3, dtype=np.uint8)).read_bytes()
    assert data == bytes([0, 0, 8, 1, 0, 0, 0, 3, 0, 1, 2])


def test_read_idx_falls_back_to_gz(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "labels.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), array)


def test_write_idx_rejects_non_uint8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))


def test_load_split_types_and_gz(tmp_path: Path) -> None:
    images, labels = _random_split(9)
    write_idx(raw_dir(tmp_path) / "t10k-images-idx3-ubyte.gz", images)
    write_idx(raw_dir(tmp_path) / "t10k-labels-idx1-ubyte", labels)
    x, y = load_split(tmp_path, train=False)
    assert x.dtype == torch.uint8 and x.shape == (9, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (9,)
    assert torch.equal(x, torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())


# ---------------------------------------------------------------------------------------------- bad data


def _one_line_error(excinfo: pytest.ExceptionInfo[MNISTDataError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(MNISTDataError) as excinfo:
        load_split(tmp_path, train=True)
    message = _one_line_error(excinfo)
    for name in MNIST_FILES:
        assert name in message
    assert str(raw_dir(tmp_path)) in message
    assert "python -m apot.data fetch --data-dir" in message


def test_wrong_magic(tmp_path: Path) -> None:
    images, labels = _random_split(4)
    _write_split(tmp_path, images, labels)
    # swap: a labels file where the images file belongs
    write_idx(raw_dir(tmp_path) / "train-images-idx3-ubyte", labels)
    with pytest.raises(MNISTDataError, match=r"train-images-idx3-ubyte: wrong magic number 0x00000801") as e:
        load_split(tmp_path, train=True)
    _one_line_error(e)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(MNISTDataError, match=r"garbage: wrong magic number 0x47494638"):
        read_idx(garbage)


@pytest.mark.parametrize("keep", [2, 10, 4 + 12 + 784 * 3 + 5])
def test_truncated_file(tmp_path: Path, keep: int) -> None:
    images, labels = _random_split(4)
    _write_split(tmp_path, images, labels)
    path = raw_dir(tmp_path) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(MNISTDataError, match=r"train-images-idx3-ubyte: truncated") as e:
        load_split(tmp_path, train=True)
    _one_line_error(e)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(MNISTDataError, match=r"labels: has trailing bytes: 14 bytes.*need 13"):
        read_idx(path, kind="labels")


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(MNISTDataError, match=r"labels.gz: cannot read"):
        read_idx(path)


def test_count_mismatch(tmp_path: Path) -> None:
    images, labels = _random_split(5)
    _write_split(tmp_path, images, labels[:4])
    with pytest.raises(MNISTDataError, match=r"has 5 images but .*has 4 labels") as e:
        load_split(tmp_path, train=True)
    _one_line_error(e)


def test_labels_out_of_range(tmp_path: Path) -> None:
    images, labels = _random_split(5)
    labels[3] = 10
    _write_split(tmp_path, images, labels, train=False)
    with pytest.raises(MNISTDataError, match=r"t10k-labels-idx1-ubyte: label 10 at index 3 is out of range"):
        load_split(tmp_path, train=False)


def test_wrong_image_dims(tmp_path: Path) -> None:
    _write_split(tmp_path, np.zeros((3, 27, 27), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(MNISTDataError, match=r"images-idx3-ubyte: wrong image dims 27x27, expected 28x28"):
        load_split(tmp_path, train=True)


def test_download_failure_becomes_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    # a stand-in torchvision whose MNIST download fails like an offline machine (cheaper than the import)
    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(MNIST=offline)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    with pytest.raises(MNISTDataError, match=r"download .* failed \(URLError.*apot.data fetch") as e:
        load_split(tmp_path, train=True, download=True)
    _one_line_error(e)


# ---------------------------------------------------------------------------------------------- root


def test_resolve_data_dir_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APOT_DATA_DIR", raising=False)
    assert resolve_data_dir(None, None) == Path("./data")
    assert resolve_data_dir(None, "cfg") == Path("cfg")
    monkeypatch.setenv("APOT_DATA_DIR", "env")
    assert resolve_data_dir(None, "cfg") == Path("env")
    assert resolve_data_dir("cli", "cfg") == Path("cli")
    monkeypatch.setenv("APOT_DATA_DIR", "")
    assert resolve_data_dir("", "cfg") == Path("cfg")


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_set_is_valid_deterministic_and_learnable(
    synthetic_mnist_root: Path, tmp_path: Path
) -> None:
    tr_x, tr_y = load_split(synthetic_mnist_root, train=True)
    te_x, te_y = load_split(synthetic_mnist_root, train=False)
    assert tr_x.shape == (1024, 28, 28) and te_x.shape == (256, 28, 28)
    assert set(tr_y.tolist()) == set(range(10))
    # same seed -> same bytes
    make_synthetic_mnist(tmp_path, n_train=1024, n_test=256, seed=0)
    for name in MNIST_FILES:
        assert (raw_dir(tmp_path) / name).read_bytes() == (raw_dir(synthetic_mnist_root) / name).read_bytes()
    # learnable: even a nearest-class-mean classifier is far above chance (10 %)
    means = torch.stack([tr_x[tr_y == c].float().mean(0) for c in range(10)])
    pred = torch.cdist(te_x.float().flatten(1), means.flatten(1)).argmin(1)
    assert (pred == te_y).float().mean() > 0.5
    with pytest.raises(ValueError, match="n_train and n_test must be >= 1"):
        make_synthetic_mnist(tmp_path, n_train=0)


# ---------------------------------------------------------------------------------------------- DeviceMNIST


def test_train_shards_partition_the_epoch() -> None:
    data = _device_mnist(n_train=1000)
    world_size, batch = 3, 32
    shards = [data.train_indices(5, 7, r, world_size, batch) for r in range(world_size)]
    assert all(s.shape == (10, batch) for s in shards)  # 1000 // 96 = 10 equal steps per rank
    assert data.steps_per_epoch(world_size, batch) == 10
    used = torch.cat([s.flatten() for s in shards])
    assert used.unique().numel() == used.numel() == 960  # disjoint, remainder of 40 dropped
    assert torch.equal(used, data.epoch_permutation(5, 7)[:960])
    # reproducible for the same (seed, epoch); different across epochs and seeds
    assert torch.equal(shards[1], data.train_indices(5, 7, 1, world_size, batch))
    assert not torch.equal(shards[1], data.train_indices(6, 7, 1, world_size, batch))
    assert not torch.equal(shards[1], data.train_indices(5, 8, 1, world_size, batch))


def test_train_batches_match_indices_and_are_reproducible() -> None:
    data = _device_mnist(n_train=300)
    idx = data.train_indices(2, 0, 1, 2, 16)
    batches = list(data.train_batches(2, 0, 1, 2, 16, augment=False))
    assert len(batches) == idx.shape[0] == data.steps_per_epoch(2, 16) == 9
    for (x, y), i in zip(batches, idx, strict=True):
        assert torch.equal(y, data.train_labels[i])
        assert torch.equal(x, normalize(data.train_images[i]))
    again = list(data.train_batches(2, 0, 1, 2, 16))
    for a, b in zip(again, data.train_batches(2, 0, 1, 2, 16), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_rank = next(data.train_batches(2, 0, 0, 2, 16))
    assert not torch.equal(again[0][0], other_rank[0])


def test_too_few_images_for_one_step() -> None:
    data = _device_mnist(n_train=100)
    with pytest.raises(ValueError, match="fewer than world_size"):
        data.steps_per_epoch(4, 32)


def test_train_subset_uses_first_images() -> None:
    full = _device_mnist(n_train=200)
    sub = _device_mnist(n_train=200, train_subset=50)
    assert sub.num_train == 50 and torch.equal(sub.train_images, full.train_images[:50])
    assert int(sub.train_indices(0, 0, 0, 1, 10).max()) < 50


@pytest.mark.parametrize("world_size,batch", [(1, 1000), (1, 10), (3, 7), (4, 25), (5, 50)])
def test_test_shards_cover_every_image_once(world_size: int, batch: int) -> None:
    data = _device_mnist(n_test=103)
    seen, steps = [], []
    for rank in range(world_size):
        batches = list(data.test_batches(rank, world_size, batch))
        steps.append(len(batches))
        for x, y in batches:
            assert 0 < x.shape[0] <= batch and x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
            raw = _denormalize(x)
            ids = raw[:, 0, 0].long() + 256 * raw[:, 0, 1].long()
            assert torch.equal(raw, data.test_images[ids]) and torch.equal(y, data.test_labels[ids])
            seen.append(ids)
    assert len(set(steps)) == 1  # equal step counts across ranks
    assert sorted(torch.cat(seen).tolist()) == list(range(103))


def test_shift_images_matches_independent_shift() -> None:
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    shifts = torch.tensor([[0, 0], [2, -2], [-2, 2], [1, 0], [0, -1], [-2, -2]])
    out = shift_images(images, shifts)
    for img, (dy, dx), o in zip(images, shifts.tolist(), out, strict=True):
        expected = torch.zeros_like(img)
        ys, yd = slice(max(0, -dy), 28 - max(0, dy)), slice(max(0, dy), 28 - max(0, -dy))
        xs, xd = slice(max(0, -dx), 28 - max(0, dx)), slice(max(0, dx), 28 - max(0, -dx))
        expected[yd, xd] = img[ys, xs]
        assert torch.equal(o, expected)


SHIFTS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]


def _matching_shifts(originals: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
    """(B, 25) bool: augmented[b] equals originals[b] shifted by SHIFTS[k]."""
    columns = []
    for dy, dx in SHIFTS:
        shifted = shift_images(originals, torch.tensor([[dy, dx]]).expand(len(originals), 2))
        columns.append((shifted == augmented).flatten(1).all(1))
    return torch.stack(columns, 1)


def test_augmentation_is_a_pure_shift_never_a_flip() -> None:
    data = _device_mnist(n_train=256)
    idx = data.train_indices(3, 1, 0, 1, 64)
    seen_shifts = set()
    for (x, y), i in zip(data.train_batches(3, 1, 0, 1, 64), idx, strict=True):
        assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= X_MIN - 1e-5 and x.max() <= X_MAX + 1e-5
        augmented = _denormalize(x)
        matches = _matching_shifts(data.train_images[i], augmented)
        assert (matches.sum(1) == 1).all(), "augmented image is not exactly one [-2, 2] shift of its original"
        assert not _matching_shifts(data.train_images[i].flip(-1), augmented).any(), (
            "augmented image is a flip"
        )
        seen_shifts.update(SHIFTS[k] for k in matches.int().argmax(1).tolist())
    assert len(seen_shifts) >= 20  # all 25 shifts are drawn, not a constant one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches() -> None:
    cpu = _device_mnist(n_train=500)
    gpu = _device_mnist(n_train=500, device="cuda")
    pairs = zip(cpu.train_batches(1, 3, 1, 2, 50), gpu.train_batches(1, 3, 1, 2, 50), strict=True)
    for (a, ya), (b, yb) in pairs:
        assert b.device.type == "cuda"
        assert torch.equal(a, b.cpu()) and torch.equal(ya, yb.cpu())


# ---------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "APOT_DATA_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "apot.data", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )


def test_cli_check_counts_a_staged_root(tmp_path: Path) -> None:
    make_synthetic_mnist(tmp_path, n_train=64, n_test=32, seed=3)
    checked = _cli("check", "--data-dir", str(tmp_path))
    assert checked.returncode == 0, checked.stderr
    assert "train: 64 images" in checked.stdout and "test: 32 images" in checked.stdout


def test_cli_bad_root_prints_one_line(tmp_path: Path) -> None:
    missing = _cli("check", "--data-dir", str(tmp_path))
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("error: MNIST not found")
    assert "python -m apot.data fetch" in missing.stderr


def test_cli_main_bad_files_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process `main` (a subprocess costs a torch import): invalid files -> rc 1, one stderr line."""
    _write_split(tmp_path, *_random_split(4))
    _write_split(tmp_path, np.zeros((2, 28, 28), np.uint8), np.zeros(3, np.uint8), train=False)
    assert main(["check", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "counts must match" in err


# ---------------------------------------------------------------------------------------------- real MNIST


@pytest.mark.skipif(not (STAGED_MNIST / "MNIST" / "raw").is_dir(), reason="no staged MNIST root")
def test_staged_mnist_loads() -> None:
    train_x, train_y = load_split(STAGED_MNIST, train=True)
    test_x, test_y = load_split(STAGED_MNIST, train=False)
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_y.shape == (60000,) and test_y.shape == (10000,)
    assert int(train_y[0]) == 5


def test_test_shards_tiny_split_keep_equal_step_counts() -> None:
    data = _device_mnist(n_test=3)
    sizes = [[x.shape[0] for x, _ in data.test_batches(rank, 4, 8)] for rank in range(4)]
    assert sizes == [[1], [1], [1], [0]]  # every rank steps once; the last one evaluates nothing


# ------------------------------------------------------------------------------------ augment: none
def test_augment_none_gives_the_unaugmented_batches_and_others_are_refused() -> None:
    rng = np.random.default_rng(0)
    train = (torch.from_numpy(rng.integers(0, 256, (256, 28, 28), dtype=np.uint8)),
             torch.from_numpy(rng.integers(0, 10, 256)))
    shifted = DeviceMNIST(*train, *train)
    plain = [x for x, _ in shifted.train_batches(0, 7, 0, 2, 32, augment=False)]
    assert not torch.equal([x for x, _ in shifted.train_batches(0, 7, 0, 2, 32)][0], plain[0])
    unaugmented = DeviceMNIST(*train, *train, augment="none")
    assert all(torch.equal(a, b) for a, b in
               zip(plain, [x for x, _ in unaugmented.train_batches(0, 7, 0, 2, 32)], strict=True))
    for name in ("flip", "affine"):  # affine: removed after commit a9e5893 (docs/EXPERIMENTS.md)
        with pytest.raises(ValueError, match=rf"augment '{name}' is not one of shift, none$"):
            DeviceMNIST(*train, *train, augment=name)
