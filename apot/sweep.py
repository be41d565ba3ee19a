"""The sweep on Ray: one Tune trial per grid point, each a Ray Train ``TorchTrainer`` (DDP) run.

Ray Train V2 pattern (Ray >= 2.43): the Tune trainable is a plain function (``trial_driver``) that builds a
``TorchTrainer`` and calls ``fit()``; ``TuneReportCallback`` forwards rank 0's per-epoch reports to Tune.
Every name is deterministic, so a restarted trial's ``TorchTrainer`` finds its own latest checkpoint in
``<experiment>/train/<trial>`` and continues from it.

Storage layout of one experiment (``<storage>/<name>``)::

    <trial dirs>, experiment_state*.json   Tune's own state: written by Tune, never read back (``--resume``
                                           runs a fresh Tuner over the records and checkpoints)
    train/<trial>/checkpoint_*/            Ray Train checkpoints (checkpoint.pt), the last 2 kept
    records/<trial>.json                   the trial record (docs/ARCHITECTURE.md), rewritten every epoch
    exports/<trial>.pt                     a finished trial's quantized model as integer codes (apot.export)
    exports/<trial>.onnx                   the same as an ONNX graph, with the onnx extra (apot.onnx_export)
    compile_cache/                         compiled graphs shared by every trial (apot.step.use_compile_cache)
    sweep_config.json                      the resolved sweep config the experiment started with
    stopping                               present while a signal stops the sweep (apot.orchestrate)
    results.json/.csv, tables.md, accuracy_vs_bits.png, learning_curves.png
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from apot.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint, write_json
from apot.config import FP32_BIT, FROM_RECORD, GRID_KEYS, grid_point, trial_name
from apot.recipe import INIT_FROM_FP32, TrainConfig, identity_changes
from apot.train import run_trial, summarize

CHECKPOINTS_KEPT = 2
COMPILE_CACHE = "compile_cache"  # <experiment>/compile_cache: Inductor/AOTAutograd caches (apot.step)
# Written by apot.orchestrate.GracefulStop when a signal stops the sweep: a trial whose TorchTrainer then
# raises (Tune removes its placement group) was stopped, it did not fail.
STOP_MARKER = "stopping"


def record_path(experiment: Path, point: dict[str, Any]) -> Path:
    return Path(experiment) / "records" / f"{trial_name(point)}.json"


def checkpoint_dir_name(epoch: int) -> str:
    """The folder of epoch ``epoch``'s checkpoint in ``train/<trial>/``."""
    return f"checkpoint_epoch{epoch:03d}"


def export_path(experiment: Path, point: dict[str, Any]) -> Path:
    return Path(experiment) / "exports" / f"{trial_name(point)}.pt"


def export_trial(state: dict[str, Any], experiment: Path, point: dict[str, Any]) -> dict[str, Any]:
    """Export a finished trial's final checkpoint ``state`` to ``exports/<trial>.pt`` (and, with the onnx
    extra, ``exports/<trial>.onnx``: `apot.onnx_export.export_trial_onnx`); the record's export fields
    (``export``: the path relative to the experiment, ``size_kb``, ``compression``, ``onnx_export``).

    Never raises: a failure is returned as ``export_error`` (one line), so the trial's result stands.
    """
    from apot.export import export_state, write_export
    from apot.onnx_export import export_trial_onnx

    path = export_path(experiment, point)
    onnx: dict[str, Any] = {}
    try:
        epoch = int(state["epoch"])
        checkpoint = Path(experiment) / "train" / trial_name(point) / checkpoint_dir_name(epoch)
        source = {"checkpoint": str((checkpoint / CHECKPOINT_FILE).resolve()), "epoch": epoch,
                  "test_acc": state["history"][-1]["test_acc"] if state["history"] else None}
        onnx = export_trial_onnx(state, source, path.with_suffix(".onnx"))  # {} without the onnx extra
        export = export_state(state, source)
        write_export(export, path)
    except Exception as exc:
        return {"export": None, "export_error": _one_line(exc), **onnx}
    return {"export": str(path.relative_to(experiment)), "size_kb": export["size"]["size_kb"],
            "compression": export["size"]["compression"], **onnx}


