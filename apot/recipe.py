"""What a trial trains with: `TrainConfig` (the one source of training defaults) and the named presets.

No torch here: ``apot.config`` builds the schema of ``search_space.yaml``'s ``train:`` section from these
fields, and ``python -m apot.train`` its flags.

Presets (``PRESETS``) are named sets of field values, applied under anything given explicitly:

- ``default``: this repository's recipe (the field defaults): the reference code's MNIST settings with
  per-layer MSE-optimal starting alphas (weights from their standardised values, activations calibrated on
  a batch); in a sweep, each quantized trial also starts from its arch and seed's FP32 trial
  (`SWEEP_DEFAULTS`).
  The alpha parameter group and ``ws_grad`` exist as settings, off until measured better.
  docs/EXPERIMENTS.md has what each setting measured, those removed since included (`REMOVED_SETTINGS`).
- ``paper``: as the reference's MNIST ``main.py`` trains: activation alphas start at 6.0 and weight alphas at
  3.0 for every bit width, one parameter group (the alphas share lr 0.01 and weight decay 1e-4), gradient
  through the weight standardisation, constant lr.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ALPHA_INIT_CALIBRATE", "ALPHA_INIT_MSE", "AUGMENTS", "INIT_FROM_FP32", "PRESETS", "SCHEDULES",
           "TrainConfig"]

SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("shift", "none")
"""Training augmentations of `apot.data.DeviceMNIST` (defined here, torch-free, for the config schema)."""
MNIST_TRAIN_IMAGES = 60_000
FP32_BIT = 32
"""``bit`` of full precision: no quantizer anywhere (in a sweep, one trial per arch and seed: the ceiling)."""


def quantizer_name(power: bool) -> str:
    """The quantizer's name in trial names, records, results and exports: ``apot`` (additive powers of two,
    ``power=True``) or ``uniform``."""
    return "apot" if power else "uniform"


ALPHA_INIT_CALIBRATE = "calibrate"
"""``act_alpha_init`` keyword: MSE-optimal per layer on a calibration batch (``apot.calibrate``)."""
INIT_FROM_FP32 = "fp32"
"""``init_from`` keyword of a sweep: start from the same arch and seed's full-precision trial."""
ALPHA_INIT_MSE = "mse"
"""``weight_alpha_init`` keyword: MSE-optimal per layer for its standardised weight (``apot.calibrate``)."""

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},  # the field defaults below
    "paper": {
        "act_alpha_init": 6.0,
        "weight_alpha_init": 3.0,
        "alpha_lr": None,
        "alpha_weight_decay": None,
        "ws_grad": True,
        "schedule": "constant",
        "augment": "shift",
        "init_from": None,  # its MNIST README trains every bit width from scratch
    },
}


def _choice(name: str, value: Any, allowed: tuple[str, ...], what: str) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name}: {value!r} is not {what}; allowed: {', '.join(allowed)}")


