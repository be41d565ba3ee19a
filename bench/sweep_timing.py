#!/usr/bin/env python
"""Where a sweep's time went, from its stored records: the per-trial timing summary of issue 8.

    python bench/sweep_timing.py <storage>/<name> [--wall SECONDS] [--json OUT.json]

Per trial: state, epochs, step mode, compile seconds (first call / warm-up + capture; a trial that loaded
its graph from the shared cache shows a small number), start-up seconds (Tune trial -> first batch), the
training images/s (median over epochs, epoch 1 left out when later ones exist: it includes the compile) and
the peak GPU memory the trial's allocator held. Per arch: the same, summarised. Overall: the sweep's wall
time (``--wall``, else the provenance in results.json), images trained per second over that wall time, and
the Ray start-up share (``ray.init`` and the trials' start-up against the trial slots' time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from apot.config import trial_name

MNIST_TRAIN = 60_000


def _trial_row(r: dict[str, Any]) -> dict[str, Any]:
    h = r.get("history") or []
    steady = h[1:] if len(h) > 1 else h
    mem = [e.get("gpu_mem_mb") for e in h if e.get("gpu_mem_mb") is not None]
    subset = (r.get("config") or {}).get("train_subset") or MNIST_TRAIN
    return {
        "trial": trial_name(r),  # resnet18_b4_apot_s0, or resnet18_fp32_s0 at full precision
        "arch": r["arch"], "state": r.get("state"), "epochs": r.get("epochs_done", len(h)),
        "step_mode": r.get("step_mode"), "compile_s": r.get("compile_s"), "startup_s": r.get("startup_s"),
        "images_per_s": statistics.median(e["images_per_s"] for e in steady) if steady else None,
        "epoch_s": statistics.median(e["epoch_s"] for e in steady) if steady else None,
        "gpu_mem_mb": max(mem) if mem else None,
        "images": len(h) * subset, "final_test_acc": r.get("final_test_acc"),
    }


def _pct(d: dict[str, Any], key: str) -> float | None:
    return 100 * d[key] if key in d else None


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def summarize(experiment: Path, wall: float | None) -> tuple[str, dict[str, Any]]:
    records = [json.loads(p.read_text()) for p in sorted((experiment / "records").glob("*.json"))]
    rows = [_trial_row(r) for r in records]
    prov: dict[str, Any] = {}
    results = experiment / "results.json"
    if results.exists():
        prov = json.loads(results.read_text()).get("provenance", {}) or {}
    wall = wall or prov.get("wall_time_s")
    lines = [f"# Sweep timing: {experiment}", ""]
    lines.append("| trial | state | epochs | step | compile s | start-up s | img/s | epoch s | GPU MiB "
                 "| acc |")
    lines.append("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for t in rows:
        lines.append(f"| {t['trial']} | {t['state']} | {t['epochs']} | {_fmt(t['step_mode'])} | "
                     f"{_fmt(t['compile_s'])} | {_fmt(t['startup_s'])} | {_fmt(t['images_per_s'], '.0f')} | "
                     f"{_fmt(t['epoch_s'])} | {_fmt(t['gpu_mem_mb'], '.0f')} | "
                     f"{_fmt(t['final_test_acc'], '.2f')} |")
    lines += ["", "| arch | trials | img/s per trial (median) | compile s (max / median) | GPU MiB (max) |",
              "|---|---:|---:|---:|---:|"]
    per_arch: dict[str, Any] = {}
    for arch in sorted({t["arch"] for t in rows}):
        ts = [t for t in rows if t["arch"] == arch]
        rate = [t["images_per_s"] for t in ts if t["images_per_s"]]
        comp = [t["compile_s"] for t in ts if t["compile_s"] is not None]
        mem = [t["gpu_mem_mb"] for t in ts if t["gpu_mem_mb"] is not None]
        per_arch[arch] = {"trials": len(ts), "images_per_s": statistics.median(rate) if rate else None,
                          "compile_s_max": max(comp) if comp else None,
                          "compile_s_median": statistics.median(comp) if comp else None,
                          "gpu_mem_mb_max": max(mem) if mem else None}
        a = per_arch[arch]
        lines.append(f"| {arch} | {len(ts)} | {_fmt(a['images_per_s'], '.0f')} | "
                     f"{_fmt(a['compile_s_max'])} / {_fmt(a['compile_s_median'])} | "
                     f"{_fmt(a['gpu_mem_mb_max'], '.0f')} |")
    images = sum(t["images"] for t in rows)
    overall = {"wall_s": wall, "trials": len(rows),
               "finished": sum(t["state"] == "TERMINATED" for t in rows), "images_trained": images,
               "images_per_s_total": images / wall if wall else None,
               "ray_init_s": prov.get("ray_init_s"), "concurrency": prov.get("concurrency"),
               "trial_startup_s": prov.get("trial_startup_s"), "trial_epochs_s": prov.get("trial_epochs_s")}
    if wall and overall["ray_init_s"] is not None:
        overall["ray_init_share"] = overall["ray_init_s"] / wall
    if wall and overall["trial_startup_s"] and overall["concurrency"]:
        overall["trial_startup_share"] = overall["trial_startup_s"] / (overall["concurrency"] * wall)
    lines += ["", f"Wall {_fmt(wall, '.0f')} s; {overall['finished']}/{len(rows)} trials finished; "
                  f"{images} training images, {_fmt(overall['images_per_s_total'], '.0f')} img/s in total; "
                  f"ray.init {_fmt(overall['ray_init_s'])} s ({_fmt(_pct(overall, 'ray_init_share'))}% of "
                  f"wall); trial start-up {_fmt(overall['trial_startup_s'], '.0f')} s summed "
                  f"({_fmt(_pct(overall, 'trial_startup_share'))}% of the "
                  f"{_fmt(overall['concurrency'], 'd')} trial slots' time)."]
    return "\n".join(lines), {"overall": overall, "per_arch": per_arch, "trials": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", type=Path)
    p.add_argument("--wall", type=float, default=None, help="sweep wall seconds (default: results.json's)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    args = p.parse_args()
    if not (args.experiment / "records").is_dir():
        print(f"error: {args.experiment}/records: no such folder; pass <storage>/<name> of a sweep",
              file=sys.stderr)
        return 2
    text, data = summarize(args.experiment, args.wall)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
