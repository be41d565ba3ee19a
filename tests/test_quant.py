"""Level sets, nearest-level projection, the custom gradients and the quantized layers, against independent
computations (brute-force nearest-level search in float64, gradient formulas written out by hand)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apot.layers import Conv2d8bit, Linear8bit, QuantConv2d
from apot.quant import (
    ACT_ALPHA_INIT,
    LEVEL_BITS,
    SUPPORTED_BITS,
    TABLE_SCALE,
    WEIGHT_ALPHA_INIT,
    ActQuantFn,
    QuantConfig,
    WeightQuantFn,
    levels,
    lookup_table,
    midpoints,
    nearest_level,
    project,
    project_table,
    quantize_8bit,
    quantize_activation,
    quantize_weight,
)

ALL_LEVEL_SETS = list(itertools.product(LEVEL_BITS, (True, False), (True, False)))  # bit, power, signed
LEVEL_IDS = [f"{b}bit-{'apot' if p else 'uniform'}-{'signed' if s else 'act'}" for b, p, s in ALL_LEVEL_SETS]


pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(u: torch.Tensor, level_set: torch.Tensor) -> torch.Tensor:
    """Nearest level by exhaustive search in float64 (exact for float32 data); ties -> first = lower."""
    wide = level_set.to(torch.float64)
    distance = (u.to(torch.float64).reshape(-1, 1) - wide.reshape(1, -1)).abs()
    return level_set[distance.argmin(dim=1)].reshape(u.shape).to(u.dtype)


def apot_sums(*bases: list[float]) -> list[float]:
    """Every sum with one term from each base set, normalised by the largest (spec, written out again)."""
    sums = sorted({sum(terms) for terms in itertools.product(*bases)})
    return [s / sums[-1] for s in sums]


def hard_inputs(level_set: torch.Tensor, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Random values inside and beyond the clip, the levels, the midpoints and their float neighbours."""
    gen = torch.Generator().manual_seed(seed)
    mids = ((level_set.double()[1:] + level_set.double()[:-1]) / 2).float()
    return torch.cat([
        torch.rand(n, generator=gen) * 4 - 2,
        torch.randn(n, generator=gen) * 0.4,
        level_set,
        mids,
        torch.nextafter(mids, torch.full_like(mids, 2.0)),
        torch.nextafter(mids, torch.full_like(mids, -2.0)),
        torch.tensor([-1e9, -1.0, -0.0, 0.0, 1.0, 1e9]),
    ])


# ----------------------------------------------------------------------------------------------- level sets
def test_two_and_three_bit_values_exactly():
    assert torch.equal(levels(2, power=True), torch.tensor([0, 0.25, 0.5, 1]))
    assert torch.equal(levels(3, power=True), torch.tensor([0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1]))
    assert torch.equal(levels(2, power=True, signed=True), torch.tensor([-1.0, 0, 1]))
    assert torch.equal(levels(2, power=False, signed=True), torch.tensor([-1.0, 0, 1]))
    assert torch.equal(levels(3, power=True, signed=True), torch.tensor([-1, -0.5, -0.25, 0, 0.25, 0.5, 1]))


@pytest.mark.parametrize("bit", LEVEL_BITS)
def test_apot_activation_levels_match_the_base_sets(bit):
    half = [0.0, 2**-1, 2**-2, 2**-3]
    bases = {
        2: [half],
        3: [[0, 2**-1, 2**-2, 2**-4], [0, 2**-3]],
        4: [[0, 2**-1, 2**-3, 2**-5], [0, 2**-2, 2**-4, 2**-6]],
        5: [[0, 2**-1, 2**-3, 2**-6], [0, 2**-2, 2**-4, 2**-7], [0, 2**-5]],
        6: [[0, 2**-1, 2**-4, 2**-7], [0, 2**-2, 2**-5, 2**-8], [0, 2**-3, 2**-6, 2**-9]],
    }[bit]
    expected = torch.tensor(apot_sums(*bases), dtype=torch.float64).float()
    assert torch.equal(levels(bit, power=True), expected)
    assert len(expected) == 2**bit


