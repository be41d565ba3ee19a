"""How a trial's DDP ranks find each other without listening on the network.

Ray Train's default rendezvous (``TorchConfig(init_method="env")``) starts torch's c10d ``TCPStore`` in rank
0: an unauthenticated key-value server on every network interface, one per trial, even for a single rank.
When all ranks of a trial sit on one node, which is every trial with ``workers_per_trial: 1`` and any trial
Ray packs onto one machine, nothing needs the network:

- the ranks meet through a ``FileStore`` in a fresh private directory (``mkdtemp``: mode 0700, a random
  name) that rank 0 creates and removes when the trial's process group shuts down;
- gloo's and NCCL's own connections between the ranks bind the loopback interface (``GLOO_SOCKET_IFNAME``
  and ``NCCL_SOCKET_IFNAME`` set to ``lo`` unless the user set them).

A trial whose ranks span nodes cannot rendezvous on one node's disk: it uses Ray Train's own TCP rendezvous
(the store on rank 0's node address, unauthenticated, as torch has it). Such a sweep needs a cluster
network that only its users reach; slurm/README.md (Security) says so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import ray
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import (
    TorchConfig,
    _set_torch_distributed_env_vars,
    _setup_torch_process_group,
    _TorchBackend,
)

__all__ = ["LOOPBACK_INTERFACE", "NodeLocalTorchConfig"]

LOOPBACK_INTERFACE = "lo"
"""The loopback interface's name on Linux, where gloo and NCCL bind when all ranks share a node."""

_SOCKET_INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclass
class NodeLocalTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig`` whose rendezvous opens no network port when all ranks share a node."""

    @property
    def backend_cls(self):
        return _NodeLocalBackend


class _NodeLocalBackend(_TorchBackend):
    """Forms the process group through a private ``FileStore`` when every worker is on one node."""

    _store_dir: str | None = None  # the FileStore's folder on rank 0's node while a group uses one

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        nodes = worker_group.execute(_node_id)
        if len(set(nodes)) > 1:
            super().on_start(worker_group, backend_config)  # ranks on several nodes: torch's TCP store
            return
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        self._store_dir = worker_group.execute_single(0, _make_private_dir)
        try:
            if not isinstance(worker_group, V1WorkerGroup):
                worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(
                        rank, _join_process_group, backend=backend, world_rank=rank,
                        world_size=len(worker_group), store_file=os.path.join(self._store_dir, "store"),
                        timeout_s=backend_config.timeout_s)
                     for rank in range(len(worker_group))])
        except BaseException:
            self._remove_store_dir(worker_group)
            raise

    def on_shutdown(self, worker_group, backend_config: TorchConfig) -> None:
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            self._remove_store_dir(worker_group)

    def _remove_store_dir(self, worker_group) -> None:
        store_dir, self._store_dir = self._store_dir, None
        if store_dir:
            worker_group.execute_single(0, shutil.rmtree, store_dir, ignore_errors=True)


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _make_private_dir() -> str:
    return tempfile.mkdtemp(prefix="apot-rendezvous-")


def _join_process_group(backend: str, world_rank: int, world_size: int, store_file: str, timeout_s: int
                        ) -> None:
    """This rank joins the trial's process group through ``store_file``, its sockets on loopback."""
    for var in _SOCKET_INTERFACE_VARS:
        os.environ.setdefault(var, LOOPBACK_INTERFACE)
    _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size,
                               init_method=f"file://{store_file}", timeout_s=timeout_s)
