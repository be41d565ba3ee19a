"""The trial loop: learning, checkpoints, kill-and-resume, DDP with two real gloo processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from apot.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from apot.data import DeviceMNIST
from apot.distributed import DistInfo
from apot.models import create_model
from apot.optim import make_scheduler
from apot.recipe import TrainConfig
from apot.train import evaluate, run_trial

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(arch="resnet10", bit=4, width=8, batch_size=64)


def _env() -> dict[str, str]:
    # one thread per process: bitwise-reproducible CPU arithmetic, and no oversubscription on 2 cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_cmd(root: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "apot.train", "--arch", "resnet10", "--bit", "4", "--width", "8",
            "--batch-size", "64", "--epochs", str(epochs), "--seed", "3", "--data-dir", str(root),
            "--out", str(out), *extra]


def test_short_run_learns_and_reports_every_epoch(synthetic_mnist_root: Path) -> None:
    seen: list[dict] = []
    cfg = TrainConfig(**SMALL, epochs=3, lr=0.05, data_dir=str(synthetic_mnist_root), device="cpu")
    result = run_trial(cfg, on_epoch=lambda m, s: seen.append(m))
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert seen[-1]["train_loss"] < seen[0]["train_loss"]
    assert result["final_test_acc"] == seen[-1]["test_acc"] > 50.0  # chance is 10%
    assert result["state"] == "TERMINATED" and result["epochs_done"] == 3
    assert result["best_test_acc"] == max(m["test_acc"] for m in seen)
    for m in seen:
        assert m["images_per_s"] > 0 and m["epoch_s"] > 0
        assert m["weight_alpha_mean"] is not None and m["act_alpha_mean"] is not None


def test_step_schedule_never_decays_the_first_epoch() -> None:
    for epochs in (1, 2, 3):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        make_scheduler(opt, "step", epochs)
        assert opt.param_groups[0]["lr"] == 1.0


@pytest.mark.parametrize("schedule,expected", [
    ("cosine", [(1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),  # 1, .854, .5, .146
    ("step", [1.0, 1.0, 0.1, 0.01]),  # x0.1 at 50% and 75% of 4 epochs
    ("constant", [1.0, 1.0, 1.0, 1.0]),
])
def test_schedules(schedule: str, expected: list[float]) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, schedule, epochs=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


def test_kill_and_resume_equals_uninterrupted(synthetic_mnist_root: Path, tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(synthetic_mnist_root, full, 3), check=True, env=_env(), capture_output=True)

    proc = subprocess.Popen(_train_cmd(synthetic_mnist_root, killed, 3), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the line is printed right after epoch 1's checkpoint is on disk
        if line.startswith("epoch 1/3"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = load_checkpoint(killed)["epoch"]
    assert done in (1, 2)
    assert not (killed / "result.json").exists()

    resumed = subprocess.run(_train_cmd(synthetic_mnist_root, killed, 3), check=True, env=_env(),
                             capture_output=True, text=True)
    assert f"resuming {killed / CHECKPOINT_FILE} after epoch {done}" in resumed.stdout
    # what the resumed process trained: only the epochs after the checkpoint (a line per trained epoch)
    trained = [ln.split()[1] for ln in resumed.stdout.splitlines() if ln.startswith("epoch ")]
    assert trained == [f"{e}/3" for e in range(done + 1, 4)], resumed.stdout

    a, b = load_checkpoint(full), load_checkpoint(killed)
    assert a["epoch"] == b["epoch"] == 3
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert [h["test_acc"] for h in a["history"]] == [h["test_acc"] for h in b["history"]]
    assert json.loads((killed / "result.json").read_text())["final_test_acc"] == a["history"][-1]["test_acc"]


def test_resume_refuses_another_trials_checkpoint_and_one_that_needs_more(synthetic_mnist_root: Path,
                                                                         tmp_path: Path) -> None:
    cfg = TrainConfig(**SMALL, epochs=1, data_dir=str(synthetic_mnist_root), device="cpu")
    state = {}
    run_trial(cfg, on_epoch=lambda m, s: state.update(s))
    path = save_checkpoint(state, tmp_path)
    loaded = torch.load(path, weights_only=True)  # tensors and plain data only
    assert loaded["epoch"] == 1 and torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    other = {**state["config"], "bit": 2}
    with pytest.raises(CheckpointError, match=r"another trial: bit=4 \(this run: 2\)"):
        load_checkpoint(tmp_path, other)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint"):
        load_checkpoint(tmp_path, state["config"])

    # The same checkpoint with the RNG state as numpy pickles it (what apot used to write): refused.
    torch.save({**state, "rng": {**state["rng"], "numpy": np.random.get_state()}}, path)
    with pytest.raises(CheckpointError, match=r"refused: it holds more than tensors and plain data "
                                              r"\(Unsupported global: .*numpy") as info:
        load_checkpoint(tmp_path, asdict(cfg))
    assert "\n" not in str(info.value)

    # A planted file whose unpickling would run a command: refused, and the command never runs.
    marker = tmp_path / "code-ran"
    torch.save({**state, "rng": _RunsCode(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match=r"refused: .*GLOBAL (posix|os)\.system"):
        load_checkpoint(tmp_path, asdict(cfg))
    assert not marker.exists()


class _RunsCode:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # unpickling calls os.system(command)
        return (os.system, (self.command,))


def test_resumed_rng_continues_the_same_streams(tmp_path: Path) -> None:
    import random

    from apot.rng import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint({"rng": rng_state()}, tmp_path)
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["rng"])
    again = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


@pytest.mark.parametrize("visible", [1, 3])
def test_rng_restore_with_another_number_of_cuda_devices(visible: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Resources may change on resume: a checkpoint saved with 2 visible CUDA devices restores on 1 (the
    trial's own device, device 0 under Ray, gets its state; the other is dropped) and on 3 (devices 0 and 1
    get theirs). The CUDA calls are stood in for, checking the device index as CUDA would."""
    from apot import rng

    restored: dict[int, torch.Tensor] = {}

    def set_rng_state(state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= visible:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        restored[index] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    saved = {**_rng_state_without_cuda(), "cuda": [torch.full((16,), 7, dtype=torch.uint8),
                                                   torch.full((16,), 9, dtype=torch.uint8)]}
    rng.set_rng_state(saved)
    assert sorted(restored) == list(range(min(visible, 2)))
    for index, state in restored.items():
        assert torch.equal(state, saved["cuda"][index])


def _rng_state_without_cuda() -> dict:
    from apot.rng import rng_state

    state = rng_state()
    state.pop("cuda", None)
    return state


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(_train_cmd(tmp_path / "nowhere", tmp_path / "out", 1), env=_env(), capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "train-images-idx3-ubyte" in r.stderr and "python -m apot.data fetch" in r.stderr


DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from apot.recipe import TrainConfig
    from apot.train import run_trial
    cfg = TrainConfig(arch="resnet10", bit=3, width=8, batch_size=64, epochs=2, data_dir=sys.argv[1],
                      device="cpu")
    from apot.data import DeviceMNIST
    scored = []  # test images this rank scored, per evaluation (the real batches, counted on the way)
    test_batches = DeviceMNIST.test_batches
    def counting(self, *args, **kwargs):
        n = 0
        for x, y in test_batches(self, *args, **kwargs):
            n += y.numel()
            yield x, y
        scored.append(n)
    DeviceMNIST.test_batches = counting
    seen = []
    def on_epoch(metrics, state):
        seen.append(metrics)
        on_epoch.model = {k: v.clone() for k, v in state["model"].items()}
    result = run_trial(cfg, on_epoch=on_epoch)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.save({"model": on_epoch.model, "metrics": seen, "world": world, "scored": scored},
               f"{sys.argv[2]}/rank{rank}.pt")
    dist.destroy_process_group()
""")


def test_ddp_two_gloo_ranks_agree(synthetic_mnist_root: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_trial.py"
    script.write_text(DDP_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*torchrun, str(script), str(synthetic_mnist_root), str(tmp_path)], check=True, env=_env(),
                   capture_output=True, timeout=240, cwd=REPO)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for key, tensor in r0["model"].items():
        assert torch.equal(tensor, r1["model"][key]), key
    timing = ("images_per_s", "epoch_s")  # each rank times itself; everything else is all-reduced
    assert [{k: v for k, v in m.items() if k not in timing} for m in r0["metrics"]] == \
        [{k: v for k, v in m.items() if k not in timing} for m in r1["metrics"]]
    # Each evaluation split the 256 test images between the ranks (none scored twice, none skipped)...
    assert [a + b for a, b in zip(r0["scored"], r1["scored"], strict=True)] == [256, 256]
    assert r0["scored"] == r1["scored"] == [128, 128]
    # ...and the all-reduced numbers are those of the whole split: one process scoring all 256 images with
    # the final model gets the same accuracy (a rank reporting only its shard would not).
    model = create_model("resnet10", 3, power=True, width=8)
    model.load_state_dict(r0["model"])
    data = DeviceMNIST.from_root(synthetic_mnist_root, device=torch.device("cpu"))
    loss, acc = evaluate(model, data, DistInfo())
    assert acc == r0["metrics"][-1]["test_acc"]
    assert loss == pytest.approx(r0["metrics"][-1]["test_loss"], rel=1e-5)
