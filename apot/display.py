"""The sweep's console: a live rich table on a terminal, plain timestamped lines elsewhere (Slurm logs, CI).

`SweepProgress` is the view model (no Ray in it): a row per trial, fed by events (`trial_started`,
`trial_result`, ...). `TuneDisplayCallback` turns Ray Tune's callback hooks into those events. Rendering
is chosen by ``mode``: ``live`` (a rich ``Live`` table), ``plain`` (one line per event) or ``auto`` (live
when stdout is a terminal).

Keeping Ray's own output off the console (Ray 2.60, Tune + Train V2; checked by reading the source and by
running a sweep). The driver must:

1. ``os.environ.update(QUIET_RAY_ENV)`` before ``Tuner.fit()``:
   ``RAY_AIR_NEW_OUTPUT=0`` selects Tune's legacy reporter, which ``verbose=0`` silences completely. The
   default (new) engine ignores ``verbose=0`` in two places: it always prints the "Configuration for
   experiment" table and "View detailed results here" at the start, and a block per errored trial.
   ``TUNE_PRINT_ALL_TRIAL_ERRORS=0`` stops the controller's ``logger.error("Trial task failed ...")``
   with the full traceback on every failure (the display shows a one-line error; the traceback stays in
   the trial's ``error.txt`` and record).
2. ``ray.init(log_to_driver=False, logging_level="ERROR")``: worker processes' stdout/stderr (the Tune
   trial actor, the Train V2 controller and every DDP rank) are not streamed to the driver, and the
   driver's ``ray`` loggers (``ray.tune`` included) drop INFO/WARNING lines (the start-up banner, the
   token-authentication notice, Tune's "Tune detects GPUs, but no trials are using GPUs").
3. ``tune.RunConfig(verbose=0)``. Passing ``progress_reporter`` does nothing useful: with the new engine it
   is ignored (with a warning), with the legacy one ``verbose=0`` already mutes it.

Left on the console (both worth seeing, neither silenced by the above): ERROR records of the ``ray``
loggers, e.g. ``Trials did not complete: [...]`` at the end when a trial failed for good; and raylet
warnings the driver's error-listener thread prints whatever ``log_to_driver`` says, e.g. once on a 2-core
machine ``(raylet) WARNING: 8 PYTHON worker processes have been started ...`` (each trial runs three or
more Ray processes: the Tune trial, the Train controller, its ranks). In live mode both scroll above the
table, which redraws.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from ray.tune.callback import Callback
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from apot.config import FROM_RECORD, grid_point, trial_name
from apot.recipe import FP32_BIT

__all__ = [
    "QUIET_RAY_ENV",
    "SweepProgress",
    "TrialRow",
    "TuneDisplayCallback",
    "format_duration",
]

QUIET_RAY_ENV: dict[str, str] = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
}

Mode = Literal["auto", "live", "plain"]
FINISHED = ("TERMINATED", "ERROR")
STATE_STYLES = {
    "PENDING": "dim",
    "RUNNING": "cyan",
    "RETRYING": "magenta",
    "TERMINATED": "green",
    "ERROR": "bold red",
}
ERROR_CHARS = 300  # kept per row; the live table shows what fits in its column


def format_duration(seconds: float | None) -> str:
    """``42s``, ``5m12s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def one_line(text: str | None, limit: int = ERROR_CHARS) -> str | None:
    """The most telling line of an error text (its last ``Type: message`` line), at most `limit` chars."""
    if not text:
        return None
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return None
    line = lines[-1]
    for candidate in reversed(lines):
        head = candidate.split(":", 1)[0]
        if " " not in head and (head.endswith(("Error", "Exception", "Interrupt", "Exit"))):
            line = candidate
            break
    return line if len(line) <= limit else line[: limit - 1] + "…"


# Live-table columns and the widths they keep on a narrow terminal (only the error text is squeezed).
COLUMNS = (("trial", "left", 22), ("state", "left", 10), ("epoch", "right", 5), ("loss", "right", 5),
           ("test %", "right", 6), ("best %", "right", 6), ("img/s", "right", 5), ("ETA", "right", 6))


