"""SIGTERM (kill, timeout, Slurm's cancel and ray_cluster.sh's time-limit stop) stops tune_sweep.py as Ctrl-C
does, through a real local Ray: tables written with each trial's state, non-zero exit, no native trace, and
--resume then continues each trial from its last checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from test_sweep import REPO, run_sweep, sweep_cmd

EPOCHS = 3
EPOCH_LINE = re.compile(r"^\S+ \S+ (?P<trial>\S.*?)\s+epoch (?P<epoch>\d+)/\d+\s", re.M)


def epochs_shown(output: str) -> dict[str, list[int]]:
    """Trial label -> the epochs the display reported, in order."""
    shown: dict[str, list[int]] = {}
    for m in EPOCH_LINE.finditer(output):
        shown.setdefault(m["trial"], []).append(int(m["epoch"]))
    return shown


def test_sigterm_mid_sweep_writes_tables_and_resume_completes(synthetic_mnist_root: Path, tmp_path: Path) -> None:
    cmd = sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[2]", "--set", f"train.epochs={EPOCHS}",
                    "--set", "resources.workers_per_trial=1", "--set", "resources.max_concurrent_trials=1")
    experiment = tmp_path / "apot_mnist"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.time() + 400
    while not EPOCH_LINE.search(log.read_text()):  # an epoch reported: its checkpoint is registered
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no epoch reported in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` or `timeout` does
    assert proc.wait(timeout=180) == 128 + signal.SIGTERM
    first = log.read_text()
    assert "SIGTERM received" not in first and "PC: @" not in first, first[-3000:]  # no native trace
    assert "Traceback" not in first, first[-3000:]
    assert first.count("got SIGTERM: stopping the trials") == 1
    shown_before = epochs_shown(first)
    assert len(shown_before) == 1, "the second trial started before the signal: the test proves little"
    ((label, before),) = shown_before.items()
    assert before and before[-1] < EPOCHS, f"the trial finished before the signal: {before}"

    tables = (experiment / "tables.md").read_text()
    assert "incomplete" in tables and "running" not in tables, tables
    records = {p.stem: json.loads(p.read_text()) for p in (experiment / "records").glob("*.json")}
    (stopped,) = records.values()
    assert stopped["state"] == "INCOMPLETE" and stopped["epochs_done"] >= before[-1]  # no reported epoch lost
    kept = stopped["epochs_done"]

    r = run_sweep(*cmd, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = epochs_shown(r.stdout)
    assert resumed[label] == list(range(kept + 1, EPOCHS + 1)), resumed  # went on from its checkpoint
    states = {p.stem: json.loads(p.read_text()) for p in (experiment / "records").glob("*.json")}
    assert len(states) == 2 and all(s["state"] == "TERMINATED" for s in states.values())
    assert all([h["epoch"] for h in s["history"]] == list(range(1, EPOCHS + 1)) for s in states.values())
