"""The order in which a sweep hands its grid points to Ray Tune: a quantized trial that starts from its FP32
trial (``train.init_from: fp32``) is released only once that FP32 trial has finished.

`GridPoints` is a Tune ``Searcher`` over the sweep's fixed list of trial configs. It suggests them in order,
holding back each quantized point whose FP32 trial (same arch and seed) has not yet TERMINATED. A held-back
point is not a Tune trial, so it takes no slot of ``max_concurrent_trials`` (Tune's ``ConcurrencyLimiter``
counts the trials it was given): while the FP32 trials train, the free slots stay free for trials that can
run, and the quantized trials fill them as soon as their FP32 trial is done.

Tune tells the searcher a trial is complete only when it will not run again: a failed FP32 trial that Tune
retries is not complete, so its quantized trials keep waiting through every retry. When it fails for good
(no retries left), each of them gets an ERROR record saying why, and is never started.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from apot.checkpoint import write_json
from apot.config import FP32_BIT, grid_point, trial_name
from apot.recipe import INIT_FROM_FP32, TrainConfig
from apot.sweep import STOP_MARKER, fp32_point, read_record, record_path
from apot.train import summarize


def needs_fp32(config: Mapping[str, Any]) -> str | None:
    """The trial name of the FP32 trial a trial config must wait for, or None (it can start at once)."""
    point = grid_point(config)
    if config["train"].get("init_from") != INIT_FROM_FP32 or point["bit"] == FP32_BIT:
        return None
    return trial_name(fp32_point(point))


class GridPoints(Searcher):
    """Suggest each of ``configs`` (full Tune trial configs: ``point``, ``train``, ``run``) once, a quantized
    one with ``init_from: fp32`` only after its FP32 trial has TERMINATED (see the module doc).

    Args:
        configs: the trial configs, in the sweep's order (`apot.sweep.trial_configs`).
        experiment: the experiment folder (records are read and written there).
        on_dropped: called with the ERROR record of each point that will not run because its FP32 trial
            failed for good (the live display shows it).
    """

    def __init__(self, configs: list[dict[str, Any]], experiment: Path,
                 on_dropped: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__()
        self.waiting = list(configs)  # not yet suggested, in order
        self.experiment = Path(experiment)
        self.on_dropped = on_dropped
        self.finished_fp32: set[str] = set()  # FP32 trial names that TERMINATED
        self.running: dict[str, str] = {}  # Tune trial id -> trial name, for the trials suggested

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its config into the experiment folder (never read back: `apot.orchestrate`); the
        callback holds the live display, which does not pickle."""
        return {**self.__dict__, "on_dropped": None}

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The first waiting config that may start now; None while all the rest wait; FINISHED when none is
        left."""
        for config in self.waiting:
            fp32 = needs_fp32(config)
            if fp32 is None or fp32 in self.finished_fp32:
                self.waiting.remove(config)
                self.running[trial_id] = trial_name(grid_point(config))
                return config
        return Searcher.FINISHED if not self.waiting else None

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        """A trial will not run again: an FP32 trial that TERMINATED releases its quantized points; one that
        failed for good (``error``: no retries left) drops them, each with an ERROR record. One ended by a
        stop of the sweep (Ctrl-C, SIGTERM) does neither: the sweep is ending, and ``--resume`` runs them."""
        name = self.running.pop(trial_id, None)
        if name is None:
            return
        if error:
            if (self.experiment / STOP_MARKER).exists():  # it raised as a SIGTERM stopped it: not a failure
                return
            for config in [c for c in self.waiting if needs_fp32(c) == name]:
                self.waiting.remove(config)
                self._drop(config, name)
            return
        record = read_record(self.experiment / "records" / f"{name}.json")
        if record is not None and record.get("state") == "TERMINATED":
            self.finished_fp32.add(name)

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a resumed sweep rebuilds this from the records (a fresh searcher over the grid,
        whose finished FP32 trials report their record at once and so release their quantized points)."""

    def _drop(self, config: dict[str, Any], fp32: str) -> None:
        point = grid_point(config)
        cfg = TrainConfig.from_dict({**config["train"], **point})
        record = summarize(cfg, [])
        record.update(state="ERROR", epochs_trained=[], init_checkpoint=None,
                      error=f"init_from fp32: {fp32} failed with no retries left, so {trial_name(point)} "
                            "was not started; fix that trial's error and --resume")
        write_json(record, record_path(self.experiment, point))
        if self.on_dropped is not None:
            self.on_dropped(record)
