"""FP32-first scheduling (`apot.fp32_first.GridPoints`): quantized trials that start from their FP32 trial
hold no Tune slot while they wait, wait through the FP32 trial's retries, and get an ERROR record (never
start) only when it has failed for good."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apot.config import FP32_BIT, trial_name

REPO = Path(__file__).resolve().parents[1]


def _configs(points: list[dict[str, Any]], run: dict[str, Any]) -> list[dict[str, Any]]:
    from apot.sweep import trial_configs

    return trial_configs(points, {"init_from": "fp32", "epochs": 1}, run)


@pytest.fixture(scope="module")
def private_ray() -> Iterator[None]:
    """The sweep's own private local Ray (`apot.ray_session.start_ray`), once for this module's Tune runs;
    the environment it sets is restored afterwards."""
    from apot.ray_session import start_ray

    with pytest.MonkeyPatch.context() as env:
        for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            env.setenv(key, "")  # start_ray sets them
        env.delenv("RAY_ADDRESS", raising=False)
        # Ray's workers import the stand-in trainable from this module, as pytest imported it: by its name,
        # from tests/ (pytest puts that folder on the driver's sys.path; the workers get it from here).
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), str(REPO),
                                                              os.environ.get("PYTHONPATH")])))
        session = start_ray(None, num_cpus=4, include_dashboard=False, logging_level="ERROR",
                            log_to_driver=False)
        try:
            yield
        finally:
            session.close(keep_logs=False)


def _tune(configs: list[dict[str, Any]], experiment: Path, trainable: Any, concurrency: int) -> None:
    """A real Tune run of ``trainable`` over ``configs`` in the sweep's order (`GridPoints`)."""
    from ray import tune

    from apot.config import grid_point
    from apot.fp32_first import GridPoints

    tune.Tuner(
        tune.with_resources(trainable, {"CPU": 1}),
        tune_config=tune.TuneConfig(search_alg=GridPoints(configs, experiment), num_samples=len(configs),
                                    max_concurrent_trials=concurrency,
                                    trial_dirname_creator=lambda t: trial_name(grid_point(t.config))),
        run_config=tune.RunConfig(name="order", storage_path=str(experiment / "tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    ).fit()


def _stand_in(config: dict[str, Any]) -> None:
    """A trial that waits until the trials ``run.wait_for[name]`` have run (at most ``run.patience_s``),
    logs when it ran and writes a TERMINATED record; it raises if they did not run in time, or if its
    name is in ``run.fail``. What the order depends on, without training."""
    from apot.checkpoint import write_json
    from apot.config import grid_point

    name = trial_name(grid_point(config))
    run = config["run"]
    log = Path(run["log"])
    start = time.time()
    needed = set(run["wait_for"].get(name, []))
    while needed and time.time() < start + run["patience_s"]:
        ran = {json.loads(line)["name"] for line in log.read_text().splitlines()} if log.exists() else set()
        if needed <= ran:
            break
        time.sleep(0.2)
    else:
        if needed:
            raise RuntimeError(f"{name}: {sorted(needed)} never ran beside it: their slots were taken")
    with open(log, "a") as out:
        out.write(json.dumps({"name": name, "start": start, "end": time.time()}) + "\n")
    if name in run["fail"]:
        raise RuntimeError(f"{name}: failed on purpose")
    write_json({"state": "TERMINATED"}, Path(run["experiment"]) / "records" / f"{name}.json")


@pytest.fixture
def points() -> list[dict[str, Any]]:
    """FP32 s0 and s1, then 2-bit APoT and uniform of each (the order `SweepConfig.trials` gives)."""
    fp32 = [{"arch": "resnet10", "bit": FP32_BIT, "power": True, "seed": s} for s in (0, 1)]
    quantized = [{"arch": "resnet10", "bit": 2, "power": p, "seed": s} for p in (True, False) for s in (0, 1)]
    return fp32 + quantized


def test_waiting_trials_hold_no_slot(points: list[dict[str, Any]], tmp_path: Path,
                                    private_ray: None) -> None:
    """3 slots. Seed 0's FP32 trial runs until seed 1's quantized trials have run beside it; seed 1's FP32
    trial ends at once. Had seed 0's quantized trials taken slots while waiting (as when a waiting trial was
    a started Tune trial: FP32 s0, FP32 s1, then 2-bit APoT s0 waiting, then 2-bit uniform s0 waiting once
    APoT s1 ran), 2-bit uniform s1 would find no slot and seed 0's FP32 trial would give up."""
    log = tmp_path / "ran.jsonl"
    run = {"wait_for": {"resnet10_fp32_s0": ["resnet10_b2_apot_s1", "resnet10_b2_uniform_s1"]},
           "patience_s": 120, "fail": [], "log": str(log), "experiment": str(tmp_path)}
    _tune(_configs(points, run), tmp_path, _stand_in, 3)
    ran = {r["name"]: r for r in map(json.loads, log.read_text().splitlines())}
    assert len(ran) == 6, sorted(ran)  # seed 0's FP32 trial did not give up: every trial ran
    slow = ran["resnet10_fp32_s0"]
    for power in ("apot", "uniform"):
        s1, s0 = ran[f"resnet10_b2_{power}_s1"], ran[f"resnet10_b2_{power}_s0"]
        assert ran["resnet10_fp32_s1"]["end"] <= s1["start"] and s1["end"] <= slow["end"]
        assert s0["start"] >= slow["end"]  # never before its own FP32 trial ended
    spans = sorted((r["start"], r["end"]) for r in ran.values())
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 3  # the limit held


def test_quantized_trials_of_a_failed_fp32_trial_get_an_error_record(
        points: list[dict[str, Any]], tmp_path: Path, private_ray: None) -> None:
    log = tmp_path / "ran.jsonl"
    run = {"wait_for": {}, "patience_s": 0, "fail": ["resnet10_fp32_s0"], "log": str(log),
           "experiment": str(tmp_path)}
    _tune(_configs(points, run), tmp_path, _stand_in, 2)
    ran = {json.loads(line)["name"] for line in log.read_text().splitlines()}
    assert ran == {"resnet10_fp32_s0", "resnet10_fp32_s1", "resnet10_b2_apot_s1", "resnet10_b2_uniform_s1"}
    for power in ("apot", "uniform"):
        rec = json.loads((tmp_path / "records" / f"resnet10_b2_{power}_s0.json").read_text())
        assert rec["state"] == "ERROR" and rec["epochs_trained"] == [] and rec["final_test_acc"] is None
        assert rec["error"].startswith(f"init_from fp32: resnet10_fp32_s0 failed with no retries left, so "
                                       f"resnet10_b2_{power}_s0 was not started")


def test_killed_fp32_worker_is_retried_and_its_quantized_trial_then_trains(synthetic_mnist_root: Path,
                                                                            tmp_path: Path) -> None:
    """Issue 18's reproduction: FP32 plus 2-bit APoT, max_retries 2; the FP32 trial's training worker is
    SIGKILLed once, mid-trial (as an out-of-memory kill would). The FP32 retry finishes from its checkpoint,
    then the quantized trial trains from it and finishes: exit 0."""
    from test_sweep import kill_rank_after_epoch1

    cmd = [sys.executable, "tune_sweep.py", "--data-dir", str(synthetic_mnist_root), "--storage",
           str(tmp_path), "--display", "plain", "--set", "grid.arch=[resnet10]", "--set", "grid.bit=[32,2]",
           "--set", "grid.power=[true]", "--set", "train.init_from=fp32", "--set", "train.epochs=2",
           "--set", "train.width=8",
           # batch 16: 64 steps an epoch, so epoch 2 leaves seconds to kill the worker mid-training
           "--set", "train.batch_size=16", "--set", "max_retries=2",
           "--set", "resources.workers_per_trial=1"]
    experiment = tmp_path / "apot_mnist"
    proc, registered = kill_rank_after_epoch1(cmd, experiment / "train" / "resnet10_fp32_s0")
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "RETRYING" in out, out[-3000:]
    fp32 = json.loads((experiment / "records" / "resnet10_fp32_s0.json").read_text())
    last = max(registered)
    assert fp32["state"] == "TERMINATED" and fp32["resumed_from_epoch"] == last < 2
    assert fp32["epochs_trained"] == list(range(last + 1, 3))
    final = experiment / "train" / "resnet10_fp32_s0" / "checkpoint_epoch002" / "checkpoint.pt"
    rec = json.loads((experiment / "records" / "resnet10_b2_apot_s0.json").read_text())
    assert rec["state"] == "TERMINATED" and rec["epochs_trained"] == [1, 2], rec.get("error")
    assert rec["init_checkpoint"] == str(final)
    # Inductor's compile workers sized to the trial's CPUs (auto: 1 per rank), not the machine's cores
    assert rec["compile_workers"] == 1
