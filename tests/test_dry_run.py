"""`tune_sweep.py --dry-run`: the resolved sweep, printed without starting (or importing) Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, sys
    import tune_sweep
    rc = tune_sweep.main(sys.argv[1:])
    print("PROBE " + json.dumps({"rc": rc, "ray_imported": any(m == "ray" or m.startswith("ray.")
                                                               for m in sys.modules)}))
""")


def test_dry_run_prints_the_resolved_sweep_and_starts_no_ray(synthetic_mnist_root: Path,
                                                              tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", PROBE, "--dry-run", "--data-dir", str(synthetic_mnist_root),
                        "--storage", str(tmp_path / "runs"), "--set", "grid.arch=[resnet18,resnet50]"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    probe = json.loads(r.stdout.split("PROBE ", 1)[1])
    assert probe == {"rc": 0, "ray_imported": False}
    # What the machine should resolve to, counted here without apot: `auto` is one rank of one CPU per trial;
    # with GPUs, 8 single-rank trials share each GPU and the step is a CUDA graph, else eager on the CPU.
    import torch

    cpus, gpus = len(os.sched_getaffinity(0)), torch.cuda.device_count()
    gpu_share = 0.125 if gpus else 0
    at_once = min(18, cpus, 8 * gpus) if gpus else min(18, cpus)
    out = r.stdout
    resolved = json.loads(out[: out.index("\nresources of")])
    keys = ("workers_per_trial", "cpus_per_worker", "gpus_per_worker")
    assert {k: resolved["resources"][k] for k in keys} == dict(zip(keys, (1, 1, gpu_share), strict=True))
    assert resolved["train"]["compile"] == "auto"
    assert f"resources of this machine: {cpus} CPUs, {gpus} GPUs" in out
    assert f"trials: 18, {at_once} at a time" in out  # 2 archs x (FP32 + 4 bits x 2 quantizers)
    trial_lines = [line for line in out.splitlines() if line.startswith("  resnet")]
    archs = ("resnet18", "resnet50")
    names = [f"{arch}_fp32_s0" for arch in archs] + [
        f"{arch}_b{b}_{q}_s0" for arch in archs for b in (5, 4, 3, 2) for q in ("apot", "uniform")]
    assert [line.split()[0] for line in trial_lines] == names  # FP32 first: quantized trials start from it
    step = "cudagraph" if gpus else "eager"
    expected = f"ranks 1  CPU 1  GPU {gpu_share:g}  {'cuda' if gpus else 'cpu'}  step {step}"
    assert all(line.endswith(expected) for line in trial_lines), trial_lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_dry_run_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "tune_sweep.py", "--dry-run", "--storage", str(tmp_path),
                        "--set", "train.compile=fast"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "train.compile: 'fast'" in r.stderr
