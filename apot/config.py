"""Load and validate ``search_space.yaml`` into a `SweepConfig`, before Ray starts.

Precedence, lowest first: the built-in defaults (`DEFAULTS`: the reference code's MNIST settings) < the YAML
file < its ``quick:`` section (``--quick``) < ``--set key=value`` overrides < ``--storage`` / ``--data-dir``
(``$APOT_DATA_DIR`` sits between ``--data-dir`` and the file, see `apot.data.resolve_data_dir`).
Every problem is a `ConfigError` whose message is one line naming where the value came from, the dotted key
and what is allowed, e.g.::

    search_space.yaml: grid.bit: 7 is not a supported bit width; allowed: 2, 3, 4, 5, 6, 32
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from apot.recipe import (
    ALPHA_INIT_CALIBRATE,
    ALPHA_INIT_MSE,
    FP32_BIT,
    INIT_FROM_FP32,
    PRESETS,
    TrainConfig,
    quantizer_name,
    train_defaults,
)

__all__ = [
    "DEFAULTS",
    "ConfigError",
    "Resources",
    "SweepConfig",
    "check_resources",
    "grid_point",
    "load_config",
    "local_resources",
    "resolve_resources",
    "trial_name",
]

GRID_KEYS = ("arch", "bit", "power", "seed")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SET_KEY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
AUTO = "auto"
# What `auto` resources become (`resolve_resources`). CPU: one rank of one thread per trial, as many trials
# side by side as there are cores: measured fastest on a 2-core CPU (bench/cpu_layouts.py, docs/EXPERIMENTS.md
# "Step cost and CPU layout"). GPU: single-rank trials packed TRIALS_PER_GPU to a GPU (an estimate,
# docs/RESOURCES.md).
AUTO_WORKERS_PER_TRIAL = 1
AUTO_CPUS_PER_WORKER = 1
TRIALS_PER_GPU = 8

# The schema: every allowed key with its default (the reference code's MNIST settings). Sections are the
# nested dicts; the train section is apot.recipe.TrainConfig's fields (written once, there).
DEFAULTS: dict[str, Any] = {
    "name": "apot_mnist",
    "storage": "./ray_results",
    "data_dir": "./data",
    "max_retries": 2,
    "grid": {
        "arch": ["resnet18", "resnet34", "resnet50"],
        "bit": [32, 5, 4, 3, 2],
        "power": [True, False],
        "seed": [0],
    },
    "train": train_defaults(),
    "resources": {
        "workers_per_trial": AUTO,
        "cpus_per_worker": AUTO,
        "gpus_per_worker": AUTO,
        "trials_per_gpu": TRIALS_PER_GPU,
        "max_concurrent_trials": None,
        "placement_strategy": "PACK",
    },
    "tracking": {
        "mlflow": None,
    },
}
SECTIONS = ("grid", "train", "resources", "tracking")
# MLflow tracking URIs taken as they are; anything else without "://" is a local folder (a file store).
MLFLOW_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
QUICK_KEY = "quick"


class ConfigError(ValueError):
    """A bad sweep definition; the message is one line: where, which key, what is allowed."""


def trial_name(point: Mapping[str, Any]) -> str:
    """Deterministic, filesystem-safe name of a grid point, e.g. ``resnet18_b4_apot_s0``; full precision has
    no quantizer: ``resnet18_fp32_s0``."""
    if point["bit"] == FP32_BIT:
        return f"{point['arch']}_fp32_s{point['seed']}"
    return f"{point['arch']}_b{point['bit']}_{quantizer_name(point['power'])}_s{point['seed']}"


FROM_RECORD = "from_record"
"""Key of a trial result that re-reports a finished trial's record (`apot.sweep.trial_driver` after a resume):
the display shows the trial finished, not an epoch trained again."""


def grid_point(trial_config: Mapping[str, Any]) -> dict[str, Any]:
    """The grid point (``arch``, ``bit``, ``power``, ``seed``) of a Tune trial's config: its ``point``
    (`apot.sweep.trial_configs`)."""
    return {k: trial_config["point"][k] for k in GRID_KEYS}


@dataclass(frozen=True)
class Resources:
    """What one trial asks of the cluster.

    Args:
        workers_per_trial: DDP ranks per trial (Ray Train workers).
        cpus_per_worker: CPUs reserved per rank (also its torch thread count under Ray).
        gpus_per_worker: GPUs per rank; a fraction < 1 packs several single-rank trials on one GPU.
        trials_per_gpu: how many single-rank trials ``gpus_per_worker: auto`` packs on one GPU.
        max_concurrent_trials: trials run at once; None derives it from the cluster (`check_resources`).
        placement_strategy: Ray placement group strategy for a trial's ranks (PACK, SPREAD, ...).

    The first three may be ``"auto"`` until `resolve_resources` fits them to the machine.
    """

    workers_per_trial: int | str = AUTO
    cpus_per_worker: float | str = AUTO
    gpus_per_worker: float | str = AUTO
    max_concurrent_trials: int | None = None
    placement_strategy: str = "PACK"
    trials_per_gpu: int = TRIALS_PER_GPU

    @property
    def cpus_per_trial(self) -> float:
        return self.workers_per_trial * self.cpus_per_worker

    @property
    def gpus_per_trial(self) -> float:
        return self.workers_per_trial * self.gpus_per_worker


@dataclass(frozen=True)
class SweepConfig:
    """The validated sweep. ``grid`` and ``train`` are plain dicts: treat them as read-only.

    Args:
        name: experiment folder name under ``storage`` (deterministic, so ``--resume`` finds it).
        storage: absolute path of the Ray results folder.
        data_dir: absolute path of the MNIST root.
        max_retries: restarts of a failed trial (Tune ``FailureConfig.max_failures``).
        grid: ``arch``, ``bit``, ``power`` (True = APoT, False = uniform), ``seed``: lists, crossed.
        train: `apot.recipe.TrainConfig` fields shared by every trial (epochs, batch_size, lr, ...).
        resources: per-trial resources (`Resources`).
        quick: whether the ``quick:`` section was applied.
        tracking: ``mlflow``: the MLflow tracking URI every trial is logged to (`apot.tracking`), or None.
    """

    name: str
    storage: str
    data_dir: str
    max_retries: int
    grid: dict[str, list[Any]]
    train: dict[str, Any]
    resources: Resources = field(default_factory=Resources)
    quick: bool = False
    tracking: dict[str, Any] = field(default_factory=lambda: {"mlflow": None})

    def trials(self) -> list[dict[str, Any]]:
        """Every grid point ``{"arch", "bit", "power", "seed"}``: arch, then bit, power, seed, as listed.

        Bit 32 (full precision, the FP32 ceiling) has no quantizer, so it is one trial per arch x seed, with
        the first listed ``power`` (the tables show it in both the APoT and the uniform table). With
        ``train.init_from: fp32`` the FP32 points come first (the quantized trials start from them)."""
        g = self.grid
        points = [
            {"arch": a, "bit": b, "power": p, "seed": s}
            for a in g["arch"] for b in g["bit"]
            for p in (g["power"][:1] if b == FP32_BIT else g["power"]) for s in g["seed"]
        ]
        if self.train.get("init_from") == INIT_FROM_FP32:  # FP32 trials first: Tune starts trials in order,
            points.sort(key=lambda p: p["bit"] != FP32_BIT)  # so a quantized one only waits on a started one
        return points

    def trial_name(self, point: Mapping[str, Any]) -> str:
        """See the module-level `trial_name`."""
        return trial_name(point)

    def train_config(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """Grid point + train keys + data_dir: the kwargs of ``apot.recipe.TrainConfig``."""
        return {**{k: point[k] for k in GRID_KEYS}, **self.train, "data_dir": self.data_dir}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (what the experiment folder keeps as ``sweep_config.json``)."""
        return {
            "name": self.name,
            "storage": self.storage,
            "data_dir": self.data_dir,
            "max_retries": self.max_retries,
            "grid": copy.deepcopy(self.grid),
            "train": dict(self.train),
            "resources": asdict(self.resources),
            "quick": self.quick,
            "tracking": dict(self.tracking),
        }