@pytest.mark.parametrize("bit", LEVEL_BITS)
def test_uniform_levels(bit):
    steps = 2**bit - 1
    assert torch.equal(levels(bit, power=False), torch.arange(steps + 1, dtype=torch.float32) / steps)
    half = 2 ** (bit - 1) - 1
    mags = torch.arange(half + 1, dtype=torch.float32) / half
    assert torch.equal(levels(bit, power=False, signed=True), torch.cat([-mags.flip(0)[:-1], mags]))


@pytest.mark.parametrize("bit", [b for b in LEVEL_BITS if b > 2])
def test_apot_weights_are_signed_lower_bit_activation_sets(bit):
    mags = levels(bit - 1, power=True)
    assert torch.equal(levels(bit, power=True, signed=True), torch.cat([-mags.flip(0)[:-1], mags]))


@pytest.mark.parametrize(("bit", "power", "signed"), ALL_LEVEL_SETS, ids=LEVEL_IDS)
def test_level_set_invariants(bit, power, signed):
    lv = levels(bit, power, signed)
    assert lv.dtype == torch.float32 and lv.dim() == 1
    assert len(lv) == (2**bit - 1 if signed else 2**bit)  # 5-bit weights: 31 unique levels
    assert torch.all(lv[1:] > lv[:-1])  # sorted and unique
    assert lv.max() == 1 and lv.min() == (-1 if signed else 0)
    if signed:
        assert torch.equal(lv, -lv.flip(0))
        assert (lv == 0).sum() == 1 and not torch.signbit(lv[lv == 0]).any()  # no -0.0


@pytest.mark.parametrize("bad", [0, 1, 7, 8, 16, 32, -4, 2.0, True, "4"])
def test_levels_rejects_unsupported_bits(bad):
    with pytest.raises(ValueError, match=r"bit must be one of \(2, 3, 4, 5, 6\)"):
        levels(bad)


@pytest.mark.parametrize("bad", [0, 1, 7, 8, 31, 64])
def test_quant_config_rejects_unsupported_bits(bad):
    with pytest.raises(ValueError, match=r"bit must be one of \(2, 3, 4, 5, 6, 32\), got"):
        QuantConfig(bad, True)


