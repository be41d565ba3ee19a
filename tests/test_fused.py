"""The CPU step's fast path: the fused quantizer kernels (apot/fused.py) against the torch operations they
replace, layouts kept, and the whole channels_last + fused step against the plain NCHW eager step."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from apot import fused
from apot.layers import QuantConv2d
from apot.models import create_model, list_models
from apot.quant import (
    LEVEL_BITS,
    TABLE_SCALE,
    in_memory_order,
    levels,
    lookup_table,
    midpoints,
    project_table,
    quantize_activation,
    quantize_weight,
)
from apot.step import build_step, in_layout, step_memory_format

CL = torch.channels_last
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")
needs_kernels = pytest.mark.skipif(fused.library() is None,
                                   reason=f"fused kernels not built: {fused.error()}")


def _near_every_midpoint(level_set: torch.Tensor, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``shape`` whose values / ``scale`` include every midpoint, its float32 neighbours, the
    levels, the clip (1, -1) and beyond, then random values: where a wrong compare or mask would show."""
    bounds = midpoints(level_set)
    special = torch.cat([bounds, torch.nextafter(bounds, torch.full_like(bounds, 9.0)),
                         torch.nextafter(bounds, torch.full_like(bounds, -9.0)), level_set,
                         torch.tensor([1.0, -1.0, 1.5, -1.5, 0.0, 40.0])]) * scale
    gen = torch.Generator().manual_seed(len(level_set))
    values = (torch.rand(shape, generator=gen) * 2.6 - 1.3) * scale
    flat = values.view(-1)
    flat[: special.numel()] = special
    return values


def _run(fn, *inputs: torch.Tensor, use_kernels: bool, g: torch.Tensor):
    """(out, grads of every input) of ``fn`` with the kernels on or off."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with contextlib.nullcontext() if use_kernels else fused.disabled():
        out = fn(*leaves)
        out.backward(g)
    return out.detach(), [t.grad for t in leaves]


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("power", [True, False], ids=["apot", "uniform"])
@pytest.mark.parametrize("bit", LEVEL_BITS)
def test_kernels_equal_the_torch_operations(bit: int, power: bool, layout: str) -> None:
    """Outputs and input gradients bit for bit, in the input's layout; alpha gradients to float32 rounding
    (the kernels sum in double, torch in float32)."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(bit)
    act_levels, weight_levels = levels(bit, power), levels(bit, power, signed=True)
    act_table, weight_table = lookup_table(act_levels, TABLE_SCALE), lookup_table(weight_levels, TABLE_SCALE)
    x = _near_every_midpoint(act_levels, 2.5, (8, 16, 5, 5)).clamp(min=0).contiguous(memory_format=fmt)
    w = torch.randn(16, 8, 3, 3, generator=gen).contiguous(memory_format=fmt)
    alpha_x, alpha_w = torch.tensor(2.5), torch.tensor(1.3)
    cases = [
        (lambda x, a: quantize_activation(x, a, None, act_table), x, alpha_x),
        (lambda w, a: quantize_weight(w, a, None, weight_table), w, alpha_w),
        (lambda w, a: quantize_weight(w, a, None, weight_table, ws_grad=True), w, alpha_w),
    ]
    for fn, t, alpha in cases:
        g = torch.randn(t.shape, generator=gen).contiguous(memory_format=fmt)
        out, (grad_t, grad_alpha) = _run(fn, t, alpha, use_kernels=True, g=g)
        ref, (ref_grad_t, ref_grad_alpha) = _run(fn, t, alpha, use_kernels=False, g=g)
        assert torch.equal(out, ref)
        assert out.is_contiguous(memory_format=fmt) and grad_t.is_contiguous(memory_format=fmt)
        assert torch.equal(grad_t, ref_grad_t)
        torch.testing.assert_close(grad_alpha, ref_grad_alpha, rtol=1e-5, atol=1e-4)


def test_project_table_keeps_channels_last_without_copying_it() -> None:
    lv = levels(3, True)
    u = torch.rand(4, 6, 5, 5).contiguous(memory_format=CL)
    q = project_table(u, lookup_table(lv))
    assert q.is_contiguous(memory_format=CL) and not q.is_contiguous()
    assert torch.equal(q, project_table(u.contiguous(), lookup_table(lv)))
    assert in_memory_order(u).data_ptr() == u.data_ptr()  # a view, not a copy


def test_in_layout_puts_one_channel_in_channels_last_strides() -> None:
    x = torch.randn(3, 1, 28, 28)
    assert x.contiguous(memory_format=CL).stride() == x.stride()  # what torch does for one channel
    y = in_layout(x, CL)
    assert y.stride() == (784, 1, 28, 1) and torch.equal(y, x)
    assert F.conv2d(y, torch.randn(4, 1, 3, 3)).is_contiguous(memory_format=CL)  # the stem answers in CL
    assert step_memory_format(CPU) == CL