# ---------------------------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (looked for {path.resolve()}); pass --config PATH") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (name, grid, train, ...), "
                          f"got {type(data).__name__}")
    return data


def _allowed(schema: Mapping[str, Any]) -> str:
    return ", ".join(schema)


def _merge(target: dict[str, Any], updates: Mapping[str, Any], schema: Mapping[str, Any], prefix: str,
           origins: dict[str, str], origin: str, also_allowed: Sequence[str] = ()) -> None:
    """Merge `updates` into `target`, refusing keys the schema lacks; sections merge, values replace."""
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            where = f" in {prefix[:-1]}" if prefix else ""
            allowed = ", ".join([*schema, *also_allowed])
            raise ConfigError(f"{origin}: {dotted}: unknown key{where}; allowed: {allowed}")
        if isinstance(schema[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: {dotted}: expected a mapping of keys "
                                  f"({_allowed(schema[key])}), got {value!r}")
            _merge(target[key], value, schema[key], f"{dotted}.", origins, origin)
        else:
            target[key] = value
            origins[dotted] = origin


def _parse_set(item: str) -> tuple[str, Any]:
    form = "expected KEY=VALUE with a dotted key, e.g. --set train.epochs=3 or --set grid.bit=[32,4,2]"
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not SET_KEY_PATTERN.match(key):
        raise ConfigError(f"--set {item!r}: {form}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); {form}") from None
    return key, value


def _apply_set(config: dict[str, Any], item: str, origins: dict[str, str]) -> None:
    key, value = _parse_set(item)
    origin = f"--set {item}"
    parts = key.split(".")
    if parts[0] == QUICK_KEY:
        raise ConfigError(f"{origin}: the quick section is applied before --set; set the key itself "
                          "(e.g. --set train.epochs=3) together with --quick")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    schema: Any = DEFAULTS
    for depth, part in enumerate(parts):
        if not isinstance(schema, dict):
            parent = ".".join(parts[:depth])
            raise ConfigError(f"{origin}: {parent} is a value, not a section; it has no key {part!r}")
        if part not in schema:
            level = ".".join(parts[:depth])
            where = f"at {level}" if level else "at the top level"
            raise ConfigError(f"{origin}: unknown key {key}; allowed {where}: {_allowed(schema)}")
        schema = schema[part]
    _merge(config, nested, DEFAULTS, "", origins, origin)


def _layer(origin: str | None, path_origin: str) -> int:
    """Precedence of an origin: -1 built-in default, 0 the file, 1 its quick section, 2 a --set item."""
    if origin is None:
        return -1
    return 2 if origin.startswith("--set") else 1 if origin == f"{path_origin} (quick)" else 0


def _apply_preset(train: dict[str, Any], origins: Mapping[str, str], path_origin: str) -> None:
    """Apply ``train.preset`` (apot.recipe.PRESETS): its values replace those from layers below the one
    naming it (defaults < file < quick section < --set); in that layer and above, explicit values win. So
    ``--set train.preset=paper`` overrides the file's ``schedule: step``, and ``--set train.alpha_lr=0.03``
    next to it still applies."""
    preset_layer = _layer(origins.get("train.preset"), path_origin)
    for key, value in PRESETS.get(train["preset"], {}).items():
        if _layer(origins.get(f"train.{key}"), path_origin) < preset_layer:
            train[key] = value


# ------------------------------------------------------------------------------------------- validation
class _Checker:
    """Validates the merged dict; each error names the origin of the offending key."""

    def __init__(self, origins: Mapping[str, str], default_origin: str) -> None:
        self.origins = origins
        self.default_origin = default_origin

    def fail(self, key: str, problem: str) -> ConfigError:
        parts = key.split(".")
        origin = self.default_origin
        for depth in range(len(parts), 0, -1):
            found = self.origins.get(".".join(parts[:depth]))
            if found:
                origin = found
                break
        return ConfigError(f"{origin}: {key}: {problem}")

    def integer(self, key: str, value: Any, minimum: int | None = None, *,
                nullable: bool = False) -> int | None:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            kind = "an integer or null" if nullable else "an integer"
            raise self.fail(key, f"{value!r} is not {kind}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"{value} must be >= {minimum}")
        return value

    def number(self, key: str, value: Any) -> float | int:
        """An int or float; a numeric string such as ``1e-4`` (YAML 1.1 reads it as a string) is converted."""
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"{value!r} is not a finite number")
        return value

    def choice(self, key: str, value: Any, allowed: Sequence[Any], what: str) -> Any:
        bool_mismatch = isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed)
        if bool_mismatch or value not in allowed:
            raise self.fail(key, f"{value!r} is not {what}; allowed: {', '.join(map(str, allowed))}")
        return value

    def listing(self, key: str, value: Any) -> list[Any]:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise self.fail(key, "the list is empty; give at least one value")
        seen: set[tuple[str, str]] = set()
        for v in values:
            marker = (type(v).__name__, repr(v))
            if marker in seen:
                raise self.fail(key, f"{v!r} is listed twice; each grid value must be unique")
            seen.add(marker)
        return values


