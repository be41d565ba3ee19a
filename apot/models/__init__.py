"""Model registry: architectures by name, so ``search_space.yaml`` can name them as strings.

    model = create_model("resnet18", bit=4, power=True)   # APoT 4-bit ResNet-18, width 16, 10 classes
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from apot.models.resnet import BasicBlock, Bottleneck, ResNet, resnet10, resnet18, resnet34, resnet50

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "create_model", "list_models"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    fn.__name__: fn for fn in (resnet10, resnet18, resnet34, resnet50)
}


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def create_model(
    arch: str, bit: int, power: bool = True, num_classes: int = 10, width: int = 16, ws_grad: bool = False
) -> nn.Module:
    """Build a registered architecture (1 input channel).

    Args:
        arch: one of ``list_models()``.
        bit: one of ``apot.quant.SUPPORTED_BITS``; 32 = full precision (no quantization anywhere).
        power: True for APoT levels, False for uniform.
        num_classes: classifier outputs.
        width: channels of the stem and first stage (stages are width x 1, 2, 4, 8).
        ws_grad: differentiate through the weight standardisation (``apot.quant.quantize_weight``).

    Raises:
        ValueError: unknown ``arch`` or unsupported ``bit``.
    """
    if arch not in _REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(list_models())}")
    return _REGISTRY[arch](bit=bit, power=power, num_classes=num_classes, width=width,
                            ws_grad=ws_grad)