def test_without_a_compiler_the_quantizers_run_as_torch_operations(monkeypatch) -> None:
    monkeypatch.setattr(fused, "_state", {"lib": None, "error": None, "enabled": True})
    monkeypatch.setenv("CC", "no-such-compiler-here")
    lv = levels(2, True)
    x = torch.rand(2, 3, 4, 4) * 4
    out = quantize_activation(x, torch.tensor(2.0), None, lookup_table(lv))
    assert fused.library() is None and "no C compiler 'no-such-compiler-here'" in fused.error()
    assert torch.equal(out, project_table(x / 2.0, lookup_table(lv)) * 2.0)


def test_a_kernel_cache_others_can_write_is_refused(monkeypatch, tmp_path) -> None:
    """The built library runs as this user: a cache folder that others can write is not loaded from."""
    cache = tmp_path / "kernels"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.setattr(fused, "_state", {"lib": None, "error": None, "enabled": True, "claimed_s": 0.0})
    monkeypatch.setenv("APOT_KERNEL_CACHE", str(cache))
    assert fused.library() is None
    assert "is not private" in fused.error() and not list(cache.iterdir())


def _forward_backward(arch: str, bit: int, power: bool, memory_format: torch.memory_format, kernels: bool,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Logits, loss and every gradient (input, weights, both alphas) of one forward/backward of a tiny model
    on a fixed batch, in ``memory_format``, with the fused kernels or torch operations."""
    torch.manual_seed(0)
    model = create_model(arch, bit=bit, power=power, width=8).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 28, 28, generator=gen).to(dtype).requires_grad_()
    y = torch.randint(0, 10, (16,), generator=gen)
    with contextlib.nullcontext() if kernels else fused.disabled():
        logits = model(in_layout(x, memory_format))
        loss = F.cross_entropy(logits, y)
        loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach(), "input": x.grad}
    out.update({f"{name}.grad": p.grad for name, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("power", [True, False], ids=["apot", "uniform"])
@pytest.mark.parametrize("bit", [2, 5])
@pytest.mark.parametrize("arch", list_models())
def test_cpu_step_matches_the_plain_nchw_eager_step(arch: str, bit: int, power: bool) -> None:
    """The CPU step (``step_memory_format``: channels_last, fused kernels) against the plain step (NCHW, torch
    operations) on the same batch, in two parts, because float32 convolutions in another layout sum in another
    order and, over ~10^5 quantized values, some value lies within that rounding of a midpoint and takes the
    other level (which a deep, tiny, untrained model then magnifies without bound):

    1. float32, the step's layout: the kernels against torch operations. Logits, loss, input and weight
       gradients bit for bit; the alpha gradients (sums that cancel to ~1e-5 of their absolute sum, summed in
       double by the kernels and in float32 by torch) within 1e-3 relative or 1e-4 of the model's largest
       alpha gradient.
    2. float64 (torch operations: the kernels are float32 only), the step's layout against NCHW: everything
       within 1e-9 relative or 1e-9 of its tensor's largest magnitude.
    """
    step_format = step_memory_format(CPU)
    fast = _forward_backward(arch, bit, power, step_format, kernels=True)
    plain = _forward_backward(arch, bit, power, step_format, kernels=False)
    alphas = [k for k in fast if k.endswith(("weight_alpha.grad", "act_alpha.grad"))]
    convs = sum(isinstance(m, QuantConv2d) for m in create_model(arch, bit, width=4).modules())
    assert len(alphas) == 2 * convs
    alpha_scale = max(plain[k].abs().item() for k in alphas)
    for key in fast:
        if key in alphas:
            torch.testing.assert_close(fast[key], plain[key], rtol=1e-3, atol=1e-4 * alpha_scale,
                                       msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(fast[key], plain[key]), key
    wide = _forward_backward(arch, bit, power, step_format, kernels=True, dtype=torch.float64)
    nchw = _forward_backward(arch, bit, power, torch.contiguous_format, kernels=True, dtype=torch.float64)
    for key in wide:
        scale = nchw[key].abs().max().item()
        torch.testing.assert_close(wide[key], nchw[key], rtol=1e-9, atol=1e-9 * scale,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_the_built_cpu_step_runs_channels_last_through_the_kernels() -> None:
    """``build_step`` on a CPU: the quantized convolutions see channels_last inputs the kernels take, and one
    SGD step equals the same step with torch operations (weights bit for bit, alphas to float32 rounding)."""
    results, seen = [], []
    for kernels in (True, False):
        torch.manual_seed(0)
        model = create_model("resnet10", bit=2, power=True, width=4)
        conv = model.layer1[0].conv1
        conv.register_forward_pre_hook(lambda m, args: seen.append(
            (args[0].is_contiguous(memory_format=CL), fused.usable(args[0], m.act_table))))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = build_step(model, opt, F.cross_entropy, mode="eager", device=CPU)
        gen = torch.Generator().manual_seed(2)
        with contextlib.nullcontext() if kernels else fused.disabled():
            x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
            loss, _ = step(x, y)
        results.append((loss, dict(model.named_parameters())))
    assert step.memory_format == CL and seen[0] == (True, True) and seen[1][0]
    (fast_loss, fast), (plain_loss, plain) = results
    assert torch.equal(fast_loss, plain_loss)
    for name, value in fast.items():
        if name.endswith("alpha"):
            torch.testing.assert_close(value, plain[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, plain[name]), name