def _supported_archs() -> tuple[str, ...]:
    """``apot.models.list_models()``, imported lazily (it imports torch)."""
    from apot.models import list_models

    return tuple(list_models())


def _supported_bits() -> tuple[int, ...]:
    """``apot.quant.SUPPORTED_BITS``, imported lazily (it imports torch)."""
    from apot.quant import SUPPORTED_BITS

    return tuple(SUPPORTED_BITS)


def _validate_grid(c: _Checker, grid: dict[str, Any], archs: Sequence[str], bits: Sequence[int]) -> dict:
    out = {k: c.listing(f"grid.{k}", grid[k]) for k in GRID_KEYS}
    for arch in out["arch"]:
        c.choice("grid.arch", arch, archs, "a registered model")
    for bit in out["bit"]:
        if isinstance(bit, bool) or not isinstance(bit, int):
            allowed = ", ".join(map(str, bits))
            raise c.fail("grid.bit", f"{bit!r} is not an integer bit width; allowed: {allowed}")
        c.choice("grid.bit", bit, bits, "a supported bit width")
    for power in out["power"]:
        if not isinstance(power, bool):
            raise c.fail("grid.power", f"{power!r} is not true (APoT) or false (uniform)")
    for seed in out["seed"]:
        c.integer("grid.seed", seed, 0)
        if seed >= 2**32:
            raise c.fail("grid.seed", f"{seed} must be < 2**32")
    return out


