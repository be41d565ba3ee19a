"""tune_sweep.py end to end through a real local Ray (started by the CLI), on synthetic IDX data."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from listening import exposed, listening_sockets

import apot
from apot.config import grid_point, trial_name

REPO = Path(__file__).resolve().parents[1]
SECRET = ("APOT_TEST_SECRET", "tok-5e1c9a7f3b")  # in every sweep's environment; must never reach a file
TINY = ["--set", "grid.arch=[resnet10]", "--set", "grid.bit=[4,2]",
        "--set", "train.init_from=null",  # no FP32 trial in this grid: every trial from scratch
        "--set", "train.epochs=2",
        "--set", "train.width=8", "--set", "train.batch_size=64", "--set", "max_retries=0"]


def sweep_cmd(data: Path, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "tune_sweep.py", "--data-dir", str(data), "--storage", str(storage),
            "--display", "plain", *TINY, *extra]


def finished_cmd(data: Path, storage: Path, *extra: str) -> list[str]:
    """The command of the `finished_sweep` fixture (2-bit APoT and uniform), with ``extra`` after it."""
    return sweep_cmd(data, storage, "--set", "grid.bit=[2]", *extra)


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
    """2-bit APoT and uniform, 2 DDP workers per trial on CPU, run to completion."""
    storage = tmp_path_factory.mktemp("sweep")
    r = run_sweep(*finished_cmd(synthetic_mnist_root, storage, "--set", "resources.workers_per_trial=2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout
    (storage / "stdout.txt").write_text(r.stdout)
    return storage / "apot_mnist"


def private_ray_dir(stdout: str) -> Path:
    """The private Ray's root folder, from the sweep's start-up line."""
    match = re.search(r"^ray: private local cluster at 127\.0\.0\.1:\d+ .*logs in (\S+)/ray", stdout, re.M)
    assert match, f"no private-Ray start-up line in:\n{stdout[:2000]}"
    return Path(match.group(1))


def test_sweep_runs_on_a_private_ray_and_loads_checkpoints_safely(finished_sweep: Path) -> None:
    stdout = (finished_sweep.parent / "stdout.txt").read_text()
    root = private_ray_dir(stdout)
    assert root.name.startswith("apot-ray-") and not root.exists()  # removed after a sweep that ended well
    checkpoints = sorted((finished_sweep / "train").glob("*/checkpoint_epoch*/checkpoint.pt"))
    assert len(checkpoints) == 4
    for path in checkpoints:  # tensors and plain data only: nothing in them can run code when loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_sweep_writes_records_tables_csv_png(finished_sweep: Path) -> None:
    records = {p.stem: json.loads(p.read_text()) for p in (finished_sweep / "records").glob("*.json")}
    assert sorted(records) == ["resnet10_b2_apot_s0", "resnet10_b2_uniform_s0"]
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
    assert [r[:3] for r in apot] == [["ResNet-10", "2-bit", "batch64_lr0.01_wd0.0001_2epoch"]]
    for bit, a_row, u_row in zip((2,), apot, uniform, strict=True):
        a = records[f"resnet10_b{bit}_apot_s0"]["final_test_acc"]
        u = records[f"resnet10_b{bit}_uniform_s0"]["final_test_acc"]
        assert a_row[3] == f"{a:.2f}" and u_row[3] == f"{u:.2f}"
        assert u_row[4] == f"{round(u, 2) - round(a, 2):+.2f}"

    with open(finished_sweep / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 2 and {r["state"] for r in csv_rows} == {"TERMINATED"}
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
    r = run_sweep(*finished_cmd(synthetic_mnist_root, finished_sweep.parent, "--report-only"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert {n: (finished_sweep / n).read_bytes() for n in before} == before


def test_update_readme_writes_the_sweeps_tables_between_the_markers(finished_sweep: Path,
                                                                   synthetic_mnist_root: Path,
                                                                   tmp_path: Path) -> None:
    """`tune_sweep.py --report-only --update-readme`, end to end: the README beside the script (a copy of
    the script here, so the repository's README is not touched) gets the sweep's tables.md between its
    markers, under the stored provenance; every byte outside the markers stays."""
    from apot.report import README_END, README_START

    shutil.copy(REPO / "tune_sweep.py", tmp_path / "tune_sweep.py")
    head, tail = "# A project\n\nIntro.\n\n", "\n\n## Later\n\nkept as it was\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"{head}{README_START}\nold tables\n{README_END}{tail}")
    cmd = [sys.executable, str(tmp_path / "tune_sweep.py"), "--config", str(REPO / "search_space.yaml"),
           "--report-only", "--update-readme", *finished_cmd(synthetic_mnist_root, finished_sweep.parent)[2:]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    text = readme.read_text()
    assert text.startswith(head + README_START + "\n") and text.endswith(README_END + tail)
    inside = text[len(head) + len(README_START):-len(README_END + tail)]
    tables = (finished_sweep / "tables.md").read_text().strip("\n")
    assert "old tables" not in inside and tables in inside
    stored = json.loads((finished_sweep / "results.json").read_text())["provenance"]["command"]
    assert f"Command: `{stored}`" in inside  # how the numbers were made, not this --report-only call
    assert len(rows(inside, "### APoT")) == 1 and len(rows(inside, "### Uniform")) == 1


def test_existing_sweep_needs_resume(finished_sweep: Path, synthetic_mnist_root: Path) -> None:
    r = run_sweep(*finished_cmd(synthetic_mnist_root, finished_sweep.parent), timeout=120)
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


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_data_fails_before_ray(tmp_path: Path) -> None:
    # Online or not, the download cannot succeed: every HTTP(S) request goes to a proxy that refuses it.
    proxy = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(http_proxy=proxy, https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy, PYTHONUNBUFFERED="1")
    t0 = time.time()
    r = subprocess.run(sweep_cmd(tmp_path / "no-mnist", tmp_path / "storage"), cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "MNIST download into" in r.stderr and "python -m apot.data fetch" in r.stderr
    assert "Traceback" not in r.stderr and "ray: " not in r.stdout  # no Ray started
    assert not (tmp_path / "storage").exists() and time.time() - t0 < 90


def _one_line_error(r: subprocess.CompletedProcess, pattern: str) -> None:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(pattern, r.stderr), r.stderr
    assert "ray: " not in r.stdout  # refused before Ray started


def test_bad_storage_and_resume_paths_are_one_line(synthetic_mnist_root: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    for storage in (a_file, a_file / "below"):
        r = run_sweep(*sweep_cmd(synthetic_mnist_root, storage), timeout=120)
        _one_line_error(r, rf"storage: {re.escape(str(a_file))} is a file, not a folder")
    assert a_file.read_text() == "not a folder"

    # --resume with nothing there (a mistyped --storage) must not silently start a new sweep
    r = run_sweep(*sweep_cmd(synthetic_mnist_root, tmp_path / "typo"), "--resume", timeout=120)
    _one_line_error(r, r"--resume: no sweep to resume at .*typo/apot_mnist")
    assert not (tmp_path / "typo").exists()


def test_resume_refuses_a_grid_that_loses_trials(finished_sweep: Path, synthetic_mnist_root: Path) -> None:
    before = (finished_sweep / "sweep_config.json").read_bytes()
    cmd = finished_cmd(synthetic_mnist_root, finished_sweep.parent, "--set", "grid.bit=[4]", "--resume")
    _one_line_error(run_sweep(*cmd, timeout=120),
                    r"--resume: the grid of the sweep stored at .* may grow but not lose trials; "
                    r"this one drops resnet10_b2_apot_s0")
    cmd = finished_cmd(synthetic_mnist_root, finished_sweep.parent, "--set", "grid.bit=[2,3]",
                    "--set", "train.epochs=3", "--resume")  # a grown grid, but another training setup
    _one_line_error(run_sweep(*cmd, timeout=120),
                    r"--resume: the training setup differs from the sweep stored at .*: "
                    r"train\.epochs=2 \(this run: 3\); .*only --data-dir and train\.compile may change")
    assert (finished_sweep / "sweep_config.json").read_bytes() == before


def test_resume_with_a_grown_grid_trains_only_the_new_trials(finished_sweep: Path, synthetic_mnist_root: Path,
                                                              tmp_path: Path) -> None:
    """Add bit 3 (APoT and uniform) to the finished 2-bit sweep: the 2 finished trials are reported, not
    trained again (also when stored before settings were removed); the 2 new ones train; the stored config
    and the results now hold the grown grid."""
    experiment = tmp_path / finished_sweep.name
    shutil.copytree(finished_sweep, experiment)
    # as stored while distill and label_smoothing existed: the same trials (apot.recipe.REMOVED_SETTINGS)
    for path in [*(experiment / "records").glob("*.json"), experiment / "sweep_config.json"]:
        data = json.loads(path.read_text())
        (data["config"] if "config" in data else data["train"]).update(distill=0.0, label_smoothing=0.0)
        path.write_text(json.dumps(data))
    records = {p.name: p.read_bytes() for p in (experiment / "records").glob("*.json")}
    r = run_sweep(*sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[2,3]", "--resume"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resume: the grid grew by 2 trials (resnet10_b3_apot_s0, resnet10_b3_uniform_s0)" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    for name, data in records.items():
        assert (experiment / "records" / name).read_bytes() == data, name  # not trained again
    for name in ("resnet10_b3_apot_s0", "resnet10_b3_uniform_s0"):
        rec = json.loads((experiment / "records" / f"{name}.json").read_text())
        assert rec["state"] == "TERMINATED" and rec["epochs_trained"] == [1, 2], name
    assert json.loads((experiment / "sweep_config.json").read_text())["grid"]["bit"] == [2, 3]
    results = json.loads((experiment / "results.json").read_text())["records"]
    assert sorted((r["bit"], r["power"]) for r in results) == [(2, False), (2, True), (3, False), (3, True)]


def test_resume_without_tunes_state_keeps_finished_trials(finished_sweep: Path, synthetic_mnist_root: Path,
                                                           tmp_path: Path) -> None:
    """A driver killed while Tune saved its state leaves experiment_state-*.json empty (seen under Slurm's
    scancel). --resume never reads Tune's state: it resumes from records and checkpoints under a fresh
    Tuner, the finished trials untouched, an unfinished one continued from its last Ray Train checkpoint."""
    experiment = tmp_path / finished_sweep.name
    shutil.copytree(finished_sweep, experiment)
    (state_file,) = experiment.glob("experiment_state-*.json")
    state_file.write_text("")  # as the cancelled Slurm job left it
    records = sorted((experiment / "records").glob("*.json"))
    unfinished = records[0]
    rec = json.loads(unfinished.read_text())
    unfinished.write_text(json.dumps({**rec, "state": "RUNNING"}))  # its checkpoint_epoch002 is still there
    finished = {p.name: p.read_bytes() for p in records[1:]}

    r = run_sweep(*finished_cmd(synthetic_mnist_root, tmp_path, "--resume"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr and "Failed to restore" not in r.stdout + r.stderr
    assert {p.name: p.read_bytes() for p in records[1:]} == finished  # not trained again, not rewritten
    rec = json.loads(unfinished.read_text())
    assert rec["state"] == "TERMINATED" and rec["resumed_from_epoch"] == 2 and rec["epochs_trained"] == []
    results = json.loads((experiment / "results.json").read_text())["records"]
    assert len(results) == 2 and {r["state"] for r in results} == {"TERMINATED"}


def registered_epochs(train_dir: Path) -> list[int]:
    """The checkpoint epochs Ray Train has registered for a trial (what a restarted trial resumes from)."""
    snapshot = train_dir / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except FileNotFoundError:
        return []
    return sorted({int(n) for n in re.findall(r"checkpoint_epoch(\d{3})", text)})


def epoch_lines(stdout: str, trial: str) -> list[str]:
    """The "epoch k/N" the plain display printed for ``trial`` (one per epoch Tune received)."""
    return re.findall(rf"{re.escape(trial)} +epoch (\d+/\d+)", stdout)


def test_killed_driver_resumes_finished_and_unfinished_trials(synthetic_mnist_root: Path,
                                                               tmp_path: Path) -> None:
    """Kill the driver once a trial has finished and another is part-way; --resume must not run the finished
    one again, must continue the other from its last checkpoint, and must keep only the last 2 checkpoints."""
    cmd = sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[2]",  # 2 trials: APoT, uniform
                    "--set", "resources.workers_per_trial=1",
                    "--set", "resources.max_concurrent_trials=1", "--set", "train.epochs=3",
                    # batch 16: 64 steps an epoch, so epochs 2-3 leave seconds to kill the driver part-way
                    "--set", "train.batch_size=16")
    experiment = tmp_path / "apot_mnist"
    records = experiment / "records"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    finished: dict[str, bytes] = {}
    partway: dict[str, list[int]] = {}
    ranks_seen: dict[int, list[tuple[str, int]]] = {}  # each training rank's listening sockets, as sampled
    deadline = time.time() + 500
    while not (finished and partway) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        for pid in _session_processes(proc.pid, "ray::RayTrainWorker"):
            ranks_seen.setdefault(pid, []).extend(listening_sockets(pid))
        finished, partway = {}, {}
        for path in records.glob("*.json"):
            data = path.read_bytes()
            if b'"state": "TERMINATED"' in data:
                finished[path.name] = data
            elif registered := registered_epochs(experiment / "train" / path.stem):
                partway[path.name] = registered
    kill_session(proc.pid)  # the driver and every Ray process it started, at once, no clean-up
    proc.wait()
    assert finished and partway, "no trial was part-way when a trial had finished; the test proves nothing"
    # a trial's ranks share this node: they rendezvous without a port other machines reach (apot.rendezvous)
    sockets = [s for socks in ranks_seen.values() for s in socks]
    assert len(ranks_seen) >= 2 and not exposed(sockets), ranks_seen
    time.sleep(2)
    # as left at the kill (a part-way trial may have finished before the kill landed: then it is finished)
    done = b'"state": "TERMINATED"'
    finished = {p.name: p.read_bytes() for p in records.glob("*.json") if done in p.read_bytes()}
    mtimes = {n: (records / n).stat().st_mtime_ns for n in finished}
    partway = {n: registered_epochs(experiment / "train" / Path(n).stem) for n in partway
               if n not in finished}
    assert partway, "the part-way trial finished before the kill; the test proves nothing"
    assert len(finished) == 1 and all(max(e) < 3 for e in partway.values())

    r = run_sweep(*cmd, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    states = {p.name: json.loads(p.read_text())["state"] for p in records.glob("*.json")}
    assert len(states) == 2 and set(states.values()) == {"TERMINATED"}
    for name, data in finished.items():  # finished trials not run again: byte-identical, not rewritten
        assert (records / name).read_bytes() == data
        assert (records / name).stat().st_mtime_ns == mtimes[name]
    for name, registered in partway.items():  # continued from its last checkpoint: only later epochs ran
        rec = json.loads((records / name).read_text())
        last = max(registered)
        assert rec["resumed_from_epoch"] == last and rec["epochs_trained"] == list(range(last + 1, 4))
        assert [h["epoch"] for h in rec["history"]] == [1, 2, 3]
        trial = display_name(Path(name).stem)
        assert epoch_lines(r.stdout, trial) == [f"{e}/3" for e in range(last + 1, 4)], r.stdout[-3000:]
    for name in set(states) - set(finished):  # the trials run (or continued) by --resume keep their last 2
        train_dir = experiment / "train" / Path(name).stem
        assert sorted(p.name for p in train_dir.glob("checkpoint_epoch*")) == \
            ["checkpoint_epoch002", "checkpoint_epoch003"], train_dir


def kill_session(session_id: int) -> None:
    """SIGKILL every process of a session (a crash of the whole driver side). Killing the process group
    alone is not enough: Ray's worker processes leave it, and one left training would finish its trial."""
    for _ in range(20):
        pids = session_pids(session_id)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def display_name(trial: str) -> str:
    """resnet10_b4_apot_s0 -> the plain display's "resnet10 4-bit APoT s0"."""
    arch, bit, power, seed = trial.split("_")
    return f"{arch} {bit[1:]}-bit {'APoT' if power == 'apot' else 'uniform'} {seed}"


def _session_processes(session_id: int, needle: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [int(pid) for pid, sid, *args in (ln.split(None, 2) for ln in out.splitlines() if ln.strip())
            if int(sid) == session_id and needle in " ".join(args)]


def kill_rank_after_epoch1(cmd: list[str], train_dir: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start the sweep ``cmd``; once Ray Train has registered the trial's epoch-1 checkpoint, SIGKILL its
    DDP rank (a real crash, mid-trial). Returns the running sweep and the epochs registered at the kill."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not registered_epochs(train_dir) and proc.poll() is None:
        time.sleep(0.2)
    workers = _session_processes(proc.pid, "RayTrainWorker")
    assert workers, "no Ray Train worker process found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    return proc, registered_epochs(train_dir)


def test_killed_worker_is_retried_from_its_checkpoint(synthetic_mnist_root: Path, tmp_path: Path) -> None:
    cmd = sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[4]", "--set", "grid.power=[true]",
                    "--set", "train.epochs=4", "--set", "max_retries=1",
                    # batch 16: 64 steps an epoch, so epochs 2-4 leave seconds to kill the rank mid-training
                    "--set", "train.batch_size=16", "--set", "resources.workers_per_trial=1")
    record = tmp_path / "apot_mnist" / "records" / "resnet10_b4_apot_s0.json"
    train_dir = tmp_path / "apot_mnist" / "train" / "resnet10_b4_apot_s0"
    proc, registered = kill_rank_after_epoch1(cmd, train_dir)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "RETRYING" in out, out[-3000:]  # the kill failed the trial and the display showed the retry
    rec = json.loads(record.read_text())
    assert rec["state"] == "TERMINATED" and [h["epoch"] for h in rec["history"]] == [1, 2, 3, 4]
    last = max(registered)  # what the retry must resume from, and the epochs it must then train itself
    assert last < 4 and rec["resumed_from_epoch"] == last
    assert rec["epochs_trained"] == list(range(last + 1, 5))
    after_retry = out.split("RETRYING", 1)[1]
    assert epoch_lines(after_retry, "resnet10 4-bit APoT s0") == [f"{e}/4" for e in range(last + 1, 5)], out
    assert sorted(p.name for p in train_dir.glob("checkpoint_epoch*")) == \
        ["checkpoint_epoch003", "checkpoint_epoch004"]  # only the last 2 kept


def test_trial_that_fails_for_good_makes_the_sweep_exit_1(synthetic_mnist_root: Path, tmp_path: Path) -> None:
    cmd = sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[4]", "--set", "grid.power=[true]",
                    "--set", "train.epochs=3", "--set", "max_retries=0",
                    "--set", "train.batch_size=16", "--set", "resources.workers_per_trial=1")
    experiment = tmp_path / "apot_mnist"
    train_dir = experiment / "train" / "resnet10_b4_apot_s0"
    proc, registered = kill_rank_after_epoch1(cmd, train_dir)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 1, out[-3000:]  # no retries left: the trial ends in ERROR
    rec = json.loads((experiment / "records" / "resnet10_b4_apot_s0.json").read_text())
    assert rec["state"] == "ERROR" and rec["error"] and rec["final_test_acc"] is None
    done = [h["epoch"] for h in rec["history"]]  # its finished epochs are kept...
    assert done and done == list(range(1, len(done) + 1))
    for epoch in registered:  # ...and so are their checkpoints
        assert (train_dir / f"checkpoint_epoch{epoch:03d}" / "checkpoint.pt").is_file()
    apot = rows((experiment / "tables.md").read_text(), "### APoT")
    assert [r[3] for r in apot] == ["failed"]
    with open(experiment / "results.csv") as f:
        assert [row["state"] for row in csv.DictReader(f)] == ["ERROR"]
    assert "ray: logs kept in " in out and private_ray_dir(out).is_dir()  # a failed sweep keeps Ray's logs
    shutil.rmtree(private_ray_dir(out), ignore_errors=True)


# ------------------------------------------------------------------------------- a foreign Ray on the host
LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def listening_addresses(pids: set[int]) -> dict[int, set[str]]:
    """{pid: {hex local address:port}} of the TCP sockets these processes listen on (from /proc)."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue  # exited meanwhile
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN
                found.setdefault(owner[fields[9]], set()).add(fields[1])
    return found


def processes_referencing(needle: str) -> set[int]:
    """PIDs whose command line contains ``needle``."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle.encode() in (proc / "cmdline").read_bytes():
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def session_pids(session_id: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return {int(pid) for pid, sid in (ln.split() for ln in out.splitlines() if ln.strip())
            if int(sid) == session_id}


class ForeignRay:
    """An unrelated `ray start --head` in Ray's default temp dir (so it writes /tmp/ray/ray_current_cluster,
    which a bare ray.init() follows) and without token auth: the most tempting cluster to join by mistake.
    Other tests on this host could join it too, so keep it short-lived; it is stopped by its own PIDs, never
    by `ray stop` (which kills every Ray on the host)."""

    current = Path("/tmp/ray/ray_current_cluster")

    def __init__(self) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "TMPDIR"}
        self.env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self.before = self.current.read_bytes() if self.current.exists() else None
        self.port = closed_port()
        self.session: Path | None = None
        ray_bin = str(Path(sys.executable).with_name("ray"))
        self.head = subprocess.Popen(
            [ray_bin, "start", "--head", f"--port={self.port}", "--num-cpus=1", "--num-gpus=0",
             "--include-dashboard=false", "--disable-usage-stats", "--block"], env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while not self._ours():
            if self.head.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("the foreign Ray head did not start")
            time.sleep(0.5)
        self.address = self.current.read_text().strip()
        self.session = Path("/tmp/ray/session_latest").resolve()

    def _ours(self) -> bool:
        return self.current.exists() and self.current.read_text().strip().endswith(f":{self.port}")

    def jobs(self) -> list[dict]:
        """Every driver that ever connected to this cluster (the GCS job table), this query's included."""
        r = subprocess.run([sys.executable, "-c", JOBS], env={**self.env, "FOREIGN": self.address},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                self.head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.head.kill()
                self.head.wait()
        if self.session is not None:
            deadline = time.time() + 20
            while (left := processes_referencing(f"{self.session}/")) and time.time() < deadline:
                time.sleep(0.5)
            for pid in left:  # only processes of this head's own session
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._ours():  # leave the pointer as it was, not naming a dead cluster
            if self.before is None:
                self.current.unlink()
            else:
                self.current.write_bytes(self.before)


JOBS = """
import json, os, ray
ray.init(address=os.environ["FOREIGN"], logging_level="ERROR", log_to_driver=False)
jobs = ray._private.state.jobs()
print(json.dumps([{"pid": j.get("DriverPid"), "entry": j.get("Entrypoint", "")} for j in jobs]))
ray.shutdown()
"""


def test_sweep_ignores_a_foreign_ray_and_keeps_its_own_private(synthetic_mnist_root: Path,
                                                               tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONUNBUFFERED="1")
    cmd = sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[4]", "--set", "grid.power=[true]",
                    "--set", "train.epochs=1", "--set", "train.batch_size=16",
                    "--set", "resources.workers_per_trial=1")
    foreign = ForeignRay()
    proc = None
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        lines: list[str] = []
        for line in proc.stdout:  # up to the start-up line: Ray is up (or joined) by then
            lines.append(line)
            if line.startswith("ray: "):
                break
        jobs = foreign.jobs()
    finally:
        foreign.stop()
        if proc is not None and sys.exc_info()[0] is not None:
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        check_private_sweep(proc, lines, jobs, tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def check_private_sweep(proc: subprocess.Popen, lines: list[str], jobs: list[dict], tmp_path: Path) -> None:
    # the sweep never joined the foreign cluster (other drivers on this host may have: see ForeignRay)
    assert proc.pid not in {j["pid"] for j in jobs}, jobs
    assert not [j for j in jobs if str(tmp_path) in j["entry"]], jobs
    root = private_ray_dir("".join(lines))
    info = root.lstat()
    assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700 and not root.is_symlink()
    assert len(str(root)) <= 28

    # While the trial trains: Ray's processes have the token in their environment only, every process of
    # the sweep listens on loopback only, and nothing Ray wrote so far holds the token.
    deadline = time.time() + 300
    while not _session_processes(proc.pid, "RayTrainWorker") and time.time() < deadline:
        time.sleep(0.2)
    ours = session_pids(proc.pid)
    tokens = set()
    for pid in ours:  # Ray's processes get the token through their environment
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        tokens |= {v.split(b"=", 1)[1] for v in environ if v.startswith(b"RAY_AUTH_TOKEN=")}
    assert len(tokens) == 1, tokens
    token = tokens.pop()
    assert re.fullmatch(rb"[0-9a-f]{64}", token)
    assert not [p for p in processes_referencing(token.decode())], "the token is on a command line"
    listening = listening_addresses(ours)
    assert len(listening) >= 3, listening  # at least the GCS, the raylet and a worker
    for pid, addresses in listening.items():
        assert {a.rsplit(":", 1)[0] for a in addresses} <= LOOPBACK_HEX, (pid, addresses)
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
            try:
                assert token not in path.read_bytes(), f"{path} holds the token"
            except OSError:
                continue

    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=400) == 0, out[-3000:]
    assert re.search(r"TERMINATED  final test", out), out[-3000:]
    assert not root.exists()  # removed after a sweep that ended well


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
    cmd = finished_cmd(synthetic_mnist_root, finished_sweep.parent, "--set", "resources.workers_per_trial=2")
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
    assert len(csv_acc) == 2

    analysis = ExperimentAnalysis(str(finished_sweep))
    df = analysis.dataframe()
    keys = [f"config/point/{k}" for k in ("arch", "bit", "power", "seed")]  # Tune flattens the trial's point
    ray_acc = {tuple(r[k] for k in keys): r["test_acc"] for _, r in df.iterrows()}
    assert ray_acc == csv_acc
    for trial in analysis.trials:  # per epoch: Ray's progress.csv equals the trial record's history
        name = trial_name(grid_point(trial.config))
        record = json.loads((finished_sweep / "records" / f"{name}.json").read_text())
        curve = analysis.trial_dataframes[trial.trial_id]
        assert curve["test_acc"].tolist() == [h["test_acc"] for h in record["history"]]
        assert list((finished_sweep / name).glob("events.out.tfevents.*"))  # for TensorBoard

    ours = load_results(finished_sweep)
    assert {(r.arch, r.bit, r.quantizer == "apot", r.seed): r.final_test_acc
            for r in ours.itertuples()} == csv_acc
    history = load_history(finished_sweep)
    assert len(history) == 2 * 2 and set(history["epoch"]) == {1, 2}


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
    cmd = [*command, "--report-only", *finished_cmd(synthetic_mnist_root, finished_sweep.parent)[2:]]
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


def test_init_from_fp32_starts_quantized_trials_from_the_fp32_trial(synthetic_mnist_root: Path,
                                                                    tmp_path: Path) -> None:
    r = run_sweep(*sweep_cmd(synthetic_mnist_root, tmp_path, "--set", "grid.bit=[2,32]",
                             "--set", "grid.power=[true]", "--set", "train.init_from=fp32"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    experiment = tmp_path / "apot_mnist"
    fp32 = json.loads((experiment / "records" / "resnet10_fp32_s0.json").read_text())
    b2 = json.loads((experiment / "records" / "resnet10_b2_apot_s0.json").read_text())
    assert fp32["state"] == b2["state"] == "TERMINATED" and b2["epochs_trained"] == [1, 2]
    assert fp32["init_checkpoint"] is None  # the FP32 trial itself starts from scratch
    final = experiment / "train" / "resnet10_fp32_s0" / "checkpoint_epoch002" / "checkpoint.pt"
    assert b2["init_checkpoint"] == str(final) and final.is_file()
    apot_rows = rows((experiment / "tables.md").read_text(), "### APoT")
    assert [r[:3] for r in apot_rows] == [["ResNet-10", "FP32", "batch64_lr0.01_wd0.0001_2epoch"],
                                         ["ResNet-10", "2-bit", "batch64_lr0.01_wd0.0001_2epoch_fp32init"]]


def test_the_fp32_checkpoint_a_quantized_trial_starts_from(tmp_path: Path) -> None:
    """GridPoints starts a quantized trial only once its FP32 trial TERMINATED; fp32_checkpoint still
    refuses, in one line, an FP32 trial that has not finished or whose final checkpoint is gone."""
    from apot.checkpoint import write_json
    from apot.recipe import TrainConfig
    from apot.sweep import fp32_checkpoint, record_path

    point = {"arch": "resnet10", "bit": 2, "power": True, "seed": 0}
    cfg = TrainConfig(**point, epochs=3, init_from="fp32")
    with pytest.raises(RuntimeError, match=r"resnet10_fp32_s0 has not finished \(no record\), so "
                                           r"resnet10_b2_apot_s0 cannot start"):
        fp32_checkpoint(tmp_path, point, cfg)
    fp32_record = record_path(tmp_path, {**point, "bit": 32})
    fp32_record.parent.mkdir(parents=True)
    write_json({"state": "ERROR"}, fp32_record)
    with pytest.raises(RuntimeError, match=r"resnet10_fp32_s0 has not finished \(ERROR\)"):
        fp32_checkpoint(tmp_path, point, cfg)
    write_json({"state": "TERMINATED"}, fp32_record)
    with pytest.raises(RuntimeError, match=r"fp32_s0 finished but .*checkpoint_epoch003.* is missing"):
        fp32_checkpoint(tmp_path, point, cfg)
    final = tmp_path / "train" / "resnet10_fp32_s0" / "checkpoint_epoch003" / "checkpoint.pt"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"x")
    assert fp32_checkpoint(tmp_path, point, cfg) == final


def test_a_run_torn_down_after_its_trial_finished_keeps_the_finished_record(tmp_path: Path) -> None:
    """The trial driver's TorchTrainer can raise after rank 0 wrote the TERMINATED record (a stop arriving
    as the trial ends tears the run down): that record stands, so a resume does not start the trial again.
    A record short of its last epoch becomes INCOMPLETE under a stop and ERROR (with the error) otherwise."""
    from dataclasses import asdict

    from apot.checkpoint import write_json
    from apot.recipe import TrainConfig
    from apot.sweep import read_record, record_failure, record_path
    from apot.train import summarize

    point = {"arch": "resnet10", "bit": 2, "power": False, "seed": 0}
    cfg = TrainConfig(**point, epochs=2)
    history = [{"epoch": e, "test_acc": 90.0 + e, "train_acc": 80.0, "epoch_s": 1.0} for e in (1, 2)]
    path = record_path(tmp_path, point)
    path.parent.mkdir(parents=True)

    def failing(message: str) -> BaseException:
        try:
            raise RuntimeError(message)
        except RuntimeError as exc:
            return exc

    finished = summarize(cfg, history)
    assert finished["state"] == "TERMINATED"
    write_json(finished, path)
    for stopping in (True, False):
        assert record_failure(path, cfg, failing("torn down"), stopping=stopping) == "TERMINATED"
        assert read_record(path) == finished

    write_json({**summarize(cfg, history[:1]), "state": "RUNNING"}, path)
    assert record_failure(path, cfg, failing("placement group removed"), stopping=True) == "INCOMPLETE"
    assert read_record(path)["state"] == "INCOMPLETE" and read_record(path)["epochs_done"] == 1
    assert record_failure(path, cfg, failing("worker died"), stopping=False) == "ERROR"
    assert read_record(path)["error"] == "RuntimeError: worker died"

    other = TrainConfig(**point, epochs=2, lr=0.1)  # a finished record of another setup is not this trial's
    write_json(finished, path)
    assert record_failure(path, other, failing("x"), stopping=True) == "INCOMPLETE"
    assert read_record(path)["config"] == asdict(cfg)
