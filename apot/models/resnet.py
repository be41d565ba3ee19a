"""ResNets for 1-channel 28x28 inputs, with APoT / uniform quantized convolutions.

Blocks, then the network, then thin entry points. The layout and module names follow torchvision's
ResNet (``conv1``, ``bn1``, ``layer1``..``layer4``, blocks' ``conv1/bn1/conv2/bn2[/conv3/bn3]``,
``downsample.0/.1``, ``fc``), with the stem and the four stages ``width`` x {1, 2, 4, 8} channels wide.

Quantization (``QuantConfig(bit, power)``): every conv inside the stages (downsample included) is a
``QuantConv2d``; the stem conv and ``fc`` use 8-bit weights and a real-valued input. ``bit=32`` is the
full-precision baseline: plain ``nn.Conv2d`` / ``nn.Linear`` everywhere, no quantization module at all.
"""

from __future__ import annotations

import torch
from torch import nn

from apot.layers import Conv2d8bit, Linear8bit, QuantConv2d
from apot.quant import QuantConfig

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet10", "resnet18", "resnet34", "resnet50"]


def _conv(cfg: QuantConfig, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free conv with 'same' padding: ``QuantConv2d``, or ``nn.Conv2d`` at full precision."""
    padding = kernel_size // 2
    if cfg.full_precision:
        return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
    return QuantConv2d(
        in_ch, out_ch, kernel_size, stride=stride, padding=padding, bit=cfg.bit, power=cfg.power,
        ws_grad=cfg.ws_grad,
    )


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); 3x3 convs, the stride on ``conv1``."""

    expansion = 1

    def __init__(
        self, in_ch: int, planes: int, stride: int, downsample: nn.Module | None, cfg: QuantConfig
    ) -> None:
        super().__init__()
        self.conv1 = _conv(cfg, in_ch, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(cfg, planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (the stride, as torchvision), 1x1 expand to ``4 * planes``, plus the shortcut."""

    expansion = 4

    def __init__(
        self, in_ch: int, planes: int, stride: int, downsample: nn.Module | None, cfg: QuantConfig
    ) -> None:
        super().__init__()
        self.conv1 = _conv(cfg, in_ch, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(cfg, planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(cfg, planes, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), four stages, global average pool, linear classifier.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. [2, 2, 2, 2].
        bit: one of ``apot.quant.SUPPORTED_BITS``; 32 = full precision.
        power: True for APoT, False for uniform quantization.
        ws_grad: differentiate through the weight standardisation (``apot.quant.quantize_weight``).
        num_classes: outputs of ``fc``.
        width: channels of the stem and of stage 1 (stages are width x 1, 2, 4, 8; x4 with ``Bottleneck``).
        in_channels: input channels (1 for MNIST).
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        *,
        bit: int = 32,
        power: bool = True,
        ws_grad: bool = False,
        num_classes: int = 10,
        width: int = 16,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        cfg = QuantConfig(bit, power, ws_grad)
        self.config = cfg
        stem, head = (nn.Conv2d, nn.Linear) if cfg.full_precision else (Conv2d8bit, Linear8bit)
        self.conv1 = stem(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = width
        for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2), strict=True)):
            stage, in_ch = self._make_layer(block, cfg, in_ch, width * 2**i, blocks, stride)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = head(in_ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_layer(
        block: Block, cfg: QuantConfig, in_ch: int, planes: int, blocks: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        """One stage; a 1x1 conv + BN shortcut where the shape changes. Returns (stage, out channels)."""
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(_conv(cfg, in_ch, out_ch, 1, stride), nn.BatchNorm2d(out_ch))
        stage = [block(in_ch, planes, stride, downsample, cfg)]
        stage += [block(out_ch, planes, 1, None, cfg) for _ in range(1, blocks)]
        return nn.Sequential(*stage), out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet10(**kwargs) -> ResNet:
    """ResNet-10: BasicBlock, [1, 1, 1, 1]."""
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


def resnet18(**kwargs) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2]."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34: BasicBlock, [3, 4, 6, 3]."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: Bottleneck (expansion 4), [3, 4, 6, 3]."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)
