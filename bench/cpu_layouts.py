#!/usr/bin/env python
"""Which CPU layout trains fastest: the measurement behind ``resources: auto`` on a machine without GPUs.

    python bench/cpu_layouts.py --data-dir DIR [--cores 2] [--steps 40] [--repeats 2]

On ``--cores`` cores, the same work (ResNet-18 4-bit APoT, global batch 128, real MNIST batches from
``apot.data.DeviceMNIST``, the step ``apot.step.build_step`` builds) is timed in three layouts:

    threads   one trial, one process with ``cores`` torch threads
    ranks     one trial, ``cores`` gloo DDP ranks of one thread each (per-rank batch 128 / cores)
    trials    ``cores`` independent single-rank trials side by side, one thread each

Each layout runs in fresh processes; the layouts are interleaved ``--repeats`` times (A B C A B C) so a
load change on a shared machine falls on all of them. Printed: the images/s of the whole machine (summed
over side-by-side trials) per run, and the median per layout.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("threads", "ranks", "trials")


def worker(args: argparse.Namespace) -> None:
    """One process: ``--steps`` timed training steps after ``--warmup``; prints images/s."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from apot.data import DeviceMNIST
    from apot.models import create_model
    from apot.step import build_step

    torch.set_num_threads(args.threads)
    if args.world > 1:
        dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    torch.manual_seed(0)
    data = DeviceMNIST.from_root(args.data_dir, device=torch.device("cpu"), train_subset=8192)
    model = create_model("resnet18", 4, power=True)
    net = torch.nn.parallel.DistributedDataParallel(model) if args.world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    step = build_step(net, opt, F.cross_entropy, mode="eager", device=torch.device("cpu"))
    rank = args.rank if args.world > 1 else 0  # side-by-side trials: each its own rank 0
    batches = data.train_batches(0, args.rank, rank, args.world, 128 // args.world)
    for _ in range(args.warmup):
        step(*next(batches))
    start = time.perf_counter()
    for _ in range(args.steps):
        step(*next(batches))
    seconds = time.perf_counter() - start
    images = args.steps * 128 // args.world
    print(f"IMAGES_PER_S {images / seconds:.1f}", flush=True)
    if args.world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(layout: str, args: argparse.Namespace) -> float:
    """Images/s of the whole machine for one layout (fresh processes)."""
    n = args.cores
    base = [sys.executable, __file__, "--worker", "--data-dir", args.data_dir, "--steps", str(args.steps),
            "--warmup", str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    if layout == "threads":
        cmds = [base + ["--threads", str(n)]]
    elif layout == "ranks":
        cmds = [base + ["--threads", "1", "--rank", str(r), "--world", str(n)] for r in range(n)]
    else:
        cmds = [base + ["--threads", "1", "--rank", str(r)] for r in range(n)]
    procs = [subprocess.Popen(c, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True)
             for c in cmds]
    rates = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(f"{layout}: a worker failed (exit {p.returncode})")
        rates += [float(line.split()[1]) for line in out.splitlines() if line.startswith("IMAGES_PER_S")]
    if layout == "ranks":
        return min(rates) * n  # one trial: every rank does batch/n images per step, the slowest sets the pace
    return sum(rates)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    results: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    print(f"{args.cores} cores, ResNet-18 4-bit APoT, global batch 128, {args.steps} steps after "
          f"{args.warmup} warm-up; load average before {os.getloadavg()[0]:.1f}")
    for repeat in range(args.repeats):
        for layout in LAYOUTS:
            rate = run_layout(layout, args)
            results[layout].append(rate)
            print(f"repeat {repeat + 1} {layout:8s} {rate:7.0f} img/s (machine total)  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print("\n| layout | img/s per run | median |\n|---|---|---:|")
    for layout, rates in results.items():
        print(f"| {layout} | {', '.join(f'{r:.0f}' for r in rates)} | {statistics.median(rates):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
