"""apot.display: the view model, its plain lines and ETA math, the rich view, the Tune callback adapter."""

from __future__ import annotations

import inspect
import io
import pickle
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from apot.config import trial_name
from apot.display import QUIET_RAY_ENV, SweepProgress, TuneDisplayCallback, format_duration, one_line

T0 = 1_800_000_000.0  # 2027-01-15, a fixed clock start


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def point(arch: str = "resnet18", bit: int = 4, power: bool = True, seed: int = 0) -> dict[str, Any]:
    return {"arch": arch, "bit": bit, "power": power, "seed": seed}


def metrics(epoch: int, epochs: int = 25, **kw: Any) -> dict[str, Any]:
    m = {"epoch": epoch, "epochs": epochs, "train_loss": 0.123, "train_acc": 97.0, "test_acc": 98.76,
         "best_test_acc": 98.80, "images_per_s": 1234.4, "epoch_s": 12.0, "lr": 0.01}
    m.update(kw)
    return m


def plain(points: list[dict[str, Any]], epochs: int = 25, concurrency: int = 1,
          overall_every_s: float = 60.0) -> tuple[SweepProgress, io.StringIO, FakeClock]:
    out, clock = io.StringIO(), FakeClock()
    progress = SweepProgress("plain", concurrency=concurrency, stream=out, clock=clock,
                             overall_every_s=overall_every_s)
    progress.add_trials(points, epochs=epochs)
    return progress, out, clock


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


# ------------------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize(("seconds", "text"), [
    (None, "?"), (0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (312, "5m12s"), (3599, "59m59s"),
    (3600, "1h00m"), (3 * 3600 + 125, "3h02m"), (float("inf"), "?"),
])
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_one_line_picks_the_exception_line() -> None:
    tb = ("Failure # 1 (occurred at 2026-11-26)\nray::ImplicitFunc.train() (pid=1)\n  File \"x.py\", line 3\n"
          "    raise RuntimeError('boom')\nRuntimeError: boom\n\nDuring handling ...\n  more context\n")
    assert one_line(tb) == "RuntimeError: boom"
    assert one_line("just text\n") == "just text"
    assert one_line("ValueError: " + "x" * 500, limit=50).endswith("…")
    assert len(one_line("ValueError: " + "x" * 500, limit=50) or "") == 50
    assert one_line("") is None and one_line(None) is None


# ------------------------------------------------------------------------------------------ plain lines
def test_epoch_line_format_and_trial_eta() -> None:
    progress, out, clock = plain([point(), point(power=False)])
    with progress:
        progress.trial_started(point(), epochs=25)
        for epoch, secs in ((1, 12.0), (2, 14.0), (3, 13.0)):
            clock.now += secs
            progress.trial_result(point(), metrics(epoch, epoch_s=secs))
    got = lines(out)
    assert got[0] == f"{stamp(T0)} sweep  2 trials, 1 at a time"
    assert got[1] == f"{stamp(T0)} resnet18 4-bit APoT s0     RUNNING"  # labels padded to align columns
    # mean epoch 13 s x 22 epochs left = 286 s
    epoch3 = [ln for ln in got if "epoch 3/25" in ln]
    assert epoch3 == [f"{stamp(T0 + 39)} resnet18 4-bit APoT s0     epoch 3/25  loss 0.123  test 98.76%  "
                      "best 98.80%  1234 img/s  ETA 4m46s"]


def test_state_lines_retry_error_and_completion() -> None:
    pts = [point(), point(power=False), point("resnet34")]
    progress, out, clock = plain(pts, epochs=2, concurrency=2)
    with progress:
        progress.trial_started(pts[0])
        progress.trial_started(pts[1])
        progress.trial_result(pts[0], metrics(1, 2, epoch_s=10.0))
        traceback = "Traceback (most recent call last):\n  File ...\nRuntimeError: boom\n"
        progress.trial_retrying(pts[1], traceback, attempt=1)
        progress.trial_started(pts[1])
        progress.trial_result(pts[0], metrics(2, 2, test_acc=99.1, best_test_acc=99.1, epoch_s=10.0))
        progress.trial_completed(pts[0])
        progress.trial_errored(pts[1], "ValueError: gave up")
    text = out.getvalue()
    assert re.search(r"resnet18 4-bit uniform s0 +RETRYING \(failure 1; restarts from its last checkpoint\)"
                     r"  RuntimeError: boom$", text, re.M)
    assert re.search(r"resnet18 4-bit uniform s0 +RUNNING \(retry 1\)$", text, re.M)
    assert re.search(r"resnet18 4-bit APoT s0 +TERMINATED  final test 99\.10%  best 99\.10%$", text, re.M)
    assert re.search(r"resnet18 4-bit uniform s0 +ERROR  ValueError: gave up$", text, re.M)
    # the failed trial's untrained epochs leave the total: 2 (done) + 0 (failed at epoch 0) + 2 (pending)
    assert lines(out)[-1].endswith("sweep  1/3 done  0 running  1 failed  epochs 2/4 (50.0%)  "
                                   "elapsed 0s  ETA 20s")
    assert text.count("sweep  1/3 done  0 running  1 failed") == 1  # no repeated closing summary


