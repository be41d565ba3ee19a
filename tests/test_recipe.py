"""The accuracy recipe: MSE-optimal alphas (against an independent integral), activation calibration, the
alpha parameter group, the gradient through the weight standardisation, presets, resume, one source of
defaults, and the FP32 ceiling row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from apot.calibrate import calibrate_act_alphas, init_alphas, init_weight_alphas, mse_alpha, quant_layers
from apot.config import DEFAULTS, ConfigError, load_config
from apot.data import DeviceMNIST
from apot.layers import QuantConv2d
from apot.models import create_model
from apot.optim import make_optimizer, make_scheduler
from apot.quant import levels, quantize_weight, standardise
from apot.recipe import PRESETS, TrainConfig, train_defaults
from apot.report import markdown_tables
from apot.train import parse_args, run_trial

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "search_space.yaml"
SMALL = dict(arch="resnet10", bit=2, width=8, batch_size=64)


def integral_mse(bit: int, signed: bool):
    """(alpha -> E[(x - Q_alpha(x))^2] for x ~ N(0, 1) (signed) or ReLU of it, by quadrature on a fine grid of
    x; its argmin over a 0.05 grid of alpha refined to 0.001): numpy only, independent of apot.calibrate."""
    x = np.linspace(-8.0 if signed else 0.0, 8.0, 8001)
    weight = np.exp(-x * x / 2) / np.sqrt(2 * np.pi) * (x[1] - x[0])  # ReLU's mass at 0 has no error
    lv = levels(bit, True, signed).double().numpy()
    mid = (lv[1:] + lv[:-1]) / 2

    def error(alpha: float) -> float:
        q = lv[np.searchsorted(mid, x / alpha)] * alpha  # nearest level; beyond the ends: the end level
        return float(((x - q) ** 2 * weight).sum())

    coarse = min(np.arange(0.5, 8.0, 0.05), key=error)
    return error, float(min(np.arange(coarse - 0.05, coarse + 0.05, 0.001), key=error))


def integral_mse_alpha(bit: int, signed: bool) -> float:
    return integral_mse(bit, signed)[1]


@pytest.mark.parametrize("bit", [2, 4])
def test_mse_alpha_matches_the_integral_optimum(bit: int, one_thread: None) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 18, generator=g)
    for signed, sample in ((True, x), (False, x.relu())):
        error, target = integral_mse(bit, signed)
        found = mse_alpha(sample, levels(bit, True, signed))
        # the objective is flat near its minimum (at 4 bits especially): compare the error reached
        assert error(found) <= 1.02 * error(target), (bit, signed, found, target)
        if bit == 2:
            assert found == pytest.approx(target, abs=0.05), signed
    # what a layer gets: init_weight_alphas on a conv whose standardised weights are this normal sample
    conv = QuantConv2d(64, 64, 8, bit=bit, power=True)  # 262,144 weights
    with torch.no_grad():
        conv.weight.copy_(x.view_as(conv.weight))
    init_weight_alphas(nn.Sequential(conv), None)
    error, target = integral_mse(bit, True)
    assert error(float(conv.weight_alpha)) <= 1.02 * error(target), (bit, float(conv.weight_alpha), target)


def test_activation_calibration_lands_on_target_and_is_deterministic(synthetic_mnist_root: Path,
                                                                     one_thread: None) -> None:
    torch.manual_seed(0)
    layer = QuantConv2d(4, 4, 3, padding=1, bit=2, power=True)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), layer)  # BN-ReLU of any input: ReLU of a unit normal
    images = torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 5 + 3
    running = model[0].running_mean.clone()
    found = calibrate_act_alphas(model, images)
    assert found == [float(layer.act_alpha)]
    assert float(layer.act_alpha) == pytest.approx(integral_mse_alpha(2, False), abs=0.05)
    assert torch.equal(model[0].running_mean, running) and model.training  # BN statistics untouched

    def calibrated(seed: int) -> list[float]:
        cfg = TrainConfig(**SMALL, seed=seed, device="cpu")
        torch.manual_seed(seed)
        net = create_model(cfg.arch, cfg.bit, width=cfg.width)
        init_alphas(net, cfg, DeviceMNIST.from_root(synthetic_mnist_root))
        return [float(p) for n, p in net.named_parameters() if n.endswith("act_alpha")]

    first = calibrated(0)
    assert first == calibrated(0)  # same seed: the same batch, the same alphas, bit for bit
    assert first != calibrated(1)
    assert all(a != 8.0 for a in first)


def test_weight_alphas_are_per_layer_mse_or_the_given_value(one_thread: None) -> None:
    torch.manual_seed(0)
    model = create_model("resnet10", 4, width=8)
    init_weight_alphas(model)
    for layer in quant_layers(model):
        expected = mse_alpha(standardise(layer.weight), layer.weight_levels)
        assert float(layer.weight_alpha) == pytest.approx(expected)  # float32 of the float64 search
    init_weight_alphas(model, 3.0)
    assert {float(layer.weight_alpha) for layer in quant_layers(model)} == {3.0}


def test_alphas_get_their_groups_lr_and_weight_decay() -> None:
    torch.manual_seed(0)
    model = create_model("resnet10", 2, width=8)
    cfg = TrainConfig(lr=0.01, weight_decay=1e-4, alpha_lr=0.05, alpha_weight_decay=0.0, momentum=0.0)
    opt = make_optimizer(model, cfg)
    named = dict(model.named_parameters())
    alphas = {id(p) for n, p in named.items() if n.endswith("_alpha")}
    weights, alpha_group = opt.param_groups
    assert {id(p) for p in alpha_group["params"]} == alphas and alphas
    assert not alphas & {id(p) for p in weights["params"]}
    assert len(weights["params"]) + len(alpha_group["params"]) == len(named)
    # one real step with known gradients: p <- p - lr * (g + wd * p), per group
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in named.items():
        lr, wd = (0.05, 0.0) if n.endswith("_alpha") else (0.01, 1e-4)
        assert torch.allclose(p.detach(), before[n] - lr * (1 + wd * before[n])), n
    # without alpha_lr: one group holds everything, at the weights' lr and decay (the reference's setup)
    single = make_optimizer(model, TrainConfig(alpha_lr=None, alpha_weight_decay=None))
    assert len(single.param_groups) == 1 and len(single.param_groups[0]["params"]) == len(named)


def test_schedule_scales_the_alpha_group_too() -> None:
    model = create_model("resnet10", 2, width=8)
    opt = make_optimizer(model, TrainConfig(alpha_lr=0.05))
    sched = make_scheduler(opt, "step", 4)
    for _ in range(2):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.005])


def test_ws_grad_differentiates_the_standardisation() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    alpha = torch.tensor(1.2, requires_grad=True)
    lv = levels(3, True, signed=True)
    upstream = torch.randn(8, 4, 3, 3)
    plain = quantize_weight(w, alpha, lv)
    through = quantize_weight(w, alpha, lv, ws_grad=True)
    assert torch.allclose(plain, through, atol=1e-6)
    g_plain, a_plain = torch.autograd.grad(plain, (w, alpha), upstream)
    g_through, a_through = torch.autograd.grad(through, (w, alpha), upstream)
    centred = w.detach() - w.detach().mean()
    assert torch.allclose(g_plain, upstream / centred.std())  # mean and std held constant
    wd = w.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(standardise(wd), wd, upstream)  # straight through P, then the chain
    assert torch.allclose(g_through, expected, atol=1e-6)
    assert not torch.allclose(g_through, g_plain, atol=1e-4)
    assert torch.allclose(a_plain, a_through, atol=1e-4)


def test_paper_preset_values_and_precedence(tmp_path: Path, synthetic_mnist_root: Path) -> None:
    paper = TrainConfig.from_preset("paper")
    assert (paper.act_alpha_init, paper.weight_alpha_init, paper.alpha_lr, paper.alpha_weight_decay,
            paper.ws_grad, paper.schedule, paper.preset) == (6.0, 3.0, None, None, True, "constant", "paper")
    assert (paper.lr, paper.weight_decay, paper.batch_size, paper.momentum) == (0.01, 1e-4, 128, 0.9)
    assert TrainConfig.from_preset("paper", schedule="step").schedule == "step"  # explicit values win
    assert TrainConfig.from_preset() == TrainConfig()  # default: the field defaults
    args = parse_args(["--preset", "paper", "--alpha-lr", "0.03", "--out", str(tmp_path)])
    assert args.preset == "paper" and args.alpha_lr == 0.03 and not hasattr(args, "schedule")
    # the sweep: --set train.preset=paper overrides the file's schedule: step; a --set beside it wins
    cfg = load_config(SHIPPED, overrides=["train.preset=paper", "train.act_alpha_init=5.0"])
    assert cfg.train["schedule"] == "constant" and cfg.train["ws_grad"] is True
    assert cfg.train["act_alpha_init"] == 5.0 and cfg.train["alpha_lr"] is None
    # and a paper model starts where the reference's does
    torch.manual_seed(0)
    model = create_model("resnet10", 2, width=8, ws_grad=paper.ws_grad)
    init_alphas(model, paper, DeviceMNIST.from_root(synthetic_mnist_root))
    layers = quant_layers(model)
    assert {float(m.act_alpha) for m in layers} == {6.0} and {float(m.weight_alpha) for m in layers} == {3.0}
    assert all(m.config.ws_grad for m in layers)
    assert set(PRESETS) == {"default", "paper"}


def test_resume_restores_the_calibrated_alphas(synthetic_mnist_root: Path, one_thread: None) -> None:
    # alpha_lr tiny: the alphas barely move, so epoch 2's mean shows where the resumed run started from
    cfg = TrainConfig(**SMALL, epochs=2, alpha_lr=1e-12, train_subset=256, data_dir=str(synthetic_mnist_root),
                      device="cpu")
    saved = {}

    class Stop(Exception):
        pass

    def stop_after_first(metrics: dict, state: dict) -> None:
        saved.update({k: v for k, v in state.items() if k != "model"},
                     model={k: v.clone() for k, v in state["model"].items()})
        raise Stop

    with pytest.raises(Stop):
        run_trial(cfg, on_epoch=stop_after_first)
    calibrated = [v for k, v in saved["model"].items() if k.endswith("act_alpha")]
    assert len({float(v) for v in calibrated}) > 1  # per-layer values, not one constant
    for k in saved["model"]:
        if k.endswith("act_alpha"):
            saved["model"][k].fill_(5.0)  # as if training had moved them there
    history = []
    run_trial(cfg, resume_state=saved, on_epoch=lambda m, s: history.append(m))
    assert [m["epoch"] for m in history] == [2]
    assert history[0]["act_alpha_mean"] == pytest.approx(5.0, abs=1e-6)  # not re-calibrated


def test_one_source_of_train_defaults() -> None:
    """The shipped search_space.yaml's train: section, read as plain YAML, states TrainConfig's defaults
    (the sweep's own where SWEEP_DEFAULTS differ), key for key, and python -m apot.train's flags default
    to TrainConfig's."""
    import dataclasses

    import yaml

    from apot.recipe import NOT_TRAIN_KEYS, SWEEP_DEFAULTS

    written = yaml.safe_load(SHIPPED.read_text())["train"]
    expected = {f.name: SWEEP_DEFAULTS.get(f.name, f.default) for f in dataclasses.fields(TrainConfig)
                if f.name not in NOT_TRAIN_KEYS}
    assert written == expected
    assert DEFAULTS["train"] == expected and load_config(SHIPPED).train == expected
    given = vars(parse_args(["--out", "x"]))
    assert given == {"out": "x", "preset": "default", "data_dir": None}  # absent flags: the field defaults
    import contextlib
    import io

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        parse_args(["--help"])
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"--{f.name.replace('_', '-')}" not in
               help_text.getvalue()]
    assert missing == []  # every field has its flag


