"""apot.tracking: a real sweep (real Ray, synthetic data) logged to a real sqlite MLflow store: one run per
trial with the accuracies of results.csv, every epoch a step, the record and exports as artifacts; a trial
stopped part-way continues its own run on --resume. Also the tracking key, --mlflow, the one-line errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_signals import EPOCH_LINE
from test_sweep import REPO, run_sweep, sweep_cmd

from apot.config import ConfigError, load_config

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: pip install -e '.[mlflow]'")
pytest.importorskip("sqlalchemy", reason="the mlflow extra: pip install -e '.[mlflow]'")

SHIPPED = REPO / "search_space.yaml"
EPOCHS = 3


def test_tracking_key_and_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(SHIPPED).tracking == {"mlflow": None}
    cfg = load_config(SHIPPED, overrides=["tracking.mlflow=sqlite:///runs/m.db"])
    assert cfg.tracking["mlflow"] == f"sqlite:///{tmp_path}/runs/m.db"  # made absolute
    assert cfg.to_dict()["tracking"] == cfg.tracking
    cfg = load_config(SHIPPED, overrides=["tracking.mlflow=http://127.0.0.1:5000"], mlflow="mlruns")
    assert cfg.tracking["mlflow"] == str(tmp_path / "mlruns")  # --mlflow wins; a folder made absolute
    assert load_config(SHIPPED, mlflow="https://mlflow.example:443").tracking["mlflow"] == \
        "https://mlflow.example:443"
    for value, message in [("ftp://x", r"--set tracking\.mlflow=ftp://x: tracking\.mlflow: 'ftp://x': "
                                        r"unknown scheme 'ftp'"),
                           ("sqlite://", r"give a database file"), ("3", r"3 is not a tracking URI"),
                           ("''", r"'' is not a tracking URI")]:
        with pytest.raises(ConfigError, match=message):
            load_config(SHIPPED, overrides=[f"tracking.mlflow={value}"])
    with pytest.raises(ConfigError, match=r"unknown key tracking\.colour; allowed at tracking: mlflow"):
        load_config(SHIPPED, overrides=["tracking.colour=red"])


def test_missing_extra_and_bad_store_fail_before_ray(synthetic_mnist_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from apot.tracking import check_tracking

    cfg = load_config(SHIPPED, mlflow=f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"^tracking\.mlflow needs the optional mlflow packages \(mlflow "
                                          r"is not installed\): pip install 'apot\[mlflow\]'"):
        check_tracking(cfg)
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    r = run_sweep(*sweep_cmd(synthetic_mnist_root, tmp_path / "s", "--mlflow",
                             f"sqlite:///{tmp_path}/file/m.db"), timeout=120)
    assert r.returncode == 2 and "ray:" not in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: tracking.mlflow: cannot use the MLflow store sqlite:///"), r.stderr


def test_sweep_logs_one_run_per_trial_and_resume_continues_it(synthetic_mnist_root: Path,
                                                              tmp_path: Path) -> None:
    """Two trials, one at a time; SIGTERM once the first has reported an epoch; --resume continues it. The
    store then holds one run per trial (the stopped trial's the same run as before the stop), each epoch
    once, the final accuracies of results.csv, the params, and the record and exports as artifacts."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[3]",
                    "--set", f"train.epochs={EPOCHS}", "--set", "train.batch_size=16",
                    "--set", "resources.workers_per_trial=1", "--set", "resources.max_concurrent_trials=1",
                    "--mlflow", uri)
    experiment = tmp_path / "apot_mnist"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    deadline = time.time() + 300
    def checkpointed() -> bool:  # a RUNNING record is written once its epoch's checkpoint is persisted
        records = (experiment / "records").glob("*.json") if (experiment / "records").exists() else []
        return any(json.loads(r.read_text()).get("state") == "RUNNING" for r in records)

    while not (EPOCH_LINE.search(log.read_text()) and checkpointed()):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no epoch reported in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "mlflow:" not in log.read_text(), log.read_text()[-3000:]  # no tracking failure
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("apot_mnist")
    before = {r.data.tags["apot.trial"]: r for r in client.search_runs([exp.experiment_id])}
    assert len(before) == 1, before  # the second trial had not started
    ((stopped, run),) = before.items()
    logged_before = [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")]
    assert logged_before and max(logged_before) < EPOCHS, logged_before

    r = run_sweep(*cmd, "--resume", timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mlflow:" not in r.stderr, r.stderr[-3000:]
    with open(experiment / "results.csv") as f:
        results = {f"{row['arch']}_b{row['bit']}_{row['quantizer'].lower()}_s{row['seed']}": row
                   for row in csv.DictReader(f)}
    runs = client.search_runs([exp.experiment_id])
    by_trial = {run.data.tags["apot.trial"]: run for run in runs}
    assert len(runs) == 2 and sorted(by_trial) == sorted(results) == ["resnet10_b3_apot_s0",
                                                                     "resnet10_b3_uniform_s0"]
    assert by_trial[stopped].info.run_id == run.info.run_id  # continued, not a new run
    record = json.loads((experiment / "records" / f"{stopped}.json").read_text())
    assert record["resumed_from_epoch"] is not None and record["resumed_from_epoch"] < EPOCHS
    for name, run in by_trial.items():
        rec = json.loads((experiment / "records" / f"{name}.json").read_text())
        assert run.info.status == "FINISHED" and run.info.run_name == name
        assert run.data.metrics["final_test_acc"] == pytest.approx(float(results[name]["final_test_acc"]),
                                                                   abs=1e-9)
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # every epoch, once
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == \
            [h["test_acc"] for h in rec["history"]]
        for key in ("train_loss", "lr", "images_per_s", "weight_alpha_mean", "act_alpha_mean"):
            assert len(client.get_metric_history(run.info.run_id, key)) == EPOCHS, key
        params = run.data.params
        assert (params["arch"], params["bit"], params["power"], params["seed"]) == \
            ("resnet10", "3", str(rec["power"]), "0")
        assert params["batch_size"] == "16" and params["epochs"] == str(EPOCHS) and params["width"] == "8"
        artifacts = {a.path for d in ("record", "export") for a in client.list_artifacts(run.info.run_id, d)}
        assert artifacts == {f"record/{name}.json", f"export/{name}.pt", f"export/{name}.onnx"}, artifacts
        assert rec["onnx_export"] == f"exports/{name}.onnx"
    # the sweep's ONNX export runs in onnxruntime with the checkpoint's predictions
    from apot.export import main as export_main

    onnx_file = experiment / "exports" / f"{stopped}.onnx"
    assert export_main(["--verify", str(onnx_file), "--data-dir", str(synthetic_mnist_root)]) == 0