def fp32_point(point: dict[str, Any]) -> dict[str, Any]:
    """The FP32 grid point of ``point``'s arch and seed (``init_from: fp32`` starts from its weights)."""
    return {**point, "bit": FP32_BIT}


def fp32_checkpoint(experiment: Path, point: dict[str, Any], cfg: TrainConfig) -> Path:
    """The final checkpoint of ``point``'s FP32 trial, which has finished (`apot.fp32_first.GridPoints`
    starts a quantized trial only then).

    Raises ``RuntimeError`` (one line) if that trial's record does not say TERMINATED or its final
    checkpoint is gone."""
    source = fp32_point(point)
    final = (Path(experiment) / "train" / trial_name(source) / checkpoint_dir_name(cfg.epochs)
             / CHECKPOINT_FILE)
    record = read_record(record_path(experiment, source))
    state = record["state"] if record else "no record"
    if state != "TERMINATED":
        raise RuntimeError(f"init_from fp32: {trial_name(source)} has not finished ({state}), so "
                           f"{trial_name(point)} cannot start from it; see that trial's error")
    if not final.is_file():
        raise RuntimeError(f"init_from fp32: {trial_name(source)} finished but {final} is missing; "
                           "re-run that trial (delete its record) or set train.init_from: null")
    return final


def read_record(path: Path) -> dict[str, Any] | None:
    """A trial record, or None when absent or unreadable (a record is always rewritten atomically)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def finished(record: dict[str, Any] | None, cfg: TrainConfig) -> bool:
    """True when ``record`` says the trial of ``cfg`` (the same training setup) finished: it is final."""
    return bool(record) and record.get("state") == "TERMINATED" and not identity_changes(record["config"],
                                                                                          asdict(cfg))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------- Ray Train worker
def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every DDP rank: resume from Ray's latest checkpoint, train, report every epoch (rank 0 with the
    checkpoint)."""
    import ray.train
    import ray.train.torch

    from apot.step import compile_workers, size_compile_workers

    cfg = TrainConfig.from_dict(loop_config["train"])
    record_file = Path(loop_config["record_path"])
    rank = ray.train.get_context().get_world_rank()
    size_compile_workers(loop_config["cpus_per_worker"])  # this rank's CPUs, not the machine's cores
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_checkpoint(Path(folder), asdict(cfg))
    startup_s = time.time() - loop_config["driver_started_at"]
    trained: list[int] = []  # the epochs this attempt trained (not those it resumed with)

    def write_record(history: list[dict[str, Any]], state: str, **extra: Any) -> None:
        record = summarize(cfg, history)
        resumed_from = resume["epoch"] if resume else None
        record.update(state=state, startup_s=startup_s, resumed_from_epoch=resumed_from,
                      epochs_trained=list(trained), init_checkpoint=loop_config.get("init_checkpoint"),
                      compile_workers=compile_workers(), **extra)
        write_json(record, record_file)

    final: dict[str, Any] = {"state": resume}  # the latest checkpoint state (rank 0)

    def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        trained.append(metrics["epoch"])
        if rank != 0:  # every rank reports (a barrier); only rank 0 carries the checkpoint
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="apot-ckpt-") as folder:
            save_checkpoint(state, Path(folder))
            ray.train.report(  # returns once the checkpoint is persisted in the trial's storage
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=checkpoint_dir_name(metrics["epoch"]),
            )
        final["state"] = state
        write_record(state["history"], "RUNNING")  # after: a record never claims an epoch not checkpointed

    result = run_trial(cfg, on_epoch=on_epoch, resume_state=resume, device=ray.train.torch.get_device(),
                       compile_cache=loop_config.get("compile_cache"),
                       init_checkpoint=loop_config.get("init_checkpoint"))
    if rank == 0:  # one write: a TERMINATED record is final (a kill during the export leaves RUNNING, and a
        exported: dict[str, Any] = {}  # resume then finds every epoch checkpointed, trains none, exports)
        if result["state"] == "TERMINATED" and final["state"] is not None:
            point = {k: getattr(cfg, k) for k in GRID_KEYS}
            exported = export_trial(final["state"], Path(loop_config["experiment_path"]), point)
        write_record(result["history"], result["state"], **exported)


