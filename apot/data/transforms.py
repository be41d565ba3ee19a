"""The per-batch pixel transforms of the input pipeline, on whatever device the images are on.

`normalize`: uint8 -> float32 ``(x / 255 - MNIST_MEAN) / MNIST_STD`` with a channel dim. The training
augmentation (`apot.recipe.AUGMENTS`; never a flip, digits are not mirror-symmetric): ``shift``, a random
integer shift in [-MAX_SHIFT, MAX_SHIFT] per axis, zero fill (`shift_images`).
"""

from __future__ import annotations

import torch

MNIST_MEAN = 0.1307  # the MNIST training split's pixel mean and standard deviation, pixels in [0, 1]
MNIST_STD = 0.3081
MAX_SHIFT = 2  # ``shift``: up to 2 pixels per axis


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

