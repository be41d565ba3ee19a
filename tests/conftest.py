"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny learnable MNIST root (synthetic_mnist.make_synthetic_mnist: 1024 train / 256 test, seed 0), made
    once per session and shared: treat it as read-only (make your own with make_synthetic_mnist to modify)."""
    from synthetic_mnist import make_synthetic_mnist

    return make_synthetic_mnist(tmp_path_factory.mktemp("synthetic_mnist"), n_train=1024, n_test=256, seed=0)


@pytest.fixture
def one_thread():
    """One intra-op torch thread: tiny tensors gain nothing from more, and CI shares its cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