def _alpha_init(name: str, value: Any, keyword: str) -> None:
    if value == keyword:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: {value!r} must be {keyword!r} or a number > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a trial. Defaults: the reference code's MNIST settings plus this repository's
    recipe.

    Args:
        batch_size: global batch, split evenly over the DDP ranks.
        lr, momentum, weight_decay: SGD of the weights (and of BN's scale and shift).
        schedule: ``cosine`` (lr * (1 + cos(pi * e / E)) / 2 per epoch e of E), ``step`` (x0.1 at 50% and
            75% of the epochs) or ``constant``; it scales every parameter group alike.
        train_subset: train on the first N training images (quick runs); the test split is always all 10k.
        augment: of the training images (`apot.data.DeviceMNIST`): ``shift`` (random integer shift in
            [-2, 2] px) or ``none``; never a flip (a flipped digit is another glyph).
        act_alpha_init: ``calibrate`` (MSE-optimal per layer on a batch of training images) or a number,
            every activation alpha's start.
        weight_alpha_init: ``mse`` (MSE-optimal per layer for its standardised weight) or a number.
        alpha_lr: lr of the alphas' own parameter group; None puts the alphas in the weights' group.
        alpha_weight_decay: weight decay of the alphas' group; None uses ``weight_decay``.
        ws_grad: differentiate through the weight standardisation's mean and std (the reference's MNIST
            code); False treats them as constants.
        init_from: progressive initialisation (the reference's ``--pretrained`` / ``--init``): an apot
            checkpoint (``checkpoint.pt`` or its folder) of the same arch and width, any bit width, whose
            weights and BN statistics start this trial; the alphas are then initialised from those weights
            as ``act_alpha_init`` / ``weight_alpha_init`` say. In a sweep, ``fp32`` starts each quantized
            trial from the same arch and seed's full-precision trial of that sweep. None: from scratch.
        preset: the name in ``PRESETS`` these values started from (a label; see `from_preset`).
        compile: how the training step runs (`apot.step`): ``auto``, ``eager``, ``compile`` or ``cudagraph``.
        device: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    """

    arch: str = "resnet18"
    bit: int = 4
    power: bool = True
    seed: int = 0
    epochs: int = 25
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    width: int = 16
    train_subset: int | None = None
    augment: str = "shift"
    act_alpha_init: float | str = ALPHA_INIT_CALIBRATE
    weight_alpha_init: float | str = ALPHA_INIT_MSE
    alpha_lr: float | None = None
    alpha_weight_decay: float | None = None
    ws_grad: bool = False
    init_from: str | None = None
    preset: str = "default"
    compile: str = "auto"
    data_dir: str = "./data"
    device: str = "auto"

    def __post_init__(self) -> None:
        """The one validation of the training settings; each message starts with the field's name."""
        _choice("schedule", self.schedule, SCHEDULES, "a learning-rate schedule")
        _choice("augment", self.augment, AUGMENTS, "a training augmentation")
        for name in ("epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1")
        if self.train_subset is not None and not 1 <= self.train_subset <= MNIST_TRAIN_IMAGES:
            raise ValueError(f"train_subset: {self.train_subset} must be in [1, {MNIST_TRAIN_IMAGES}], the "
                             "MNIST training images; use null for all of them")
        if self.lr <= 0:
            raise ValueError(f"lr: {self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: {self.weight_decay} must be >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: {self.momentum} must be in [0, 1)")
        _alpha_init("act_alpha_init", self.act_alpha_init, ALPHA_INIT_CALIBRATE)
        _alpha_init("weight_alpha_init", self.weight_alpha_init, ALPHA_INIT_MSE)
        for name in ("alpha_lr", "alpha_weight_decay"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: {value!r} must be a number or null")
            if value < 0 or (name == "alpha_lr" and value == 0):
                raise ValueError(f"{name}: {value} must be {'> 0' if name == 'alpha_lr' else '>= 0'} or null")
        if self.alpha_lr is None and self.alpha_weight_decay is not None:
            raise ValueError(f"alpha_weight_decay: {self.alpha_weight_decay} needs alpha_lr (the alphas' own "
                             "group); with alpha_lr null the alphas share the weights' group, so set both "
                             "null or give alpha_lr")
        if not isinstance(self.ws_grad, bool):
            raise ValueError(f"ws_grad: {self.ws_grad!r} must be true or false")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ValueError(f"init_from: {self.init_from!r} must be a checkpoint path, {INIT_FROM_FP32!r} "
                             "(in a sweep) or null")
        _choice("preset", self.preset, tuple(PRESETS), "a preset (apot.recipe.PRESETS)")
        from apot.step import STEP_MODES  # lazily: it imports torch

        _choice("compile", self.compile, STEP_MODES, "a training-step mode")

    def per_rank_batch(self, ranks: int) -> int:
        """The batch of each of ``ranks`` DDP ranks: ``batch_size`` is the global batch, split evenly."""
        if self.batch_size % ranks:
            raise ValueError(f"batch_size: {self.batch_size} is the global batch and must be divisible by "
                             f"the {ranks} DDP ranks of a trial (resources.workers_per_trial in a sweep), so "
                             "every rank gets an equal share")
        return self.batch_size // ranks

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, ignoring keys that are not fields (e.g. a Ray trial's extra keys)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_preset(cls, preset: str = "default", **explicit: Any) -> TrainConfig:
        """The preset's values, then ``explicit`` ones over them (``preset`` records the name)."""
        if preset not in PRESETS:
            raise ValueError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **explicit, "preset": preset})

    @property
    def alpha_group(self) -> bool:
        """Whether the alphas have their own parameter group (``alpha_lr`` set)."""
        return self.alpha_lr is not None


# Settings added after sweeps and checkpoints were stored, each with the value that means what those did: a
# stored config without the key is the same trial as one with this value (a resume never retrains it).
ADDED_SETTINGS: dict[str, Any] = {}

# Settings removed since sweeps and checkpoints were stored, each with the value at which it did nothing: a
# stored config holding that value is the same trial as one without the key (a resume never retrains it, a
# report shows it as any other); another value is a trial this code does not train: `identity_changes` names
# it and the report's Hyper-Params cell shows it (`removed_settings_used`). Likewise REMOVED_CHOICES, values
# of a field that remains (a stored ``augment: affine`` differs from every trial this code trains).
# docs/EXPERIMENTS.md has what each measured; commit REMOVED_AFTER still has them (the next removed them).
REMOVED_SETTINGS: dict[str, Any] = {"distill": 0.0, "label_smoothing": 0.0}
REMOVED_CHOICES: dict[str, tuple[Any, ...]] = {"augment": ("affine",)}
REMOVED_AFTER = "a9e5893"


def with_other_versions(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a stored trial config or a sweep's ``train:`` section) with the `ADDED_SETTINGS` and
    `REMOVED_SETTINGS` it lacks: configs written by any version of this code then compare key for key."""
    return {**ADDED_SETTINGS, **REMOVED_SETTINGS, **config}


def removed_settings_used(config: dict[str, Any]) -> dict[str, Any]:
    """What a stored ``config`` sets that this code cannot train: the `REMOVED_SETTINGS` it holds at another
    value than their no-op one, and the `REMOVED_CHOICES` it holds."""
    removed = {k: config[k] for k, off in REMOVED_SETTINGS.items() if k in config and config[k] != off}
    return {**removed, **{k: config[k] for k, values in REMOVED_CHOICES.items() if config.get(k) in values}}


# The trial identity: which `TrainConfig` fields make two runs the same trial, so that one may resume the
# other (a checkpoint, a finished record, a stored sweep). Every field does, except where and how it runs:
#   data_dir  where the MNIST files are read from: the same files may sit elsewhere after a move, on another
#             node or in a requeued job's new scratch folder (they are validated on every start);
#   device    and compile: how the step is executed (eager, compiled, CUDA graph; CPU or GPU). They compute
#             the same step (tests/test_step.py compares them), so they change speed, not the trial.
# Everything else (the grid point, epochs and the schedule, the recipe, the preset) changes what is trained.
MAY_CHANGE_ON_RESUME = ("data_dir", "device", "compile")
TRIAL_IDENTITY = tuple(f.name for f in fields(TrainConfig) if f.name not in MAY_CHANGE_ON_RESUME)


def identity_changes(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The `TRIAL_IDENTITY` fields and `REMOVED_SETTINGS` on which two trial configs (``asdict(TrainConfig)``,
    a stored record's or checkpoint's ``config``, or a sweep's ``train:`` section) differ, as
    ``key=stored (this run: value)``; empty when ``now`` may resume ``stored``. A setting missing from a
    config has its `ADDED_SETTINGS` or `REMOVED_SETTINGS` value; a field neither has (a ``train:`` section
    holds no grid point) is not compared."""
    stored, now = with_other_versions(stored), with_other_versions(now)
    changes = [f"{k}={stored.get(k)!r} (this run: {now.get(k)!r})" for k in TRIAL_IDENTITY
               if (k in stored or k in now) and stored.get(k) != now.get(k)]
    removed = [k for k in REMOVED_SETTINGS if stored[k] != now[k]]
    return changes + [f"{k}={stored[k]!r} (this run: {now[k]!r}; a setting removed after commit "
                      f"{REMOVED_AFTER}, docs/EXPERIMENTS.md)" for k in removed]


# Keys that are not per-sweep training settings: the grid point's and the run's own.
NOT_TRAIN_KEYS = ("arch", "bit", "power", "seed", "data_dir", "device")


# Where a sweep's default differs from a lone trial's: a sweep has FP32 trials to start from
# (docs/EXPERIMENTS.md: +0.25 points at 2 bits); `python -m apot.train` would need a checkpoint path.
SWEEP_DEFAULTS: dict[str, Any] = {"init_from": INIT_FROM_FP32}


def train_defaults() -> dict[str, Any]:
    """``{field: default}`` of the settings a sweep's ``train:`` section may set, in field order: the
    `TrainConfig` field defaults, with `SWEEP_DEFAULTS` over them."""
    return {f.name: SWEEP_DEFAULTS.get(f.name, f.default) for f in fields(TrainConfig)
            if f.name not in NOT_TRAIN_KEYS}