def test_quant_config():
    assert SUPPORTED_BITS == (2, 3, 4, 5, 6, 32)
    assert QuantConfig(32).full_precision and not QuantConfig(4).full_precision
    assert torch.equal(QuantConfig(4, power=False).weight_levels(), levels(4, False, signed=True))
    assert torch.equal(QuantConfig(4, power=True).act_levels(), levels(4, True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig(4).bit = 5
    with pytest.raises(ValueError, match="power must be a bool"):
        QuantConfig(4, power="yes")


# ----------------------------------------------------------------------------------------------- projection
@pytest.mark.parametrize(("bit", "power", "signed"), ALL_LEVEL_SETS, ids=LEVEL_IDS)
def test_projection_equals_brute_force(bit, power, signed):
    lv = levels(bit, power, signed)
    u = hard_inputs(lv, seed=bit)
    expected = brute_force(u, lv)
    assert torch.equal(project(u, lv), expected)
    assert torch.equal(project_table(u, lookup_table(lv)), expected)
    assert torch.equal(nearest_level(u, lv, lookup_table(lv)), expected)
    # the same on a 4-D tensor and in float64 (where project recomputes the midpoints for that dtype)
    u4 = u[: 2 * 3 * 4 * 5].reshape(2, 3, 4, 5)
    assert torch.equal(project(u4, lv), expected[: u4.numel()].reshape(u4.shape))
    u64 = torch.randn(3000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(nearest_level(u64, lv), brute_force(u64, lv.double()))
    assert torch.equal(nearest_level(u64, None, lookup_table(lv.double())), brute_force(u64, lv.double()))


def test_exact_midpoints_go_to_the_lower_level():
    lv = levels(2, power=True)  # midpoints 0.125, 0.375, 0.75 are exact in float32
    u = torch.tensor([0.125, 0.375, 0.75, -0.0])
    assert torch.equal(project(u, lv), torch.tensor([0.0, 0.25, 0.5, 0.0]))
    signed = levels(3, power=True, signed=True)
    u = torch.tensor([-0.75, -0.375, -0.125, 0.125, 0.375, 0.75])
    expected = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5])
    assert torch.equal(project(u, signed), expected)
    assert torch.equal(project_table(u, lookup_table(signed)), expected)


def test_midpoints_are_rounded_down():
    lv = levels(3, power=True)  # 0.1 + 0.2 etc. are not exact in float32
    exact = (lv.double()[1:] + lv.double()[:-1]) / 2
    bounds = midpoints(lv)
    assert torch.all(bounds.double() <= exact)
    assert torch.all(torch.nextafter(bounds, torch.ones_like(bounds)).double() > exact)


def test_lookup_table_rejects_levels_outside_the_unit_range():
    with pytest.raises(ValueError, match="within"):
        lookup_table(torch.tensor([0.0, 2.0]))


# ------------------------------------------------------------------------------------- gradient formulas
def standardised(w: torch.Tensor) -> torch.Tensor:
    """(w - mean) / std with the unbiased std, in float64."""
    w = w.double()
    return (w - w.mean()) / w.std()


def away_from_midpoints(w: torch.Tensor, alpha: float, lv: torch.Tensor, gap: float = 1e-5) -> torch.Tensor:
    """Drop weights whose u lies within ``gap`` of a midpoint, so float32 rounding cannot change a level
    (exact ties are tested on ``project`` itself)."""
    mids = (lv.double()[1:] + lv.double()[:-1]) / 2
    for _ in range(10):
        u = standardised(w) / alpha
        keep = (u.reshape(-1, 1) - mids).abs().min(dim=1).values > gap
        if keep.all():
            return w
        w = w[keep]
    raise AssertionError("could not keep the weights away from the midpoints")


def weight_formula(w: torch.Tensor, alpha: float, lv: torch.Tensor, g: torch.Tensor):
    """(out, dL/dw, dL/dalpha) from the spec, in float64 with the brute-force projection."""
    u = standardised(w) / alpha
    q = brute_force(u.clamp(-1, 1), lv.double())
    inside = u.abs() <= 1
    grad_alpha = (g.double() * (u.sign() * ~inside + (q - u) * inside)).sum()
    return alpha * q, g.double() / w.double().std(), grad_alpha


def act_formula(x: torch.Tensor, alpha: float, lv: torch.Tensor, g: torch.Tensor):
    """(out, dL/dx, dL/dalpha) from the spec, in float64 with the brute-force projection."""
    u = (x / alpha).double()  # u rounded to float32 as the quantizer sees it
    q = brute_force(u.clamp(max=1), lv.double())
    inside = u <= 1
    grad_alpha = (g.double() * (~inside + (q - u) * inside)).sum()
    return alpha * q, g.double() * inside, grad_alpha


@pytest.mark.parametrize("use_table", [True, False], ids=["table", "bucketize"])
@pytest.mark.parametrize(("bit", "power"), [(2, True), (3, True), (5, True), (5, False), (6, True)])
def test_weight_quantizer_gradients(bit, power, use_table):
    gen = torch.Generator().manual_seed(bit)
    lv, alpha = levels(bit, power, signed=True), 0.8  # alpha < 3 std: some weights clip
    w = away_from_midpoints(torch.randn(3000, generator=gen) * 0.05 + 0.01, alpha, lv)
    g = torch.randn(w.shape, generator=gen)
    w_req, a_req = w.clone().requires_grad_(), torch.tensor(alpha, requires_grad=True)
    out = WeightQuantFn.apply(w_req, a_req, lv, lookup_table(lv) if use_table else None)
    out.backward(g)
    ref_out, ref_grad_w, ref_grad_alpha = weight_formula(w, alpha, lv, g)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w_req.grad.double(), ref_grad_w, rtol=1e-6, atol=0)  # unclipped, via 1/std
    torch.testing.assert_close(a_req.grad.double(), ref_grad_alpha, rtol=1e-5, atol=1e-4)
    assert a_req.grad.shape == a_req.shape


def test_weight_quantizer_at_the_clip():
    """|u| == 1 counts as inside (slope P(u) - u = 0); just beyond, the slope is sign(u)."""
    lv = levels(3, power=True, signed=True)
    w = torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0])  # mean 0, unbiased std exactly 1
    g = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    for alpha, expected in [(1.0, 0.0), (0.999, -1.0 - 2.0 + 8.0 + 16.0)]:
        a = torch.tensor(alpha, requires_grad=True)
        WeightQuantFn.apply(w.clone().requires_grad_(), a, lv, lookup_table(lv)).backward(g)
        assert a.grad.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("use_table", [True, False], ids=["table", "bucketize"])