@pytest.mark.parametrize("item,message", [
    ("train.alpha_lr=0", r"--set train.alpha_lr=0: train.alpha_lr: 0 must be > 0 or null$"),
    ("train.alpha_weight_decay=-1", r"train.alpha_weight_decay: -1 must be >= 0 or null$"),
    ("train.act_alpha_init=mse", r"train.act_alpha_init: 'mse' must be 'calibrate' or a number > 0$"),
    ("train.weight_alpha_init=0", r"train.weight_alpha_init: 0 must be 'mse' or a number > 0$"),
    ("train.ws_grad=yes please", r"train.ws_grad: 'yes please' must be true or false$"),
    ("train.preset=fast", r"train.preset: 'fast' is not a preset .*; allowed: default, paper$"),
    ("train.augment=affine", r"train.augment: 'affine' is not a training augmentation; allowed: shift, "
                             r"none$"),
    ("train.init_from=/x", r"train.init_from: '/x' is not how a sweep's trials start .*; allowed: fp32$"),
])
def test_recipe_keys_are_validated_in_one_line(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(SHIPPED, overrides=[item])
    assert "\n" not in str(info.value)


def test_fp32_is_one_trial_per_arch_and_seed_and_a_row_in_both_tables() -> None:
    cfg = load_config(SHIPPED, overrides=["grid.arch=[resnet18,resnet34]", "grid.seed=[0,1]"])
    fp32 = [t for t in cfg.trials() if t["bit"] == 32]
    assert [(t["arch"], t["seed"]) for t in fp32] == [("resnet18", 0), ("resnet18", 1), ("resnet34", 0),
                                                      ("resnet34", 1)]
    assert cfg.trial_name(fp32[0]) == "resnet18_fp32_s0"
    assert len(cfg.trials()) == 2 * 2 * (1 + 4 * 2)

    def record(bit: int, power: bool, seed: int, acc: float) -> dict:
        config = {**train_defaults(), "arch": "resnet18", "bit": bit, "power": power, "seed": seed}
        return {"arch": "resnet18", "bit": bit, "power": power, "seed": seed, "config": config,
                "state": "TERMINATED", "final_test_acc": acc}

    records = [record(32, True, 0, 99.60), record(32, True, 1, 99.70), record(2, True, 0, 99.0),
               record(2, False, 0, 98.5)]
    md = markdown_tables(records, {"quick": False})
    apot_table, uniform_table = md.split("### Uniform")
    row = re.compile(r"^\| ResNet-18 \| FP32 \| .* \| 99.65 ± 0.07 \(n=2\) \|", re.M)
    assert row.search(apot_table) and row.search(uniform_table)
    assert re.search(r"^\| ResNet-18 \| FP32 \| .* \| — \|$", uniform_table, re.M)  # no APoT delta
    assert re.search(r"^\| ResNet-18 \| 2-bit \| .* \| 98.50 \(n=1\) \| -0.50 \|$", uniform_table, re.M)


def test_tune_space_holds_each_point_once() -> None:
    from apot.config import grid_point, trial_name
    from apot.sweep import trial_configs

    cfg = load_config(SHIPPED)
    names = [trial_name(grid_point(c)) for c in trial_configs(cfg.trials(), cfg.train, {})]
    assert len(names) == len(set(names)) == 27 and names.count("resnet18_fp32_s0") == 1


# ------------------------------------------------------------------ progressive initialisation (init_from)
def _fp32_checkpoint(folder: Path, root: Path) -> dict:
    """Train a tiny FP32 model for one epoch and save its checkpoint in ``folder`` (as apot.train does)."""
    from apot.checkpoint import save_checkpoint

    cfg = TrainConfig(**{**SMALL, "bit": 32}, epochs=1, train_subset=256, data_dir=str(root), device="cpu")
    states = []
    run_trial(cfg, on_epoch=lambda m, s: states.append(s))
    save_checkpoint(states[-1], folder)
    return {k: v.clone() for k, v in states[-1]["model"].items()}


def test_init_from_starts_from_the_checkpoint_weights_and_calibrates_alphas(
        tmp_path: Path, synthetic_mnist_root: Path, one_thread: None) -> None:
    fp32 = _fp32_checkpoint(tmp_path / "fp32", synthetic_mnist_root)
    torch.manual_seed(0)
    fresh = create_model("resnet10", 2, width=8).state_dict()
    conv = "layer1.0.conv1.weight"
    assert not torch.equal(fresh[conv], fp32[conv])  # else the test could not tell the two starts apart
    # lr ~0: the weights stay where they started, so the epoch's state shows the start
    cfg = TrainConfig(**SMALL, epochs=1, lr=1e-12, train_subset=256, init_from=str(tmp_path / "fp32"),
                      data_dir=str(synthetic_mnist_root), device="cpu")
    states = []
    run_trial(cfg, on_epoch=lambda m, s: states.append(s))
    start = states[-1]["model"]
    bn_keys = [k for k in fp32 if k.endswith("num_batches_tracked")]
    assert bn_keys and all(int(fp32[k]) == 4 for k in bn_keys)  # 256 images / batch 64 in the FP32 epoch
    for key, value in fp32.items():
        if key.endswith(("weight", "bias")):  # convs, the 8-bit layers and BatchNorm's affine parameters
            assert torch.allclose(start[key], value, atol=1e-6), key
        elif key.endswith("num_batches_tracked"):  # BN statistics loaded, then 4 more batches on top
            assert int(start[key]) == int(value) + 4, key
    # the alphas were initialised for these weights: per layer, MSE-optimal for the loaded conv weights
    model = create_model("resnet10", 2, width=8)
    model.load_state_dict(start)
    layers = quant_layers(model)
    expected = create_model("resnet10", 2, width=8)
    expected.load_state_dict(fp32, strict=False)
    init_weight_alphas(expected, None)
    assert [float(m.weight_alpha.detach()) for m in layers] == pytest.approx(
        [float(m.weight_alpha.detach()) for m in quant_layers(expected)], abs=1e-6)
    assert len({round(float(m.act_alpha), 4) for m in layers}) > 1  # calibrated per layer
    assert states[-1]["config"]["init_from"] == str(tmp_path / "fp32")


def test_init_from_bad_checkpoints_fail_in_one_line(tmp_path: Path, synthetic_mnist_root: Path,
                                                    one_thread: None, capsys: pytest.CaptureFixture) -> None:
    from apot.checkpoint import CheckpointError
    from apot.train import main

    _fp32_checkpoint(tmp_path / "fp32", synthetic_mnist_root)
    base = dict(SMALL, epochs=1, train_subset=64, data_dir=str(synthetic_mnist_root), device="cpu")
    cases = [
        (dict(base, init_from=str(tmp_path / "nowhere")), r"init_from: .*nowhere: no such checkpoint"),
        (dict(base, init_from=str(tmp_path / "fp32"), arch="resnet18"),
         r"init_from: .*checkpoint.pt was trained for another model: "
         r"arch='resnet10' \(this run: 'resnet18'\)"),
        (dict(base, init_from=str(tmp_path / "fp32"), width=16), r"another model: width=8 \(this run: 16\)"),
        (dict(base, init_from="fp32"), r"init_from: 'fp32' names a sweep's full-precision trial"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CheckpointError, match=message) as info:
            run_trial(TrainConfig(**kwargs))
        assert "\n" not in str(info.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code = main(["--arch", "resnet10", "--width", "8", "--bit", "2", "--epochs", "1", "--train-subset", "64",
                 "--data-dir", str(synthetic_mnist_root), "--init-from", str(tmp_path / "junk"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and re.fullmatch(r"error: .*junk/checkpoint.pt: cannot read checkpoint .*\n", err)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()  # nothing trained


def test_init_from_in_a_sweep_is_fp32_or_null_and_puts_fp32_trials_first() -> None:
    cfg = load_config(SHIPPED, overrides=["train.init_from=fp32", "grid.arch=[resnet18,resnet34]"])
    order = [(t["arch"], t["bit"]) for t in cfg.trials()]
    assert order[:2] == [("resnet18", 32), ("resnet34", 32)] and all(b != 32 for _, b in order[2:])
    assert len(order) == 2 * (1 + 4 * 2)
    scratch = load_config(SHIPPED, overrides=["train.init_from=null"]).trials()
    assert [(t["arch"], t["bit"]) for t in scratch][:2] == [("resnet18", 32), ("resnet18", 5)]  # as listed
    with pytest.raises(ConfigError, match=r"train.init_from: '/x/ckpt' is not how a sweep's trials start"):
        load_config(SHIPPED, overrides=["train.init_from=/x/ckpt"])
    with pytest.raises(ConfigError, match=r"train.init_from: 'fp32' starts .* grid.bit must include 32 "
                                          r"\(or --set train.init_from=null: from scratch\)$"):
        load_config(SHIPPED, overrides=["train.init_from=fp32", "grid.bit=[4,2]"])


def test_hyper_params_cell_says_fp32init() -> None:
    from apot.report import hyper_params_cell

    config = {**train_defaults(), "bit": 2, "init_from": "fp32"}
    assert hyper_params_cell(config) == "batch128_lr0.01_wd0.0001_25epoch_fp32init"
    assert hyper_params_cell({**config, "bit": 32}) == "batch128_lr0.01_wd0.0001_25epoch"
    assert hyper_params_cell({**config, "init_from": None}) == "batch128_lr0.01_wd0.0001_25epoch"


# ------------------------------------------------------------- settings removed since records were stored
STORED_FP32 = REPO / "results/cpu_all_s0/train/resnet18_fp32_s0/checkpoint_epoch025/checkpoint.pt"
REMOVED_NOTE = r"; a setting removed after commit [0-9a-f]{7}, docs/EXPERIMENTS.md\)"


def test_a_stored_checkpoint_with_removed_settings_resumes_and_starts_a_trial(tmp_path: Path) -> None:
    """apot.recipe.REMOVED_SETTINGS: a checkpoint of this repository's stored sweep (its config holds
    ``distill: 0.0`` and ``label_smoothing: 0.0``, both since removed) is still the same trial and still
    starts a quantized one (``init_from``); the same checkpoint at another value of a removed setting is
    another trial, named as such."""
    import dataclasses

    from apot.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, start_from_checkpoint

    state = torch.load(STORED_FP32, map_location="cpu", weights_only=True)
    assert {"distill": 0.0, "label_smoothing": 0.0}.items() <= state["config"].items()
    now = dataclasses.asdict(TrainConfig.from_dict(state["config"]))
    assert "distill" not in now and "label_smoothing" not in now
    assert load_checkpoint(STORED_FP32.parent, now)["epoch"] == 25
    cfg = TrainConfig(arch="resnet18", bit=2, width=16, init_from=str(STORED_FP32.parent))
    model = create_model("resnet18", 2, width=16)
    start_from_checkpoint(model, cfg)
    assert torch.equal(model.state_dict()["fc.weight"], state["model"]["fc.weight"])

    save_checkpoint({**state, "config": {**state["config"], "distill": 0.5}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"belongs to another trial: distill=0.5 \(this run: 0.0"
                                              + REMOVED_NOTE):
        load_checkpoint(tmp_path, now)


def test_removed_settings_are_no_settings_and_show_in_the_hyper_params_cell() -> None:
    import dataclasses

    from apot.recipe import REMOVED_SETTINGS, removed_settings_used
    from apot.report import hyper_params_cell

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(REMOVED_SETTINGS) == {"distill", "label_smoothing"} and not names & set(REMOVED_SETTINGS)
    with pytest.raises(ValueError, match=r"^augment: 'affine' is not a training augmentation; allowed: "
                                         r"shift, none$"):
        TrainConfig(augment="affine")
    for key in REMOVED_SETTINGS:
        with pytest.raises(ConfigError, match=rf"--set train.{key}=0.5: unknown key train.{key}"):
            load_config(SHIPPED, overrides=[f"train.{key}=0.5"])
        with pytest.raises(TypeError):
            TrainConfig(**{key: 0.5})
    config = {**train_defaults(), "bit": 2, "init_from": "fp32"}
    stored = {**config, **REMOVED_SETTINGS}  # as stored before they were removed: at their no-op values
    assert removed_settings_used(stored) == {}
    cell = "batch128_lr0.01_wd0.0001_25epoch"
    assert hyper_params_cell(stored) == hyper_params_cell(config) == f"{cell}_fp32init"
    assert removed_settings_used({**stored, "distill": 0.5}) == {"distill": 0.5}
    assert hyper_params_cell({**stored, "distill": 0.5}) == f"{cell}_fp32init_distill0.5"
    assert hyper_params_cell({**stored, "bit": 32, "label_smoothing": 0.1}) == f"{cell}_label_smoothing0.1"
    assert removed_settings_used({**stored, "augment": "affine"}) == {"augment": "affine"}  # a removed choice
    assert hyper_params_cell({**stored, "augment": "affine"}) == f"{cell}_fp32init_augment_affine"
    assert removed_settings_used({**stored, "augment": "none"}) == {}


# ------------------------------------------------------------------------------------------ trial identity
def test_trial_identity_is_every_field_but_where_and_how_it_runs() -> None:
    import dataclasses

    from apot.recipe import MAY_CHANGE_ON_RESUME, TRIAL_IDENTITY, identity_changes

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(MAY_CHANGE_ON_RESUME) == {"data_dir", "device", "compile"}
    assert set(TRIAL_IDENTITY) == names - set(MAY_CHANGE_ON_RESUME)
    stored = dataclasses.asdict(TrainConfig(**SMALL))
    moved = {**stored, "data_dir": "/elsewhere/mnist", "device": "cuda", "compile": "compile"}
    assert identity_changes(stored, moved) == []
    assert identity_changes(stored, {**stored, "lr": 0.02}) == ["lr=0.01 (this run: 0.02)"]
    old = {**stored, "distill": 0.0, "label_smoothing": 0.0}  # stored before these settings were removed
    assert identity_changes(old, stored) == [] and identity_changes(stored, old) == []
    (change,) = identity_changes({**old, "label_smoothing": 0.1}, stored)
    assert re.fullmatch(r"label_smoothing=0.1 \(this run: 0.0" + REMOVED_NOTE, change)


def _stored_sweep(tmp_path: Path, *overrides: str) -> Path:
    cfg = load_config(SHIPPED, overrides=list(overrides))
    experiment = tmp_path / cfg.name
    experiment.mkdir(parents=True)
    (experiment / "sweep_config.json").write_text(json.dumps(cfg.to_dict()))
    return experiment


def test_a_sweep_resumes_from_another_data_dir_and_step_mode_only(tmp_path: Path) -> None:
    """The sweep applies the same identity as checkpoints and records: --resume from another MNIST folder or
    with another train.compile continues the stored sweep; another training setting is refused."""
    from apot.orchestrate import check_resume_matches

    experiment = _stored_sweep(tmp_path, "data_dir=/old/mnist", "train.compile=auto")
    moved = load_config(SHIPPED, overrides=["train.compile=eager"], data_dir="/new/mnist")
    assert moved.data_dir != json.loads((experiment / "sweep_config.json").read_text())["data_dir"]
    assert check_resume_matches(moved, moved.trials(), experiment) == []
    changed = load_config(SHIPPED, overrides=["train.lr=0.02"], data_dir="/old/mnist")
    with pytest.raises(ConfigError, match=r"differs from the sweep stored at .*: train\.lr=0\.01 \(this run: "
                                          r"0\.02\); .*only --data-dir and train\.compile may change"):
        check_resume_matches(changed, changed.trials(), experiment)


def test_a_checkpoint_resumes_on_another_device_data_dir_and_step_mode(tmp_path: Path) -> None:
    import dataclasses

    from apot.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    cfg = dataclasses.asdict(TrainConfig(**SMALL, data_dir="/old/mnist"))
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "history": [], "config": cfg}
    save_checkpoint(state, tmp_path)
    moved = {**cfg, "data_dir": "/new/mnist", "device": "cuda", "compile": "eager"}
    assert load_checkpoint(tmp_path, moved)["epoch"] == 1
    with pytest.raises(CheckpointError, match=r"belongs to another trial: epochs=25 \(this run: 30\)"):
        load_checkpoint(tmp_path, {**cfg, "epochs": 30})
