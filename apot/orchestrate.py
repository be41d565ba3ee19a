"""Run a sweep: what happens between the command line (``tune_sweep.py``) and Ray.

`run` reads top to bottom: the trial list (computed once, here, and passed down), resources fitted to the
machine or the cluster joined, ``--dry-run``, the checks before Ray starts (storage, README, Ray version,
data, tracking, the resume policy), then Ray and a fresh Tuner over the trials (`train_sweep`), the stop
after a signal (`GracefulStop`, `mark_stopped`), and the report (results files, tables, exit code).

Exit codes: 0 every trial finished; 1 some did not; 2 a refused run (one ``error: ...`` line on stderr);
``128 + signal`` after a signal stopped the sweep.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apot import provenance as code_provenance
from apot import report
from apot.checkpoint import write_json
from apot.config import (
    AUTO,
    ConfigError,
    SweepConfig,
    check_resources,
    grid_point,
    local_resources,
    resolve_resources,
    trial_name,
)
from apot.data import MNISTDataError, ensure_mnist
from apot.errors import exit_with_error
from apot.ray_session import RaySetupError, check_ray_version, cluster_resources, joined_address, start_ray
from apot.recipe import TrainConfig, identity_changes
from apot.sweep import STOP_MARKER, collect_records, record_path, trial_configs, trial_driver

SAVED_CONFIG = "sweep_config.json"


@dataclass(frozen=True)
class SweepRequest:
    """What the command line asks of a loaded sweep config.

    Args:
        address: the Ray cluster to join (``--address``), or None (``$RAY_ADDRESS``, else a private Ray).
        resume: continue the sweep stored in the experiment folder.
        report_only: rebuild the results and tables from storage; train nothing.
        dry_run: print what would run; start nothing, write nothing.
        display: ``auto``, ``live`` or ``plain`` (`apot.display.SweepProgress`).
        readme: the README the tables go into (``--update-readme``), or None.
    """

    address: str | None = None
    resume: bool = False
    report_only: bool = False
    dry_run: bool = False
    display: str = "auto"
    readme: Path | None = None


def run(cfg: SweepConfig, request: SweepRequest, stop: GracefulStop, started: float) -> int:
    """Run (or dry-run, or only report) the sweep ``cfg``; print progress and the tables; the exit code.

    Args:
        stop: installed by the caller as early as it can (a signal before the Tuner starts is kept).
        started: ``time.time()`` when the command started (the results' ``wall_time_s``).
    """
    trials = cfg.trials()
    experiment = Path(cfg.storage).resolve() / cfg.name
    try:
        cluster = joined_address(request.address)
        if cluster is None:  # a private Ray on this host: fit auto to it now; a joined cluster in _fit
            cfg = resolve_resources(cfg, local_resources())
        if request.dry_run:
            available = local_resources() if cluster is None else cluster_resources(cluster)
            cfg = resolve_resources(cfg, available)
            print(dry_run(cfg, trials, available, cluster))
            return 0
        check_storage(experiment)
        if request.readme is not None:
            report.check_readme(request.readme)  # markers present: before hours of training, not after
        if not request.report_only:
            check_ray_version()
            ensure_mnist(cfg.data_dir)  # present, parseable, or downloaded: before any Ray start-up
            if cfg.tracking["mlflow"] is not None:
                from apot.tracking import check_tracking

                check_tracking(cfg)  # the extra is installed and the store answers: before Ray starts
            check_resume_policy(cfg, trials, experiment, request.resume)
            if cluster is None:
                check_resources(cfg, local_resources(), len(trials))
    except (ConfigError, MNISTDataError, RaySetupError, report.ReportError) as exc:
        return exit_with_error(str(exc))

    extra: dict[str, Any] = {}
    if not request.report_only:
        experiment.mkdir(parents=True, exist_ok=True)
        stop.marker = experiment / STOP_MARKER
        stop.marker.unlink(missing_ok=True)  # left by a stop of an earlier run of this sweep
        (experiment / SAVED_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
        try:
            extra = train_sweep(cfg, trials, experiment, request.address, request.display, stop)
        except (ConfigError, RaySetupError) as exc:
            return exit_with_error(str(exc))
        if stop.received is not None:
            mark_stopped(experiment, trials)
    elif not experiment.exists():
        return exit_with_error(f"--report-only: no sweep at {experiment}; check --storage and the config's "
                               "name")

    records = collect_records(experiment, trials)
    if request.report_only:
        prov = stored_provenance(experiment, cfg)
    else:
        prov = run_provenance(cfg, started, {**extra, **startup_share(records)})
    paths = report.write_results(records, experiment, prov, expected=trials)
    tables = paths["tables.md"].read_text()
    print(tables)
    print(f"results in {experiment}")
    if request.readme is not None:
        try:
            report.update_readme(request.readme, tables, prov)
        except report.ReportError as exc:
            return exit_with_error(str(exc))
    if stop.received is not None:
        return 128 + stop.received
    finished = sum(r["state"] == "TERMINATED" for r in records)
    return 0 if finished == len(trials) else 1


# ---------------------------------------------------------------------------------- before Ray starts
def dry_run(cfg: SweepConfig, trials: list[dict[str, Any]], available: dict[str, float],
            address: str | None) -> str:
    """What the sweep would run, without starting Ray: resolved config, trials with resources, concurrency."""
    from apot.step import resolve_mode

    res = cfg.resources
    concurrency = check_resources(cfg, available, len(trials))
    where = f"the cluster at {address}" if address else "this machine"
    device = "cuda" if res.gpus_per_worker > 0 else "cpu"
    lines = [json.dumps(cfg.to_dict(), indent=2),
             f"resources of {where}: {available.get('CPU', 0):g} CPUs, {available.get('GPU', 0):g} GPUs",
             f"trials: {len(trials)}, {concurrency} at a time; each {res.workers_per_trial} rank(s) x "
             f"({res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU)"]
    for point in trials:
        mode = TrainConfig.from_dict(cfg.train_config(point)).compile
        step = resolve_mode(mode, __import__("torch").device(device), int(res.workers_per_trial))
        lines.append(f"  {trial_name(point):28s} ranks {res.workers_per_trial}  CPU {res.cpus_per_trial:g}  "
                     f"GPU {res.gpus_per_trial:g}  {device}  step {step}")
    return "\n".join(lines)


def check_storage(experiment: Path) -> None:
    """Refuse a sweep folder that cannot be made or written (under a file, read-only) before Ray starts."""
    for folder in (experiment, *experiment.parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise ConfigError(f"storage: {folder} is a file, not a folder, so {experiment} cannot be made; "
                              "point --storage (or storage: in the config) at a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"storage: {folder} is not writable, so {experiment} cannot be written; "
                              "point --storage (or storage: in the config) at a folder of yours")
        return


def check_resume_policy(cfg: SweepConfig, trials: list[dict[str, Any]], experiment: Path,
                        resume: bool) -> None:
    """A new sweep needs a folder with no sweep in it; ``--resume`` one that `check_resume_matches`. Prints
    the trials a resume adds to the stored grid."""
    if resume:
        added = check_resume_matches(cfg, trials, experiment)
        if added:
            names = ", ".join(trial_name(p) for p in added[:4]) + (" ..." if len(added) > 4 else "")
            print(f"resume: the grid grew by {len(added)} trials ({names}); finished trials are kept",
                  flush=True)
    elif (experiment / SAVED_CONFIG).exists():
        raise ConfigError(f"a sweep already exists at {experiment}: pass --resume to continue it, "
                          "or --set name=<new name> / --storage DIR to start another")


def check_resume_matches(cfg: SweepConfig, trials: list[dict[str, Any]], experiment: Path
                         ) -> list[dict[str, Any]]:
    """Refuse to resume a sweep that is not there, or has a different training setup or a grid that lost
    points; the grid points of ``trials`` (``cfg.trials()``) that the stored grid lacks (``--resume`` may
    grow a grid), ``[]`` for the stored grid. Raises ``ConfigError`` (one line)."""
    saved_file = experiment / SAVED_CONFIG
    if not saved_file.is_file():
        raise ConfigError(f"--resume: no sweep to resume at {experiment} (no {SAVED_CONFIG}); check "
                          "--storage and the config's name, or drop --resume to start a new sweep")
    try:
        saved, now = json.loads(saved_file.read_text()), cfg.to_dict()
        stored = replace(cfg, grid=saved["grid"]).trials() if saved.get("grid") != now["grid"] else None
        changed = identity_changes(saved["train"], now["train"])  # the trial identity (apot.recipe)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: cannot read {saved_file} ({type(exc).__name__}: {exc})") from None
    if changed:
        raise ConfigError(
            f"--resume: the training setup differs from the sweep stored at {experiment}: "
            f"train.{', train.'.join(changed)}; resume with the same config (only --data-dir and "
            "train.compile may change), or start a new sweep with --set name=<new name>"
        )
    if stored is None:
        return []
    dropped = [trial_name(p) for p in stored if p not in trials]  # grid points compare as they are
    if dropped:
        raise ConfigError(
            f"--resume: the grid of the sweep stored at {experiment} may grow but not lose trials; this one "
            f"drops {', '.join(dropped[:4])}{' ...' if len(dropped) > 4 else ''} "
            f"(stored grid {saved['grid']}: keep its values, first in each list) "
            "or start a new sweep with --set name=<new name>"
        )
    return [p for p in trials if p not in stored]


# ---------------------------------------------------------------------------------------- Ray and Tune
def train_sweep(cfg: SweepConfig, trials: list[dict[str, Any]], experiment: Path, address: str | None,
                display: str, stop: GracefulStop) -> dict[str, Any]:
    """Start or join Ray, run the Tuner with the live display, close Ray; the timing provenance.

    The private Ray's logs are kept (and named) when a trial did not finish."""
    t0 = time.time()
    session = start_ray(address, log_to_driver=False, logging_level="ERROR", include_dashboard=False,
                        configure_logging=True)
    stop.install()  # after ray.init: Ray's core worker replaced the SIGTERM handler
    ray_init_s = time.time() - t0
    print(session.describe(), flush=True)
    try:
        return _fit(cfg, trials, experiment, display, ray_init_s, stop)
    finally:
        records = collect_records(experiment, trials)
        unfinished = sum(r["state"] != "TERMINATED" for r in records) + len(trials) - len(records)
        session.close(keep_logs=unfinished > 0)
        if unfinished and session.private:
            print(f"ray: logs kept in {session.temp_dir}/ray", flush=True)


def _fit(cfg: SweepConfig, trials: list[dict[str, Any]], experiment: Path, display: str, ray_init_s: float,
         stop: GracefulStop) -> dict[str, Any]:
    """Run every trial under a fresh Tuner, a new sweep and a resumed one alike: Tune's saved state is never
    read back (nothing in the storage folder is unpickled). A trial with a TERMINATED record reports it
    and is not trained again, an unfinished one continues from its latest Ray Train checkpoint
    (`apot.sweep.trial_driver`), and `apot.fp32_first.GridPoints` orders them."""
    import ray
    from ray import tune

    from apot.display import QUIET_RAY_ENV, SweepProgress, TuneDisplayCallback
    from apot.fp32_first import GridPoints

    os.environ.update(QUIET_RAY_ENV)
    res = cfg.resources
    if AUTO in (res.workers_per_trial, res.cpus_per_worker, res.gpus_per_worker):
        cfg = resolve_resources(cfg, ray.cluster_resources())  # fitted to the cluster joined, however named
    concurrency = check_resources(cfg, ray.cluster_resources(), len(trials))
    hardware = code_provenance.hardware_line()

    run_settings = {
        "experiment_path": str(experiment),
        "workers_per_trial": cfg.resources.workers_per_trial,
        "cpus_per_worker": cfg.resources.cpus_per_worker,
        "gpus_per_worker": cfg.resources.gpus_per_worker,
        "placement_strategy": cfg.resources.placement_strategy,
    }
    train = {**cfg.train, "data_dir": str(Path(cfg.data_dir).resolve())}
    # The trial driver only waits on its TorchTrainer: it holds no CPU, so workers get all of them. (Ray
    # drops zero-valued resources and refuses an empty request; one byte of memory keeps it non-empty.)
    trainable = tune.with_resources(trial_driver, {"CPU": 0, "memory": 1})

    progress = SweepProgress(mode=display, concurrency=concurrency)
    progress.add_trials(trials, epochs=cfg.train["epochs"])
    for record in collect_records(experiment, trials):
        progress.mark_record(record)
    callbacks = [TuneDisplayCallback(progress)]
    if cfg.tracking["mlflow"] is not None:
        from apot.tracking import MLflowTracking

        callbacks.append(MLflowTracking(cfg.tracking["mlflow"], cfg.name, experiment))

    configs = trial_configs(trials, train, run_settings)
    order = GridPoints(configs, experiment, on_dropped=progress.mark_record)  # FP32 trials first
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=order, num_samples=len(configs),
                                    max_concurrent_trials=concurrency,
                                    trial_dirname_creator=lambda t: trial_name(grid_point(t.config)),
                                    trial_name_creator=lambda t: trial_name(grid_point(t.config))),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=str(Path(cfg.storage).resolve()),
            failure_config=tune.FailureConfig(max_failures=cfg.max_retries),
            callbacks=callbacks,
            verbose=0,
        ),
    )
    with progress:
        if stop.received is None:  # else stopped before the trials started
            tuner.fit()
        for record in collect_records(experiment, trials):
            progress.settle(record)
    return {"hardware": hardware, "ray_init_s": round(ray_init_s, 1), "concurrency": concurrency}