@pytest.mark.parametrize(("bit", "power"), [(2, True), (3, False), (4, True), (5, True), (6, False)])
def test_activation_quantizer_gradients(bit, power, use_table):
    gen = torch.Generator().manual_seed(bit)
    lv = levels(bit, power)
    x = torch.cat([torch.rand(3000, generator=gen) * 12, torch.tensor([0.0, 6.0])])  # u == 1 exactly
    alpha, g = 6.0, torch.randn(3002, generator=gen)
    x_req, a_req = x.clone().requires_grad_(), torch.tensor(alpha, requires_grad=True)
    out = ActQuantFn.apply(x_req, a_req, lv, lookup_table(lv) if use_table else None)
    out.backward(g)
    ref_out, ref_grad_x, ref_grad_alpha = act_formula(x, alpha, lv, g)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-6, atol=1e-6)
    assert torch.equal(x_req.grad.double(), ref_grad_x)
    torch.testing.assert_close(a_req.grad.double(), ref_grad_alpha, rtol=1e-5, atol=1e-4)


def test_activation_gradcheck_in_the_clipped_region():
    """Beyond the clip the quantizer is alpha itself, so the custom gradients are the true derivatives."""
    lv = levels(4, power=True)
    x = (torch.rand(20, dtype=torch.float64) + 1.5).requires_grad_()
    alpha = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: ActQuantFn.apply(x, a, lv, None), (x, alpha))


def test_weight_gradcheck_in_the_clipped_region():
    """All |u| > 1: the output is alpha * sign(w - mean), so dL/dalpha is the true derivative."""
    lv = levels(4, power=True, signed=True)
    w = torch.tensor([-1.0, 1.0] * 8, dtype=torch.float64)
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: WeightQuantFn.apply(w, a, lv, None), (alpha,))


def test_quantize_weight_standardises_with_constant_mean_and_std():
    lv = levels(4, power=True, signed=True)
    w = torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(away_from_midpoints(w.reshape(-1), WEIGHT_ALPHA_INIT, lv), w.reshape(-1))  # seed ok
    w.requires_grad_()
    alpha = torch.tensor(WEIGHT_ALPHA_INIT, requires_grad=True)
    g = torch.randn_like(w)
    out = quantize_weight(w, alpha, lv, lookup_table(lv))
    out.backward(g)
    ref_out, ref_grad_w, ref_grad_alpha = weight_formula(w.detach(), WEIGHT_ALPHA_INIT, lv, g)
    torch.testing.assert_close(out.detach().double(), ref_out)
    torch.testing.assert_close(w.grad.double(), ref_grad_w, rtol=1e-6, atol=0)  # dL/dw = g / std(w)
    torch.testing.assert_close(alpha.grad.double(), ref_grad_alpha, rtol=1e-5, atol=1e-4)


def test_quantize_8bit():
    w = torch.randn(64, 32, requires_grad=True)
    m = w.detach().max()
    expected = torch.round(w.detach() / m * 127) / 127 * m
    out = quantize_8bit(w)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    assert torch.unique(out.detach()).numel() <= 255
    g = torch.randn_like(w)
    out.backward(g)
    assert torch.equal(w.grad, g)  # straight through
    # the reference scales by the max, not the absolute max: values below -max are not clipped
    w2 = torch.tensor([-3.0, 0.5, 1.0])
    torch.testing.assert_close(quantize_8bit(w2), torch.round(w2 * 127) / 127)
    assert torch.isfinite(quantize_8bit(torch.zeros(3))).all()


# ----------------------------------------------------------------------------------------------- layers
def reference_quant_conv(conv: QuantConv2d, x: torch.Tensor) -> torch.Tensor:
    """conv of independently quantized input and weight (brute-force projection, written from the spec)."""
    bit, power = conv.config.bit, conv.config.power
    alpha_a, alpha_w = conv.act_alpha.item(), conv.weight_alpha.item()
    x_q = alpha_a * brute_force((x / alpha_a).clamp(max=1), levels(bit, power))
    w_levels = levels(bit, power, signed=True)
    w = conv.weight.detach()
    assert torch.equal(away_from_midpoints(w.reshape(-1), alpha_w, w_levels), w.reshape(-1))  # seed ok
    w_q = alpha_w * brute_force((standardised(w) / alpha_w).clamp(-1, 1), w_levels.double()).float()
    return F.conv2d(x_q, w_q, conv.bias, conv.stride, conv.padding)


