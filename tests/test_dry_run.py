"""`tune_sweep.py --dry-run`: the resolved sweep, printed without starting (or importing) Ray."""

from __future__ import annotations

import json
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
    from apot.config import check_resources, load_config, local_resources, resolve_resources

    cfg = load_config(REPO / "search_space.yaml", overrides=["grid.arch=[resnet18,resnet50]"])
    cfg = resolve_resources(cfg, local_resources())
    res = cfg.resources
    assert res.workers_per_trial == 1 and res.cpus_per_worker == 1  # auto, resolved
    out = r.stdout
    resolved = json.loads(out[: out.index("\nresources of")])
    assert resolved["resources"]["gpus_per_worker"] == res.gpus_per_worker
    assert resolved["train"]["compile"] == "auto"
    assert len(cfg.trials()) == 18  # 2 archs x (FP32 + 4 bits x 2 quantizers)
    assert f"trials: 18, {check_resources(cfg, local_resources())} at a time" in out
    trial_lines = [line for line in out.splitlines() if line.startswith("  resnet")]
    assert len(trial_lines) == 18 and "resnet50_b2_uniform_s0" in trial_lines[-1]
    device = "cuda" if res.gpus_per_worker else "cpu"
    expected = f"ranks 1  CPU 1  GPU {res.gpus_per_worker:g}  {device}  step "
    assert all(expected in line for line in trial_lines)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_dry_run_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "tune_sweep.py", "--dry-run", "--storage", str(tmp_path),
                        "--set", "train.compile=fast"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "train.compile: 'fast'" in r.stderr