# --------------------------------------------------------------------------------------------- stopping
class GracefulStop:
    """SIGTERM (kill, timeout, scancel, ray_cluster.sh on the time limit) stops the sweep as Ctrl-C does.

    Tune stops the trials (every epoch already reported is checkpointed: it stays), `run` then writes the
    tables with each trial's state and exits ``128 + signal``; ``--resume`` continues. A signal before the
    Tuner runs is acted on when it would start (``_fit`` checks ``received``). A second signal exits at
    once (records and checkpoints are already on disk; ``--report-only`` rebuilds the tables). (SIGUSR1 is
    Tune's own stop signal inside ``Tuner.fit``; slurm/ray_cluster.sh turns Slurm's USR1 into SIGTERM.)
    """

    SIGNALS = (signal.SIGTERM,)

    def __init__(self, marker: Path | None = None) -> None:
        self.received: int | None = None
        self.marker = marker  # touched on the first signal: trials then raising were stopped, not failed

    def install(self) -> None:
        """(Re)install the handlers. Call again after ``ray.init``: Ray's core worker replaces the SIGTERM
        handler with its crash handler (the native "*** SIGTERM received ... PC:" trace, then an abort)."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"got {name} again: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        if self.marker is not None:
            self.marker.touch()
        print(f"got {name}: stopping the trials at their last checkpoint and writing the tables; --resume "
              "continues (send it again to exit at once)", file=sys.stderr, flush=True)
        on_interrupt = signal.getsignal(signal.SIGINT)
        if callable(on_interrupt) and on_interrupt is not signal.default_int_handler:
            on_interrupt(signal.SIGINT, frame)  # inside Tuner.fit: Tune's Ctrl-C (stop trials, save state)


def mark_stopped(experiment: Path, trials: list[dict[str, Any]]) -> None:
    """After a stopped sweep no trial runs: the records of the trials it stopped say INCOMPLETE (resumable),
    not RUNNING (a trial that raised as Tune stopped it wrote INCOMPLETE itself: see ``STOP_MARKER``)."""
    for record in collect_records(experiment, trials):
        if record["state"] == "RUNNING":
            record["state"] = "INCOMPLETE"
            write_json(record, record_path(experiment, record))


# ------------------------------------------------------------------------------------------- provenance
def run_provenance(cfg: SweepConfig, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    """How the numbers were made: the run's settings, then the code, software, GPUs and command
    (`apot.provenance.collect`: argv only, never the environment), then timings and ``extra``."""
    return {
        "quick": cfg.quick,
        "epochs": cfg.train["epochs"],
        "train_subset": cfg.train.get("train_subset"),
        "schedule": cfg.train["schedule"],
        "seeds": list(cfg.grid["seed"]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **code_provenance.collect(),
        "wall_time_s": round(time.time() - started, 1),
        **extra,
    }


def stored_provenance(experiment: Path, cfg: SweepConfig) -> dict[str, Any]:
    """--report-only keeps how the numbers were made (the stored provenance), not how it was called."""
    try:
        _, prov = report.read_results(experiment)
        return prov
    except Exception:
        return {"quick": cfg.quick, "epochs": cfg.train["epochs"], "seeds": list(cfg.grid["seed"]),
                "command": "unknown (rebuilt with --report-only; no stored results.json)"}


def startup_share(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the trial slots' time went: Ray and process start-up (trial driver start -> first batch) versus
    epochs (train + test), summed over every trial with a record."""
    started = [r for r in records if r.get("startup_s") is not None]
    if not started:
        return {}
    return {
        "trial_startup_s": round(sum(r["startup_s"] for r in started)),
        "trial_epochs_s": round(sum(r["wall_time_s"] for r in started)),
    }
