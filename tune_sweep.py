#!/usr/bin/env python
"""Run the APoT / uniform quantization sweep on Ray Tune and write both accuracy tables.

    python tune_sweep.py                      # embedded local Ray, the 27 trials of search_space.yaml
    python tune_sweep.py --quick              # same grid, a few epochs on a subset (~10 min on 2 cores)
    python tune_sweep.py --address HOST:PORT  # join a running cluster (slurm/ray_cluster.sh does this)
    python tune_sweep.py --resume             # continue an interrupted sweep
    python tune_sweep.py --report-only        # rebuild results and tables from storage, no training
    python tune_sweep.py --dry-run            # print the resolved config, trials, resources; train nothing
    python tune_sweep.py --mlflow sqlite:///mlflow.db   # also log every trial to MLflow (docs/TRACKING.md)

`pip install .` installs this script as the command `apot-sweep` (same flags).

Flow: search_space.yaml -> apot.config (validated before Ray starts) -> apot.sweep (one Tune trial per grid
point, each a TorchTrainer DDP run) -> records/<trial>.json -> apot.report (results.json/csv, tables.md, PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from dataclasses import replace
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
    load_config,
    local_resources,
    resolve_resources,
    trial_name,
)
from apot.data import MNISTDataError, ensure_mnist
from apot.errors import exit_with_error
from apot.ray_session import RaySetupError, check_ray_version, cluster_resources, joined_address, start_ray
from apot.recipe import TrainConfig, identity_changes
from apot.sweep import (
    STOP_MARKER,
    collect_records,
    record_path,
    trial_configs,
    trial_driver,
)

SAVED_CONFIG = "sweep_config.json"
DEFAULT_CONFIG = "search_space.yaml"


class _VersionAction(argparse.Action):
    """``--version``: the apot version and the git commit, worked out only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(code_provenance.version_text(parser.prog))
        parser.exit()


def default_config() -> Path:
    """``search_space.yaml`` in the working directory, else the one shipped with apot (beside this script in a
    checkout, ``apot/search_space.yaml`` in an installed package)."""
    candidates = [Path(DEFAULT_CONFIG), Path(__file__).with_name(DEFAULT_CONFIG),
                  code_provenance.PACKAGE_DIR / DEFAULT_CONFIG]
    return next((c for c in candidates if c.is_file()), candidates[0])


def readme_path() -> Path:
    """--update-readme's target: the README beside this script (a checkout), else ./README.md (the
    installed command run from a checkout or a project folder of one's own)."""
    beside = Path(__file__).with_name("README.md")
    return beside if beside.is_file() else Path("README.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_VersionAction, help="print the apot version and git commit, and exit")
    p.add_argument("--config", default=None,
                   help=f"sweep definition (default: ./{DEFAULT_CONFIG}, else the one shipped with apot)")
    p.add_argument("--quick", action="store_true", help="apply the config's quick: section (a short demo)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (host:port or auto) instead of starting a private local one")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in storage")
    p.add_argument("--storage", default=None, help="override the config's storage folder")
    p.add_argument("--data-dir", default=None, help="override the MNIST root (else $APOT_DATA_DIR or config)")
    p.add_argument("--report-only", action="store_true", help="rebuild results and tables without training")
    p.add_argument("--update-readme", action="store_true", help="write the tables into README.md")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the trials, their resources and the concurrency; train "
                        "nothing (a cluster named by --address or $RAY_ADDRESS is joined for its resources)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 --set grid.bit=[32,4,2]")
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help="log every trial as an MLflow run (sqlite:///mlflow.db, a folder, http://host:port); "
                        "overrides tracking.mlflow of the config; needs the mlflow extra")
    p.add_argument("--display", choices=("auto", "live", "plain"), default="auto",
                   help="live rich table on a terminal, timestamped lines otherwise (default: auto)")
    args = p.parse_args(argv)
    args.default_config = args.config is None
    if args.default_config:
        args.config = str(default_config())
    return args



def check_resume_matches(cfg: SweepConfig, experiment: Path) -> list[dict[str, Any]]:
    """Refuse to resume a sweep that is not there, or has a different training setup or a grid that lost
    points; the grid points added since it was stored (``--resume`` may grow a grid: add uniform trials to
    a finished APoT sweep, say), ``[]`` for the stored grid."""
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
    points = cfg.trials()  # grid points: {arch, bit, power, seed}, comparable as they are
    dropped = [trial_name(p) for p in stored if p not in points]
    if dropped:
        raise ConfigError(
            f"--resume: the grid of the sweep stored at {experiment} may grow but not lose trials; this one "
            f"drops {', '.join(dropped[:4])}{' ...' if len(dropped) > 4 else ''} "
            f"(stored grid {saved['grid']}: keep its values, first in each list) "
            "or start a new sweep with --set name=<new name>"
        )
    return [p for p in points if p not in stored]


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


