"""``auto`` resources are fitted to the cluster a sweep joins, also when only ``$RAY_ADDRESS`` names it (as
``ray job submit`` does). The cluster here is a local Ray head that advertises GPUs it does not have (Ray
takes ``--num-gpus`` as given), on loopback, token-authenticated, in a private temp dir."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """(address, environment to join it) of a running head with 4 CPUs and 2 (advertised) GPUs."""
    root = Path(tempfile.mkdtemp(prefix="apot-c-", dir="/tmp"))  # short: Ray's socket paths live below it
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=4", "--num-gpus=2", f"--temp-dir={root}/ray",
         "--include-dashboard=false", "--disable-usage-stats", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the test's Ray head did not start") from None
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_dry_run_under_ray_address_fits_auto_to_the_joined_cluster(gpu_cluster: tuple[str, dict[str, str]],
                                                                   synthetic_mnist_root: Path,
                                                                   tmp_path: Path) -> None:
    address, env = gpu_cluster
    r = subprocess.run([sys.executable, "tune_sweep.py", "--dry-run", "--data-dir", str(synthetic_mnist_root),
                        "--storage", str(tmp_path), "--set", "grid.arch=[resnet18]"],
                       cwd=REPO, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resources of the cluster at {address}: 4 CPUs, 2 GPUs" in r.stdout, r.stdout[-2000:]
    trial_lines = [line for line in r.stdout.splitlines() if line.startswith("  resnet18")]
    assert len(trial_lines) == 9
    # auto on GPUs: single-rank trials share a GPU (1 / trials_per_gpu each), and so run on CUDA
    assert all("  GPU 0." in line and "  cuda  " in line for line in trial_lines), trial_lines
