"""SIGTERM (kill, timeout, Slurm's cancel and ray_cluster.sh's time-limit stop) stops tune_sweep.py as Ctrl-C
does, through a real local Ray: tables written with each trial's state, non-zero exit, no native trace, and
--resume then continues each trial from its last checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path

from test_sweep import REPO, run_sweep, sweep_cmd

EPOCHS = 5
EPOCH_LINE = re.compile(r"^\S+ \S+ (?P<trial>\S.*?)\s+epoch (?P<epoch>\d+)/\d+\s", re.M)


class RunsWhenUnpickled:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # unpickling calls os.system(command)
        return (os.system, (self.command,))


def epochs_shown(output: str) -> dict[str, list[int]]:
    """Trial label -> the epochs the display reported, in order."""
    shown: dict[str, list[int]] = {}
    for m in EPOCH_LINE.finditer(output):
        shown.setdefault(m["trial"], []).append(int(m["epoch"]))
    return shown


def test_sigterm_mid_sweep_writes_tables_and_resume_completes(synthetic_mnist_root: Path,
                                                               tmp_path: Path) -> None:
    # One trial; batch 16 (64 steps an epoch) so the epochs left outlast the stop (Tune stops a trial within
    # seconds, not at once).
    cmd = sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[2]", "--set", "grid.power=[true]",
                    "--set", f"train.epochs={EPOCHS}", "--set", "train.batch_size=16",
                    "--set", "resources.workers_per_trial=1")
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
    ((label, before),) = epochs_shown(first).items()
    records = {p.stem: json.loads(p.read_text()) for p in (experiment / "records").glob("*.json")}
    (stopped,) = records.values()
    kept = stopped["epochs_done"]
    assert kept < EPOCHS, f"the trial finished during the stop ({before} shown before): slower epochs needed"
    assert stopped["state"] == "INCOMPLETE" and kept >= before[-1]  # no reported epoch lost
    tables = (experiment / "tables.md").read_text()
    assert "| incomplete |" in tables and "running" not in tables, tables

    # --resume must not unpickle Tune's state: a tuner.pkl that runs a command when unpickled stays unrun
    canary = tmp_path / "unpickled"
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(RunsWhenUnpickled(f"touch {canary}")))
    r = run_sweep(*cmd, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not canary.exists(), "--resume unpickled Tune's state from the storage folder"
    # What the resumed run trained: from the last registered checkpoint on. Every epoch reported before the
    # signal is kept; at most one more is trained again (the epoch in flight: its record can be written
    # before Ray Train registers its checkpoint, and the stop can come in between).
    resumed = epochs_shown(r.stdout)[label]
    start = resumed[0]
    assert resumed == list(range(start, EPOCHS + 1)), resumed
    assert before[-1] < start and kept <= start <= kept + 1, (before, kept, resumed)
    (done,) = [json.loads(p.read_text()) for p in (experiment / "records").glob("*.json")]
    assert done["state"] == "TERMINATED"
    assert [h["epoch"] for h in done["history"]] == list(range(1, EPOCHS + 1))


SECOND_SIGNAL = """
import sys, time
from apot.orchestrate import GracefulStop
stop = GracefulStop()
stop.install()
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # as the driver waits in Tuner.fit while the trials stop
    time.sleep(0.05)
sys.exit(0)
"""


def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    """The first SIGTERM starts the stop (the process goes on, to write the tables); a second one ends the
    process at once with 128 + SIGTERM, whatever the stop is still waiting for."""
    import sys

    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SECOND_SIGNAL], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while "ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        while "got SIGTERM: stopping" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None  # the first signal does not end it
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - sent < 5
        assert "got SIGTERM again: exiting at once" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
