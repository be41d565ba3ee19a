#!/usr/bin/env python
"""Run several trials as concurrent ``python -m apot.train`` processes on one machine, without Ray.

For a machine where Ray is not installed (the lent GPU box) or for quick A/B runs: the same trial function
the sweep runs, one process per trial, all started at once, stopped at a deadline. Each trial's record
(docs/ARCHITECTURE.md) goes to ``OUT/records/<name>.json`` so ``apot.report`` can tabulate it; trials cut
off by the deadline are recorded as INCOMPLETE with the epochs they finished.

    python bench/run_direct.py --out runs/gpu --data-dir DIR --deadline 480 \\
        --trial resnet18_b4_apot_s0="--arch resnet18 --bit 4 --power apot" ...
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apot.checkpoint import load_checkpoint, write_json  # noqa: E402
from apot.train import TrainConfig, summarize  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--deadline", type=float, default=480.0, help="seconds before unfinished trials stop")
    p.add_argument("--trial", action="append", required=True, metavar="NAME=ARGS",
                   help="a trial name and its apot.train arguments")
    args = p.parse_args()

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen] = {}
    started = time.time()
    for spec in args.trial:
        name, trial_args = spec.split("=", 1)
        cmd = [sys.executable, "-m", "apot.train", *shlex.split(trial_args), "--data-dir", args.data_dir,
               "--out", str(out / "train" / name)]
        log = open(out / "logs" / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    while any(pr.poll() is None for pr in procs.values()) and time.time() - started < args.deadline:
        time.sleep(2)
    for pr in procs.values():
        if pr.poll() is None:
            pr.send_signal(signal.SIGTERM)
    for pr in procs.values():
        pr.wait()
    wall = time.time() - started

    summary = {}
    for name, pr in procs.items():
        folder = out / "train" / name
        result_file = folder / "result.json"
        if result_file.exists():
            record = json.loads(result_file.read_text())
        else:
            state = load_checkpoint(folder) if (folder / "checkpoint.pt").exists() else None
            config_file = folder / "config.json"
            config = json.loads(config_file.read_text()) if config_file.exists() else {}
            record = summarize(TrainConfig.from_dict(config), state["history"] if state else [])
            record["error"] = f"stopped at the {args.deadline:.0f}s deadline (exit {pr.returncode})"
        write_json(record, out / "records" / f"{name}.json")
        h = record["history"]
        summary[name] = {
            "state": record["state"], "epochs_done": record["epochs_done"],
            "final_test_acc": record["final_test_acc"],
            "last_test_acc": h[-1]["test_acc"] if h else None,
            "mean_epoch_s": sum(x["epoch_s"] for x in h) / len(h) if h else None,
            "mean_images_per_s": sum(x["images_per_s"] for x in h) / len(h) if h else None,
        }
    write_json({"wall_s": wall, "trials": summary}, out / "summary.json")
    for name, s in summary.items():
        print(name, json.dumps(s))
    print(f"wall {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