def _validate_train(c: _Checker, train: dict[str, Any], workers: int) -> dict[str, Any]:
    """The ``train:`` section: YAML's types coerced here (integers, numbers written as text such as
    ``1e-4``), every rule checked once, by `TrainConfig`, its message re-raised as this layer's one line
    naming where the value came from."""
    out = dict(train)
    for key in ("epochs", "batch_size", "width"):
        out[key] = c.integer(f"train.{key}", train[key])
    out["train_subset"] = c.integer("train.train_subset", train["train_subset"], nullable=True)
    numbers = ("lr", "weight_decay", "momentum", "alpha_lr", "alpha_weight_decay", "act_alpha_init",
               "weight_alpha_init")
    for key in numbers:
        value = out[key]
        if value is not None and value not in (ALPHA_INIT_CALIBRATE, ALPHA_INIT_MSE):
            out[key] = c.number(f"train.{key}", value)  # as given, so a message quotes what was written
    if train["init_from"] is not None:  # a path would be one checkpoint for every arch: apot.train takes it
        c.choice("train.init_from", train["init_from"], (INIT_FROM_FP32,),
                 "how a sweep's trials start (null: from scratch; fp32: from the FP32 trial of their "
                 "arch and seed; a checkpoint path is for python -m apot.train)")
    try:
        TrainConfig.from_dict(out).per_rank_batch(workers)
    except ValueError as exc:
        key, _, problem = str(exc).partition(": ")
        raise c.fail(f"train.{key}", problem) from None
    return {k: float(v) if k in numbers and isinstance(v, int) else v for k, v in out.items()}


