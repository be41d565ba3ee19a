"""The per-batch pixel transforms of the input pipeline, on whatever device the images are on.

`normalize`: uint8 -> float32 ``(x / 255 - MNIST_MEAN) / MNIST_STD`` with a channel dim. The training
augmentations (`apot.recipe.AUGMENTS`; never a flip, digits are not mirror-symmetric): ``shift``, a random
integer shift in [-MAX_SHIFT, MAX_SHIFT] per axis, zero fill (`shift_images`); ``affine``, a random rotation,
zoom and sub-pixel shift, bilinear, zero fill (`random_affine`, `affine_images`).
"""

from __future__ import annotations

import math

import torch

from apot.data.idx import IMAGE_SIZE

MNIST_MEAN = 0.1307  # the MNIST training split's pixel mean and standard deviation, pixels in [0, 1]
MNIST_STD = 0.3081
MAX_SHIFT = 2  # ``shift``: up to 2 pixels per axis
AFFINE_ROTATION_DEG = 10.0  # ``affine``: rotation uniform in [-10, 10] degrees,
AFFINE_SCALE = 0.1  # scale uniform in [0.9, 1.1],
AFFINE_SHIFT_PX = 2.0  # shift uniform in [-2, 2] pixels per axis


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