# ---------------------------------------------------------------------------------------- Tune trainable
def trial_driver(config: dict[str, Any]) -> None:
    """The Tune trainable: one grid point -> one ``TorchTrainer`` run (resumed from its checkpoint if any).

    ``config`` holds the grid point (``point``: arch, bit, power, seed), ``train`` (TrainConfig fields)
    and ``run`` (experiment path, DDP workers, resources per worker).
    """
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from apot.rendezvous import NodeLocalTorchConfig

    started = time.time()
    point = grid_point(config)
    run = config["run"]
    experiment = Path(run["experiment_path"])
    cfg = TrainConfig.from_dict({**config["train"], **point})
    rec_path = record_path(experiment, point)

    done = read_record(rec_path)
    if finished(done, cfg):
        ray.tune.report({**done["history"][-1], FROM_RECORD: True})  # finished before a stop: not again
        return
    try:  # from here on, a failure leaves a record that says why (also one before training started)
        init_checkpoint = None
        if cfg.init_from == INIT_FROM_FP32 and cfg.bit != FP32_BIT:
            init_checkpoint = str(fp32_checkpoint(experiment, point, cfg))
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"train": asdict(cfg), "record_path": str(rec_path),
                               "driver_started_at": started, "experiment_path": str(experiment),
                               "init_checkpoint": init_checkpoint, "cpus_per_worker": run["cpus_per_worker"],
                               "compile_cache": str(experiment / COMPILE_CACHE)},  # shared by all trials
            torch_config=NodeLocalTorchConfig(),  # no listening port when the ranks share a node
            scaling_config=ray.train.ScalingConfig(
                num_workers=run["workers_per_trial"],
                use_gpu=run["gpus_per_worker"] > 0,
                resources_per_worker={"CPU": run["cpus_per_worker"], "GPU": run["gpus_per_worker"]},
                placement_strategy=run.get("placement_strategy", "PACK"),
            ),
            run_config=ray.train.RunConfig(
                name=trial_name(point),
                storage_path=str(experiment / "train"),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                # Retries live at the Tune level (one layer): a failed run fails the trial, Tune restarts it
                # and this function builds the same-named trainer, which resumes from its latest checkpoint.
                failure_config=ray.train.FailureConfig(max_failures=0),
                callbacks=[TuneReportCallback()],
            ),
        )
        trainer.fit()
    except Exception as exc:
        if record_failure(rec_path, cfg, exc, stopping=(experiment / STOP_MARKER).exists()) == "TERMINATED":
            return  # the trial finished (its record is final) before the run around it failed or was stopped
        raise


def record_failure(path: Path, cfg: TrainConfig, exc: BaseException, stopping: bool) -> str:
    """The record at ``path`` after the trial's ``TorchTrainer`` raised ``exc``; its state.

    A TERMINATED record is kept as it is: rank 0 wrote it after the last epoch, so the trial finished and
    what raised came after (a stop of the sweep arriving as the trial ended tears its run down). Otherwise
    the record says INCOMPLETE when the sweep is ``stopping`` (resumable, not a failure), else ERROR with the
    error and its traceback."""
    record = read_record(path)
    if finished(record, cfg):
        return "TERMINATED"
    record = record or summarize(cfg, [])
    if stopping:
        record.update(state="INCOMPLETE")
    else:
        record.update(state="ERROR", error=_one_line(exc), traceback=traceback.format_exc()[-4000:])
    write_json(record, path)
    return record["state"]


def trial_configs(points: list[dict[str, Any]], train: dict[str, Any], run: dict[str, Any]
                  ) -> list[dict[str, Any]]:
    """One Tune trial config per grid point (``SweepConfig.trials()``: not a plain cross product, since
    FP32 is one trial per arch x seed): the point as ``point`` (`apot.config.grid_point` reads it), the
    shared ``train`` and ``run`` settings. `apot.fp32_first.GridPoints` hands them to Tune."""
    return [{"point": {k: p[k] for k in GRID_KEYS}, "train": train, "run": run} for p in points]


def collect_records(experiment: Path, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records present in ``records/`` for these grid points (absent points are the report's MISSING)."""
    records = [read_record(record_path(experiment, point)) for point in points]
    return [r for r in records if r is not None]
