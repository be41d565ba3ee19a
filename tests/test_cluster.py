"""A two-node Ray cluster on this one host, without Slurm: what slurm/ray_cluster.sh builds, checked directly.

The head and a second raylet are `ray start --block` processes of this test with their own short temp dirs,
free ports and a fresh auth token, so they cannot collide with another Ray on the host (a teammate's
`ray.init()`, a Slurm job's cluster). Drivers run in subprocesses: this pytest process never joins a
cluster. `ray stop` is never used: it would kill every Ray on the host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from synthetic_mnist import make_synthetic_mnist

REPO = Path(__file__).resolve().parents[1]
RAY_CLUSTER = REPO / "slurm" / "ray_cluster.sh"
RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60

pytestmark = pytest.mark.slow


def processes_referencing(needle: str) -> dict[int, str]:
    """PID -> command line of every process whose command line, open files or environment mention
    `needle` (a temp dir, or e.g. "SLURM_JOB_ID=12"). Ray's agents rename themselves (ray::DashboardAgent):
    only their open log files and environment tie them to a cluster."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            hit = needle in cmdline
            if not hit:
                environ = (entry / "environ").read_bytes().split(b"\0")
                hit = needle.encode() in environ
            if not hit:
                for fd in (entry / "fd").iterdir():
                    try:
                        if needle in os.readlink(fd):
                            hit = True
                            break
                    except OSError:
                        pass
            if hit:
                found[int(entry.name)] = cmdline
        except (OSError, ProcessLookupError):
            continue  # exited meanwhile, or a process we may not inspect
    return found


def wait_until_gone(needle: str, timeout_s: float) -> dict[int, str]:
    """Poll until no process references `needle`; return what is left at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_referencing(needle)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


@dataclass
class LocalRayCluster:
    """`ray start --block` head + workers on this host, token auth on. Use `start()`/`stop()` or `with`."""

    nodes: int = 2
    cpus_per_node: int = 2
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp")))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)
    node_dirs: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a driver of this cluster (the token goes through the environment only)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PYTHONPATH=str(REPO))
        return env

    def _start_node(self, index: int, *args: str) -> None:
        # Each node's Ray temp dir inside a private folder made by ray_cluster.sh's own function, as a Slurm
        # job's nodes get theirs (Ray makes its temp dir world-writable; short: Unix sockets < 107 bytes).
        made = subprocess.run(["bash", "-c", 'source "$1" && private_tmp_dir "$2"', "_", str(RAY_CLUSTER),
                               str(self.root)], capture_output=True, text=True, check=True)
        self.node_dirs.append(Path(made.stdout.strip()))
        log = open(self.root / f"node{index}.log", "wb")
        cmd = [RAY, "start", f"--temp-dir={self.node_dirs[-1] / 'r'}", f"--num-cpus={self.cpus_per_node}",
               "--num-gpus=0", "--min-worker-port=0", "--max-worker-port=0",
               f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", "--block", *args]
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def _check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise RuntimeError(f"ray on node {i} exited with {proc.returncode}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- node {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("node*.log")))

    def start(self) -> LocalRayCluster:
        deadline = time.monotonic() + START_TIMEOUT_S
        self._start_node(0, "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                         f"--dashboard-port={free_port()}")
        while not port_open("127.0.0.1", self.port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray head did not answer within {START_TIMEOUT_S} s:\n{self.logs()}")
            time.sleep(0.5)
        for i in range(1, self.nodes):
            self._start_node(i, f"--address={self.address}", "--node-ip-address=127.0.0.1")
        poller = self.driver(f"""
            import time, ray
            ray.init(address={self.address!r}, logging_level="ERROR", log_to_driver=False)
            while sum(n["Alive"] for n in ray.nodes()) < {self.nodes}:
                time.sleep(0.5)
        """, wait=False)
        while poller.poll() is None:
            try:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.nodes} nodes did not join within {START_TIMEOUT_S} s:\n"
                                       f"{self.logs()}")
            except BaseException:
                poller.kill()
                poller.wait()
                raise
            time.sleep(0.5)
        if poller.returncode != 0:
            raise RuntimeError(f"could not count the nodes: {poller.stderr.read()}\n{self.logs()}")
        return self

    def stop(self) -> dict[int, str]:
        """SIGTERM every `ray start --block` (each then stops its node's processes), wait, SIGKILL what
        remains; return what SIGTERM left behind, before that SIGKILL: the `ray start` processes that did not
        exit and the processes still referencing this cluster's temp dirs (should be none)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        stuck = {}
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck[proc.pid] = " ".join(map(str, proc.args))
                proc.kill()
                proc.wait()
        left = {**stuck, **wait_until_gone(f"{self.root}/", timeout_s=20)}
        for pid in left:  # only processes under this cluster's own temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def driver(self, code: str, *, wait: bool = True, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.Popen | subprocess.CompletedProcess:
        """Run a Python driver (source `code`) against this cluster in a subprocess."""
        cmd = [sys.executable, "-c", textwrap.dedent(code)]
        env = self.env if env is None else env
        if not wait:
            return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=REPO)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def __enter__(self) -> LocalRayCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_two_nodes() -> Iterator[LocalRayCluster]:
    """Two Ray nodes on this host (2 CPUs each, token auth), shared by this module's tests. Teardown fails
    the last test if any of its processes outlive it."""
    cluster = LocalRayCluster(nodes=2, cpus_per_node=2)
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()  # what SIGTERM left, seen before stop() kills it
        shutil.rmtree(cluster.root, ignore_errors=True)
    assert not left, f"Ray processes left after teardown: {left}"