def dry_run(cfg: SweepConfig, available: dict[str, float], address: str | None) -> str:
    """What the sweep would run, without starting Ray: resolved config, trials with resources, concurrency."""
    from apot.step import resolve_mode

    res = cfg.resources
    concurrency = check_resources(cfg, available)
    where = f"the cluster at {address}" if address else "this machine"
    device = "cuda" if res.gpus_per_worker > 0 else "cpu"
    lines = [json.dumps(cfg.to_dict(), indent=2),
             f"resources of {where}: {available.get('CPU', 0):g} CPUs, {available.get('GPU', 0):g} GPUs",
             f"trials: {len(cfg.trials())}, {concurrency} at a time; each {res.workers_per_trial} rank(s) x "
             f"({res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU)"]
    for point in cfg.trials():
        mode = TrainConfig.from_dict(cfg.train_config(point)).compile
        step = resolve_mode(mode, __import__("torch").device(device), int(res.workers_per_trial))
        lines.append(f"  {trial_name(point):28s} ranks {res.workers_per_trial}  CPU {res.cpus_per_trial:g}  "
                     f"GPU {res.gpus_per_trial:g}  {device}  step {step}")
    return "\n".join(lines)
class GracefulStop:
    """SIGTERM (kill, timeout, scancel, ray_cluster.sh on the time limit) stops the sweep as Ctrl-C does.

    Tune stops the trials (every epoch already reported is checkpointed: it stays), ``main`` then writes the
    tables with each trial's state and exits ``128 + signal``; ``--resume`` continues. A signal before the
    Tuner runs is acted on when it would start (``run_sweep`` checks ``received``). A second signal exits
    at once (records and checkpoints are already on disk; ``--report-only`` rebuilds the tables). (SIGUSR1
    is Tune's own stop signal inside ``Tuner.fit``; slurm/ray_cluster.sh turns Slurm's USR1 into SIGTERM.)
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


def mark_stopped(experiment: Path, points: list[dict[str, Any]]) -> None:
    """After a stopped sweep no trial runs: the records of the trials it stopped say INCOMPLETE (resumable),
    not RUNNING (a trial that raised as Tune stopped it wrote INCOMPLETE itself: see ``STOP_MARKER``)."""
    for record in collect_records(experiment, points):
        if record["state"] == "RUNNING":
            record["state"] = "INCOMPLETE"
            write_json(record, record_path(experiment, record))


def hardware_summary() -> str:
    """One line: CPU model and cores of this host, GPUs the cluster has (from Ray)."""
    import ray

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    res = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    return f"{nodes} node(s), {int(res.get('CPU', 0))} CPUs ({cpu})"  # GPUs: apot.provenance.gpus()


def provenance(cfg: SweepConfig, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    """How the numbers were made: the run's settings, then the code, software, GPUs and command
    (apot.provenance: argv only, never the environment), then timings."""
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


def run_sweep(cfg: SweepConfig, args: argparse.Namespace, experiment: Path, stop: GracefulStop
              ) -> dict[str, Any]:
    """Start or join Ray, run the Tuner with the live display, return timing provenance."""
    t0 = time.time()
    session = start_ray(args.address, log_to_driver=False, logging_level="ERROR", include_dashboard=False,
                        configure_logging=True)
    stop.install()  # after ray.init: Ray's core worker replaced the SIGTERM handler
    ray_init_s = time.time() - t0
    print(session.describe(), flush=True)
    try:
        return _fit(cfg, args, experiment, ray_init_s, stop)
    finally:  # the private cluster's logs are kept when a trial did not finish
        records = collect_records(experiment, cfg.trials())
        unfinished = sum(r["state"] != "TERMINATED" for r in records) + len(cfg.trials()) - len(records)
        session.close(keep_logs=unfinished > 0)
        if unfinished and session.private:
            print(f"ray: logs kept in {session.temp_dir}/ray", flush=True)


def _fit(cfg: SweepConfig, args: argparse.Namespace, experiment: Path, ray_init_s: float,
         stop: GracefulStop) -> dict[str, Any]:
    """Run every grid point under a fresh Tuner, a new sweep and a resumed one alike: Tune's saved state is
    never read back (nothing in the storage folder is unpickled). A resume needs none of it: a trial with
    a TERMINATED record reports it and is not trained again, an unfinished one continues from its latest
    Ray Train checkpoint (`apot.sweep.trial_driver`), and `apot.fp32_first.GridPoints` orders them."""
    import ray
    from ray import tune

    from apot.display import QUIET_RAY_ENV, SweepProgress, TuneDisplayCallback
    from apot.fp32_first import GridPoints

    os.environ.update(QUIET_RAY_ENV)
    res = cfg.resources
    if AUTO in (res.workers_per_trial, res.cpus_per_worker, res.gpus_per_worker):
        cfg = resolve_resources(cfg, ray.cluster_resources())  # fitted to the cluster joined, however named
    concurrency = check_resources(cfg, ray.cluster_resources())
    hardware = hardware_summary()

    run = {
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

    progress = SweepProgress(mode=args.display, concurrency=concurrency)
    progress.add_trials(cfg.trials(), epochs=cfg.train["epochs"])
    for record in collect_records(experiment, cfg.trials()):
        progress.mark_record(record)
    callbacks = [TuneDisplayCallback(progress)]
    if cfg.tracking["mlflow"] is not None:
        from apot.tracking import MLflowTracking

        callbacks.append(MLflowTracking(cfg.tracking["mlflow"], cfg.name, experiment))

    configs = trial_configs(cfg.trials(), train, run)
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
    return {"hardware": hardware, "ray_init_s": round(ray_init_s, 1), "concurrency": concurrency}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    stop = GracefulStop()
    stop.install()
    added: list[dict[str, Any]] = []  # grid points a --resume adds to the stored sweep
    if args.default_config and not Path(DEFAULT_CONFIG).is_file():
        print(f"config: {args.config} (the default; no ./{DEFAULT_CONFIG} here, --config to choose)")
    try:
        cfg = load_config(args.config, overrides=args.overrides, quick=args.quick,
                          storage=args.storage, data_dir=args.data_dir, mlflow=args.mlflow)
        experiment = Path(cfg.storage).resolve() / cfg.name
        cluster = joined_address(args.address)
        if cluster is None:  # a private Ray on this host: fit auto to it now; a joined cluster in _fit
            cfg = resolve_resources(cfg, local_resources())
        if args.dry_run:
            available = local_resources() if cluster is None else cluster_resources(cluster)
            cfg = resolve_resources(cfg, available)
            print(dry_run(cfg, available, cluster))
            return 0
        check_storage(experiment)
        if args.update_readme:
            report.check_readme(readme_path())  # markers present: before hours of training, not after
        if not args.report_only:
            check_ray_version()
            ensure_mnist(cfg.data_dir)  # present, parseable, or downloaded: before any Ray start-up
            if cfg.tracking["mlflow"] is not None:
                from apot.tracking import check_tracking

                check_tracking(cfg)  # the extra is installed and the store answers: before Ray starts
            if args.resume:
                added = check_resume_matches(cfg, experiment)
                if added:
                    names = ", ".join(trial_name(p) for p in added[:4]) + (" ..." if len(added) > 4 else "")
                    print(f"resume: the grid grew by {len(added)} trials ({names}); finished trials are kept",
                          flush=True)
            elif (experiment / SAVED_CONFIG).exists():
                raise ConfigError(f"a sweep already exists at {experiment}: pass --resume to continue it, "
                                  "or --set name=<new name> / --storage DIR to start another")
            if cluster is None:
                check_resources(cfg, local_resources())
    except (ConfigError, MNISTDataError, RaySetupError, report.ReportError) as exc:
        return exit_with_error(str(exc))

    extra: dict[str, Any] = {}
    if not args.report_only:
        experiment.mkdir(parents=True, exist_ok=True)
        stop.marker = experiment / STOP_MARKER
        stop.marker.unlink(missing_ok=True)  # left by a stop of an earlier run of this sweep
        (experiment / SAVED_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
        try:
            extra = run_sweep(cfg, args, experiment, stop)
        except (ConfigError, RaySetupError) as exc:
            return exit_with_error(str(exc))
        if stop.received is not None:
            mark_stopped(experiment, cfg.trials())
    elif not experiment.exists():
        return exit_with_error(f"--report-only: no sweep at {experiment}; check --storage and the config's "
                               "name")

    records = collect_records(experiment, cfg.trials())
    if args.report_only:
        prov = _stored_provenance(experiment, cfg)
    else:
        prov = provenance(cfg, started, {**extra, **startup_share(records)})
    paths = report.write_results(records, experiment, prov, expected=cfg.trials())
    tables = paths["tables.md"].read_text()
    print(tables)
    print(f"results in {experiment}")
    if args.update_readme:
        try:
            report.update_readme(readme_path(), tables, prov)
        except report.ReportError as exc:
            return exit_with_error(str(exc))
    finished = sum(r["state"] == "TERMINATED" for r in records)
    if stop.received is not None:
        return 128 + stop.received
    return 0 if finished == len(cfg.trials()) else 1


def _stored_provenance(experiment: Path, cfg: SweepConfig) -> dict[str, Any]:
    """--report-only keeps how the numbers were made (the stored provenance), not how it was called."""
    try:
        _, prov = report.read_results(experiment)
        return prov
    except Exception:
        return {"quick": cfg.quick, "epochs": cfg.train["epochs"], "seeds": list(cfg.grid["seed"]),
                "command": "unknown (rebuilt with --report-only; no stored results.json)"}


if __name__ == "__main__":
    sys.exit(main())
