"""What produced a result: the code (apot version, git commit, uncommitted changes), the software (Python,
torch, Ray), the GPUs and the exact command.

``collect(argv)`` returns the flat dict the sweep stores in ``results.json`` under ``provenance`` and
``apot.report`` shows in the "Made with" line (the sweep adds ``hardware``: `hardware_line`). Only argv is
recorded, never the environment: secrets (Ray's auth token, cluster credentials) live there and must never
reach a results file.

Keys (None where unknown):
    ``code``       one line for people: ``apot 0.1.0, git 1a2b3c4d5e6f (uncommitted changes)``, or
                   ``apot 0.1.0, not a git checkout (installed package)``
    ``git_commit`` the full commit hash of the checkout the apot package was imported from, or None
    ``git_dirty``  True when tracked files differ from that commit or the apot package holds files git does
                   not track (a new module); other untracked files (results, logs) do not count
    ``python``, ``torch``, ``ray``   versions
    ``gpu_model``, ``gpu_count``     the cluster's GPUs (Ray's view when Ray is up, else this host's CUDA)
    ``gpu_numerics``  how GPU trials compute (`apot.distributed.CUDA_NUMERICS`); None without GPUs
    ``command``    the command line, shell-quoted
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import apot

PACKAGE_DIR = Path(apot.__file__).resolve().parent
GIT_TIMEOUT_S = 10


def _git(*args: str) -> str | None:
    """``git -C <apot package dir> args`` stdout, stripped; None when git is absent or the command fails."""
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout the apot package was imported from, or ``(None, None)``.

    A package installed into a virtual environment that happens to sit inside some repository is not a
    checkout: the package's own ``__init__.py`` must be tracked by the repository for its commit to count.
    """
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    tracked = _git("status", "--porcelain", "--untracked-files=no")
    in_package = _git("status", "--porcelain", "--untracked-files=all", "--", ".")  # '.' = the package dir
    if tracked is None or in_package is None:
        return commit, None
    return commit, bool(tracked) or any(line.startswith("??") for line in in_package.splitlines())


def code_line(commit: str | None, dirty: bool | None) -> str:
    """``apot 0.1.0, git 1a2b3c4d5e6f`` (+ ``(uncommitted changes)``), or the not-a-checkout wording."""
    if commit is None:
        return f"apot {apot.__version__}, not a git checkout (installed package)"
    state = " (uncommitted changes)" if dirty else " (dirty state unknown)" if dirty is None else ""
    return f"apot {apot.__version__}, git {commit[:12]}{state}"


def gpus() -> tuple[str | None, int]:
    """``(model, count)`` of the GPUs: from Ray's nodes when Ray is initialised (every node of a cluster,
    model from Ray's ``accelerator_type:<model>`` resource), else this host's CUDA devices. Several models
    are joined with `` + ``; ``(None, 0)`` without GPUs."""
    try:
        import ray

        if ray.is_initialized():
            count, models = 0, []
            for node in ray.nodes():
                if not node.get("Alive"):
                    continue
                resources = node.get("Resources", {})
                count += int(resources.get("GPU", 0))
                models += [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
            if count:
                return " + ".join(sorted(set(models))) or _cuda_model() or "GPU", count
            return None, 0
    except ImportError:
        pass
    import torch

    if torch.cuda.is_available():
        return _cuda_model(), torch.cuda.device_count()
    return None, 0


def _cuda_model() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def cpu_model() -> str:
    """This host's CPU model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_line() -> str:
    """One line for the results: the live nodes and CPUs of the Ray cluster this process has joined (Ray
    must be initialised) and the CPU model of this host; GPUs are `gpus`."""
    import ray

    res = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    return f"{nodes} node(s), {int(res.get('CPU', 0))} CPUs ({cpu_model()})"


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``python tune_sweep.py --quick`` for a script, ``apot-sweep --quick`` for the
    installed command (its path shortened to its name), each argument shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "python"
    head = argv[0]
    if head.endswith(".py") or head == "-c":
        words = ["python", head]
    else:
        words = [Path(head).name]
    return " ".join(shlex.quote(w) for w in [*words, *argv[1:]])


def software() -> dict[str, str]:
    """Versions of Python, torch and Ray."""
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def collect(argv: list[str] | None = None) -> dict[str, Any]:
    """Everything above as one flat dict (see the module docstring for the keys)."""
    commit, dirty = git_state()
    model, count = gpus()
    from apot.distributed import CUDA_NUMERICS

    return {"code": code_line(commit, dirty), "git_commit": commit, "git_dirty": dirty, **software(),
            "gpu_model": model, "gpu_count": count, "gpu_numerics": CUDA_NUMERICS if count else None,
            "command": command_line(argv)}


def version_text(prog: str) -> str:
    """``--version``: ``apot-sweep 0.1.0 (git 1a2b3c4d5e6f, uncommitted changes)``."""
    commit, dirty = git_state()
    if commit is None:
        where = "not a git checkout"
    else:
        where = f"git {commit[:12]}" + (", uncommitted changes" if dirty else "")
    return f"{prog} {apot.__version__} ({where})"