def test_overall_line_is_throttled_between_epoch_lines() -> None:
    progress, out, clock = plain([point()], overall_every_s=60)
    with progress:
        for epoch in range(1, 6):
            clock.now += 25
            progress.trial_result(point(), metrics(epoch, epoch_s=25))
    overall = [ln for ln in lines(out) if " sweep  0/1 done" in ln]
    # after epochs 3 (75 s) and 5 (125 s: 50 s after the last is too soon) -> once, plus the closing line
    assert len(overall) == 2
    assert "epochs 3/25 (12.0%)" in overall[0] and "epochs 5/25 (20.0%)" in overall[1]


def test_sweep_eta_formula() -> None:
    """sum(remaining epochs x per-trial epoch time) / min(concurrency, unfinished trials)."""
    pts = [point("resnet18"), point("resnet18", power=False), point("resnet50"), point("resnet34")]
    progress, _, _ = plain(pts, epochs=10, concurrency=2)
    progress.trial_result(pts[0], metrics(4, 10, epoch_s=10.0))  # own mean 10 s, 6 left -> 60 s
    progress.trial_result(pts[2], metrics(2, 10, epoch_s=30.0))  # own mean 30 s, 8 left -> 240 s
    # pts[1]: no timing yet -> mean of its arch (resnet18: 10 s) x 10 = 100 s
    # pts[3]: no arch timing -> mean over all timed epochs (10 + 30) / 2 = 20 s, x 10 = 200 s
    s = progress.summary()
    assert s["eta_s"] == pytest.approx((60 + 240 + 100 + 200) / 2)
    assert (s["epochs_done"], s["epochs_total"]) == (6, 40)
    progress.trial_completed(pts[0])
    progress.trial_completed(pts[1])
    progress.trial_completed(pts[3])
    assert progress.summary()["eta_s"] == pytest.approx(240)  # one trial left: nothing runs beside it


def test_sweep_eta_counts_start_up_of_trials_not_yet_training() -> None:
    """A trial's start-up (start -> first result, minus that epoch) is added for each trial still to start."""
    pts = [point("resnet18"), point("resnet18", power=False), point("resnet18", bit=2)]
    progress, _, clock = plain(pts, epochs=4, concurrency=1)
    progress.trial_started(pts[0])
    clock.now += 25.0  # 20 s of start-up, then a 5 s epoch
    progress.trial_result(pts[0], metrics(1, 4, epoch_s=5.0))
    assert progress.rows["resnet18_b4_apot_s0"].startup_s == pytest.approx(20.0)
    # pts[0]: 3 epochs x 5 s; pts[1], pts[2] pending: 4 x 5 s + 20 s start-up each
    assert progress.summary()["eta_s"] == pytest.approx(15 + 2 * (20 + 20))
    progress.trial_started(pts[1])
    clock.now += 8.0  # pts[1] has spent 8 of its expected 20 s starting
    assert progress.summary()["eta_s"] == pytest.approx(15 + (20 + 12) + (20 + 20))


def test_eta_unknown_before_any_epoch() -> None:
    progress, _, _ = plain([point()])
    assert progress.summary()["eta_s"] is None
    assert progress.rows["resnet18_b4_apot_s0"].eta_s is None


