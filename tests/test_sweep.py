"""tune_sweep.py end to end through a real local Ray (started by the CLI), on synthetic IDX data."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import apot
from apot.config import trial_name

REPO = Path(__file__).resolve().parents[1]
SECRET = ("APOT_TEST_SECRET", "tok-5e1c9a7f3b")  # in every sweep's environment; must never reach a file
TINY = ["--set", "grid.arch=[resnet10]", "--set", "grid.bit=[4,2]", "--set", "train.epochs=2",
        "--set", "train.width=8", "--set", "train.batch_size=64", "--set", "max_retries=0"]


def sweep_cmd(data: Path, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "tune_sweep.py", "--data-dir", str(data), "--storage", str(storage),
            "--display", "plain", *TINY, *extra]


def run_sweep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", SECRET[0]: SECRET[1]}
    return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def rows(table_md: str, heading: str) -> list[list[str]]:
    """The body rows of the Markdown table under ``heading``."""
    section = table_md.split(heading, 1)[1].split("###", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist_root: Path) -> Path:
    """A 2x2 grid (bits 4, 2 x APoT, uniform), 2 DDP workers per trial on CPU, run to completion."""
    storage = tmp_path_factory.mktemp("sweep")
    r = run_sweep(*sweep_cmd(synthetic_mnist_root, storage, "--set", "resources.workers_per_trial=2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout
    return storage / "apot_mnist"


def test_sweep_writes_records_tables_csv_png(finished_sweep: Path) -> None:
    records = {p.stem: json.loads(p.read_text()) for p in (finished_sweep / "records").glob("*.json")}
    assert sorted(records) == ["resnet10_b2_apot_s0", "resnet10_b2_uniform_s0", "resnet10_b4_apot_s0",
                               "resnet10_b4_uniform_s0"]
    for rec in records.values():
        assert rec["state"] == "TERMINATED" and rec["epochs_done"] == 2
        assert rec["final_test_acc"] == rec["history"][-1]["test_acc"]
        assert rec["config"]["batch_size"] == 64
    # each trial kept its per-epoch checkpoints in its own Train storage
    for name in records:
        assert sorted(p.name for p in (finished_sweep / "train" / name).glob("checkpoint_epoch*")) == \
            ["checkpoint_epoch001", "checkpoint_epoch002"]

    tables = (finished_sweep / "tables.md").read_text()
    apot = rows(tables, "### APoT")
    uniform = rows(tables, "### Uniform")
    assert [r[:3] for r in apot] == [["ResNet-10", "4-bit", "batch64_lr0.01_wd0.0001_2epoch"],
                                    ["ResNet-10", "2-bit", "batch64_lr0.01_wd0.0001_2epoch"]]
    for bit, a_row, u_row in zip((4, 2), apot, uniform, strict=True):
        a = records[f"resnet10_b{bit}_apot_s0"]["final_test_acc"]
        u = records[f"resnet10_b{bit}_uniform_s0"]["final_test_acc"]
        assert a_row[3] == f"{a:.2f}" and u_row[3] == f"{u:.2f}"
        assert u_row[4] == f"{round(u, 2) - round(a, 2):+.2f}"

    with open(finished_sweep / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4 and {r["state"] for r in csv_rows} == {"TERMINATED"}
    assert all(float(r["size_kb"]) > 0 and float(r["compression"]) > 1 for r in csv_rows)
    assert (finished_sweep / "accuracy_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((finished_sweep / "results.json").read_text())["provenance"]["epochs"] == 2


def test_finished_trials_are_exported(finished_sweep: Path) -> None:
    """Each finished trial's export decodes to its final checkpoint's model: the same logits."""
    import torch

    from apot.export import load, model_from_checkpoint, read_export

    x = torch.randn(8, 1, 28, 28)
    for path in (finished_sweep / "records").glob("*.json"):
        rec = json.loads(path.read_text())
        assert rec["export"] == f"exports/{path.stem}.pt" and "export_error" not in rec
        export = read_export(finished_sweep / rec["export"])
        assert (export["arch"], export["bit"], export["power"]) == (rec["arch"], rec["bit"], rec["power"])
        size = export["size"]
        assert (rec["size_kb"], rec["compression"]) == (size["size_kb"], size["compression"])
        reference, _, source = model_from_checkpoint(finished_sweep / "train" / path.stem)  # the latest epoch
        assert source["epoch"] == 2 and export["source"]["checkpoint"] == source["checkpoint"]
        with torch.no_grad():
            assert torch.equal(load(finished_sweep / rec["export"])(x), reference(x))


def test_report_only_reproduces_the_tables(finished_sweep: Path, synthetic_mnist_root: Path) -> None:
    before = {n: (finished_sweep / n).read_bytes() for n in ("tables.md", "results.csv")}
    (finished_sweep / "tables.md").unlink()
    r = run_sweep(*sweep_cmd(synthetic_mnist_root, finished_sweep.parent, "--report-only"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert {n: (finished_sweep / n).read_bytes() for n in before} == before


def test_existing_sweep_needs_resume(finished_sweep: Path, synthetic_mnist_root: Path) -> None:
    r = run_sweep(*sweep_cmd(synthetic_mnist_root, finished_sweep.parent), timeout=120)
    assert r.returncode == 2 and "pass --resume" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override,message", [
    ("grid.bit=[7]", r"grid\.bit: 7 is not a supported bit width"),
    ("grid.arch=[resnet99]", r"grid\.arch: .*resnet99"),
    ("train.lr=0", r"train\.lr"),
    ("train.epochs=0", r"train\.epochs"),
    ("resources.gpus_per_worker=1", r"GPU"),
])
def test_config_errors_before_ray(override: str, message: str, synthetic_mnist_root: Path,
                                  tmp_path: Path) -> None:
    t0 = time.time()
    r = run_sweep(*sweep_cmd(synthetic_mnist_root, tmp_path, "--set", override), timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    import re
    assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "apot_mnist").exists()  # nothing started
    assert time.time() - t0 < 60


def test_missing_data_fails_before_ray(tmp_path: Path) -> None:
    r = run_sweep(*sweep_cmd(tmp_path / "no-mnist", tmp_path), timeout=120)
    assert r.returncode == 2 and "python -m apot.data fetch" in r.stderr and "Traceback" not in r.stderr


def test_killed_driver_resumes_without_rerunning_finished_trials(synthetic_mnist_root: Path,
                                                                  tmp_path: Path) -> None:
    cmd = sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "resources.workers_per_trial=1",
                    "--set", "resources.max_concurrent_trials=1")
    records = tmp_path / "apot_mnist" / "records"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    finished: dict[str, bytes] = {}
    deadline = time.time() + 400
    while not finished and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        for path in records.glob("*.json"):
            data = path.read_bytes()
            if b'"state": "TERMINATED"' in data:
                finished[path.name] = data
    assert finished, "no trial finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its process group, no clean-up
    proc.wait()
    time.sleep(2)
    finished = {n: (records / n).read_bytes() for n in finished}  # as left at the kill
    assert len(finished) < 4, "the sweep finished before it could be killed; the test proves nothing"
    mtimes = {n: (records / n).stat().st_mtime_ns for n in finished}

    r = run_sweep(*cmd, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    states = {p.name: json.loads(p.read_text())["state"] for p in records.glob("*.json")}
    assert len(states) == 4 and set(states.values()) == {"TERMINATED"}
    for name, data in finished.items():  # finished trials not run again: byte-identical, not rewritten
        assert (records / name).read_bytes() == data
        assert (records / name).stat().st_mtime_ns == mtimes[name]


def _session_processes(session_id: int, needle: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [int(pid) for pid, sid, *args in (ln.split(None, 2) for ln in out.splitlines() if ln.strip())
            if int(sid) == session_id and needle in " ".join(args)]


def test_killed_worker_is_retried_from_its_checkpoint(synthetic_mnist_root: Path, tmp_path: Path) -> None:
    cmd = sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[4]", "--set", "grid.power=[true]",
                    "--set", "train.epochs=4", "--set", "max_retries=1",
                    # batch 16: 64 steps an epoch, so epochs 2-4 leave seconds to kill the rank mid-training
                    "--set", "train.batch_size=16", "--set", "resources.workers_per_trial=1")
    record = tmp_path / "apot_mnist" / "records" / "resnet10_b4_apot_s0.json"
    # Ray Train's own list of the trial's registered checkpoints: kill once epoch 1's is on it
    snapshot = tmp_path / "apot_mnist" / "train" / "resnet10_b4_apot_s0" / "checkpoint_manager_snapshot.json"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    def registered() -> bool:
        return snapshot.exists() and "checkpoint_epoch001" in snapshot.read_text()

    while time.time() < deadline and not registered():
        time.sleep(0.2)
    workers = _session_processes(proc.pid, "RayTrainWorker")
    assert workers, "no Ray Train worker process found"
    for pid in workers:  # a real crash of the DDP rank, mid-trial
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "RETRYING" in out, out[-3000:]  # the kill failed the trial and the display showed the retry
    rec = json.loads(record.read_text())
    assert rec["state"] == "TERMINATED" and [h["epoch"] for h in rec["history"]] == [1, 2, 3, 4]
    assert rec["resumed_from_epoch"] is not None and rec["resumed_from_epoch"] >= 1  # not restarted from 0


# ------------------------------------------------------------------------------------------ everyday use
def _git_head(repo: Path) -> tuple[str | None, bool | None]:
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return None, None
    def status(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), "status", "--porcelain", *args], capture_output=True,
                              text=True, check=True).stdout

    untracked_code = "??" in status("--untracked-files=all", "--", "apot")
    return head.stdout.strip(), bool(status("--untracked-files=no").strip()) or untracked_code


def test_results_record_provenance_and_no_secret(finished_sweep: Path, synthetic_mnist_root: Path) -> None:
    import platform

    import ray
    import torch

    prov = json.loads((finished_sweep / "results.json").read_text())["provenance"]
    commit, dirty = _git_head(REPO)
    assert (prov["git_commit"], prov["git_dirty"]) == (commit, dirty)
    assert (prov["python"], prov["torch"], prov["ray"]) == (platform.python_version(), torch.__version__,
                                                            ray.__version__)
    assert prov["gpu_count"] == torch.cuda.device_count()
    cmd = sweep_cmd(synthetic_mnist_root, finished_sweep.parent, "--set", "resources.workers_per_trial=2")
    assert prov["command"] == "python " + shlex.join(cmd[1:])
    made_with = (finished_sweep / "tables.md").read_text().split("Made with: ", 1)[1].split("\n", 1)[0]
    code = f"code apot {apot.__version__}, " + (f"git {commit[:12]}" if commit else "not a git checkout")
    for text in (code, f"python {platform.python_version()}", f"torch {torch.__version__}",
                 f"ray {ray.__version__}", "GPUs "):
        assert text in made_with
    outputs = [finished_sweep / n for n in ("results.json", "results.csv", "tables.md", "sweep_config.json")]
    for path in [*outputs, *(finished_sweep / "records").glob("*.json")]:
        assert SECRET[1] not in path.read_text(), path


def test_ray_tools_and_load_results_agree_with_results_csv(finished_sweep: Path) -> None:
    """The README's ways of reading a sweep: Ray's ExperimentAnalysis (per trial and per epoch), TensorBoard's
    event files, apot.report.load_results; all give results.csv's final accuracies."""
    from ray.tune import ExperimentAnalysis

    from apot.report import load_history, load_results

    with open(finished_sweep / "results.csv") as f:
        csv_acc = {(r["arch"], int(r["bit"]), r["quantizer"] == "apot", int(r["seed"])):
                   float(r["final_test_acc"]) for r in csv.DictReader(f)}
    assert len(csv_acc) == 4

    analysis = ExperimentAnalysis(str(finished_sweep))
    df = analysis.dataframe()
    ray_acc = {(r["config/arch"], r["config/bit"], r["config/power"], r["config/seed"]): r["test_acc"]
               for _, r in df.iterrows()}
    assert ray_acc == csv_acc
    for trial in analysis.trials:  # per epoch: Ray's progress.csv equals the trial record's history
        config = trial.config
        record = json.loads((finished_sweep / "records" / f"{trial_name(config)}.json").read_text())
        curve = analysis.trial_dataframes[trial.trial_id]
        assert curve["test_acc"].tolist() == [h["test_acc"] for h in record["history"]]
        assert list((finished_sweep / trial_name(config)).glob("events.out.tfevents.*"))  # for TensorBoard

    ours = load_results(finished_sweep)
    assert {(r.arch, r.bit, r.quantizer == "apot", r.seed): r.final_test_acc
            for r in ours.itertuples()} == csv_acc
    history = load_history(finished_sweep)
    assert len(history) == 4 * 2 and set(history["epoch"]) == {1, 2}


