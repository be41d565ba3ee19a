"""apot.orchestrate without Ray: the trial list computed once per run, and the resume policy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from apot.config import ConfigError, SweepConfig, load_config
from apot.orchestrate import SAVED_CONFIG, GracefulStop, SweepRequest, check_resume_policy, run

SHIPPED = Path(__file__).resolve().parents[1] / "search_space.yaml"


@pytest.mark.parametrize("request_", [SweepRequest(dry_run=True), SweepRequest(report_only=True)],
                         ids=["dry-run", "report-only"])
def test_a_run_computes_the_trial_list_once(request_: SweepRequest, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(SHIPPED, overrides=["grid.arch=[resnet18]"], storage=tmp_path)
    (tmp_path / cfg.name).mkdir()  # --report-only: a sweep folder with no records yet
    calls = []
    trials = SweepConfig.trials

    def counted(self: SweepConfig) -> list:
        calls.append(self.name)
        return trials(self)

    monkeypatch.setattr(SweepConfig, "trials", counted)
    rc = run(cfg, request_, GracefulStop(), started=time.time())
    out = capsys.readouterr().out
    assert calls == [cfg.name]
    if request_.dry_run:
        assert rc == 0 and "trials: 9, " in out  # resnet18: FP32 + 4 bits x 2 quantizers
    else:
        assert rc == 1 and f"results in {tmp_path / cfg.name}" in out  # 9 trials, none finished
        # every row of both tables: FP32 + 4 bits each (the FP32 trial is in both)
        assert (tmp_path / cfg.name / "tables.md").read_text().count("| missing |") == 10


def _stored(tmp_path: Path, *overrides: str) -> tuple[SweepConfig, Path]:
    cfg = load_config(SHIPPED, overrides=list(overrides), storage=tmp_path)
    experiment = tmp_path / cfg.name
    experiment.mkdir()
    (experiment / SAVED_CONFIG).write_text(json.dumps(cfg.to_dict()))
    return cfg, experiment


def test_a_new_sweep_is_refused_where_one_is_stored(tmp_path: Path) -> None:
    cfg, experiment = _stored(tmp_path)
    with pytest.raises(ConfigError, match=rf"^a sweep already exists at {experiment}: pass --resume to "
                                          r"continue it, or --set name=<new name> / --storage DIR"):
        check_resume_policy(cfg, cfg.trials(), experiment, resume=False)
    check_resume_policy(cfg, cfg.trials(), experiment, resume=True)  # the stored sweep itself resumes
    empty = tmp_path / "empty"
    check_resume_policy(cfg, cfg.trials(), empty, resume=False)
    with pytest.raises(ConfigError, match=rf"^--resume: no sweep to resume at {empty} \(no {SAVED_CONFIG}\)"):
        check_resume_policy(cfg, cfg.trials(), empty, resume=True)


def test_a_resume_names_the_trials_a_grown_grid_adds(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, experiment = _stored(tmp_path, "grid.arch=[resnet18]", "grid.power=[true]")
    grown = load_config(SHIPPED, overrides=["grid.arch=[resnet18]", "grid.power=[true,false]"],
                        storage=tmp_path)
    check_resume_policy(grown, grown.trials(), experiment, resume=True)
    assert capsys.readouterr().out == (
        "resume: the grid grew by 4 trials (resnet18_b5_uniform_s0, resnet18_b4_uniform_s0, "
        "resnet18_b3_uniform_s0, resnet18_b2_uniform_s0); finished trials are kept\n")