def test_resumed_sweep_marks_records() -> None:
    pts = [point(), point(power=False), point("resnet34")]
    progress, out, _ = plain(pts, epochs=3)
    done = {**point(), "state": "TERMINATED", "config": {"epochs": 3}, "epochs_done": 3,
            "best_test_acc": 99.0, "error": None,
            "history": [metrics(e, 3, epoch_s=5.0, test_acc=98.0 + e / 3) for e in (1, 2, 3)]}
    half = {**point(power=False), "state": "RUNNING", "config": {"epochs": 3}, "epochs_done": 1,
            "best_test_acc": 97.0, "error": None, "history": [metrics(1, 3, epoch_s=7.0)]}
    failed = {**point("resnet34"), "state": "ERROR", "config": {"epochs": 3}, "epochs_done": 0,
              "error": "RuntimeError: CUDA out of memory\nmore", "history": []}
    for record in (done, half, failed):
        progress.mark_record(record)
    rows = progress.rows
    assert rows["resnet18_b4_apot_s0"].state == "TERMINATED"
    assert rows["resnet18_b4_uniform_s0"].state == "PENDING" and rows["resnet18_b4_uniform_s0"].epoch == 1
    assert rows["resnet34_b4_apot_s0"].state == "ERROR"
    assert rows["resnet34_b4_apot_s0"].error == "RuntimeError: CUDA out of memory"
    s = progress.summary()
    assert (s["done"], s["errors"], s["epochs_done"], s["epochs_total"]) == (1, 1, 4, 6)
    assert s["eta_s"] == pytest.approx(2 * 7.0)
    with progress:
        pass
    assert lines(out)[0].endswith("sweep  3 trials (1 finished earlier), 1 at a time")


def test_restarted_trial_shows_its_own_best_not_the_stale_record() -> None:
    """A record that claims epochs with no checkpoint behind them (a lost run) restarts at epoch 1: the
    best shown is the new run's, not the record's."""
    progress, out, _ = plain([point()], epochs=3)
    stale = {**point(), "state": "RUNNING", "config": {"epochs": 3}, "epochs_done": 2, "best_test_acc": 99.5,
             "error": None, "history": [metrics(e, 3, epoch_s=5.0, test_acc=99.5) for e in (1, 2)]}
    progress.mark_record(stale)
    progress.trial_started(point(), 3)
    progress.trial_result(point(), metrics(1, 3, test_acc=97.0, best_test_acc=97.0))
    assert progress.rows["resnet18_b4_apot_s0"].best_test_acc == 97.0
    epoch_line = [line for line in lines(out) if "epoch 1/3" in line][-1]
    assert "best 97.00%" in epoch_line, epoch_line


def test_settle_shows_a_trial_that_finished_as_the_stop_came_once() -> None:
    pts = [point(), point(power=False), point("resnet34")]
    progress, out, _ = plain(pts, epochs=1)
    earlier = {**point("resnet34"), "state": "TERMINATED", "config": {"epochs": 1}, "epochs_done": 1,
               "error": None, "history": [metrics(1, 1, epoch_s=5.0)]}
    progress.mark_record(earlier)
    with progress:
        for p in pts[:2]:
            progress.trial_started(p, 1)
            progress.trial_result(p, metrics(1, 1))
        progress.trial_completed(pts[0])  # Tune saw this one finish; the stop came before it saw pts[1]
        for p in pts:
            progress.settle({**p, "state": "TERMINATED"})
    finished = [line.split()[2] for line in lines(out) if " TERMINATED " in line]
    assert sorted(finished) == ["resnet18"] * 2, lines(out)  # both this run's, once each; not resnet34's
    assert progress.rows["resnet18_b4_uniform_s0"].state == "TERMINATED"


# ------------------------------------------------------------------------------------------ rich view
def render(progress: SweepProgress) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(progress.renderable())
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_rich_view_renders_rows_progress_and_errors() -> None:
    pts = [point(), point(power=False), point("resnet50", 2)]
    progress, _, _ = plain(pts, epochs=25, concurrency=2)
    progress.trial_started(pts[0])
    progress.trial_result(pts[0], metrics(3, epoch_s=13.0))
    progress.trial_errored(pts[2], "Traceback ...\nRuntimeError: worker died: " + "x" * 300)
    text = render(progress)
    assert "epochs 3/50" in text and "trials 0/3 done, 1 running, 1 failed" in text
    row = next(ln for ln in text.splitlines() if "APoT" in ln and "resnet18" in ln)
    assert re.search(r"resnet18 4-bit APoT s0\s+RUNNING\s+3/25\s+0\.123\s+98\.76\s+98\.80\s+1234\s+"
                     r"4m46s", row)
    assert re.search(r"resnet18 4-bit uniform s0\s+PENDING\s+0/25", text)
    err_row = next(ln for ln in text.splitlines() if "resnet50" in ln)
    assert "ERROR" in err_row and "RuntimeError: worker died: xxx" in err_row
    assert err_row.rstrip().endswith("…")
    assert all(len(ln) <= 160 for ln in text.splitlines())