@pytest.mark.parametrize(("bit", "power"), [(2, True), (3, True), (4, False), (5, True), (6, True)])
def test_quant_conv_equals_conv_of_quantized_input_and_weight(bit, power):
    torch.manual_seed(bit)
    conv = QuantConv2d(6, 8, 3, stride=2, padding=1, bit=bit, power=power)
    with torch.no_grad():
        conv.act_alpha.fill_(2.5)
        conv.weight_alpha.fill_(1.75)
    x = torch.relu(torch.randn(2, 6, 9, 9)) * 2
    torch.testing.assert_close(conv(x), reference_quant_conv(conv, x), rtol=1e-5, atol=1e-5)


def test_quant_conv_parameters_buffers_and_state_dict():
    conv = QuantConv2d(4, 8, 3, padding=1, bit=4, power=True)
    assert dict(conv.named_parameters()).keys() == {"weight", "weight_alpha", "act_alpha"}
    assert list(conv.state_dict()) == ["weight", "weight_alpha", "act_alpha"]  # level buffers not saved
    assert conv.weight_alpha.shape == () and conv.act_alpha.shape == ()
    assert conv.weight_alpha.item() == WEIGHT_ALPHA_INIT == 3.0
    assert conv.act_alpha.item() == ACT_ALPHA_INIT == 8.0
    assert torch.equal(conv.act_levels, levels(4, True))
    assert torch.equal(conv.weight_levels, levels(4, True, signed=True))
    assert "bit=4, power=True" in repr(conv)
    with_bias = QuantConv2d(4, 8, 1, bias=True, bit=3, power=False)
    assert list(with_bias.state_dict()) == ["weight", "bias", "weight_alpha", "act_alpha"]


def test_quant_conv_at_32_bits_is_a_plain_conv():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 5, 3, stride=1, padding=1, bit=32, power=True)
    assert list(conv.state_dict()) == ["weight"]
    plain = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(conv(x), plain(x))