@dataclass
class TrialRow:
    """One trial as the display sees it. Accuracies are percent; ``epoch_s`` maps epoch -> seconds."""

    name: str
    arch: str
    bit: int
    power: bool
    seed: int
    epochs: int
    state: str = "PENDING"
    epoch: int = 0
    train_loss: float | None = None
    test_acc: float | None = None
    best_test_acc: float | None = None
    images_per_s: float | None = None
    epoch_s: dict[int, float] = field(default_factory=dict)
    error: str | None = None
    retries: int = 0
    started_at: float | None = None  # clock() when the trial (or its retry) started running
    startup_s: float | None = None  # start -> first epoch result, minus that epoch: Ray and process start-up
    from_record: bool = False  # finished before this run (its record): a resume re-reports it, trains nothing

    @property
    def quantizer(self) -> str:
        return "APoT" if self.power else "uniform"

    @property
    def label(self) -> str:
        """``resnet18 4-bit APoT s0``; full precision: ``resnet18 FP32 s0``."""
        if self.bit == FP32_BIT:
            return f"{self.arch} FP32 s{self.seed}"
        return f"{self.arch} {self.bit}-bit {self.quantizer} s{self.seed}"

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def remaining_epochs(self) -> int:
        return 0 if self.finished else max(0, self.epochs - self.epoch)

    @property
    def mean_epoch_s(self) -> float | None:
        return sum(self.epoch_s.values()) / len(self.epoch_s) if self.epoch_s else None

    @property
    def eta_s(self) -> float | None:
        """Mean epoch seconds of this trial x its remaining epochs (None before its first epoch)."""
        if self.finished:
            return 0.0
        mean = self.mean_epoch_s
        return None if mean is None else mean * self.remaining_epochs