def _validate_resources(c: _Checker, res: dict[str, Any]) -> Resources:
    auto = {k: res[k] == AUTO for k in ("workers_per_trial", "cpus_per_worker", "gpus_per_worker")}
    workers = AUTO if auto["workers_per_trial"] else \
        c.integer("resources.workers_per_trial", res["workers_per_trial"], 1)
    cpus = AUTO if auto["cpus_per_worker"] else c.number("resources.cpus_per_worker", res["cpus_per_worker"])
    if cpus != AUTO and cpus <= 0:
        raise c.fail("resources.cpus_per_worker", f"{cpus} must be > 0 (or auto)")
    per_gpu = c.integer("resources.trials_per_gpu", res["trials_per_gpu"], 1)
    concurrent = c.integer("resources.max_concurrent_trials", res["max_concurrent_trials"], 1, nullable=True)
    strategy = c.choice("resources.placement_strategy", res["placement_strategy"], PLACEMENT_STRATEGIES,
                        "a Ray placement strategy")
    if auto["gpus_per_worker"]:
        return Resources(workers, cpus, AUTO, concurrent, strategy, per_gpu)
    gpus = c.number("resources.gpus_per_worker", res["gpus_per_worker"])
    if gpus < 0:
        raise c.fail("resources.gpus_per_worker", f"{gpus} must be >= 0 (0 trains on CPU)")
    if gpus > 1 and gpus != int(gpus):
        raise c.fail("resources.gpus_per_worker", f"{gpus}: above 1 it must be a whole number of GPUs")
    if 0 < gpus < 1 and workers != AUTO and workers > 1:
        raise c.fail("resources.gpus_per_worker",
                     f"{gpus} is a fractional GPU with resources.workers_per_trial: {workers}; two NCCL "
                     "ranks of one trial could land on the same GPU. Fractional GPUs pack single-rank "
                     "trials: use workers_per_trial: 1, or whole GPUs per rank (gpus_per_worker: 1)")
    return Resources(workers, cpus, gpus, concurrent, strategy, per_gpu)


def _validate_tracking(c: _Checker, tracking: dict[str, Any]) -> dict[str, Any]:
    """``tracking.mlflow``: null, a tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``, ...) or a
    local folder. Relative sqlite files and folders are made absolute: the stored sweep config then names
    the same store from any working directory."""
    uri = tracking["mlflow"]
    if uri is None:
        return {"mlflow": None}
    if not isinstance(uri, str) or not uri.strip() or uri != uri.strip():
        raise c.fail("tracking.mlflow", f"{uri!r} is not a tracking URI; give e.g. sqlite:///mlflow.db, "
                                        "http://127.0.0.1:5000, a folder, or null for no tracking")
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest.startswith("//") or len(scheme) < 2:  # a folder (C:\... too)
        return {"mlflow": _path(c, "tracking.mlflow", uri)}
    if scheme.split("+")[0] not in MLFLOW_SCHEMES:
        raise c.fail("tracking.mlflow", f"{uri!r}: unknown scheme {scheme!r}; allowed: "
                                        f"{', '.join(MLFLOW_SCHEMES)}, or a folder")
    if scheme == "sqlite":
        db = uri[len("sqlite:///"):]
        if not uri.startswith("sqlite:///") or not db or db == ":memory:":
            raise c.fail("tracking.mlflow", f"{uri!r}: give a database file, sqlite:///FILE (relative) or "
                                            "sqlite:////ABSOLUTE/FILE")
        uri = "sqlite:///" + str(Path(db).expanduser().resolve())
    return {"mlflow": uri}


