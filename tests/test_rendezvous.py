"""A trial's DDP ranks on one node form their process group without listening on the network
(apot.rendezvous), on a real private Ray with real TorchTrainer runs over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from listening import exposed

REPO = Path(__file__).resolve().parents[1]

# Runs in its own process: start_ray sets the private cluster's token in os.environ.
SCRIPT = r'''
import glob, json, os, sys, tempfile

import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer

from apot.ray_session import start_ray
from apot.rendezvous import NodeLocalTorchConfig


def train_fn(config):
    sys.path.insert(0, config["tests"])
    from listening import listening_sockets

    total = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(total)  # the group works: 1 + 2
    mine = {"rank": dist.get_rank(), "listening": listening_sockets(),
            "store_dirs": [[p, oct(os.stat(p).st_mode & 0o777)]
                           for p in glob.glob(os.path.join(tempfile.gettempdir(), "apot-rendezvous-*"))]}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump({"sum": float(total), "world": dist.get_world_size(), "ranks": everyone,
                       "tempdir": tempfile.gettempdir()}, f)


session = start_ray(None, num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
out = {}
try:
    for name, config in (("node_local", NodeLocalTorchConfig()), ("ray_default", TorchConfig())):
        report = os.path.join(sys.argv[1], f"{name}.json")
        TorchTrainer(
            train_fn, torch_config=config, train_loop_config={"out": report, "tests": sys.argv[2]},
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name=name, storage_path=sys.argv[1]),
        ).fit()
        with open(report) as f:
            out[name] = json.load(f)
        out[name]["left_after"] = glob.glob(os.path.join(out[name]["tempdir"], "apot-rendezvous-*"))
finally:
    session.close(keep_logs=False)
print("RESULT " + json.dumps(out))
'''


def test_ranks_on_one_node_listen_only_on_loopback(tmp_path: Path) -> None:
    """Two gloo ranks under NodeLocalTorchConfig: the group works, no rank listens on a non-loopback address,
    the store's folder is private while the trial runs and gone after it. Ray Train's default rendezvous,
    run the same way, shows what this guards against: rank 0 listening on every interface."""
    script = tmp_path / "rendezvous.py"
    script.write_text(SCRIPT)
    temp = tmp_path / "tmp"  # the workers' tempfile.gettempdir(), where the store's folder goes
    temp.mkdir()
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "train"), str(REPO / "tests")], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])

    ours = out["node_local"]
    assert ours["sum"] == 3.0 and ours["world"] == 2
    assert [rank["rank"] for rank in ours["ranks"]] == [0, 1]
    for rank in ours["ranks"]:
        assert not exposed(rank["listening"]), f"rank {rank['rank']} listens beyond loopback: {rank}"
    store_dirs = {p for rank in ours["ranks"] for p, _ in rank["store_dirs"]}
    assert len(store_dirs) == 1 and Path(store_dirs.pop()).parent == temp  # one, seen by both ranks
    assert {mode for rank in ours["ranks"] for _, mode in rank["store_dirs"]} == {"0o700"}
    assert ours["left_after"] == [], "the rendezvous folder outlived the trial"

    default = out["ray_default"]
    assert default["sum"] == 3.0
    rank0 = default["ranks"][0]
    assert exposed(rank0["listening"]), \
        f"the default rendezvous exposed no port: the check above proves nothing ({rank0['listening']})"
