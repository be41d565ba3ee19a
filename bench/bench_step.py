"""Time the training step (forward, backward, SGD step) per arch and step variant, quantized against FP32.

    python bench/bench_step.py                                  # resnet18/34/50, 2 bits APoT, 1 and 2 threads
    python bench/bench_step.py --bits 5 4 3 2 --quantizers apot uniform --threads 1 --modes eager --grid
    python bench/bench_step.py --markdown table.md              # also write the Markdown tables to a file
    python bench/bench_step.py --device cuda --modes eager compile cudagraph --bits 4 --archs resnet18

Step variants (``--modes``), all built by ``apot.step.build_step`` on the same batch:

    nchw           CPU: the plain step: NCHW activations, quantizers as torch operations (``fused.disabled``)
    channels_last  CPU: ``channels_last`` activations, quantizers as torch operations
    eager          what apot runs eagerly: on a CPU ``channels_last`` and the quantizers' fused kernels
                   (``apot.fused``); on CUDA the plain eager step
    compile        ``torch.compile`` (its compile seconds are printed, not timed)
    cudagraph      CUDA: the compiled step replayed as one CUDA graph

For each thread count (``--threads``, set with ``torch.set_num_threads`` in this one process) every
configuration (arch x quantizer x bits x variant, and FP32 in each layout) gets its own model (seed 0) and is
stepped once per round, the rounds interleaved and rotated so that load changes on a shared machine hit every
configuration alike. Reported: the median ms/step, images/s, the ratio to the FP32 step of the same variant
(``channels_last`` is compared with FP32 ``eager``: FP32 has no quantizer to fuse), the speed-up over
``nchw`` and the compile seconds. With ``--grid``
(1 thread, every bit width of the default sweep and both quantizers measured) it also prints the ideal time of
the one-seed 27-trial grid (3 archs x (FP32 + 4 bits x 2 quantizers), 25 epochs of 60,000 images) on
``--cores`` cores running one single-thread trial each, from the ``eager`` rates.

Run against another checkout (``PYTHONPATH=<checkout>``) without ``apot.fused``, only ``--modes nchw`` exists:
the figures of that code in the same conditions.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from apot.models import create_model
from apot.provenance import cpu_model
from apot.step import WARMUP_STEPS, build_step

try:
    from apot import fused
except ImportError:  # a checkout from before the fused kernels: only the nchw variant
    fused = None

MODES = ("nchw", "channels_last", "eager", "compile", "cudagraph")
CPU_ONLY = ("nchw", "channels_last")
GRID_BITS = (5, 4, 3, 2)
EPOCH_IMAGES, EPOCHS = 60_000, 25


class Step:
    """One SGD step of a fresh model (seed 0) on a fixed random batch in one step variant."""

    def __init__(self, arch: str, bit: int, power: bool, mode: str, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.batch, 1, 28, 28, generator=gen).to(self.device)
        self.y = torch.randint(0, 10, (args.batch,), generator=gen).to(self.device)
        torch.manual_seed(0)
        model = create_model(arch, bit=bit, power=power, width=args.width).to(self.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        kwargs = {}
        if mode in CPU_ONLY and "memory_format" in inspect.signature(build_step).parameters:
            kwargs["memory_format"] = torch.contiguous_format if mode == "nchw" else torch.channels_last
        self.step = build_step(model, opt, F.cross_entropy, mode="eager" if mode in CPU_ONLY else mode,
                               device=self.device, **kwargs)
        self.unfused = mode in CPU_ONLY and fused is not None

    def __call__(self) -> float:
        """Seconds of one step."""
        with fused.disabled() if self.unfused else contextlib.nullcontext():
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.step(self.x, self.y)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--bits", type=int, nargs="+", default=[2])
    p.add_argument("--quantizers", nargs="+", default=["apot"], choices=["apot", "uniform"])
    p.add_argument("--modes", nargs="+", default=["nchw", "channels_last", "eager"], choices=MODES)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, nargs="+", help="torch thread counts (default: 1 2 on a CPU, "
                   "torch's own on CUDA)")
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step per configuration each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--grid", action="store_true", help="print the ideal time of the one-seed 27-trial grid")
    p.add_argument("--cores", type=int, default=2, help="cores for --grid (one single-thread trial each)")
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args(argv)
    args.threads = args.threads or ([1, 2] if args.device == "cpu" else [torch.get_num_threads()])
    if fused is None and args.modes != ["nchw"]:
        p.error("this checkout has no apot.fused: only --modes nchw")
    if args.device == "cuda" and set(args.modes) & set(CPU_ONLY):
        p.error(f"--modes {' '.join(CPU_ONLY)} are CPU variants; on CUDA use eager, compile, cudagraph")
    if args.device == "cpu" and "cudagraph" in args.modes:
        p.error("--modes cudagraph needs --device cuda")
    grid_measured = sorted(args.bits) == sorted(GRID_BITS) and len(args.quantizers) == 2 and 1 in args.threads
    if args.grid and not grid_measured:
        p.error("--grid needs --bits 5 4 3 2, --quantizers apot uniform and 1 in --threads")
    return args


def measure(configs: dict[tuple, Callable[[], float]], rounds: int, warmup: int) -> dict[tuple, float]:
    """Median seconds per configuration over ``rounds`` interleaved, rotated rounds after ``warmup``."""
    times: dict[tuple, list[float]] = {key: [] for key in configs}
    keys = list(configs)
    for round_ in range(warmup + rounds):
        for key in keys[round_ % len(keys):] + keys[: round_ % len(keys)]:
            seconds = configs[key]()
            if round_ >= warmup:
                times[key].append(seconds)
    return {key: statistics.median(v) for key, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fp32_of = {mode: "eager" if mode == "channels_last" else mode for mode in args.modes}
    if args.warmup <= WARMUP_STEPS and "cudagraph" in args.modes:
        args.warmup = WARMUP_STEPS + 1  # warm-up steps and the capture are not timed
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    lines = [f"{machine}; "
             f"width {args.width}, batch {args.batch}, 1x28x28; median of {args.steps} steps after "
             f"{args.warmup} warm-up, configurations interleaved in one process", ""]
    grid_rates: dict[tuple, float] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        configs: dict[tuple, Callable[[], float]] = {}
        for arch in args.archs:
            for fp32_mode in dict.fromkeys(fp32_of.values()):
                configs[(arch, "FP32", 32, fp32_mode)] = Step(arch, 32, True, fp32_mode, args)
            for quantizer in args.quantizers:
                for bit in args.bits:
                    for mode in args.modes:
                        power = quantizer == "apot"
                        configs[(arch, quantizer, bit, mode)] = Step(arch, bit, power, mode, args)
        load = os.getloadavg()[0]
        median = measure(configs, args.steps, args.warmup)
        lines += [f"**{threads} thread{'s' if threads > 1 else ''}** (load average {load:.1f} -> "
                  f"{os.getloadavg()[0]:.1f})", "",
                  "| arch | quantizer | bits | step | ms/step | img/s | ratio vs FP32 | speed-up vs nchw "
                  "| compile s |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        for key, seconds in median.items():
            arch, quantizer, bit, mode = key
            fp32 = median[(arch, "FP32", 32, fp32_of.get(mode, mode))]
            nchw = median.get((arch, quantizer, bit, "nchw"))
            speedup = f"{nchw / seconds:.2f}" if nchw else "—"
            lines.append(f"| {arch} | {quantizer} | {bit} | {mode} | {seconds * 1e3:.1f} | "
                         f"{args.batch / seconds:.0f} | {seconds / fp32:.2f} | {speedup} | "
                         f"{configs[key].step.setup_s:.1f} |")
            if threads == 1:
                grid_rates[key] = args.batch / seconds
        lines.append("")
    if args.grid:
        best = "eager" if "eager" in args.modes else args.modes[-1]
        fp32_rates = [grid_rates[(arch, "FP32", 32, fp32_of[best])] for arch in args.archs]
        trial_s = [EPOCHS * EPOCH_IMAGES / rate for rate in fp32_rates]
        trial_s += [EPOCHS * EPOCH_IMAGES / grid_rates[(arch, q, bit, best)]
                    for arch in args.archs for q in args.quantizers for bit in GRID_BITS]
        lines.append(f"Ideal time of the one-seed {len(trial_s)}-trial grid ({best} step, 1-thread rates, "
                     f"{args.cores} trials side by side): {sum(trial_s) / args.cores / 3600:.2f} h")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