def test_narrow_terminal_squeezes_only_the_error_text() -> None:
    pts = [point(), point("resnet50", 2, power=False)]
    progress, _, _ = plain(pts, epochs=25)
    progress.trial_result(pts[0], metrics(3, epoch_s=13.0))
    progress.trial_errored(pts[1], "RuntimeError: worker died")
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(progress.renderable())
    text = console.file.getvalue()
    assert re.search(r"resnet18 4-bit APoT s0\s+RUNNING\s+3/25\s+0\.123\s+98\.76\s+98\.80\s+1234", text)
    assert re.search(r"resnet50 2-bit uniform s0\s+ERROR\s+0/25\s+Runtime", text)


def test_live_mode_runs_and_leaves_the_final_table() -> None:
    console = Console(file=io.StringIO(), width=160, force_terminal=True, color_system=None)
    progress = SweepProgress("live", concurrency=1, console=console, refresh_per_second=20)
    progress.add_trials([point()], epochs=2)
    with progress:
        progress.trial_started(point())
        progress.trial_result(point(), metrics(1, 2))
        progress.trial_completed(point())
    assert "TERMINATED" in console.file.getvalue()  # type: ignore[attr-defined]


def test_mode_auto_follows_the_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert SweepProgress("auto", stream=io.StringIO()).mode == "plain"
    assert SweepProgress("auto", stream=Tty()).mode == "live"
    assert SweepProgress("plain", stream=Tty()).mode == "plain"
    with pytest.raises(ValueError, match="mode"):
        SweepProgress("fancy")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ Tune adapter
@dataclass
class FakeTrial:
    """The attributes of ray.tune.experiment.Trial that the callback reads."""

    config: dict[str, Any]
    trial_id: str = "abc_00000"
    status: str = "RUNNING"
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None
    num_failures: int = 0


def tune_config(p: dict[str, Any], epochs: int = 25) -> dict[str, Any]:
    """A Tune trial's config as `apot.sweep.trial_configs` shapes it: the grid point under ``point``."""
    return {"point": p, "train": {"epochs": epochs, "lr": 0.01}, "run": {"workers_per_trial": 2}}


def test_callback_maps_trial_events_onto_the_model(tmp_path: Path) -> None:
    progress, out, _ = plain([point(), point(power=False)], epochs=4)
    cb = TuneDisplayCallback(progress)
    trial = FakeTrial(tune_config(point(), epochs=4))
    other = FakeTrial(tune_config(point(power=False), epochs=4), trial_id="abc_00001")
    cb.on_trial_start(iteration=1, trials=[trial], trial=trial)
    cb.on_trial_result(iteration=2, trials=[trial], trial=trial,
                       result={**metrics(1, 4), "training_iteration": 1, "trial_id": "abc_00000"})
    row = progress.rows["resnet18_b4_apot_s0"]
    assert (row.state, row.epoch, row.epochs, row.test_acc) == ("RUNNING", 1, 4, 98.76)

    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1 (occurred at x)\nTraceback ...\nValueError: first\n"
                          "Failure # 2 (occurred at y)\nray::ImplicitFunc.train()\n  File \"a.py\"\n"
                          "ray.train.WorkerGroupError: Training failed due to worker errors:\n")
    other.error_file, other.num_failures = str(error_file), 2
    cb.on_trial_start(iteration=3, trials=[other], trial=other)
    cb.on_trial_recover(iteration=4, trials=[other], trial=other)
    assert progress.rows["resnet18_b4_uniform_s0"].state == "RETRYING"
    assert progress.rows["resnet18_b4_uniform_s0"].retries == 2
    assert progress.rows["resnet18_b4_uniform_s0"].error == (
        "ray.train.WorkerGroupError: Training failed due to worker errors:")
    cb.on_trial_error(iteration=5, trials=[other], trial=other)
    assert progress.rows["resnet18_b4_uniform_s0"].state == "ERROR"
    cb.on_trial_complete(iteration=6, trials=[trial], trial=trial)
    assert row.state == "TERMINATED"
    assert "resnet18 4-bit uniform s0  ERROR  ray.train.WorkerGroupError" in out.getvalue()


