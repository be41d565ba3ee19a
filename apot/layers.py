"""Quantized layers: ``QuantConv2d`` (APoT / uniform) and the 8-bit first and last layers.

State dicts match the paper's reference checkpoints: a quantized conv ``<name>`` holds ``<name>.weight``,
``<name>.weight_alpha`` and ``<name>.act_alpha`` (0-dim tensors); level sets are non-persistent buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from apot.quant import (
    ACT_ALPHA_INIT,
    TABLE_SCALE,
    WEIGHT_ALPHA_INIT,
    QuantConfig,
    lookup_table,
    quantize_8bit,
    quantize_activation,
    quantize_weight,
)


class QuantConv2d(nn.Conv2d):
    """Conv whose input (activation quantizer) and weight (weight quantizer) are fake-quantized.

    forward(x) = conv(alpha_a * P_a(min(x / alpha_a, 1)),  alpha_w * P_w(clip(w' / alpha_w, -1, 1)))
    with w' = (w - mean(w)) / std(w) the standardised weight; P_a / P_w project onto the unsigned /
    signed level sets of ``QuantConfig(bit, power)``.

    Args:
        in_ch, out_ch, kernel_size, stride, padding, bias: as ``nn.Conv2d``.
        bit: one of ``apot.quant.SUPPORTED_BITS``. With 32 the layer is a plain ``nn.Conv2d``: no alpha
            parameters and no level buffers, so its state dict is ``weight`` (and ``bias``) only.
        power: True for APoT levels, False for uniform.
        ws_grad: differentiate through the weight standardisation's mean and std (see
            ``apot.quant.quantize_weight``); False treats them as constants.

    Parameters (bit < 32): ``weight``, ``weight_alpha`` (init 3.0), ``act_alpha`` (init 8.0).
    Buffers, not saved: ``weight_levels`` / ``act_levels`` and their ``lookup_table``s (``weight_table`` /
    ``act_table``), computed once here; they follow ``.to(device)``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        *,
        bit: int,
        power: bool,
        ws_grad: bool = False,
    ) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias)
        self.config = QuantConfig(bit, power, ws_grad)
        if self.config.full_precision:
            return
        self.weight_alpha = nn.Parameter(torch.tensor(WEIGHT_ALPHA_INIT))
        self.act_alpha = nn.Parameter(torch.tensor(ACT_ALPHA_INIT))
        weight_levels, act_levels = self.config.weight_levels(), self.config.act_levels()
        self.register_buffer("weight_levels", weight_levels, persistent=False)
        # Tables padded to one shape for every bit width and quantizer: one compiled graph for all.
        self.register_buffer("weight_table", lookup_table(weight_levels, TABLE_SCALE), persistent=False)
        self.register_buffer("act_levels", act_levels, persistent=False)
        self.register_buffer("act_table", lookup_table(act_levels, TABLE_SCALE), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.full_precision:
            return super().forward(x)
        # Only the (padded) tables go in: the level sets' shapes differ per bit width, the tables' do not.
        x = quantize_activation(x, self.act_alpha, None, self.act_table)
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def quantized_weight(self) -> torch.Tensor:
        """The weight ``forward`` convolves with: alpha_w * P_w(clip(w' / alpha_w, -1, 1)) (``apot.export``
        encodes exactly this tensor)."""
        return quantize_weight(self.weight, self.weight_alpha, None, self.weight_table, self.config.ws_grad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bit={self.config.bit}, power={self.config.power}"


class Conv2d8bit(nn.Conv2d):
    """Conv with 8-bit weights (``apot.quant.quantize_8bit``, straight-through) and a real-valued input.

    The network's first layer; its state dict is that of ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = quantize_8bit(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Linear8bit(nn.Linear):
    """Linear layer with 8-bit weights (``apot.quant.quantize_8bit``, straight-through).

    The network's classifier; its state dict is that of ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, quantize_8bit(self.weight), self.bias)
