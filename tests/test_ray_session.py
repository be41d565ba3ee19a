"""apot.ray_session without starting Ray: the version gate and the private temp dir. (The private cluster
itself, next to a foreign one, is tested end to end in test_sweep.py.)"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from apot import ray_session
from apot.ray_session import MAX_TEMP_ROOT, RaySession, RaySetupError, check_ray_version, private_temp_dir


@pytest.mark.parametrize("version", ["2.49.0", "2.59.1", "1.13.0"])
def test_old_ray_is_refused_in_one_line(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_session.metadata, "version", lambda name: version)
    message = rf"ray {version} is installed but apot needs ray >= 2\.60"
    with pytest.raises(RaySetupError, match=message) as info:
        check_ray_version()
    assert "\n" not in str(info.value) and "pip install -U" in str(info.value)


@pytest.mark.parametrize("version", ["2.60.0", "2.61.0rc1", "3.0.0"])
def test_recent_ray_passes(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_session.metadata, "version", lambda name: version)
    assert check_ray_version() == version


def test_installed_ray_passes() -> None:
    check_ray_version()  # the suite runs on the Ray the project requires


@pytest.mark.parametrize("long_tmpdir", [False, True])
def test_private_temp_dir_is_fresh_ours_0700_and_short(long_tmpdir: bool, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if long_tmpdir:  # a deep $TMPDIR would push Ray's socket paths past the AF_UNIX limit: /tmp is used
        deep = tmp_path / ("d" * 60)
        deep.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(deep))
    first, second = private_temp_dir(), private_temp_dir()
    try:
        assert first != second and first.name.startswith("apot-ray-") and len(first.name) > len("apot-ray-")
        for path in (first, second):
            info = path.lstat()
            assert stat.S_ISDIR(info.st_mode) and not path.is_symlink()
            assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
            assert len(str(path)) <= MAX_TEMP_ROOT
            # Ray's deepest socket: <root>/ray/session_<date>_<time>_<usec>_<7-digit pid>/sockets/plasma_store
            socket = f"{path}/ray/session_2026-11-27_06-14-30_056454_1234567/sockets/plasma_store"
            assert len(socket) < 107
        if long_tmpdir:
            assert first.parent == Path("/tmp")
    finally:
        first.rmdir()
        second.rmdir()


def test_start_up_line_says_which_ray() -> None:
    private = RaySession(True, "127.0.0.1:6379", "private", Path("/tmp/apot-ray-abc"))
    assert private.describe().startswith("ray: private local cluster at 127.0.0.1:6379 (loopback, token auth")
    assert "/tmp/apot-ray-abc/ray" in private.describe()
    joined = RaySession(False, "10.0.0.5:6379", "--address auto")
    assert joined.describe() == "ray: joined the cluster at 10.0.0.5:6379 (from --address auto)"