def test_callback_without_error_file_still_marks_the_error() -> None:
    progress, _, _ = plain([point()])
    trial = FakeTrial(tune_config(point()))
    TuneDisplayCallback(progress).on_trial_error(iteration=1, trials=[trial], trial=trial)
    assert progress.rows["resnet18_b4_apot_s0"].state == "ERROR"
    assert progress.rows["resnet18_b4_apot_s0"].error == "failed (no error text)"


def test_callback_pickles_without_its_display() -> None:
    """Tune pickles the RunConfig (callbacks included) into tuner.pkl; locks and consoles must not go in."""
    progress, _, _ = plain([point()])
    clone = pickle.loads(pickle.dumps(TuneDisplayCallback(progress)))
    assert clone.progress is None
    clone.on_trial_start(iteration=1, trials=[], trial=FakeTrial(tune_config(point())))  # a no-op


def test_callback_hooks_match_ray_tune() -> None:
    """Every hook we define exists on ray.tune.Callback with the same parameters (a typo would never fire)."""
    from ray.tune import Callback

    ours = {n for n in vars(TuneDisplayCallback) if n.startswith("on_")}
    assert ours == {"on_trial_start", "on_trial_result", "on_trial_complete",
                    "on_trial_recover", "on_trial_error"}
    for name in ours:
        ray_params = list(inspect.signature(getattr(Callback, name)).parameters)
        assert list(inspect.signature(getattr(TuneDisplayCallback, name)).parameters) == ray_params, name


def test_quiet_env_names_real_ray_switches() -> None:
    import ray.tune.execution.tune_controller as controller
    import ray.tune.experimental.output as output

    assert QUIET_RAY_ENV == {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}
    assert "RAY_AIR_NEW_OUTPUT" in inspect.getsource(output.get_air_verbosity)
    assert "TUNE_PRINT_ALL_TRIAL_ERRORS" in inspect.getsource(controller)


def test_a_finished_trial_reported_from_its_record_prints_no_epoch_line() -> None:
    """After a resume a finished trial re-reports its record's last epoch: shown finished, not as an epoch
    trained again (the Slurm time-limit test reads epoch lines as epochs trained)."""
    from apot.config import FROM_RECORD

    progress, out, _ = plain([point()], epochs=3)
    progress.trial_started(point())
    progress.trial_result(point(), {**metrics(3, epochs=3), FROM_RECORD: True})
    progress.trial_completed(point())
    assert not any("epoch 3/3" in line for line in lines(out)), lines(out)
    assert any("TERMINATED" in line for line in lines(out))
    progress.trial_result(point(bit=2), metrics(1, epochs=3))  # a trained epoch still prints
    assert any("epoch 1/3" in line for line in lines(out))


def test_a_trial_finished_before_a_resume_prints_no_state_line() -> None:
    """A resume re-runs every grid point under a fresh Tuner; one whose record says TERMINATED only
    re-reports it. It shows as finished and prints nothing (no RUNNING, no second TERMINATED: the Slurm
    time-limit test reads those as a finished trial started again); a stopped one resumes and prints."""
    from apot.config import FROM_RECORD

    progress, out, _ = plain([point(), point(bit=2)], epochs=3)
    record = {**point(), "state": "TERMINATED", "config": {"epochs": 3},
              "history": [{"epoch": e, "epoch_s": 1.0, "test_acc": 99.0} for e in (1, 2, 3)]}
    progress.mark_record(record)
    progress.mark_record({**point(bit=2), "state": "INCOMPLETE", "config": {"epochs": 3},
                          "history": [{"epoch": 1, "epoch_s": 1.0, "test_acc": 98.0}]})
    before = list(lines(out))
    progress.trial_started(point())
    progress.trial_result(point(), {**metrics(3, epochs=3), FROM_RECORD: True})
    progress.trial_completed(point())
    finished = progress.rows[trial_name(point())]
    assert lines(out) == before and finished.state == "TERMINATED" and finished.epoch == 3
    progress.trial_started(point(bit=2))
    assert any("RUNNING" in line for line in lines(out)[len(before):]), lines(out)