def _apot_sweep() -> Path:
    return Path(sys.executable).with_name("apot-sweep")


def test_report_only_outside_the_checkout(finished_sweep: Path, synthetic_mnist_root: Path,
                                          tmp_path: Path) -> None:
    """From a folder without search_space.yaml, the installed apot-sweep (or tune_sweep.py where apot is
    not installed) finds the default config and rebuilds every output, learning_curves.png included."""
    installed = _apot_sweep().exists()
    command = [str(_apot_sweep())] if installed else [sys.executable, str(REPO / "tune_sweep.py")]
    before = {n: (finished_sweep / n).read_bytes() for n in ("tables.md", "results.csv")}
    (finished_sweep / "learning_curves.png").unlink()
    cmd = [*command, "--report-only", *sweep_cmd(synthetic_mnist_root, finished_sweep.parent)[2:]]
    env = os.environ if installed else {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("config: ") and "search_space.yaml (the default;" in r.stdout.splitlines()[0]
    assert {n: (finished_sweep / n).read_bytes() for n in before} == before
    assert (finished_sweep / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not _apot_sweep().exists(), reason="apot is not pip-installed in this environment")
def test_installed_command_version() -> None:
    r = subprocess.run([str(_apot_sweep()), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"apot-sweep {apot.__version__} (")
