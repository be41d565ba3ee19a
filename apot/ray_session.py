"""Starting or joining Ray for a sweep: a private embedded cluster unless a cluster is named.

Why private: ``ray.init(address=None)`` joins whatever cluster ``/tmp/ray/ray_current_cluster`` names. Any
``ray start`` on the host writes that file, and ``/tmp/ray`` is world-writable, so another user's cluster
would receive our pickles and return theirs. The private cluster here is:

- started with ``address="local"``: nothing is looked up;
- rooted in a fresh ``<tmp>/apot-ray-XXXXXXXX`` (``mkdtemp``: mode 0700, ours, unpredictable name). Ray
  makes its ``ray/`` folder inside world-writable; the 0700 parent keeps everyone else out. The root is kept
  short: Ray's AF_UNIX sockets live ~70 bytes below it and a socket path must fit in ~107 bytes;
- bound to loopback: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray's node IP 127.0.0.1 (its single-node
  mode), so the GCS, raylet and worker servers listen on 127.0.0.1 only (checked after start);
- token-authenticated with a fresh random token per run, handed to Ray's processes in the environment
  (``RAY_AUTH_TOKEN``): never on a command line, never printed, never in ``~/.ray``.

``--address ADDR`` (``auto`` included) or ``$RAY_ADDRESS`` joins that cluster instead; a token it needs
comes from the environment, as Ray documents (``slurm/ray_cluster.sh`` sets it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

MIN_RAY = (2, 60)  # token authentication as the README describes it
LOOPBACK = "127.0.0.1"
# Longest root: Ray adds ray/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (~70 bytes) below it.
MAX_TEMP_ROOT = 28


class RaySetupError(RuntimeError):
    """Ray cannot be used as asked: too old, or the private cluster did not come up private."""


def check_ray_version() -> str:
    """Return the installed Ray version; raise ``RaySetupError`` (one line) if it is older than ``MIN_RAY``.

    Reads the package metadata only: nothing is imported or started.
    """
    try:
        version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        raise RaySetupError("ray is not installed; pip install 'ray[tune,train]>=2.60'") from None
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]]
    if tuple(parts) < MIN_RAY:
        raise RaySetupError(
            f"ray {version} is installed but apot needs ray >= {MIN_RAY[0]}.{MIN_RAY[1]} (token "
            "authentication of its private cluster); pip install -U 'ray[tune,train]>=2.60'"
        )
    return version


def private_temp_dir() -> Path:
    """A fresh 0700 folder of ours with an unpredictable name, short enough for Ray's socket paths."""
    base = tempfile.gettempdir()
    if len(base) > MAX_TEMP_ROOT - len("/apot-ray-XXXXXXXX"):
        base = "/tmp"
    path = Path(tempfile.mkdtemp(prefix="apot-ray-", dir=base))
    info = path.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:  # mkdtemp promises both; check, never assume
        raise RaySetupError(f"{path}: not a private folder (owner {info.st_uid}, mode {info.st_mode:o})")
    return path


@dataclass
class RaySession:
    """The Ray this driver is connected to.

    Attributes:
        private: True for the embedded cluster started here, False when joining one.
        address: the GCS address (host:port) the driver is connected to.
        source: how it was chosen: ``private``, ``--address <value>`` or ``RAY_ADDRESS``.
        temp_dir: the private cluster's root folder (its logs), None when joined.
    """

    private: bool
    address: str
    source: str
    temp_dir: Path | None = None

    def describe(self) -> str:
        """The start-up line: which Ray, and where its logs are."""
        if self.private:
            return (f"ray: private local cluster at {self.address} (loopback, token auth; logs in "
                    f"{self.temp_dir}/ray, removed after a sweep with no failed trial)")
        return f"ray: joined the cluster at {self.address} (from {self.source})"

    def close(self, keep_logs: bool) -> None:
        """Disconnect (stopping the private cluster) and remove its folder unless ``keep_logs``."""
        import ray

        ray.shutdown()
        if self.private and self.temp_dir is not None and not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def joined_address(address: str | None) -> str | None:
    """The cluster a sweep will join: ``--address`` if given, else ``$RAY_ADDRESS``, else None (a private
    one is started). `start_ray` joins exactly this one, so ``auto`` resources are fitted to it."""
    return address if address is not None else (os.environ.get("RAY_ADDRESS") or None)


def cluster_resources(address: str) -> dict[str, float]:
    """The total resources (``{"CPU": ..., "GPU": ...}``) of the running cluster at ``address``, read by
    joining it briefly as a driver (``--dry-run``); starts no task.

    Raises:
        RaySetupError: the cluster cannot be reached (one line).
    """
    import ray

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False,
                 configure_logging=True)
    except Exception as exc:  # ConnectionError, or Ray's own errors for a bad address or token
        text = str(exc).strip().splitlines()
        raise RaySetupError(f"cannot join the Ray cluster at {address} ({type(exc).__name__}: "
                            f"{text[0] if text else ''}); check --address / $RAY_ADDRESS") from None
    try:
        return {k: float(v) for k, v in ray.cluster_resources().items()}
    finally:
        ray.shutdown()


def start_ray(address: str | None, **init_kwargs: Any) -> RaySession:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a private one (see module doc).

    Args:
        address: ``--address`` (``host:port`` or ``auto``), or None.
        init_kwargs: passed to ``ray.init`` (logging, dashboard, ...).
    """
    joined = joined_address(address)
    if joined is not None:
        import ray

        ray.init(address=joined, **init_kwargs)
        source = f"--address {address}" if address is not None else "RAY_ADDRESS"
        return RaySession(False, ray.get_runtime_context().gcs_address, source)

    temp_dir = private_temp_dir()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node IP = loopback, for us and every child
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    if "ray" in sys.modules:  # imported before: Ray read both settings then; refresh them as Ray itself does
        import ray._private.ray_constants as ray_constants
        from ray._raylet import Config

        ray_constants.ENABLE_RAY_CLUSTER = False
        Config.initialize("")
    import ray

    ray.init(address="local", _temp_dir=str(temp_dir / "ray"), _node_ip_address=LOOPBACK, **init_kwargs)
    session = RaySession(True, ray.get_runtime_context().gcs_address, "private", temp_dir)
    if not session.address.startswith(f"{LOOPBACK}:"):
        session.close(keep_logs=False)
        raise RaySetupError(f"the private Ray came up at {session.address}, not on loopback; not using it")
    return session
