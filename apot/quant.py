"""APoT and uniform quantizers: level sets, nearest-level projection, custom autograd.

Everything is in units of a learnable clipping threshold alpha, so the largest level is 1. A quantizer maps
a real tensor ``t`` to ``alpha * P(u)`` with ``u = t / alpha`` and ``P`` the projection onto the nearest
level of a fixed set (Li, Dong and Wang, "Additive Powers-of-Two Quantization", ICLR 2020).

Public pieces:
    ``levels``        the sorted level set of a bit width and quantizer (APoT or uniform, signed or not)
    ``midpoints``     the decision boundaries between consecutive levels
    ``project``       nearest-level projection (``torch.bucketize`` on the midpoints; no levels x elements)
    ``lookup_table`` / ``project_table``   the same projection through a lookup table, 2-3x faster on CPU;
                      ``TABLE_SCALE`` pads every table to one shape (one compiled graph for all variants)
    ``nearest_level`` the projection the quantizers call (the table when given one, else ``project``)
    ``standardisation`` / ``standardise``   the weight's centring and unbiased std (one computation for both
                      weight quantizers and the calibration)
    ``WeightQuantFn`` / ``ActQuantFn``   the custom autograd of the weight and activation quantizers (float32
                      CPU tensors through the fused kernels of `apot.fused`, others as torch operations)
    ``quantize_weight`` / ``quantize_activation`` / ``quantize_8bit``   the functions the layers call
    ``QuantConfig``   (bit, power), validated at construction
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from apot import fused
from apot.recipe import FP32_BIT

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, FP32_BIT)
"""Bit widths a model can be built with; 32 means full precision (no quantization)."""

FULL_PRECISION = FP32_BIT
LEVEL_BITS: tuple[int, ...] = tuple(b for b in SUPPORTED_BITS if b != FULL_PRECISION)
"""Bit widths that have a level set."""

WEIGHT_ALPHA_INIT = 3.0
"""Initial clipping threshold of the (standardised) weights at construction (``apot.calibrate`` may then
set a per-bit one)."""
ACT_ALPHA_INIT = 8.0
"""Initial clipping threshold of the (post-ReLU) activations at construction (see ``apot.calibrate``)."""

# APoT base sets of the unsigned b-bit level set, as exponents k of 2**-k; every set also holds 0.
# A level is one term from each set summed, then everything is divided by the largest sum.
_APOT_EXPONENTS: dict[int, tuple[tuple[int, ...], ...]] = {
    2: ((1, 2, 3),),
    3: ((1, 2, 4), (3,)),
    4: ((1, 3, 5), (2, 4, 6)),
    5: ((1, 3, 6), (2, 4, 7), (5,)),
    6: ((1, 4, 7), (2, 5, 8), (3, 6, 9)),
}


def _check_bit(bit: int, allowed: tuple[int, ...]) -> None:
    if isinstance(bit, bool) or not isinstance(bit, int) or bit not in allowed:
        raise ValueError(f"bit must be one of {allowed}, got {bit!r}")


def _magnitudes(bit: int, power: bool) -> list[float]:
    """Unsigned level values (float64 Python floats) of a ``bit``-bit quantizer, ``bit`` in 1..6.

    One bit is {0, 1} for both quantizers (the reference's uniform 1-bit magnitude).
    """
    if bit == 1 or not power:
        steps = 2**bit - 1
        return [k / steps for k in range(steps + 1)]
    bases = [[0.0] + [2.0**-k for k in exps] for exps in _APOT_EXPONENTS[bit]]
    sums = sorted({sum(terms) for terms in itertools.product(*bases)})
    return [s / sums[-1] for s in sums]


def levels(bit: int, power: bool = True, signed: bool = False) -> torch.Tensor:
    """The sorted level set of a ``bit``-bit quantizer, in units of alpha (float32, 1-D, max 1).

    Args:
        bit: bit width, one of 2..6.
        power: True for APoT (sums of powers of two), False for uniform.
        signed: False for activations (levels in [0, 1], ``2**bit`` of them); True for weights: the sign
            and the ``bit - 1``-bit magnitude set (levels in [-1, 1], ``2**bit - 1`` of them). 2-bit
            weights are ternary {-1, 0, 1} for both quantizers.

    APoT b-bit activations: every sum of one term from each base set of ``_APOT_EXPONENTS[b]`` (0
    included), divided by the largest sum; uniform: k / (2**b - 1). Uniform weights: ±k / (2**(b-1) - 1).
    """
    _check_bit(bit, LEVEL_BITS)
    mags = _magnitudes(bit - 1 if signed else bit, power)
    values = sorted({-m for m in mags if m > 0} | set(mags)) if signed else mags
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def midpoints(level_set: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decision boundaries of ``project``: the midpoints of consecutive levels, as ``dtype``.

    The exact midpoint (computed in float64, exact for float32 levels) is rounded DOWN to ``dtype`` where
    it is not representable, so for every ``u`` of that dtype ``u <= bound[i]`` holds exactly when ``u`` is
    no farther from level ``i`` than from level ``i + 1``.
    """
    dtype = level_set.dtype if dtype is None else dtype
    wide = level_set.to(torch.float64)
    exact = (wide[1:] + wide[:-1]) / 2
    bounds = exact.to(dtype)
    lower = torch.nextafter(bounds, torch.full_like(bounds, float("-inf")))
    return torch.where(bounds.to(torch.float64) > exact, lower, bounds)


def project(u: torch.Tensor, level_set: torch.Tensor, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest level of ``level_set`` (sorted, 1-D) for every element of ``u``; ties go to the LOWER level.

    Equal to ``level_set[argmin_l |u - l|]`` with argmin taking the first minimum, but computed with
    ``torch.bucketize`` on the midpoints of consecutive levels: O(elements * log(levels)) time and no
    (levels x elements) temporary. Values beyond the extreme levels map to them, so with levels spanning
    [-1, 1] (or [0, 1]) ``project(u) == project(clip(u))``.

    Args:
        u: any shape, floating point.
        level_set: sorted 1-D levels.
        bounds: ``midpoints(level_set, u.dtype)`` if already at hand.
    """
    if bounds is None or bounds.dtype != u.dtype or bounds.device != u.device:
        bounds = midpoints(level_set.to(u.device), u.dtype)
    index = torch.bucketize(u, bounds)  # right=False: u == bounds[i] -> i, the lower level
    return level_set.to(u.dtype)[index]


_MAX_TABLE_SCALE = 2**16


def lookup_table(level_set: torch.Tensor, scale: int | None = None) -> torch.Tensor:
    """Lookup table of ``project_table``, an exact and faster ``project`` for levels within [-1, 1].

    The range [-1, 1) is cut into n = 2S bins of width 1/S, S the smallest power of two that leaves at most
    one midpoint (``midpoints``) per bin, or ``scale`` if given (a power of two at least that large: a finer
    table, same projections; the layers use `TABLE_SCALE` so every level set has one table shape). For bin
    k, column k holds: row 0 the midpoint inside the bin (+inf if none), row 1 the nearest level of the
    bin's points up to that midpoint, row 2 of those above it. Shape (3, n), dtype of ``level_set``.
    """
    if level_set.numel() < 2 or level_set.min() < -1 or level_set.max() > 1:
        raise ValueError("lookup_table needs at least two levels, all within [-1, 1]")
    device, level_set = level_set.device, level_set.cpu()  # built once, on the CPU
    bounds = midpoints(level_set)
    wide = bounds.to(torch.float64)
    needed = 1
    while torch.unique(torch.floor(wide * needed)).numel() < bounds.numel():
        needed *= 2
        if needed > _MAX_TABLE_SCALE:
            raise ValueError("levels too close together for a lookup table; use project()")
    if scale is not None and (scale < needed or scale & (scale - 1)):
        raise ValueError(f"lookup_table scale {scale}: must be a power of two >= {needed} for these levels")
    scale = needed if scale is None else scale
    left = torch.arange(-scale, scale, dtype=torch.float64) / scale  # bin k is [left[k], left[k] + 1/S)
    below = torch.bucketize(left, wide)  # #midpoints < left[k]: the nearest level at the bin's left edge
    table = torch.full((3, 2 * scale), float("inf"), dtype=level_set.dtype)
    table[0, (torch.floor(wide * scale) + scale).long()] = bounds
    table[1] = level_set[below]
    table[2] = level_set[(below + 1).clamp(max=level_set.numel() - 1)]
    return table.to(device)


def _padded_scale() -> int:
    """The largest table scale any supported level set needs (see `TABLE_SCALE`)."""
    return max(
        lookup_table(levels(bit, power, signed)).shape[1] // 2
        for bit in LEVEL_BITS for power in (True, False) for signed in (True, False)
    )


def in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` as a 1-D tensor in the order they lie in memory: a view for contiguous and
    ``channels_last`` tensors (``reshape(-1)`` would copy the latter), a copy in logical order otherwise.
    ``torch.empty_like(t)`` has the same order, so an elementwise result can be written through it."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)
    return t.reshape(-1)


def project_table(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``project(u, level_set)`` through ``table = lookup_table(level_set)``; the same values, bit for bit.

    Bin k = floor(u * S) + S (exact: S is a power of two; clamped to the table), then one gather of the bin's
    midpoint, one compare, one gather of the level: a few cheap passes instead of a binary search per
    element. Needs ``u.dtype == table.dtype`` (the midpoints are rounded for that dtype). NaN maps to the
    level at -1 (or 0). The result has ``u``'s memory layout (NCHW or ``channels_last``).
    """
    bins = table.shape[1]
    scale = bins // 2
    flat = in_memory_order(u)
    k = (flat * scale).floor_().add_(scale).clamp_(0, bins - 1).nan_to_num_(0).int()
    k.add_(flat > table[0].index_select(0, k), alpha=bins)  # column k of row 1, or of row 2 if above
    levels_of_bins = table[1:].reshape(-1)
    if not (u.is_contiguous() or (u.dim() == 4 and u.is_contiguous(memory_format=torch.channels_last))):
        return levels_of_bins.index_select(0, k).reshape(u.shape)
    out = torch.empty_like(u)  # u's layout; written in memory order through its 1-D view
    torch.index_select(levels_of_bins, 0, k, out=in_memory_order(out))
    return out


TABLE_SCALE: int = _padded_scale()
"""One table scale for every level set (512: 6-bit APoT activations need it): tables of every bit width and
quantizer then have the same shape (3, 2 * TABLE_SCALE), so a compiled graph is shared by all of them
(`apot.step`). Projections are the same as with the smallest table (tests/test_step.py)."""


def table_levels(table: torch.Tensor) -> torch.Tensor:
    """The level set ``table = lookup_table(level_set)`` was built from, exactly: every level is the nearest
    level just above some midpoint (row 2 of that midpoint's bin) or of the lowest bin (row 1)."""
    return torch.unique(table[1:])


def nearest_level(
    u: torch.Tensor, level_set: torch.Tensor | None, table: torch.Tensor | None = None
) -> torch.Tensor:
    """The projection the quantizers use: ``project_table`` when a table is given (the layers keep one per
    level set), else ``project`` on ``level_set``. Both give the same values. The layers pass only the
    table: a compiled graph's inputs are then the same shape for every bit width (`TABLE_SCALE`).

    Raises:
        ValueError: a table of another dtype or device than ``u`` (its midpoints are rounded for its dtype;
            rather than fall back to ``project``, whose data-dependent shapes and host syncs would break a
            compiled or captured step, this says so), or neither a table nor a level set.
    """
    if table is not None:
        if table.dtype != u.dtype or table.device != u.device:
            raise ValueError(f"nearest_level: the lookup table is {table.dtype} on {table.device} but the "
                             f"input is {u.dtype} on {u.device}; move the model (its tables are buffers) "
                             "to the input's dtype and device, or pass the level set without a table")
        return project_table(u, table)
    if level_set is None:
        raise ValueError("nearest_level needs a level set or a lookup table")
    return project(u, level_set)


def _keep_within(t: torch.Tensor, u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """t * [low <= u <= high] in one fused pass, without a boolean mask.

    ``aten.hardtanh_backward(t, u, a, b)`` keeps t where a < u < b (strictly); a and b are moved one float
    outwards so that the bounds themselves are kept.
    """
    eps = torch.finfo(u.dtype).eps
    return torch.ops.aten.hardtanh_backward(t, u, low * (1 + eps), high * (1 + eps))


def _project_and_save(ctx, u: torch.Tensor, alpha: torch.Tensor, level_set, table, *saved) -> torch.Tensor:
    """The quantizers' common forward: ``alpha * P(u)``, saving ``(u, P(u), *saved)`` and alpha's shape."""
    q = nearest_level(u, level_set, table)
    ctx.save_for_backward(u, q, *saved)
    ctx.alpha_shape = alpha.shape
    return q * alpha


def _alpha_grad(ctx, g: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """dL/dalpha = sum g * slope, in alpha's shape (summed in memory order when both share a layout)."""
    if g.stride() == slope.stride():
        return torch.dot(in_memory_order(g), in_memory_order(slope)).reshape(ctx.alpha_shape)
    return torch.dot(g.reshape(-1), slope.reshape(-1)).reshape(ctx.alpha_shape)


def _bound(value: float, dtype: torch.dtype) -> float:
    """``value`` moved one float outwards, as `_keep_within` moves its bounds (the fused kernels' mask)."""
    return value * (1 + torch.finfo(dtype).eps)


def standardisation(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean(w), w - mean(w), std(w)) with the unbiased std sqrt(sum (w - mean)^2 / (n - 1)), two-pass
    (faster than ``torch.std`` on a CPU). Differentiable; both weight quantizers and the calibration use
    it."""
    mean = w.mean()
    centred = w - mean
    flat = centred.reshape(-1)
    return mean, centred, (torch.dot(flat, flat) / (flat.numel() - 1)).sqrt()


class WeightQuantFn(torch.autograd.Function):
    """Weight quantizer: standardise, then project, with the paper's calibrated (unclipped) gradient.

    forward:  w' = (w - mean(w)) / std(w)    (mean and unbiased std: constants to autograd)
              u = w' / alpha;  out = alpha * P(clip(u, -1, 1))   (P: nearest signed level)
    backward: dL/dw' = g (not clipped), so dL/dw = g / std(w)
              dL/dalpha = sum g * (sign(u) [|u| > 1] + (P(u) - u) [|u| <= 1])
    ``table`` (optional): ``lookup_table(level_set)``, to project faster (then ``level_set`` may be None).
    """

    @staticmethod
    def forward(ctx, w, alpha, level_set, table):
        mean, centred, std = standardisation(w)
        scale = std * alpha
        ctx.fused = fused.usable(w, table)
        if ctx.fused:  # one pass: u = (w - mean) / scale recomputed per element, exactly as below
            ctx.save_for_backward(w, alpha, table, mean, scale, std)
            ctx.alpha_shape = alpha.shape
            return fused.weight_forward(w, mean.item(), scale.item(), alpha.item(), table)
        u = centred.div_(scale)  # w' / alpha; the levels span [-1, 1], so P(u) == P(clip(u))
        return _project_and_save(ctx, u, alpha, level_set, table, std)

    @staticmethod
    def backward(ctx, g):
        if ctx.fused:
            w, alpha, table, mean, scale, std = ctx.saved_tensors
            grad_w, total = fused.weight_backward(
                w, g, mean.item(), scale.item(), std.item(), table, _bound(-1.0, w.dtype),
                _bound(1.0, w.dtype), ctx.needs_input_grad[0])
            grad_alpha = torch.tensor(total, dtype=alpha.dtype).reshape(ctx.alpha_shape)
            return grad_w, grad_alpha if ctx.needs_input_grad[1] else None, None, None
        u, q, std = ctx.saved_tensors
        grad_w = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_w = g / std
        if ctx.needs_input_grad[1]:
            slope = q - _keep_within(u, u, -1.0, 1.0)  # q == sign(u) where |u| > 1
            grad_alpha = _alpha_grad(ctx, g, slope)
        return grad_w, grad_alpha, None, None


class ActQuantFn(torch.autograd.Function):
    """Quantizer of a post-ReLU activation ``x``.

    forward:  u = x / alpha;  out = alpha * P(min(u, 1))   (P: nearest unsigned level)
    backward: dL/dx = g [u <= 1]
              dL/dalpha = sum g * ([u > 1] + (P(u) - u) [u <= 1])
    ``table`` (optional): ``lookup_table(level_set)``, to project faster (then ``level_set`` may be None).
    """

    @staticmethod
    def forward(ctx, x, alpha, level_set, table):
        ctx.fused = fused.usable(x, table)
        if ctx.fused:  # one pass; backward recomputes u and P(u) from x (kept alive by the ReLU anyway)
            ctx.save_for_backward(x, alpha, table)
            ctx.alpha_shape = alpha.shape
            return fused.act_forward(x, alpha.item(), table)
        # the levels span [0, 1], so P(u) == P(min(u, 1))
        return _project_and_save(ctx, x / alpha, alpha, level_set, table)

    @staticmethod
    def backward(ctx, g):
        if ctx.fused:
            x, alpha, table = ctx.saved_tensors
            grad_x, total = fused.act_backward(x, g, alpha.item(), table, _bound(1.0, x.dtype),
                                               ctx.needs_input_grad[0])
            grad_alpha = torch.tensor(total, dtype=alpha.dtype).reshape(ctx.alpha_shape)
            return grad_x, grad_alpha if ctx.needs_input_grad[1] else None, None, None
        u, q = ctx.saved_tensors
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_x = _keep_within(g, u, float("-inf"), 1.0)
        if ctx.needs_input_grad[1]:
            slope = q - _keep_within(u, u, float("-inf"), 1.0)  # q == 1 where u > 1
            grad_alpha = _alpha_grad(ctx, g, slope)
        return grad_x, grad_alpha, None, None


class StandardisedWeightQuantFn(torch.autograd.Function):
    """The projection of ``WeightQuantFn`` for an already standardised weight ``w'``, so that autograd
    differentiates the standardisation itself (``ws_grad``: the reference's MNIST code does this).

    forward:  u = w' / alpha;  out = alpha * P(clip(u, -1, 1))
    backward: dL/dw' = g (not clipped);  dL/dalpha as ``WeightQuantFn``
    """

    @staticmethod
    def forward(ctx, ws, alpha, level_set, table):
        ctx.fused = fused.usable(ws, table)
        if ctx.fused:  # the weight kernels with mean 0, scale alpha: u = (ws - 0) / alpha == ws / alpha
            ctx.save_for_backward(ws, alpha, table)
            ctx.alpha_shape = alpha.shape
            return fused.weight_forward(ws, 0.0, alpha.item(), alpha.item(), table)
        return _project_and_save(ctx, ws / alpha, alpha, level_set, table)

    @staticmethod
    def backward(ctx, g):
        if ctx.fused:
            ws, alpha, table = ctx.saved_tensors
            grad_alpha = None
            if ctx.needs_input_grad[1]:
                _, total = fused.weight_backward(ws, g, 0.0, alpha.item(), 1.0, table, _bound(-1.0, ws.dtype),
                                                 _bound(1.0, ws.dtype), False)
                grad_alpha = torch.tensor(total, dtype=alpha.dtype).reshape(ctx.alpha_shape)
            return g, grad_alpha, None, None
        u, q = ctx.saved_tensors
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            slope = q - _keep_within(u, u, -1.0, 1.0)
            grad_alpha = _alpha_grad(ctx, g, slope)
        return g, grad_alpha, None, None


def standardise(w: torch.Tensor) -> torch.Tensor:
    """w' = (w - mean(w)) / std(w) (`standardisation`): the weight the weight quantizer clips and projects."""
    _, centred, std = standardisation(w)
    return centred / std


def quantize_weight(
    w: torch.Tensor,
    alpha: torch.Tensor,
    level_set: torch.Tensor | None,
    table: torch.Tensor | None = None,
    ws_grad: bool = False,
) -> torch.Tensor:
    """alpha * P(clip(w' / alpha, -1, 1)) with w' = (w - mean(w)) / std(w) (see ``WeightQuantFn``).

    ``ws_grad``: differentiate through the mean and std (``StandardisedWeightQuantFn``) instead of treating
    them as constants; the forward value is the same.
    """
    if ws_grad:
        return StandardisedWeightQuantFn.apply(standardise(w), alpha, level_set, table)
    return WeightQuantFn.apply(w, alpha, level_set, table)


def quantize_activation(
    x: torch.Tensor, alpha: torch.Tensor, level_set: torch.Tensor | None, table: torch.Tensor | None = None
) -> torch.Tensor:
    """alpha * P(min(x / alpha, 1)) of a post-ReLU activation (see ``ActQuantFn``)."""
    return ActQuantFn.apply(x, alpha, level_set, table)


def quantize_8bit(w: torch.Tensor) -> torch.Tensor:
    """8-bit weights of the first and last layers, straight-through gradient (dL/dw = g).

    w_q = round(w / m * 127) / 127 * m with m = max(w) (the maximum, not the absolute maximum, as the
    reference; m == 0 is replaced by 1 to avoid 0/0). Returns w + (w_q - w).detach().
    """
    with torch.no_grad():
        m = w.max()
        m = torch.where(m == 0, torch.ones_like(m), m)
        w_q = (w / m * 127).round() / 127 * m
    return w + (w_q - w.detach())


@dataclass(frozen=True)
class QuantConfig:
    """How a layer quantizes: ``bit`` in ``SUPPORTED_BITS`` (32 = full precision), ``power`` True for
    APoT and False for uniform, ``ws_grad`` True to differentiate through the weight standardisation.
    Validated at construction."""

    bit: int = FULL_PRECISION
    power: bool = True
    ws_grad: bool = False

    def __post_init__(self) -> None:
        _check_bit(self.bit, SUPPORTED_BITS)
        if not isinstance(self.power, bool):
            raise ValueError(f"power must be a bool, got {self.power!r}")
        if not isinstance(self.ws_grad, bool):
            raise ValueError(f"ws_grad must be a bool, got {self.ws_grad!r}")

    @property
    def full_precision(self) -> bool:
        """True when nothing is quantized (bit 32)."""
        return self.bit == FULL_PRECISION

    def weight_levels(self) -> torch.Tensor:
        """Signed level set of the weights (``levels(bit, power, signed=True)``)."""
        return levels(self.bit, self.power, signed=True)

    def act_levels(self) -> torch.Tensor:
        """Unsigned level set of the activations (``levels(bit, power, signed=False)``)."""
        return levels(self.bit, self.power, signed=False)