class SweepProgress:
    """The sweep's rows and overall progress, rendered live or as plain lines.

    Sweep ETA: ``sum over unfinished trials of remaining_epochs x t / min(concurrency, unfinished trials)``,
    where ``t`` is that trial's mean epoch time, else the mean epoch time of trials of the same arch, else
    the mean over all timed epochs (None until one epoch finished). Epoch times are measured while trials
    share the machine, so dividing by the number running at once is fair. Each trial not yet past its
    start-up adds the mean start-up seen so far (Ray actors, process group, imports: on a small CPU sweep
    as long as the training), less what it has already spent starting.

    Use as a context manager around ``Tuner.fit()``: live mode starts/stops the rich ``Live`` display,
    plain mode prints a header and a final summary line. The event methods are thread-safe.

    Args:
        mode: ``live``, ``plain``, or ``auto`` (live when `stream` is a terminal).
        concurrency: how many trials run at once (`apot.config.check_resources`), for the sweep ETA.
        stream: where plain lines go (default stdout).
        console: the rich console of live mode (default: one on stdout).
        clock: seconds since the epoch (tests pass a fake one).
        overall_every_s: in plain mode, the overall line follows an epoch line at most this often (it
            always follows a trial's end).
    """

    def __init__(
        self,
        mode: Mode = "auto",
        *,
        concurrency: int = 1,
        stream: TextIO | None = None,
        console: Console | None = None,
        clock: Callable[[], float] = time.time,
        overall_every_s: float = 60.0,
        refresh_per_second: float = 2.0,
    ) -> None:
        if mode not in ("auto", "live", "plain"):
            raise ValueError(f"mode: {mode!r} is not one of auto, live, plain")
        self.stream = stream if stream is not None else sys.stdout
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "live" if isatty is not None and isatty() else "plain"
        self.mode: Literal["live", "plain"] = mode
        self.concurrency = max(1, int(concurrency))
        self.console = console
        self.clock = clock
        self.overall_every_s = overall_every_s
        self.refresh_per_second = refresh_per_second
        self.rows: dict[str, TrialRow] = {}
        self._lock = threading.RLock()
        self._live: Live | None = None
        self._last_overall = -math.inf
        self._events = 0  # lines printed; the closing summary is skipped when nothing followed the last one
        self._events_at_overall = -1
        self._started = clock()

    # ------------------------------------------------------------------------------------ rows and events
    def add_trials(self, points: Iterable[Mapping[str, Any]], epochs: int) -> None:
        """Pre-populate a PENDING row per grid point (``arch``, ``bit``, ``power``, ``seed``), in order."""
        with self._lock:
            for point in points:
                self._row(point, epochs)

    def mark_record(self, record: Mapping[str, Any]) -> None:
        """Show what a stored trial record (docs/ARCHITECTURE.md) says, before a resumed sweep starts.

        TERMINATED and ERROR records keep their state; a RUNNING or INCOMPLETE one is PENDING again (it
        will resume), with its finished epochs counted. Their epoch times feed the ETA.
        """
        with self._lock:
            epochs = (record.get("config") or {}).get("epochs")
            row = self._row(record, epochs)
            history = list(record.get("history") or [])
            state = record.get("state")
            row.state = state if state in FINISHED else "PENDING"
            row.from_record = state == "TERMINATED"
            row.epoch = int(record.get("epochs_done", len(history)) or 0)
            row.error = one_line(record.get("error")) if state == "ERROR" else None
            row.best_test_acc = record.get("best_test_acc")
            for h in history:
                if "epoch" in h and h.get("epoch_s") is not None:
                    row.epoch_s[int(h["epoch"])] = float(h["epoch_s"])
            if history:
                last = history[-1]
                row.train_loss, row.test_acc = last.get("train_loss"), last.get("test_acc")
                row.images_per_s = last.get("images_per_s")

    def trial_started(self, point: Mapping[str, Any], epochs: int | None = None) -> None:
        """A trial (or its retry) started running. A trial finished before this run only re-reports its
        record: it shows as finished, with no line."""
        with self._lock:
            row = self._row(point, epochs)
            if row.from_record:
                return
            row.state = "RUNNING"
            row.started_at, row.startup_s = self.clock(), None
            self._state_line(row)

    def trial_result(self, point: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """One epoch's metrics (``epoch``, ``epochs``, ``train_loss``, ``test_acc``, ``best_test_acc``,
        ``images_per_s``, ``epoch_s``; missing keys are left as they were)."""
        with self._lock:
            row = self._row(point, metrics.get("epochs"))
            if "epoch" not in metrics:
                return
            if not row.finished:
                row.state = "RUNNING"
            row.epoch = int(metrics["epoch"])
            if metrics.get("epochs"):
                row.epochs = int(metrics["epochs"])
            for key in ("train_loss", "test_acc", "images_per_s"):
                if metrics.get(key) is not None:
                    setattr(row, key, float(metrics[key]))
            best = metrics.get("best_test_acc")  # the run's own: a restart at epoch 1 forgets the record's
            if best is None:
                candidates = [v for v in (row.best_test_acc, row.test_acc) if v is not None]
                best = max(candidates) if candidates else None
            row.best_test_acc = best
            if metrics.get("epoch_s") is not None:
                row.epoch_s[row.epoch] = float(metrics["epoch_s"])
                if row.startup_s is None and row.started_at is not None:
                    row.startup_s = max(0.0, self.clock() - row.started_at - float(metrics["epoch_s"]))
            if self.mode == "plain" and not metrics.get(FROM_RECORD):  # a re-report trained nothing
                self._print(self._epoch_text(row))
                if self.clock() - self._last_overall >= self.overall_every_s:
                    self._overall_line()

    def trial_completed(self, point: Mapping[str, Any]) -> None:
        with self._lock:
            row = self._row(point)
            if row.from_record:  # finished in an earlier run; its TERMINATED line is in that run's log
                return
            row.state = "TERMINATED"
            row.error = None
            self._state_line(row, overall=True)

    def settle(self, record: Mapping[str, Any]) -> None:
        """After the trials ran: a trial whose record says TERMINATED though this run never saw it finish (it
        finished as a stop came, before Tune reported it) is shown finished now, once."""
        with self._lock:
            row = self.rows.get(trial_name(record))
            unseen = row is not None and record.get("state") == "TERMINATED" and row.state != "TERMINATED"
        if unseen:
            self.trial_completed(record)

    def trial_errored(self, point: Mapping[str, Any], error: str | None = None) -> None:
        """The trial failed for good (its retries are used up)."""
        with self._lock:
            row = self._row(point)
            row.state = "ERROR"
            row.error = one_line(error) or row.error or "failed (no error text)"
            self._state_line(row, overall=True)

    def trial_retrying(self, point: Mapping[str, Any], error: str | None = None,
                       attempt: int | None = None) -> None:
        """The trial failed and will be restarted from its last checkpoint (`attempt` = failures so far)."""
        with self._lock:
            row = self._row(point)
            row.state = "RETRYING"
            row.retries = attempt if attempt is not None else row.retries + 1
            row.error = one_line(error) or row.error
            self._state_line(row)

    def _row(self, point: Mapping[str, Any], epochs: int | None = None) -> TrialRow:
        name = trial_name(point)
        row = self.rows.get(name)
        if row is None:
            row = TrialRow(name, point["arch"], int(point["bit"]), bool(point["power"]), point["seed"],
                           int(epochs or 1))
            self.rows[name] = row
        elif epochs:
            row.epochs = int(epochs)
        return row

    # ------------------------------------------------------------------------------------ overall numbers
    def summary(self) -> dict[str, Any]:
        """Counts, epoch progress and the sweep ETA in seconds (see the class docstring)."""
        with self._lock:
            rows = list(self.rows.values())
            timed = [s for r in rows for s in r.epoch_s.values()]
            overall = sum(timed) / len(timed) if timed else None
            by_arch: dict[str, list[float]] = {}
            for r in rows:
                by_arch.setdefault(r.arch, []).extend(r.epoch_s.values())
            unfinished = [r for r in rows if not r.finished]
            startups = [r.startup_s for r in rows if r.startup_s is not None]
            mean_startup = sum(startups) / len(startups) if startups else 0.0
            now = self.clock()
            remaining_s: float | None = 0.0
            for r in unfinished:
                same_arch = by_arch.get(r.arch) or []
                t = r.mean_epoch_s or (sum(same_arch) / len(same_arch) if same_arch else overall)
                if t is None:
                    remaining_s = None
                    break
                remaining_s += r.remaining_epochs * t
                if r.state == "PENDING":
                    remaining_s += mean_startup
                elif r.startup_s is None and r.started_at is not None:  # still starting
                    remaining_s += max(0.0, mean_startup - (now - r.started_at))
            parallel = min(self.concurrency, len(unfinished)) or 1
            # A failed trial's untrained epochs leave the total: it is the work the sweep will do.
            done = sum(r.epochs if r.state == "TERMINATED" else min(r.epoch, r.epochs) for r in rows)
            total = sum(min(r.epoch, r.epochs) if r.state == "ERROR" else r.epochs for r in rows)
            return {
                "trials": len(rows),
                "done": sum(r.state == "TERMINATED" for r in rows),
                "errors": sum(r.state == "ERROR" for r in rows),
                "running": sum(r.state in ("RUNNING", "RETRYING") for r in rows),
                "pending": sum(r.state == "PENDING" for r in rows),
                "epochs_total": total,
                "epochs_done": done,
                "eta_s": None if remaining_s is None else remaining_s / parallel,
                "elapsed_s": now - self._started,
            }

    # ------------------------------------------------------------------------------------ plain lines
    def _timestamp(self) -> str:
        return datetime.fromtimestamp(self.clock()).strftime("%Y-%m-%d %H:%M:%S")

    def _label(self, row: TrialRow) -> str:
        width = max((len(r.label) for r in self.rows.values()), default=0)
        return row.label.ljust(width)

    def _epoch_text(self, row: TrialRow) -> str:
        parts = [f"epoch {row.epoch}/{row.epochs}"]
        if row.train_loss is not None:
            parts.append(f"loss {row.train_loss:.3f}")
        if row.test_acc is not None:
            parts.append(f"test {row.test_acc:.2f}%")
        if row.best_test_acc is not None:
            parts.append(f"best {row.best_test_acc:.2f}%")
        if row.images_per_s is not None:
            parts.append(f"{row.images_per_s:.0f} img/s")
        parts.append(f"ETA {format_duration(row.eta_s)}")
        return f"{self._timestamp()} {self._label(row)}  " + "  ".join(parts)

    def _state_text(self, row: TrialRow) -> str:
        text = f"{self._timestamp()} {self._label(row)}  {row.state}"
        if row.state == "RUNNING" and row.retries:
            text += f" (retry {row.retries})"
        if row.state == "RETRYING":
            text += f" (failure {row.retries}; restarts from its last checkpoint)"
        if row.state == "TERMINATED" and row.test_acc is not None:
            best = f"  best {row.best_test_acc:.2f}%" if row.best_test_acc is not None else ""
            text += f"  final test {row.test_acc:.2f}%{best}"
        if row.state in ("ERROR", "RETRYING") and row.error:
            text += f"  {row.error}"
        return text

    def _overall_text(self) -> str:
        s = self.summary()
        pct = 100.0 * s["epochs_done"] / s["epochs_total"] if s["epochs_total"] else 100.0
        return (
            f"{self._timestamp()} sweep  {s['done']}/{s['trials']} done  {s['running']} running  "
            f"{s['errors']} failed  epochs {s['epochs_done']}/{s['epochs_total']} ({pct:.1f}%)  "
            f"elapsed {format_duration(s['elapsed_s'])}  ETA {format_duration(s['eta_s'])}"
        )

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
        self._events += 1

    def _state_line(self, row: TrialRow, overall: bool = False) -> None:
        if self.mode != "plain":
            return
        self._print(self._state_text(row))
        if overall:
            self._overall_line()

    def _overall_line(self) -> None:
        self._print(self._overall_text())
        self._last_overall = self.clock()
        self._events_at_overall = self._events

    # ------------------------------------------------------------------------------------ rich view
    def renderable(self) -> RenderableType:
        """The live view: the overall bar with the sweep ETA, then a row per trial (errors in red)."""
        with self._lock:
            s = self.summary()
            bar = Table.grid(padding=(0, 1))
            bar.add_row(
                Text("sweep", style="bold"),
                ProgressBar(total=max(1, s["epochs_total"]), completed=s["epochs_done"], width=40),
                Text(f"epochs {s['epochs_done']}/{s['epochs_total']}  trials {s['done']}/{s['trials']} done, "
                     f"{s['running']} running, {s['errors']} failed  "
                     f"elapsed {format_duration(s['elapsed_s'])}  ETA {format_duration(s['eta_s'])}"),
            )
            table = Table(expand=False, header_style="bold", pad_edge=False, box=None)
            for name, justify, width in COLUMNS:
                table.add_column(name, justify=justify, no_wrap=True, min_width=width)
            # the one wrappable column: what a narrow terminal squeezes (its cells still never wrap)
            table.add_column("error", style="red", overflow="ellipsis", max_width=60)
            for row in self.rows.values():
                state = row.state + (f" ({row.retries})" if row.retries and not row.finished else "")
                table.add_row(
                    row.label,
                    Text(state, style=STATE_STYLES.get(row.state, "")),
                    f"{row.epoch}/{row.epochs}",
                    _fmt(row.train_loss, ".3f"), _fmt(row.test_acc, ".2f"), _fmt(row.best_test_acc, ".2f"),
                    _fmt(row.images_per_s, ".0f"),
                    "" if row.finished or row.eta_s is None else format_duration(row.eta_s),
                    Text(row.error or "", style="red" if row.state == "ERROR" else "yellow", no_wrap=True,
                         overflow="ellipsis"),
                )
            return Group(bar, table)

    # ------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SweepProgress:
        self._started = self.clock()
        if self.mode == "live":
            self._live = Live(get_renderable=self.renderable, console=self.console or Console(),
                              refresh_per_second=self.refresh_per_second, transient=False)
            self._live.__enter__()
        else:
            s = self.summary()
            already = f" ({s['done']} finished earlier)" if s["done"] else ""
            self._print(f"{self._timestamp()} sweep  {s['trials']} trials{already}, "
                        f"{self.concurrency} at a time")
            self._last_overall = self.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None
        else:
            with self._lock:
                if self._events != self._events_at_overall:
                    self._overall_line()


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------- Ray Tune adapter
def _trial_error_text(trial: Any) -> str | None:
    """The latest failure of a Tune trial, from its ``error.txt`` (Tune appends one block per failure)."""
    path = getattr(trial, "error_file", None)
    text = None
    if path:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            text = None
    if text is None and hasattr(trial, "get_error"):
        try:
            text = trial.get_error()
        except Exception:  # storage not reachable: no text rather than a crashed display
            text = None
    if not text:
        return None
    return text.rsplit("Failure # ", 1)[-1]


class TuneDisplayCallback(Callback):
    """Feeds a `SweepProgress` from Ray Tune's callback hooks (``ray.tune.Callback``, Ray 2.60).

    Reads the grid point from ``trial.config`` (`apot.config.grid_point`; epochs from
    ``config["train"]["epochs"]`` when present) and the per-epoch metrics from each result. Pickles without
    its progress (Tune pickles the RunConfig, callbacks included, into ``tuner.pkl``); an unpickled copy
    does nothing.
    """

    def __init__(self, progress: SweepProgress | None) -> None:
        self.progress = progress

    def __getstate__(self) -> dict[str, Any]:
        return {"progress": None}

    @staticmethod
    def _epochs(trial: Any) -> int | None:
        train = trial.config.get("train")
        return train.get("epochs") if isinstance(train, Mapping) else None

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.trial_started(grid_point(trial.config), self._epochs(trial))

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict,
                        **info: Any) -> None:
        if self.progress is not None:
            self.progress.trial_result(grid_point(trial.config), result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.trial_completed(grid_point(trial.config))

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.trial_retrying(grid_point(trial.config), _trial_error_text(trial),
                                         attempt=getattr(trial, "num_failures", None))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.trial_errored(grid_point(trial.config), _trial_error_text(trial))