def test_quant_conv_gradients_reach_every_parameter():
    conv = QuantConv2d(4, 6, 3, padding=1, bit=5, power=True)
    with torch.no_grad():
        conv.act_alpha.fill_(1.0)  # some inputs clip, so dL/dalpha_a has both terms
    x = torch.relu(torch.randn(2, 4, 8, 8)).requires_grad_()
    conv(x).square().sum().backward()
    for name, p in [*conv.named_parameters(), ("input", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_quantizer_functions_work_without_grad_and_on_other_dtypes():
    lv = levels(3, power=True)
    x = torch.rand(4, 5) * 3
    with torch.no_grad():
        out = quantize_activation(x, torch.tensor(2.0), lv, lookup_table(lv))
    assert torch.equal(out, 2.0 * brute_force((x / 2.0).clamp(max=1), lv))
    out64 = quantize_activation(x.double(), torch.tensor(2.0, dtype=torch.float64), lv, None)
    assert out64.dtype == torch.float64


def test_a_table_of_another_dtype_is_refused_not_worked_around():
    """A float32 table (the layers' buffers) with float64 input: one line saying so, not a silent switch to
    the level-set search (host syncs and data-dependent shapes, which break a compiled or captured step)."""
    lv = levels(3, power=True)
    x = torch.rand(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^nearest_level: the lookup table is torch.float32 on cpu but the "
                                         r"input is torch.float64 on cpu; move the model"):
        nearest_level(x, lv, lookup_table(lv))
    with pytest.raises(ValueError, match=r"the lookup table is torch.float32"):
        quantize_activation(x, torch.tensor(2.0, dtype=torch.float64), None, lookup_table(lv))


def test_8bit_layers():
    torch.manual_seed(0)
    conv, fc = Conv2d8bit(1, 4, 7, stride=2, padding=3, bias=False), Linear8bit(8, 3)
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(conv(x), F.conv2d(x, quantize_8bit(conv.weight), None, 2, 3))
    h = torch.randn(2, 8)
    torch.testing.assert_close(fc(h), F.linear(h, quantize_8bit(fc.weight), fc.bias))
    assert list(conv.state_dict()) == ["weight"] and list(fc.state_dict()) == ["weight", "bias"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quant_conv_on_cuda_matches_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare full float32 convs
    torch.manual_seed(0)
    conv = QuantConv2d(8, 8, 3, padding=1, bit=5, power=True)
    w = conv.weight.detach().reshape(-1)
    assert torch.equal(away_from_midpoints(w, WEIGHT_ALPHA_INIT, levels(5, True, True)), w)  # seed ok
    x = torch.relu(torch.randn(4, 8, 10, 10)) * 4
    x.requires_grad_()
    expected = conv(x)
    expected.square().sum().backward()
    cpu_grads = [p.grad.clone() for p in (x, conv.weight, conv.weight_alpha, conv.act_alpha)]
    conv.zero_grad()
    conv = conv.cuda()
    assert conv.act_table.is_cuda and conv.weight_levels.is_cuda
    x_cuda = x.detach().cuda().requires_grad_()
    got = conv(x_cuda)
    got.square().sum().backward()
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    cuda_grads = [p.grad.cpu() for p in (x_cuda, conv.weight, conv.weight_alpha, conv.act_alpha)]
    for a, b in zip(cuda_grads, cpu_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("bit", "power", "signed"), ALL_LEVEL_SETS, ids=LEVEL_IDS)
def test_projection_on_cuda_equals_brute_force(bit, power, signed):
    lv = levels(bit, power, signed)
    u = hard_inputs(lv, seed=bit)
    expected = brute_force(u, lv)
    lv_cuda, u_cuda = lv.cuda(), u.cuda()
    assert torch.equal(project(u_cuda, lv_cuda).cpu(), expected)
    table = lookup_table(lv_cuda)
    assert table.is_cuda and torch.equal(table.cpu(), lookup_table(lv))
    assert torch.equal(project_table(u_cuda, table).cpu(), expected)


# ------------------------------------------------------------------------------ the paper's projection
def _paper_projection(power: bool):
    """The reference code's projection, written as it is there: an exhaustive |x - level| search (APoT;
    signed weights search the magnitudes and keep the sign) or ``round()`` on the uniform grid."""

    def nearest(u: torch.Tensor, level_set: torch.Tensor) -> torch.Tensor:
        signed = bool(level_set[0] < 0)
        if not power:
            steps = (level_set.numel() - 1) // 2 if signed else level_set.numel() - 1
            return (u.clamp(-1 if signed else 0, 1) * steps).round() / steps
        values = level_set[level_set >= 0].to(u.dtype) if signed else level_set.to(u.dtype)
        x = u.clamp(-1, 1).abs() if signed else u.clamp(0, 1)
        index = (x.unsqueeze(0) - values.view(-1, *([1] * x.dim()))).abs().min(dim=0)[1]
        return values[index] * u.sign() if signed else values[index]

    return nearest


@pytest.mark.parametrize("power", [True, False], ids=["apot", "uniform"])
def test_three_projections_agree_except_on_midpoints(power: bool) -> None:
    """``project``, ``project_table`` and the reference code's projection give the same level off the
    midpoints between two levels; on a midpoint apot's two take the lower level, while the reference's
    ``round()`` (uniform) rounds half to even and its search (signed APoT) keeps the smaller magnitude."""
    reference = _paper_projection(power)
    differ_on_ties = 0
    for bit, signed in itertools.product(LEVEL_BITS, (True, False)):
        lv = levels(bit, power=power, signed=signed)
        u = torch.rand(20000, generator=torch.Generator().manual_seed(bit)) * 3 - 1.5
        u = u[(u.unsqueeze(1) - midpoints(lv)).abs().min(1)[0] > 1e-4]
        table = project_table(u, lookup_table(lv, TABLE_SCALE))
        assert torch.equal(table, project(u, lv)), (bit, signed)
        assert torch.equal(table, reference(u, lv)), (bit, signed)
        ties = midpoints(lv)
        assert torch.equal(project_table(ties, lookup_table(lv, TABLE_SCALE)), project(ties, lv))
        differ_on_ties += int((reference(ties, lv) != project(ties, lv)).sum())
    assert differ_on_ties > 0  # the stated exception is real: the reference is not tie-exact
