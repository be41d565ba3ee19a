"""MLflow tracking of a sweep: one MLflow run per trial, in one experiment named after the sweep.

    python tune_sweep.py --mlflow sqlite:///mlflow.db      # or tracking: {mlflow: URI} in search_space.yaml
    mlflow ui --backend-store-uri sqlite:///mlflow.db      # compare the trials (needs the full mlflow)

Needs the optional ``mlflow`` extra (``pip install 'apot[mlflow]'``: mlflow-skinny and the SQL store).

What a trial's run holds (`MLflowTracking`, a Tune callback in the driver):
    tags        ``apot.trial`` (the trial name), ``apot.experiment`` (the sweep folder): how a resumed trial
                finds its run again; ``mlflow.runName`` = the trial name
    params      the grid point and the resolved ``TrainConfig`` of the trial (``config`` of its record)
    metrics     every epoch's ``METRICS`` at step = epoch (test accuracy, train loss, lr, img/s, the mean
                weight and activation alphas, ...); at the end ``final_test_acc`` as in results.csv
    artifacts   ``record/<trial>.json`` (the trial record) and ``export/<trial>.pt`` / ``.onnx``

A resumed sweep continues each trial's own run: the run is found by its tags, epochs trained since are
added at their steps, and any epoch of the record that the run lacks (trained while nothing tracked it) is
filled in when the trial ends. Tracking failures never stop the sweep: they are printed once per trial.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.tune import Callback

from apot.config import FROM_RECORD, ConfigError, SweepConfig, grid_point, trial_name

EXTRA_HINT = "pip install 'apot[mlflow]' (or: pip install mlflow-skinny sqlalchemy alembic)"
TRIAL_TAG = "apot.trial"
EXPERIMENT_TAG = "apot.experiment"
METRICS = ("test_acc", "test_loss", "train_loss", "train_acc", "best_test_acc", "lr", "images_per_s",
           "epoch_s", "weight_alpha_mean", "act_alpha_mean", "compile_s")
"""The per-epoch metrics of ``apot.train.run_trial`` logged at step = epoch (those that are numbers)."""
ARTIFACT_DIRS = {"records": "record", "exports": "export"}  # sweep folder -> artifact folder of the run


def require_mlflow() -> Any:
    """The ``mlflow`` module; ``ConfigError`` (one line naming the extra) when it is not installed."""
    try:
        import mlflow
        import sqlalchemy  # noqa: F401  (the sqlite store; mlflow-skinny leaves it out)
    except ImportError as exc:
        raise ConfigError(f"tracking.mlflow needs the optional mlflow packages ({exc.name or 'mlflow'} is "
                          f"not installed): {EXTRA_HINT}") from None
    return mlflow


@contextmanager
def _few_http_retries():
    """MLflow retries an unreachable server for minutes by default; the check before a sweep should not."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of the MLflow experiment ``name``, made if absent (a sqlite store keeps its artifacts in
    ``mlartifacts/`` beside the database file)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def check_tracking(cfg: SweepConfig) -> str | None:
    """Before Ray starts: the extra is installed and the store answers (the experiment is made if absent).
    Returns the tracking URI or None; ``ConfigError`` (one line) otherwise."""
    uri = cfg.tracking.get("mlflow")
    if uri is None:
        return None
    mlflow = require_mlflow()
    try:
        with _few_http_retries():
            experiment_id(mlflow.MlflowClient(tracking_uri=uri), cfg.name, uri)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ConfigError(f"tracking.mlflow: cannot use the MLflow store {uri} ({type(exc).__name__}: "
                          f"{text[0][:160] if text else ''}); check the URI, or drop --mlflow") from None
    return uri


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _param_text(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a param value


class MLflowTracking(Callback):
    """Tune callback: each trial's run (made, or found again by its tags), its epochs and its end.

    Args:
        uri: the MLflow tracking URI (``SweepConfig.tracking["mlflow"]``).
        experiment_name: the sweep's name (the MLflow experiment).
        experiment_path: the sweep folder (records/ and exports/ are read from it).
    """

    def __init__(self, uri: str, experiment_name: str, experiment_path: Path | str) -> None:
        self.uri = uri
        self.experiment_name = experiment_name
        self.experiment_path = Path(experiment_path)
        self._client: Any = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # trial name -> run id
        self._logged: dict[str, set[int]] = {}  # trial name -> epochs its run holds
        self._warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        state = dict(self.__dict__)
        state.update(_client=None, _experiment_id=None, _runs={}, _logged={})
        return state

    # -- the store
    @property
    def client(self) -> Any:
        if self._client is None:
            mlflow = require_mlflow()
            self._client = mlflow.MlflowClient(tracking_uri=self.uri)
            self._experiment_id = experiment_id(self._client, self.experiment_name, self.uri)
        return self._client

    def run_id(self, trial: Any) -> str:
        """The run of ``trial``: cached, found by its tags (a resumed sweep), or made with its params."""
        name = trial_name(grid_point(trial.config))
        if name in self._runs:
            return self._runs[name]
        client = self.client
        found = client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{name}' and tags.`{EXPERIMENT_TAG}` = "
                          f"'{self.experiment_path}'",
            max_results=1, order_by=["attributes.start_time ASC"])
        self._logged[name] = set()
        if found:
            run_id = found[0].info.run_id
            self._logged[name] = self._logged_steps(run_id, "test_acc")
            if found[0].info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(self._experiment_id, run_name=name,
                                    tags={TRIAL_TAG: name, EXPERIMENT_TAG: str(self.experiment_path)})
            run_id = run.info.run_id
            self._log_params(run_id, trial.config)
        self._runs[name] = run_id
        return run_id

    def _log_params(self, run_id: str, config: dict[str, Any]) -> None:
        from dataclasses import asdict

        from mlflow.entities import Param

        from apot.recipe import TrainConfig

        point = grid_point(config)
        train = asdict(TrainConfig.from_dict({**config["train"], **point}))
        params = [Param(k, _param_text(v)) for k, v in sorted(train.items())]
        for lo in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=params[lo:lo + 100])

    def _log_epochs(self, run_id: str, epochs: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, int(h["epoch"])) for h in epochs for key in METRICS
                   if (value := _number(h.get(key))) is not None]
        for lo in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(run_id, metrics=metrics[lo:lo + 1000])

    def _logged_steps(self, run_id: str, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def _safely(self, trial: Any, what: str, fn: Any) -> None:
        """Run ``fn``; a failure is printed (once per trial) and the sweep goes on."""
        try:
            fn()
        except Exception as exc:
            name = str(trial)
            if name not in self._warned:
                self._warned.add(name)
                text = str(exc).strip().splitlines()
                print(f"mlflow: {what} of {name} not logged ({type(exc).__name__}: "
                      f"{text[0][:200] if text else ''}); the sweep goes on", file=sys.stderr, flush=True)

    # -- Tune's hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(trial, "the start", lambda: self.run_id(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(FROM_RECORD) or "epoch" not in result:  # a finished trial's record: logged at its end
            return
        self._safely(trial, f"epoch {result.get('epoch')}", lambda: self._log_result(trial, result))

    def _log_result(self, trial: Any, result: dict[str, Any]) -> None:
        """One epoch, unless the run has it (an epoch trained again after a stop: the same numbers)."""
        run_id, name = self.run_id(trial), trial_name(grid_point(trial.config))
        if int(result["epoch"]) not in self._logged[name]:
            self._log_epochs(run_id, [result])
            self._logged[name].add(int(result["epoch"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(trial, "the end", lambda: self._finish(trial, "FINISHED"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(trial, "the error", lambda: self._finish(trial, "FAILED"))

    def _finish(self, trial: Any, status: str) -> None:
        """Fill in epochs of the record the run lacks, log ``final_test_acc`` and the artifacts, end it."""
        from mlflow.entities import Metric

        from apot.sweep import read_record, record_path

        point = grid_point(trial.config)
        run_id = self.run_id(trial)
        record = read_record(record_path(self.experiment_path, point))
        if record is not None:
            logged = self._logged_steps(run_id, "test_acc")
            self._log_epochs(run_id, [h for h in record.get("history", []) if h["epoch"] not in logged])
            final = _number(record.get("final_test_acc"))
            step = int(record["history"][-1]["epoch"]) if record.get("history") else 0
            if final is not None and step not in self._logged_steps(run_id, "final_test_acc"):
                now = int(time.time() * 1000)
                self.client.log_batch(run_id, metrics=[Metric("final_test_acc", final, now, step)])
        name = trial_name(point)
        for folder, artifact_dir in ARTIFACT_DIRS.items():
            for path in sorted((self.experiment_path / folder).glob(f"{name}.*")):
                self.client.log_artifact(run_id, str(path), artifact_path=artifact_dir)
        if status == "FINISHED" and (record or {}).get("state") != "TERMINATED":
            status = "KILLED"  # stopped part-way (a signal): --resume continues this run
        self.client.set_terminated(run_id, status=status)
