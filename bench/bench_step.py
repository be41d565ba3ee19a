"""Time one training step (forward, backward, SGD step) of a quantized ResNet against full precision.

    python bench/bench_step.py                      # ResNet-18 width 16, batch 128, 1x28x28, CPU
    python bench/bench_step.py --threads 1 --steps 30

For every bit width and quantizer (APoT, uniform) the step is timed with three projections onto the levels,
all in the same process and interleaved round by round so that drift (other jobs on the machine, thermal
state) hits every column alike:

    table      what apot's layers use: ``apot.quant.project_table`` (an exact lookup table)
    bucketize  ``apot.quant.project``: ``torch.bucketize`` on the midpoints of the levels
    reference  the paper's code: ``(x.unsqueeze(0) - levels.view(-1, 1, ...)).abs().min(dim=0)``, a
               (levels x elements) temporary; sign and magnitude for the weights; ``round()`` for uniform

Only the projection is swapped (``apot.quant.nearest_level``); the rest of the step is apot's. The table
reports the median ms/step of the ``table`` projection and, for each projection, the ratio of its median
step to the median full-precision step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F

import apot.quant
from apot.models import create_model

PROJECTIONS = ("table", "bucketize", "reference")


def reference_projection(power: bool) -> Callable[..., torch.Tensor]:
    """The paper's projection: exhaustive |x - level| search (APoT) or round() (uniform)."""

    def nearest(u: torch.Tensor, level_set: torch.Tensor | None, table: torch.Tensor | None = None) -> torch.Tensor:
        level_set = apot.quant.table_levels(table) if level_set is None else level_set  # layers pass tables
        signed = bool(level_set[0] < 0)
        if not power:
            steps = (level_set.numel() - 1) // 2 if signed else level_set.numel() - 1
            return (u.clamp(-1 if signed else 0, 1) * steps).round() / steps
        values = level_set[level_set >= 0].to(u.dtype) if signed else level_set.to(u.dtype)
        x = u.clamp(-1, 1).abs() if signed else u.clamp(0, 1)
        index = (x.unsqueeze(0) - values.view(-1, *([1] * x.dim()))).abs().min(dim=0)[1]
        return values[index] * u.sign() if signed else values[index]

    return nearest


def bucketize_projection(u: torch.Tensor, level_set: torch.Tensor | None, table: torch.Tensor | None = None):
    return apot.quant.project(u, apot.quant.table_levels(table) if level_set is None else level_set)


def make_step(bit: int, power: bool, args: argparse.Namespace) -> Callable[[], None]:
    """A closure running one SGD step of a fresh model on a fixed random batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=gen).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(args.device)
    torch.manual_seed(0)
    model = create_model(args.arch, bit=bit, power=power, width=args.width).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(step: Callable[[], None], projection: Callable | None, device: str) -> float:
    """Seconds for one step with ``projection`` patched in (None: apot's own)."""
    patch = contextlib.nullcontext()
    if projection is not None:
        patch = mock.patch.object(apot.quant, "nearest_level", projection)
    with patch:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=15, help="timed rounds (one step per configuration each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--bits", type=int, nargs="+", default=[5, 4, 3, 2])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--projections", nargs="+", default=list(PROJECTIONS), choices=PROJECTIONS,
                   help="projections to time ('table' always is)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quantizers = [("APoT", True), ("uniform", False)]
    args.projections = ["table"] + [p for p in args.projections if p != "table"]
    runs: dict[tuple, tuple[Callable[[], None], Callable | None]] = {}
    runs[("FP32", 32, "table")] = (make_step(32, True, args), None)
    for name, power in quantizers:
        for bit in args.bits:
            step = make_step(bit, power, args)
            projections = {
                "table": None,
                "bucketize": bucketize_projection,
                "reference": reference_projection(power),
            }
            for proj in args.projections:
                runs[(name, bit, proj)] = (step, projections[proj])

    load_before = os.getloadavg()
    times: dict[tuple, list[float]] = {key: [] for key in runs}
    keys = list(runs)
    for round_ in range(args.warmup + args.steps):
        order = keys[round_ % len(keys):] + keys[: round_ % len(keys)]  # rotate so no key always runs first
        for key in order:
            seconds = timed(*runs[key], args.device)
            if round_ >= args.warmup:
                times[key].append(seconds)
    load_after = os.getloadavg()

    median = {key: statistics.median(v) for key, v in times.items()}
    base = median[("FP32", 32, "table")]
    print(
        f"{args.arch} width {args.width}, batch {args.batch}, 1x28x28, {args.device} "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.steps} steps after {args.warmup} warm-up, "
        f"configurations interleaved; load average {load_before[0]:.1f} -> {load_after[0]:.1f}\n"
    )
    header = ["quantizer", "bits", "ms/step", "ratio vs FP32"]
    header += [f"{p} ratio" for p in args.projections if p != "table"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    print(f"| FP32 | 32 | {base * 1e3:.1f} | 1.00 |" + " |" * (len(header) - 4))
    for name, _ in quantizers:
        for bit in args.bits:
            row = [name, str(bit), f"{median[(name, bit, 'table')] * 1e3:.1f}"]
            row += [f"{median[(name, bit, p)] / base:.2f}" for p in args.projections]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
