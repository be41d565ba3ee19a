"""Time one training step (forward, backward, SGD step) of a quantized ResNet against full precision.

    python bench/bench_step.py                      # ResNet-18 width 16, batch 128, 1x28x28, CPU
    python bench/bench_step.py --threads 1 --steps 30
    python bench/bench_step.py --modes eager compile --bits 4 --projections table   # eager vs compiled
    python bench/bench_step.py --device cuda --modes eager compile cudagraph --bits 4 --projections table

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

``--modes``: the step is built by ``apot.step.build_step`` in each mode (eager, compile, cudagraph; the
other projections are timed eagerly only). Every mode is timed in the same process, interleaved with the
others; FP32 gets its own step per mode, so each mode's ratio is to its own full-precision step. The
compile seconds (the first call, or the warm-up and capture for cudagraph) and the largest loss difference
to the eager step on the same batches are printed per configuration.
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
from apot.step import WARMUP_STEPS, build_step

PROJECTIONS = ("table", "bucketize", "reference")


def reference_projection(power: bool) -> Callable[..., torch.Tensor]:
    """The paper's projection: exhaustive |x - level| search (APoT) or round() (uniform)."""

    def nearest(u: torch.Tensor, level_set: torch.Tensor | None,
                table: torch.Tensor | None = None) -> torch.Tensor:
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


class Step:
    """One SGD step of a fresh model (seed 0) on a fixed random batch, built by ``apot.step.build_step`` in
    ``mode``; keeps every step's loss (to compare modes) and the build's compile seconds."""

    def __init__(self, bit: int, power: bool, args: argparse.Namespace, mode: str = "eager") -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.batch, 1, 28, 28, generator=gen).to(args.device)
        self.y = torch.randint(0, 10, (args.batch,), generator=gen).to(args.device)
        torch.manual_seed(0)
        model = create_model(args.arch, bit=bit, power=power, width=args.width).to(args.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.step = build_step(model, opt, F.cross_entropy, mode=mode, device=torch.device(args.device))
        self.losses: list[torch.Tensor] = []

    def __call__(self) -> None:
        self.losses.append(self.step(self.x, self.y)[0].clone())


def make_step(bit: int, power: bool, args: argparse.Namespace, mode: str = "eager") -> Step:
    """A callable running one SGD step (see ``Step``)."""
    return Step(bit, power, args, mode)


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
    p.add_argument("--modes", nargs="+", default=["eager"], choices=("eager", "compile", "cudagraph"),
                   help="training-step modes to time (apot.step); 'eager' always is")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quantizers = [("APoT", True), ("uniform", False)]
    args.projections = ["table"] + [p for p in args.projections if p != "table"]
    modes = ["eager"] + [m for m in args.modes if m != "eager"]
    if "cudagraph" in modes:
        args.warmup = max(args.warmup, WARMUP_STEPS + 1)  # warm-up steps and the capture are not timed
    runs: dict[tuple, tuple[Callable[[], None], Callable | None]] = {}
    runs[("FP32", 32, "table")] = (make_step(32, True, args), None)
    for mode in modes[1:]:
        runs[("FP32", 32, mode)] = (make_step(32, True, args, mode), None)
    for name, power in quantizers:
        for bit in args.bits:
            projections = {
                "table": None,
                "bucketize": bucketize_projection,
                "reference": reference_projection(power),
            }
            for proj in args.projections:
                runs[(name, bit, proj)] = (make_step(bit, power, args), projections[proj])  # own model each
            for mode in modes[1:]:
                runs[(name, bit, mode)] = (make_step(bit, power, args, mode), None)

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
    if len(modes) > 1:
        print("\nStep modes (apot.step), same process: ms/step, ratio to that mode's FP32 step, speed-up "
              "over "
              "eager, compile seconds, largest |loss - eager loss| over the steps run\n")
        print("| quantizer | bits | mode | ms/step | ratio vs FP32 | speed-up | compile s | max loss diff |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for name, bit in [("FP32", 32)] + [(n, b) for n, _ in quantizers for b in args.bits]:
            eager_key = (name, bit, "table")
            for mode in modes:
                key = eager_key if mode == "eager" else (name, bit, mode)
                step = runs[key][0]
                fp32 = median[("FP32", 32, "table" if mode == "eager" else mode)]
                losses = torch.stack(step.losses).cpu()
                reference = torch.stack(runs[eager_key][0].losses).cpu()
                diff = (losses - reference[: len(losses)]).abs().max().item()
                print(f"| {name} | {bit} | {mode} | {median[key] * 1e3:.2f} | {median[key] / fp32:.2f} | "
                      f"{median[eager_key] / median[key]:.2f} | {step.step.setup_s:.1f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
