"""apot.provenance and the command line's --version / default config: real git repositories in temp folders,
the real tune_sweep.py in a subprocess."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import apot
from apot import provenance

REPO = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(folder: Path, *args: str) -> str:
    cmd = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def package_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point apot.provenance at a copy of the apot package inside ``tmp_path / where``."""
    def place(where: str) -> Path:
        package = tmp_path / where / "apot"
        shutil.copytree(provenance.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
        monkeypatch.setattr(provenance, "PACKAGE_DIR", package)
        return package
    return place


@needs_git
def test_git_commit_and_dirty_flag_of_a_checkout(tmp_path: Path, package_in) -> None:
    package = package_in("checkout")
    git(package.parent, "init", "-q")
    git(package.parent, "add", "apot")
    git(package.parent, "commit", "-qm", "c")
    head = git(package.parent, "rev-parse", "HEAD")
    assert provenance.git_state() == (head, False)
    assert provenance.code_line(*provenance.git_state()) == f"apot {apot.__version__}, git {head[:12]}"

    (tmp_path / "checkout" / "notes.txt").write_text("untracked, outside the package: not code")
    assert provenance.git_state() == (head, False)
    (package / "new_module.py").write_text("X = 1\n")  # untracked code inside the package
    assert provenance.git_state() == (head, True)
    (package / "new_module.py").unlink()
    (package / "__init__.py").write_text((package / "__init__.py").read_text() + "# edited\n")
    assert provenance.git_state() == (head, True)
    assert provenance.code_line(head, True).endswith("(uncommitted changes)")
    assert provenance.version_text("apot-sweep") == \
        f"apot-sweep {apot.__version__} (git {head[:12]}, uncommitted changes)"


@needs_git
def test_untracked_package_inside_a_repository_is_not_a_checkout(tmp_path: Path, package_in) -> None:
    package_in(".venv/lib/site-packages")  # a venv inside some project's repository
    git(tmp_path, "init", "-q")
    (tmp_path / "README").write_text("x")
    git(tmp_path, "add", "README")
    git(tmp_path, "commit", "-qm", "c")
    assert provenance.git_state() == (None, None)
    assert provenance.code_line(*provenance.git_state()) == \
        f"apot {apot.__version__}, not a git checkout (installed package)"


def test_installed_package_without_git(package_in, monkeypatch: pytest.MonkeyPatch) -> None:
    package_in("site-packages")
    monkeypatch.setenv("PATH", "/nonexistent")  # no git executable at all
    assert provenance.git_state() == (None, None)
    assert provenance.version_text("apot-sweep") == f"apot-sweep {apot.__version__} (not a git checkout)"


def test_command_line_is_argv_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert provenance.command_line(["tune_sweep.py", "--quick", "--set", "grid.bit=[4, 2]"]) == \
        "python tune_sweep.py --quick --set 'grid.bit=[4, 2]'"
    assert provenance.command_line(["/home/u/.venv/bin/apot-sweep", "--resume"]) == "apot-sweep --resume"
    secret = "tok-6b3f0d2e9a"
    monkeypatch.setenv("RAY_AUTH_TOKEN", secret)
    monkeypatch.setenv("APOT_TEST_SECRET", secret)
    info = provenance.collect(["tune_sweep.py", "--address", "10.0.0.1:6379"])
    assert secret not in json.dumps(info)
    assert info["command"] == "python tune_sweep.py --address 10.0.0.1:6379"
    assert info["python"] == platform.python_version()


def test_gpus_from_ray_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's view of a GPU cluster (no GPU here, so Ray's node list is the one stand-in)."""
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": 32.0, "GPU": 4.0, "accelerator_type:H100": 1.0}},
             {"Alive": True, "Resources": {"CPU": 32.0, "GPU": 4.0, "accelerator_type:H100": 1.0}},
             {"Alive": False, "Resources": {"CPU": 32.0, "GPU": 4.0, "accelerator_type:A100": 1.0}},
             {"Alive": True, "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert provenance.gpus() == ("H100", 8)
    monkeypatch.setattr(ray, "nodes", lambda: nodes[3:])
    assert provenance.gpus() == (None, 0)


def test_gpus_of_this_host_without_ray() -> None:
    import torch

    model, count = provenance.gpus()
    assert count == torch.cuda.device_count()
    assert model == (torch.cuda.get_device_name(0) if count else None)


# ------------------------------------------------------------------------------------------ the command
def test_version_flag(tmp_path: Path) -> None:
    """`--version` prints the version and commit, from any folder (the default config outside a checkout is
    tested with a real sweep's storage: test_sweep.py::test_report_only_outside_the_checkout)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "tune_sweep.py"), "--version"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"tune_sweep.py {apot.__version__} (")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI, development): the commit is named
        assert f"(git {head.stdout.strip()[:12]}" in out.stdout


def test_installed_package_ships_the_default_config() -> None:
    """`pip install .` copies apot/search_space.yaml (a link to the root file) as package data, and installs
    tune_sweep.main as apot-sweep."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    shipped = REPO / "apot" / "search_space.yaml"
    assert shipped.resolve() == (REPO / "search_space.yaml").resolve()
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["apot-sweep"] == "tune_sweep:main"
    assert "tune_sweep" in meta["tool"]["setuptools"]["py-modules"]
    assert "search_space.yaml" in meta["tool"]["setuptools"]["package-data"]["apot"]
