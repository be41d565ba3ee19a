"""Trial checkpoints: atomic writes and validated reads.

A checkpoint is one ``torch.save`` file holding everything a trial needs to continue exactly where it
stopped: ``model``, ``optimizer``, ``scheduler`` state dicts, ``epoch`` (epochs completed), ``rng`` states,
``history`` (per-epoch metrics) and ``config`` (the ``TrainConfig`` as a dict, checked on resume).

Only tensors, numbers, strings, lists and dicts: every load uses ``torch.load(weights_only=True)``, which
unpickles nothing else, so a checkpoint on shared storage cannot run code when it is read. A file that needs
more is refused.

A checkpoint also starts other trials: ``init_from`` (progressive initialisation) loads its weights into a
fresh model of another bit width (`start_from_checkpoint`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from apot.atomic import atomic_write, atomic_write_bytes
from apot.models import create_model
from apot.recipe import FP32_BIT, INIT_FROM_FP32, TrainConfig, identity_changes

CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "result.json"
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, incomplete, or made for another trial."""


def save_checkpoint(state: dict[str, Any], folder: Path) -> Path:
    """Atomically write ``state`` to ``folder/checkpoint.pt`` and return the path."""
    path = Path(folder) / CHECKPOINT_FILE
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def write_json(obj: Any, path: Path) -> None:
    """Atomically write ``obj`` as indented JSON."""
    data = json.dumps(obj, indent=2, sort_keys=False).encode()
    atomic_write_bytes(Path(path), data)


def _reason(exc: Exception) -> str:
    """The informative line of a load error (torch's weights_only errors are paragraphs)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL " in ln or "Unsupported" in ln]
    text = (named or lines or [""])[0]
    return text.replace("WeightsUnpickler error: ", "").split(" was not an allowed")[0][:160]


def _read_state(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of an apot checkpoint file; ``CheckpointError`` (one line) if it is
    unreadable, holds more than plain data, or lacks a required key."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        if "GLOBAL " in str(exc):  # weights_only refused a class or function: loading it could run code
            raise CheckpointError(
                f"{path}: refused: it holds more than tensors and plain data ({_reason(exc)}), and loading "
                "that could run code; apot never writes such checkpoints: delete it, and keep storage "
                "writable only by people you trust"
            ) from None
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(exc).__name__}: {_reason(exc)}); "
            "delete it to start the trial afresh"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path}: not an apot checkpoint (missing {', '.join(missing)}); delete it")
    return state


def load_checkpoint(folder: Path, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Read ``folder/checkpoint.pt``; None if there is none.

    Raises ``CheckpointError`` (one line: the file and what is wrong) when the file is unreadable, lacks a
    key, or was written for a different trial than ``config`` (`apot.recipe.TRIAL_IDENTITY`).
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return None
    state = _read_state(path)
    if config is not None:
        diff = identity_changes(state["config"], config)
        if diff:
            raise CheckpointError(
                f"{path}: checkpoint belongs to another trial: {', '.join(diff)}; "
                "use another output folder or delete the checkpoint"
            )
    return state


def model_from_state(state: dict[str, Any]) -> torch.nn.Module:
    """The model a checkpoint ``state`` holds: built from its ``config`` (arch, bit, power, width, ws_grad)
    with its ``model`` weights loaded (strict), on the CPU, in train mode. Raises ``KeyError`` for a config
    without arch, bit or width, and torch's ``RuntimeError`` when the weights do not fit that model."""
    c = state["config"]
    model = create_model(c["arch"], int(c["bit"]), power=bool(c.get("power", True)), width=int(c["width"]),
                         ws_grad=bool(c.get("ws_grad", False)))
    model.load_state_dict({k: v.detach().cpu() for k, v in state["model"].items()})
    return model


def load_init_weights(source: str | Path, arch: str, width: int) -> dict[str, Any]:
    """The model state dict of the checkpoint ``source`` (a ``checkpoint.pt`` or a folder holding one) that a
    trial of ``arch`` / ``width`` starts from (``TrainConfig.init_from``).

    Raises ``CheckpointError`` (one line) if there is no such file, it is unreadable, or it was trained
    for another arch or width. Any bit width and quantizer is accepted: the clipping thresholds (``*_alpha``)
    are not weights and are initialised afresh by the trial.
    """
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"init_from: {source}: no such checkpoint (give a checkpoint.pt or the folder "
                              "that holds one, e.g. the --out of a full-precision python -m apot.train run)")
    state = _read_state(path)
    saved = state["config"]
    diff = [f"{k}={saved.get(k)!r} (this run: {want!r})"
            for k, want in (("arch", arch), ("width", width)) if saved.get(k) != want]
    if diff:
        raise CheckpointError(f"init_from: {path} was trained for another model: {', '.join(diff)}")
    return state["model"]


def init_source(cfg: TrainConfig, init_checkpoint: str | os.PathLike[str] | None) -> str | None:
    """The checkpoint a fresh trial starts from: ``init_checkpoint`` (what a sweep resolved ``fp32`` to),
    else ``cfg.init_from``; None for a trial from scratch, FP32 trials of a sweep included."""
    if cfg.init_from is None or (cfg.init_from == INIT_FROM_FP32 and cfg.bit == FP32_BIT):
        return None
    return str(init_checkpoint) if init_checkpoint is not None else cfg.init_from


def start_from_checkpoint(model: torch.nn.Module, cfg: TrainConfig,
                          source: str | os.PathLike[str] | None = None) -> None:
    """Load the weights and BN statistics of ``source`` (default ``cfg.init_from``) into a fresh ``model``:
    progressive initialisation. Its clipping thresholds are skipped: `apot.calibrate.init_alphas` sets them
    afresh.

    Raises ``CheckpointError`` (one line) for a missing, unreadable or mismatched checkpoint."""
    source = source if source is not None else cfg.init_from
    if source == INIT_FROM_FP32:
        raise CheckpointError(f"init_from: {INIT_FROM_FP32!r} names a sweep's full-precision trial; "
                              "outside a sweep give the checkpoint itself (e.g. the --out of a --bit 32 run)")
    weights = {k: v for k, v in load_init_weights(source, cfg.arch, cfg.width).items()
               if not k.endswith("_alpha")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_alpha")]
    if missing or unexpected:
        raise CheckpointError(f"init_from: {source}: its weights do not fit {cfg.arch} (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
