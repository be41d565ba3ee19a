"""Where the clipping thresholds (alphas) start: MSE-optimal for what each quantizer actually sees.

A b-bit quantizer with threshold alpha maps t to ``Q_alpha(t) = alpha * P(clip(t / alpha))`` (``apot.quant``).
A threshold too large leaves most values on level 0 (at 2 bits an activation alpha of 8.0 puts ~84% of a
BN-ReLU output there); too small clips the tail. The starting point chosen here minimises the quantization
error on the tensor itself::

    alpha* = argmin_alpha  mean((t - Q_alpha(t))**2)

found by a grid search (``mse_alpha``). Two uses:

- weights (``init_weight_alphas``): t is the layer's standardised weight, so alpha* depends only on the bit
  width, the level set and the weight's (roughly normal) shape; for N(0, 1) and APoT it is about 1.22 / 2.08
  / 2.64 / 3.30 at 2 / 3 / 4 / 5 bits (``tests/test_recipe.py`` checks against a numerical integral);
- activations (``calibrate_act_alphas``): t is the layer's input on one calibration batch of training images,
  layer by layer in forward order, each layer seeing the already calibrated quantizers before it.

Both are deterministic: the weights come from the seeded initialisation and the calibration batch is the
first batch of the trial seed's epoch-0 permutation (``apot.data.DeviceMNIST.train_batches``), unaugmented.
``init_alphas`` starts a fresh trial's alphas as its config says (``weight_alpha_init``, ``act_alpha_init``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from apot.layers import QuantConv2d
from apot.quant import nearest_level, standardise
from apot.recipe import ALPHA_INIT_CALIBRATE, ALPHA_INIT_MSE

if TYPE_CHECKING:
    from apot.data import DeviceMNIST
    from apot.recipe import TrainConfig

__all__ = ["CALIBRATION_IMAGES", "calibrate_act_alphas", "init_alphas", "init_weight_alphas", "mse_alpha",
           "quant_layers"]

CALIBRATION_IMAGES = 512
"""Training images in the activation calibration batch."""
_MAX_ELEMENTS = 1 << 16  # elements of a tensor the search looks at (an evenly strided subset beyond that)
_COARSE = 48  # candidates of the first pass, on (0, max|t|]
_FINE = 24  # candidates of the second pass, within one coarse step either side of the best


def _quant_error(t: torch.Tensor, alpha: torch.Tensor, level_set: torch.Tensor) -> torch.Tensor:
    """mean((t - Q_alpha(t))**2) for each alpha of the 1-D ``alpha`` (t flat)."""
    errors = []
    for a in alpha:
        q = nearest_level(t / a, level_set) * a
        errors.append((t - q).square().mean())
    return torch.stack(errors)


def mse_alpha(t: torch.Tensor, level_set: torch.Tensor) -> float:
    """The threshold alpha > 0 that minimises ``mean((t - alpha * P(t / alpha))**2)``.

    Args:
        t: any shape; standardised weights (with a signed ``level_set``) or post-ReLU activations (with an
            unsigned one). At most 2**16 evenly strided elements are used.
        level_set: sorted levels in units of alpha (``apot.quant.levels``), spanning [-1, 1] or [0, 1].

    Two grid passes: 48 candidates on (0, max|t|], then 24 within one step of the best (a resolution of
    about max|t| / 500). Returns 1.0 for an all-zero ``t``.
    """
    flat = t.detach().reshape(-1).float()
    if flat.numel() > _MAX_ELEMENTS:
        flat = flat[:: -(-flat.numel() // _MAX_ELEMENTS)]
    top = float(flat.abs().max())
    if top == 0.0:
        return 1.0
    level_set = level_set.to(flat.device, flat.dtype)
    step = top / _COARSE
    coarse = torch.arange(1, _COARSE + 1, dtype=torch.float64) * step
    best = float(coarse[int(_quant_error(flat, coarse.float(), level_set).argmin())])
    fine = torch.linspace(max(best - step, step / _FINE), best + step, _FINE, dtype=torch.float64)
    return float(fine[int(_quant_error(flat, fine.float(), level_set).argmin())])


def quant_layers(model: nn.Module) -> list[QuantConv2d]:
    """The quantized convolutions of ``model`` (bit < 32), in registration (forward) order."""
    return [m for m in model.modules() if isinstance(m, QuantConv2d) and not m.config.full_precision]


@torch.no_grad()
def init_weight_alphas(model: nn.Module, value: float | None = None) -> None:
    """Set every ``weight_alpha`` to ``value``, or (None) to the MSE-optimal one for its weight."""
    for layer in quant_layers(model):
        alpha = value if value is not None else mse_alpha(standardise(layer.weight), layer.weight_levels)
        layer.weight_alpha.fill_(alpha)


@torch.no_grad()
def calibrate_act_alphas(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Set every ``act_alpha`` to ``mse_alpha`` of that layer's input on ``images``; return them in order.

    One forward pass in training mode (batch statistics, as the first steps see them); a pre-hook on each
    quantized conv calibrates it before it quantizes its input, so later layers see calibrated ones. BN
    running statistics and the model's mode are restored afterwards.
    """
    layers = quant_layers(model)
    found: list[float] = []

    def hook(layer: QuantConv2d, args: tuple[torch.Tensor, ...]) -> None:
        alpha = mse_alpha(args[0], layer.act_levels)
        layer.act_alpha.fill_(alpha)
        found.append(float(layer.act_alpha))

    saved = [(b, b.clone()) for b in model.buffers()]  # BN running stats (level buffers are unchanged)
    was_training = model.training
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        model.train()
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        for buffer, copy in saved:
            buffer.copy_(copy)
        model.train(was_training)
    return found


def init_alphas(model: nn.Module, cfg: TrainConfig, data: DeviceMNIST) -> None:
    """Starting clipping thresholds of a fresh model (never on resume: the checkpoint holds the alphas).

    ``weight_alpha_init`` / ``act_alpha_init``: a number, or ``mse`` / ``calibrate`` (`init_weight_alphas`,
    `calibrate_act_alphas`); the calibration batch is the first ``CALIBRATION_IMAGES`` of the trial seed's
    epoch-0 order, unaugmented, the same on every rank."""
    weight = cfg.weight_alpha_init
    init_weight_alphas(model, None if weight == ALPHA_INIT_MSE else float(weight))
    if cfg.act_alpha_init == ALPHA_INIT_CALIBRATE:
        size = min(CALIBRATION_IMAGES, data.num_train)
        images, _ = next(data.train_batches(0, cfg.seed, 0, 1, size, augment=False))
        calibrate_act_alphas(model, images)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("act_alpha"):
                    p.fill_(float(cfg.act_alpha_init))
