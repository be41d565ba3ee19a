"""The model registry and the ResNets: shapes, parameter counts by formula, torchvision equivalence at full
precision, checkpoint key names, and that a few SGD steps train every configuration."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from resnet_formula import STAGES, quantized_conv_weights
from torch import nn
from torchvision.models import resnet as tv_resnet

from apot.layers import Conv2d8bit, Linear8bit, QuantConv2d
from apot.models import create_model, list_models
from apot.quant import SUPPORTED_BITS

ARCHS = ["resnet10", "resnet18", "resnet34", "resnet50"]
QUANT_BITS = [b for b in SUPPORTED_BITS if b != 32]


pytestmark = pytest.mark.usefixtures("one_thread")


def expected_counts(arch: str, width: int, num_classes: int = 10) -> tuple[int, int]:
    """(parameters at full precision, number of quantized convs), counted from the architecture's formula."""
    weights, convs, bn, fc_in = quantized_conv_weights(arch, width)
    stem = 49 * width  # 1 input channel, 7x7
    return stem + weights + 2 * bn + fc_in * num_classes + num_classes, convs  # BN: scale and shift


def torchvision_twin(arch: str) -> nn.Module:
    """torchvision's ResNet of the same depth (width 64), with a 1-channel stem."""
    block = tv_resnet.Bottleneck if arch == "resnet50" else tv_resnet.BasicBlock
    model = tv_resnet.ResNet(block, STAGES[arch], num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry():
    assert list_models() == ARCHS
    with pytest.raises(ValueError, match=r"unknown arch 'resnet19'; expected one of resnet10, resnet18, "):
        create_model("resnet19", bit=4)
    with pytest.raises(ValueError, match=r"bit must be one of \(2, 3, 4, 5, 6, 32\), got 7"):
        create_model("resnet18", bit=7)


def test_expected_counts_formula_matches_torchvision():
    """The counting formula itself, against torchvision's resnet18/34/50 (3-channel stem, 1000 classes)."""
    for arch in ("resnet18", "resnet34", "resnet50"):
        with torch.device("meta"):
            model = getattr(tv_resnet, arch)()
        params, _ = expected_counts(arch, 64, num_classes=1000)
        assert count(model) == params + 2 * 49 * 64  # two more input channels on the stem


BUILDS = list(itertools.product(ARCHS, SUPPORTED_BITS, (True, False)))


@pytest.mark.parametrize(("arch", "bit", "power"), BUILDS)
def test_every_arch_builds_at_every_bit(arch, bit, power):
    torch.manual_seed(0)
    model = create_model(arch, bit=bit, power=power, width=8, num_classes=7)
    params, quant_convs = expected_counts(arch, 8, num_classes=7)
    found = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    if bit == 32:
        assert count(model) == params and not found
    else:
        assert count(model) == params + 2 * quant_convs  # + weight_alpha and act_alpha per quantized conv
        assert len(found) == quant_convs
        assert all(m.config.bit == bit and m.config.power == power for m in found)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_full_precision_equals_torchvision(arch):
    """bit=32: no quantization module at all, same keys as torchvision's ResNet, same outputs."""
    torch.manual_seed(0)
    model = create_model(arch, bit=32, width=64)
    assert not [m for m in model.modules() if isinstance(m, (QuantConv2d, Conv2d8bit, Linear8bit))]
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    assert type(model.fc) is nn.Linear
    twin = torchvision_twin(arch)
    assert list(model.state_dict()) == list(twin.state_dict())
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    for mode in (True, False):
        model.train(mode), twin.train(mode)
        torch.testing.assert_close(model(x), twin(x))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_quantized_state_dict_keys(arch):
    """Reference checkpoint keys: torchvision's names plus <conv>.weight_alpha / <conv>.act_alpha."""
    model = create_model(arch, bit=4, power=True)
    with torch.device("meta"):
        twin = torchvision_twin(arch)
    quant = [name for name, m in model.named_modules() if isinstance(m, QuantConv2d)]
    alphas = {f"{name}.{p}" for name in quant for p in ("weight_alpha", "act_alpha")}
    assert set(model.state_dict()) == set(twin.state_dict()) | alphas
    keys = model.state_dict()
    for key in (
        "conv1.weight",
        "fc.weight",
        "fc.bias",
        "layer1.0.conv1.weight",
        "layer1.0.conv1.weight_alpha",
        "layer1.0.conv1.act_alpha",
        "layer2.0.downsample.0.weight_alpha",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.conv2.act_alpha",
    ):
        assert key in keys
    assert not [k for k in model.state_dict() if "levels" in k or "table" in k]
    assert isinstance(model.conv1, Conv2d8bit) and isinstance(model.fc, Linear8bit)


def test_bottleneck_strides_like_torchvision():
    model = create_model("resnet50", bit=3)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.conv3.stride == (1, 1)
    assert block.downsample[0].stride == (2, 2) and block.downsample[0].kernel_size == (1, 1)
    assert model.layer1[0].downsample is not None  # 16 -> 64 channels
    assert model.fc.in_features == 16 * 8 * 4


def test_init():
    model = create_model("resnet10", bit=5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = model.layer3[0].conv1.weight  # kaiming normal, fan_out, relu: std = sqrt(2 / (out * 3 * 3))
    assert abs(w.std().item() / (2 / (w.shape[0] * 9)) ** 0.5 - 1) < 0.1


@pytest.mark.parametrize(("bit", "power"), [(4, True), (2, False), (32, True)])
def test_a_state_dict_rebuilds_the_same_model(bit, power):
    """A checkpoint stores parameters and BN statistics only; the level sets are rebuilt from bit and power
    (non-persistent buffers), so a fresh model loading the state dict computes exactly what the source did."""
    torch.manual_seed(0)
    source = create_model("resnet10", bit=bit, power=power)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith("alpha"):
                p.mul_(0.5 + torch.rand(()))  # moved from their initial values, as training would
    source.train()(torch.randn(8, 1, 28, 28))  # BN running statistics away from their initial values
    state = source.state_dict()
    assert not any("levels" in k for k in state)  # level sets are not stored
    torch.manual_seed(1)
    target = create_model("resnet10", bit=bit, power=power)
    target.load_state_dict(state)  # strict
    x = torch.randn(3, 1, 28, 28)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))


@pytest.mark.parametrize(("bit", "power"), [(b, p) for b in QUANT_BITS for p in (True, False)] + [(32, True)])
def test_sgd_steps_lower_the_loss(bit, power):
    torch.manual_seed(bit)
    model = create_model("resnet10", bit=bit, power=power)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None, name
                assert torch.isfinite(p.grad).all(), name
            alpha_grads = [p.grad for n, p in model.named_parameters() if n.endswith("alpha")]
            assert all(g.abs() > 0 for g in alpha_grads)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("bit", "power"), [(5, True), (3, False), (32, True)])
def test_training_steps_on_cuda(bit, power):
    """The level buffers move with the model; a few steps on the GPU train (outputs are not compared with
    the CPU: different conv arithmetic can move values across a level boundary)."""
    torch.manual_seed(0)
    model = create_model("resnet10", bit=bit, power=power).cuda()
    assert all(b.is_cuda for b in model.buffers())
    x, y = torch.randn(16, 1, 28, 28, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
