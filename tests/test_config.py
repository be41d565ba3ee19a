"""apot.config: the shipped search space, --quick, --set, and every refusal with its message."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from apot.config import (
    ConfigError,
    SweepConfig,
    check_resources,
    load_config,
    local_resources,
    resolve_resources,
)

SHIPPED = Path(__file__).resolve().parents[1] / "search_space.yaml"


def write_config(tmp_path: Path, edit: dict[str, Any] | None = None, text: str | None = None) -> Path:
    """A copy of the shipped YAML named search_space.yaml, with sections updated by `edit`, or raw `text`."""
    path = tmp_path / "search_space.yaml"
    if text is None:
        data = yaml.safe_load(SHIPPED.read_text())
        for key, value in (edit or {}).items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            else:
                data[key] = value
        text = yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ shipped file
def test_shipped_config_is_the_seeds_sweep_plus_fp32() -> None:
    cfg = load_config(SHIPPED)
    assert cfg.name == "apot_mnist" and cfg.max_retries == 2 and not cfg.quick
    assert cfg.grid == {"arch": ["resnet18", "resnet34", "resnet50"], "bit": [32, 5, 4, 3, 2],
                        "power": [True, False], "seed": [0]}
    seeds = {"epochs": 25, "batch_size": 128, "lr": 0.01, "weight_decay": 0.0001, "momentum": 0.9,
             "schedule": "step", "width": 16, "train_subset": None, "compile": "auto"}
    assert {k: cfg.train[k] for k in seeds} == seeds
    r = cfg.resources
    assert (r.workers_per_trial, r.cpus_per_worker, r.gpus_per_worker) == ("auto", "auto", "auto")
    assert r.max_concurrent_trials is None
    assert Path(cfg.storage).is_absolute() and Path(cfg.storage).name == "ray_results"
    assert Path(cfg.data_dir).is_absolute()

    trials = cfg.trials()
    assert len(trials) == 27  # per arch: one FP32 trial, then 4 bits x 2 quantizers
    assert trials[0] == {"arch": "resnet18", "bit": 32, "power": True, "seed": 0}
    trials = [t for t in trials if t["bit"] != 32]
    assert trials[:3] == [{"arch": "resnet18", "bit": 5, "power": True, "seed": 0},
                          {"arch": "resnet18", "bit": 5, "power": False, "seed": 0},
                          {"arch": "resnet18", "bit": 4, "power": True, "seed": 0}]
    assert trials[-1] == {"arch": "resnet50", "bit": 2, "power": False, "seed": 0}
    names = [cfg.trial_name(t) for t in trials]
    assert names[0] == "resnet18_b5_apot_s0" and names[1] == "resnet18_b5_uniform_s0"
    assert len(set(names)) == 24


def test_train_config_builds_a_trainconfig() -> None:
    from apot.recipe import TrainConfig

    cfg = load_config(SHIPPED)
    point = next(p for p in cfg.trials() if (p["arch"], p["bit"], p["power"]) == ("resnet18", 4, True))
    tc = TrainConfig(**cfg.train_config(point))
    assert (tc.arch, tc.bit, tc.power, tc.seed, tc.epochs, tc.lr) == ("resnet18", 4, True, 0, 25, 0.01)
    assert tc.data_dir == cfg.data_dir


def test_to_dict_is_json_and_stable() -> None:
    cfg = load_config(SHIPPED)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d == cfg.to_dict()
    assert set(d) == {"name", "storage", "data_dir", "max_retries", "grid", "train", "resources", "quick",
                      "tracking"}


def test_quick_applies_its_section_only_with_the_flag() -> None:
    cfg = load_config(SHIPPED, quick=True)
    assert cfg.quick and cfg.name == "apot_mnist_quick"
    assert cfg.train["epochs"] == 2 and cfg.train["train_subset"] == 4096
    assert cfg.train["lr"] == 0.01  # untouched keys keep the file's values
    assert cfg.resources.workers_per_trial == "auto" and cfg.resources.cpus_per_worker == "auto"
    assert len(cfg.trials()) == 27  # same grid
    assert check_resources(cfg, {"CPU": 2, "GPU": 0}, 27) == 2  # two single-rank trials on a 2-core CPU


# ------------------------------------------------------------------------------------------ --set
def test_set_overrides_nested_values_and_lists() -> None:
    cfg = load_config(SHIPPED, overrides=["train.epochs=3", "grid.bit=[4,2]",
                                          "train.init_from=null", "grid.arch=resnet18",
                                          "resources.workers_per_trial=1", "resources.gpus_per_worker=0.5",
                                          "train.train_subset=512", "name=other", "max_retries=0"])
    assert cfg.train["epochs"] == 3 and cfg.train["train_subset"] == 512
    assert cfg.grid["bit"] == [4, 2] and cfg.grid["arch"] == ["resnet18"]  # a scalar becomes a 1-list
    assert cfg.resources.gpus_per_worker == 0.5 and cfg.name == "other" and cfg.max_retries == 0
    assert len(cfg.trials()) == 4


def test_set_comes_after_quick_and_cli_paths_come_last(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APOT_DATA_DIR", raising=False)
    cfg = load_config(SHIPPED, quick=True, overrides=["train.epochs=5", f"storage={tmp_path / 'a'}"],
                      storage=tmp_path / "b", data_dir=tmp_path / "mnist")
    assert cfg.train["epochs"] == 5 and cfg.train["train_subset"] == 4096
    assert cfg.storage == str(tmp_path / "b") and cfg.data_dir == str(tmp_path / "mnist")


def test_data_dir_env_beats_the_file_but_not_the_flag(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APOT_DATA_DIR", str(tmp_path / "env"))
    assert load_config(SHIPPED).data_dir == str(tmp_path / "env")
    assert load_config(SHIPPED, data_dir=tmp_path / "cli").data_dir == str(tmp_path / "cli")


def test_numeric_strings_are_read_as_numbers() -> None:
    cfg = load_config(SHIPPED, overrides=["train.weight_decay=1e-4", "train.lr=5e-3"])  # YAML 1.1: strings
    assert cfg.train["weight_decay"] == pytest.approx(1e-4) and cfg.train["lr"] == pytest.approx(5e-3)


# ------------------------------------------------------------------------------------------ refusals
BAD_SETS = [
    (["grid.bit=[4,7]"], r"^--set grid\.bit=\[4,7\]: grid\.bit: 7 is not a supported bit width; "
                         r"allowed: 2, 3, 4, 5, 6, 32$"),
    (["grid.arch=[resnet18,resnet99]"], r"grid\.arch: 'resnet99' is not a registered model; "
                                        r"allowed: .*resnet18"),
    (["train.lr=0"], r"train\.lr: 0 must be > 0"),
    (["train.lr=-0.1"], r"train\.lr: -0\.1 must be > 0"),
    (["train.epochs=0"], r"train\.epochs: 0 must be >= 1"),
    (["train.epochs=ten"], r"train\.epochs: 'ten' is not an integer"),
    (["train.epochs=true"], r"train\.epochs: True is not an integer"),
    (["train.momentum=1"], r"train\.momentum: 1 must be in \[0, 1\)"),
    (["train.weight_decay=-1"], r"train\.weight_decay: -1 must be >= 0"),
    (["train.schedule=linear"], r"train\.schedule: 'linear' is not a learning-rate schedule; "
                                r"allowed: cosine, step, constant"),
    (["train.train_subset=70000"], r"train\.train_subset: 70000 must be in \[1, 60000\], the MNIST training"),
    (["train.batch_size=127", "resources.workers_per_trial=2"],
     r"train\.batch_size: 127 is the global batch and must be divisible by the 2 DDP ranks of a trial "
     r"\(resources\.workers_per_trial in a sweep\)"),
    (["grid.power=[true,1]"], r"grid\.power: 1 is not true \(APoT\) or false \(uniform\)"),
    (["grid.seed=[0,0]"], r"grid\.seed: 0 is listed twice"),
    (["grid.bit=[]"], r"grid\.bit: the list is empty"),
    (["resources.gpus_per_worker=0.5", "resources.workers_per_trial=2"],
     r"resources\.gpus_per_worker: 0\.5 is a fractional GPU with "
                                        r"resources\.workers_per_trial: 2; two NCCL ranks .* use "
                                        r"workers_per_trial: 1, or whole GPUs per rank"),
    (["resources.gpus_per_worker=1.5"], r"resources\.gpus_per_worker: 1\.5: above 1 it must be a whole "),
    (["resources.gpus_per_worker=-1"], r"resources\.gpus_per_worker: -1 must be >= 0"),
    (["resources.cpus_per_worker=0"], r"resources\.cpus_per_worker: 0 must be > 0"),
    (["resources.workers_per_trial=0"], r"resources\.workers_per_trial: 0 must be >= 1"),
    (["resources.max_concurrent_trials=0"], r"resources\.max_concurrent_trials: 0 must be >= 1"),
    (["resources.placement_strategy=ANY"], r"placement_strategy: 'ANY' is not a Ray placement strategy"),
    (["max_retries=-1"], r"max_retries: -1 must be >= 0"),
    (["name=a/b"], r"name: 'a/b' must be a folder name"),
    (["train.epoch=3"], r"^--set train\.epoch=3: unknown key train\.epoch; "
                        r"allowed at train: epochs, batch_size"),
    (["epochs=3"], r"unknown key epochs; allowed at the top level: name, storage, data_dir, max_retries, "),
    (["train.epochs.x=3"], r"train\.epochs is a value, not a section"),
    (["train=3"], r"train: expected a mapping of keys"),
    (["quick.train.epochs=3"], r"the quick section is applied before --set"),
    (["train.epochs"], r"^--set 'train\.epochs': expected KEY=VALUE with a dotted key, "
                       r"e\.g\. --set train\.epochs=3"),
    (["=3"], r"expected KEY=VALUE"),
    (["train..epochs=3"], r"expected KEY=VALUE"),
    (["grid.bit=[4,2"], r"the value is not valid YAML .*expected KEY=VALUE"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_SETS, ids=[o[0] for o, _ in BAD_SETS])
def test_bad_overrides_are_refused_with_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(SHIPPED, overrides=overrides)
    assert "\n" not in str(info.value)


BAD_FILES = [
    ({"grid": {"bit": [5, 7]}}, r"^\S*search_space\.yaml: grid\.bit: 7 is not a supported bit width; "
                                r"allowed: 2, 3, 4, 5, 6, 32$"),
    ({"grid": {"arch": ["resnet99"]}}, r"search_space\.yaml: grid\.arch: 'resnet99' is not a registered "),
    ({"train": {"lr": 0}}, r"search_space\.yaml: train\.lr: 0 must be > 0"),
    ({"train": {"epochs": 0}}, r"search_space\.yaml: train\.epochs: 0 must be >= 1"),
    ({"epochz": 3}, r"search_space\.yaml: epochz: unknown key; allowed: name, storage, data_dir, "
                    r"max_retries, grid, train, resources, tracking, quick$"),
    ({"train": {"epoch": 3}}, r"search_space\.yaml: train\.epoch: unknown key in train; allowed: epochs, "),
    ({"resources": {"gpus": 1}}, r"resources\.gpus: unknown key in resources; allowed: workers_per_trial"),
    ({"quick": {"train": {"epochz": 1}}}, r"search_space\.yaml: quick\.train\.epochz: unknown key in "
                                          r"quick\.train; allowed: epochs"),
    ({"grid": [1, 2]}, r"grid: expected a mapping of keys \(arch, bit, power, seed\)"),
    ({"storage": 5}, r"storage: 5 is not a path"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_FILES, ids=[m[:40] for _, m in BAD_FILES])
def test_bad_files_are_refused_naming_the_file(tmp_path: Path, edit: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, edit))


def test_a_bad_value_in_the_quick_section_names_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"quick": {"train": {"epochs": 0}}})
    load_config(path)  # not applied without --quick
    with pytest.raises(ConfigError, match=r"search_space\.yaml \(quick\): train\.epochs: 0 must be >= 1"):
        load_config(path, quick=True)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file \(looked for .*nope\.yaml\); "
                                          r"pass --config"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_gives_path_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, text="name: x\ntrain:\n  epochs: [3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"search_space\.yaml:\d+:\d+: YAML syntax error: ") as info:
        load_config(path)
    assert "\n" not in str(info.value)
    path = write_config(tmp_path, text="name: x\ntrain:\n  epochs: 3\n   lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"search_space\.yaml:4:\d+: YAML syntax error"):
        load_config(path)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, text="train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"search_space\.yaml:3:3: YAML syntax error: "
                                          r"duplicate key 'epochs'"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"the top level must be a mapping"):
        load_config(write_config(tmp_path, text="- 1\n- 2\n"))


# ------------------------------------------------------------------------------------------ resources
def _cfg(*overrides: str) -> SweepConfig:
    return load_config(SHIPPED, overrides=list(overrides))


def test_gpus_asked_where_none_exist() -> None:
    cfg = _cfg("resources.gpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"^resources\.gpus_per_worker: 1 asks for GPUs but the cluster has "
                                          r"none; set it to 0 to train on CPU$"):
        check_resources(cfg, {"CPU": 2, "GPU": 0}, len(cfg.trials()))
    with pytest.raises(ConfigError, match="asks for GPUs"):
        check_resources(cfg, {"CPU": 2}, len(cfg.trials()))  # Ray omits GPU when there is none


def test_a_trial_that_cannot_fit_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"one trial needs workers_per_trial x cpus_per_worker = "
                                          r"4 x 1 = 4 CPUs but the cluster has 2"):
        check_resources(_cfg("resources.workers_per_trial=4"), {"CPU": 2, "GPU": 0}, 27)
    with pytest.raises(ConfigError, match=r"= 2 GPUs but the cluster has 1"):
        check_resources(_cfg("resources.gpus_per_worker=1", "resources.workers_per_trial=2"),
                        {"CPU": 8, "GPU": 1}, 27)


@pytest.mark.parametrize(("overrides", "available", "expected"), [
    ((), {"CPU": 2, "GPU": 0}, 2),                       # auto: 1 rank x 1 CPU per trial
    ((), {"CPU": 16, "GPU": 0}, 16),
    ((), {"CPU": 16, "GPU": 1}, 8),                      # auto: trials_per_gpu (8) on the one GPU
    (("resources.trials_per_gpu=3",), {"CPU": 16, "GPU": 2}, 6),
    (("resources.workers_per_trial=2",), {"CPU": 2, "GPU": 0}, 1),   # 2 ranks x 1 CPU on 2 cores
    (("resources.workers_per_trial=2",), {"CPU": 16, "GPU": 0}, 8),
    (("resources.workers_per_trial=2",), {"CPU": 3.0}, 1),           # whole trials only
    (("resources.workers_per_trial=1",), {"CPU": 64}, 27),  # never more than the trials
    (("grid.bit=[4]", "train.init_from=null", "resources.workers_per_trial=1"), {"CPU": 64}, 6),
    (("resources.workers_per_trial=1", "resources.gpus_per_worker=0.25"), {"CPU": 16, "GPU": 1}, 4),
    (("resources.workers_per_trial=1", "resources.gpus_per_worker=0.25"), {"CPU": 3, "GPU": 1}, 3),
    (("resources.gpus_per_worker=1", "resources.workers_per_trial=2"), {"CPU": 16, "GPU": 4}, 2),
    (("resources.workers_per_trial=2",), {"CPU": 16, "GPU": 4}, 2),  # auto: a whole GPU per rank
    (("resources.max_concurrent_trials=3",), {"CPU": 2}, 3),       # configured wins
])
def test_derived_concurrency(overrides: tuple[str, ...], available: dict, expected: int) -> None:
    cfg = _cfg(*overrides)
    assert check_resources(cfg, available, len(cfg.trials())) == expected


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_local_resources_counts_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    allowed = os.sched_getaffinity(0)
    one = {min(allowed)}
    os.sched_setaffinity(0, one)  # as under `taskset -c` or a Slurm/cgroup CPU limit
    try:
        assert local_resources()["CPU"] == 1.0
    finally:
        os.sched_setaffinity(0, allowed)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert local_resources() == {"CPU": float(len(allowed)), "GPU": 3.0}

    def broken_driver() -> int:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "device_count", broken_driver)
    assert local_resources()["GPU"] == 0.0


@pytest.mark.parametrize(("overrides", "available", "expected"), [
    ((), {"CPU": 2, "GPU": 0}, (1, 1, 0)),                           # CPU: the measured layout
    ((), {"CPU": 16, "GPU": 1}, (1, 1, 0.125)),                      # 8 single-rank trials per GPU
    (("resources.trials_per_gpu=3",), {"CPU": 16, "GPU": 1}, (1, 1, 0.3333)),  # Ray's 1e-4 resolution
    (("resources.workers_per_trial=2",), {"CPU": 16, "GPU": 4}, (2, 1, 1)),    # a whole GPU per rank
    (("resources.gpus_per_worker=0",), {"CPU": 16, "GPU": 1}, (1, 1, 0)),      # explicit values stay
    (("resources.cpus_per_worker=2",), {"CPU": 16, "GPU": 0}, (1, 2, 0)),
])
def test_auto_resources_fit_the_machine(overrides: tuple[str, ...], available: dict,
                                        expected: tuple) -> None:
    r = resolve_resources(_cfg(*overrides), available).resources
    assert (r.workers_per_trial, r.cpus_per_worker, r.gpus_per_worker) == expected


def test_bad_auto_values_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"resources\.trials_per_gpu: 0 must be >= 1"):
        _cfg("resources.trials_per_gpu=0")
    with pytest.raises(ConfigError, match=r"resources\.workers_per_trial: 'two' is not an integer"):
        _cfg("resources.workers_per_trial=two")
    with pytest.raises(ConfigError, match=r"train\.compile: 'fast' is not a training-step mode; "
                                          r"allowed: auto, "
                                          r"eager, compile, cudagraph"):
        _cfg("train.compile=fast")