SPAN_BOTH_NODES = """
    import json, os, ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id(), os.environ.get("RAY_AUTH_MODE")

    got = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                   .remote() for n in nodes], timeout=120)
    print(json.dumps({{"nodes": sorted(n["NodeID"] for n in nodes), "ran_on": sorted(g[0] for g in got),
                      "auth": sorted({{g[1] for g in got}}), "cpus": ray.cluster_resources().get("CPU")}}))
"""


def test_two_nodes_join_and_run_tasks_on_both(ray_two_nodes: LocalRayCluster) -> None:
    out = ray_two_nodes.driver(SPAN_BOTH_NODES.format(address=ray_two_nodes.address))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["nodes"]) == 2
    assert report["ran_on"] == report["nodes"]  # one task pinned to each node, each ran there
    assert report["auth"] == ["token"]  # workers inherit token mode from their raylet
    assert report["cpus"] == 4


def test_cluster_refuses_drivers_without_its_token(ray_two_nodes: LocalRayCluster, tmp_path: Path) -> None:
    """The server rejects a wrong token and a client that sends none (not just a client-side check)."""
    connect = f"import ray; ray.init(address={ray_two_nodes.address!r}, logging_level='ERROR')"
    base = {k: v for k, v in ray_two_nodes.env.items() if not k.startswith("RAY_AUTH")}
    base["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    wrong = ray_two_nodes.driver(connect, wait=False, env={**base, "RAY_AUTH_MODE": "token",
                                                           "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    none = ray_two_nodes.driver(connect, wait=False, env={**base, "RAY_AUTH_MODE": "disabled"})
    for proc in (wrong, none):
        _, err = proc.communicate(timeout=180)
        assert proc.returncode != 0
        assert "Unauthenticated" in err or "InvalidAuthToken" in err, err[-2000:]


def test_stop_leaves_no_ray_processes() -> None:
    """SIGTERM to each `ray start --block` stops the node's whole process tree, agents included."""
    cluster = LocalRayCluster(nodes=2, cpus_per_node=1)
    try:
        cluster.start()
        assert processes_referencing(f"{cluster.root}/")  # the check sees a live cluster
        for folder in cluster.node_dirs:  # made by ray_cluster.sh: sockets unreachable for other users
            info = folder.lstat()
            assert folder.is_dir() and not folder.is_symlink(), folder
            assert (info.st_uid, info.st_mode & 0o777) == (os.getuid(), 0o700), (folder, oct(info.st_mode))
    finally:
        left = cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
    assert not left, f"left behind: {left}"
    assert all(p.returncode is not None for p in cluster.procs)


def sweep_overrides(name: str) -> list[str]:
    """A tiny grid: 2 trials (APoT and uniform, 2 bits), 2 DDP ranks each, ranks on different nodes."""
    return ["--set", f"name={name}", "--set", "grid.arch=[resnet10]", "--set", "grid.bit=[2]",
            "--set", "train.init_from=null",
            "--set", "grid.power=[true,false]", "--set", "grid.seed=[0]", "--set", "train.epochs=1",
            "--set", "train.batch_size=64", "--set", "train.width=4",
            "--set", "resources.workers_per_trial=2", "--set", "resources.cpus_per_worker=1",
            "--set", "resources.placement_strategy=STRICT_SPREAD", "--display", "plain"]


def test_sweep_joins_two_node_cluster(ray_two_nodes: LocalRayCluster, tmp_path: Path) -> None:
    """tune_sweep.py --address: 2 trials x 2 ranks, each trial's ranks on both nodes (STRICT_SPREAD)."""
    data = tmp_path / "mnist"
    make_synthetic_mnist(data, n_train=512, n_test=256)
    out = subprocess.run([sys.executable, "tune_sweep.py", "--address", ray_two_nodes.address,
                          "--storage", str(tmp_path / "results"), "--data-dir", str(data),
                          *sweep_overrides("two_nodes")],
                         cwd=REPO, env=ray_two_nodes.env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    check_tiny_sweep_results(tmp_path / "results" / "two_nodes")


def check_tiny_sweep_results(experiment: Path, epochs: int = 1) -> None:
    """Both trials of `sweep_overrides` finished, and every results file shows them."""
    from apot.report import read_results

    records, _ = read_results(experiment)
    assert sorted((r["arch"], r["bit"], r["power"], r["state"]) for r in records) == [
        ("resnet10", 2, False, "TERMINATED"), ("resnet10", 2, True, "TERMINATED")]
    assert all(r["epochs_done"] == epochs and r["final_test_acc"] is not None for r in records)
    tables = (experiment / "tables.md").read_text()
    apot, uniform = tables.split("### APoT (power=True)")[1].split("### Uniform (power=False)")
    for table in (apot, uniform):
        rows = [line for line in table.splitlines() if line.startswith("| ") and "Model" not in line]
        assert len(rows) == 1 and "missing" not in rows[0], table
    assert len((experiment / "results.csv").read_text().strip().splitlines()) == 3  # header + 2 trials
    assert (experiment / "accuracy_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
