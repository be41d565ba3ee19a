"""The ResNets' sizes by the architecture's formula, written independently of apot.models: the reference
the model and export tests count against."""

from __future__ import annotations

STAGES = {
    "resnet10": [1, 1, 1, 1],
    "resnet18": [2, 2, 2, 2],
    "resnet34": [3, 4, 6, 3],
    "resnet50": [3, 4, 6, 3],
}


def quantized_conv_weights(arch: str, width: int) -> tuple[int, int, int, int]:
    """(weights of the quantized convs, number of quantized convs, BatchNorm channels including the stem's,
    fc input features). The stem conv (1 input channel, 7x7) and the fc are the 8-bit layers, not counted."""
    bottleneck = arch == "resnet50"
    expansion = 4 if bottleneck else 1
    weights = convs = 0
    bn = width  # stem BN
    in_ch = width
    for stage, blocks in enumerate(STAGES[arch]):
        planes = width * 2**stage
        out_ch = planes * expansion
        for block in range(blocks):
            if bottleneck:
                weights += in_ch * planes + 9 * planes * planes + planes * out_ch
                bn += planes + planes + out_ch
                convs += 3
            else:
                weights += 9 * in_ch * planes + 9 * planes * planes
                bn += 2 * planes
                convs += 2
            if block == 0 and (stage > 0 or in_ch != out_ch):  # 1x1 conv + BN shortcut
                weights += in_ch * out_ch
                bn += out_ch
                convs += 1
            in_ch = out_ch
    return weights, convs, bn, in_ch