def _path(c: _Checker, key: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise c.fail(key, f"{value!r} is not a path")
    return str(Path(value).expanduser().resolve())


def load_config(
    path: str | os.PathLike[str] = "search_space.yaml",
    *,
    overrides: Sequence[str] = (),
    quick: bool = False,
    storage: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    mlflow: str | None = None,
) -> SweepConfig:
    """Read, merge and validate the sweep definition; raise `ConfigError` on the first problem.

    Args:
        path: the YAML file.
        overrides: ``--set`` items ``"dotted.key=yaml value"``, applied in order after the quick section.
        quick: apply the file's ``quick:`` section.
        storage: ``--storage`` (wins over the file and ``--set``).
        data_dir: ``--data-dir`` (wins over ``$APOT_DATA_DIR``, which wins over the file and ``--set``).
        mlflow: ``--mlflow`` (wins over ``tracking.mlflow`` of the file and ``--set``).
    """
    from apot.data import ENV_DATA_DIR, resolve_data_dir

    path = Path(path)
    origin = str(path)
    raw = _read_yaml(path)
    quick_section = raw.pop(QUICK_KEY, None) or {}
    config = copy.deepcopy(DEFAULTS)
    origins: dict[str, str] = {}
    _merge(config, raw, DEFAULTS, "", origins, origin, also_allowed=(QUICK_KEY,))
    if not isinstance(quick_section, Mapping):
        raise ConfigError(f"{origin}: quick: expected a mapping of overrides (e.g. train: {{epochs: 2}}), "
                          f"got {quick_section!r}")
    # Check the quick section's keys even without --quick: a typo fails now, not on the day it is used.
    _merge(copy.deepcopy(DEFAULTS), quick_section, DEFAULTS, f"{QUICK_KEY}.", {}, origin)
    if quick:
        _merge(config, quick_section, DEFAULTS, "", origins, f"{origin} (quick)")
    for item in overrides:
        _apply_set(config, item, origins)
    _apply_preset(config["train"], origins, origin)
    if storage is not None:
        config["storage"] = storage
        origins["storage"] = "--storage"
    if mlflow is not None:
        config["tracking"]["mlflow"] = mlflow
        origins["tracking.mlflow"] = "--mlflow"
    c = _Checker(origins, origin)
    _path(c, "data_dir", config["data_dir"])  # the file's value must be a path even when overridden
    if data_dir or os.environ.get(ENV_DATA_DIR):
        origins["data_dir"] = "--data-dir" if data_dir else f"${ENV_DATA_DIR}"
    config["data_dir"] = str(resolve_data_dir(str(data_dir) if data_dir else None, str(config["data_dir"])))

    name = config["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise c.fail("name", f"{name!r} must be a folder name of letters, digits, '.', '_' or '-'")
    max_retries = c.integer("max_retries", config["max_retries"], 0)
    resources = _validate_resources(c, config["resources"])
    workers = resources.workers_per_trial
    train = _validate_train(c, config["train"], AUTO_WORKERS_PER_TRIAL if workers == AUTO else workers)
    grid = _validate_grid(c, config["grid"], _supported_archs(), _supported_bits())
    if train["init_from"] is not None and FP32_BIT not in grid["bit"]:
        raise c.fail("train.init_from", f"{INIT_FROM_FP32!r} starts each quantized trial from its arch and "
                                        f"seed's FP32 trial, so grid.bit must include {FP32_BIT} (or "
                                        "--set train.init_from=null: from scratch)")
    return SweepConfig(
        name=name,
        storage=_path(c, "storage", config["storage"]),
        data_dir=_path(c, "data_dir", config["data_dir"]),
        max_retries=max_retries,
        grid=grid,
        train=train,
        resources=resources,
        quick=quick,
        tracking=_validate_tracking(c, config["tracking"]),
    )


# -------------------------------------------------------------------------------------------- resources
def local_resources() -> dict[str, float]:
    """This machine in Ray's terms: ``{"CPU": usable cores, "GPU": visible CUDA devices}``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # torch without CUDA support, or a broken driver: no GPUs
        gpus = 0
    return {"CPU": float(cpus), "GPU": float(gpus)}


def resolve_resources(cfg: SweepConfig, available: Mapping[str, float]) -> SweepConfig:
    """``cfg`` with every ``auto`` resource fitted to ``available`` (Ray-style totals, `local_resources`).

    workers_per_trial / cpus_per_worker auto: 1 / 1 (`AUTO_WORKERS_PER_TRIAL`, `AUTO_CPUS_PER_WORKER`).
    gpus_per_worker auto: 0 without GPUs; with GPUs, ``1 / trials_per_gpu`` for single-rank trials (several
    trials share a GPU; rounded down to Ray's 1e-4 resolution) and 1 per rank for multi-rank trials (two
    NCCL ranks of one trial never share a GPU). Explicit values are kept.
    """
    res = cfg.resources
    workers = AUTO_WORKERS_PER_TRIAL if res.workers_per_trial == AUTO else res.workers_per_trial
    cpus = AUTO_CPUS_PER_WORKER if res.cpus_per_worker == AUTO else res.cpus_per_worker
    gpus = res.gpus_per_worker
    if gpus == AUTO:
        if float(available.get("GPU", 0)) <= 0:
            gpus = 0
        else:
            gpus = math.floor(1e4 / res.trials_per_gpu) / 1e4 if workers == 1 else 1
    return replace(cfg, resources=replace(res, workers_per_trial=workers, cpus_per_worker=cpus,
                                          gpus_per_worker=gpus))


def _fits(available: float, needed: float) -> float:
    """How many `needed` fit in `available` (inf when nothing is needed)."""
    return math.floor(available / needed + 1e-9) if needed > 0 else math.inf


def check_resources(cfg: SweepConfig, available: Mapping[str, float], n_trials: int) -> int:
    """Check one trial fits the cluster; return how many trials to run at once.

    Args:
        available: Ray-style totals, e.g. ``ray.cluster_resources()`` or `local_resources()`.
        n_trials: how many trials the sweep has (``len(cfg.trials())``).

    Returns:
        ``resources.max_concurrent_trials`` if set, else how many whole trials fit in the CPUs and GPUs
        (capped at ``n_trials``, at least 1).
    """
    res = cfg.resources
    if AUTO in (res.workers_per_trial, res.cpus_per_worker, res.gpus_per_worker):
        res = resolve_resources(cfg, available).resources
    cpus, gpus = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    if res.gpus_per_worker > 0 and gpus <= 0:
        raise ConfigError(f"resources.gpus_per_worker: {res.gpus_per_worker} asks for GPUs but the cluster "
                          "has none; set it to 0 to train on CPU")
    if res.cpus_per_trial > cpus + 1e-9:
        raise ConfigError(
            f"resources: one trial needs workers_per_trial x cpus_per_worker = {res.workers_per_trial} x "
            f"{res.cpus_per_worker} = {res.cpus_per_trial:g} CPUs but the cluster has {cpus:g}; lower "
            "resources.workers_per_trial or resources.cpus_per_worker"
        )
    if res.gpus_per_trial > gpus + 1e-9:
        raise ConfigError(
            f"resources: one trial needs workers_per_trial x gpus_per_worker = {res.workers_per_trial} x "
            f"{res.gpus_per_worker} = {res.gpus_per_trial:g} GPUs but the cluster has {gpus:g}; lower "
            "resources.workers_per_trial or resources.gpus_per_worker"
        )
    if res.max_concurrent_trials is not None:
        return res.max_concurrent_trials
    fit = min(_fits(cpus, res.cpus_per_trial), _fits(gpus, res.gpus_per_trial), n_trials)
    return max(1, int(fit))

