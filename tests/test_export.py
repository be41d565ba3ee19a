"""apot.export: exact round trip from integer codes, the packed size against a formula, code dtypes, the
bad-input messages, and the CLI on a checkpoint that apot.train really wrote."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from resnet_formula import quantized_conv_weights
from torch import nn

from apot import export as ex
from apot.checkpoint import CHECKPOINT_FILE, save_checkpoint
from apot.layers import Conv2d8bit, Linear8bit, QuantConv2d
from apot.models import create_model, list_models
from apot.quant import LEVEL_BITS, quantize_8bit, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 2  # the smallest width every arch builds with a std per conv (a 1x1 conv of width 1 has one weight)


def trained_like(arch: str, bit: int, power: bool, width: int = WIDTH, seed: int = 0) -> nn.Module:
    """A model in eval mode with the state a trained one has: alphas away from their initial values, fc bias,
    and BatchNorm running statistics from a few train-mode forwards (not the initial 0 / 1)."""
    torch.manual_seed(seed)
    model = create_model(arch, bit, power=power, width=width)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("act_alpha"):
                p.uniform_(0.5, 3.0)
            elif name.endswith("weight_alpha"):
                p.uniform_(1.0, 3.0)
            elif name.endswith("bias") or name.endswith("bn1.weight"):
                p.normal_()
        model.train()
        for _ in range(2):
            model(torch.randn(8, 1, 28, 28))
    return model.eval()


def config_of(arch: str, bit: int, power: bool, width: int = WIDTH) -> dict:
    return {"arch": arch, "bit": bit, "power": power, "width": width}


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("power", [True, False], ids=["apot", "uniform"])
@pytest.mark.parametrize("bit", LEVEL_BITS)
@pytest.mark.parametrize("arch", list_models())
def test_round_trip_gives_identical_logits(arch: str, bit: int, power: bool, tmp_path: Path) -> None:
    model = trained_like(arch, bit, power)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in bns)  # not the init
    export = ex.export_model(model, config_of(arch, bit, power), {"epoch": 1})
    path = ex.write_export(export, tmp_path / "m.pt")
    loaded = ex.load(path)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    # Bit for bit: the decoded weights are the fake-quantized ones and every other op is the same.
    assert torch.equal(got, expected), float((got - expected).abs().max())
    # The decoded conv weights are exactly the fake-quantized weights, and nothing float of them is stored.
    data = torch.load(path, weights_only=True)
    for name, m in model.named_modules():
        if isinstance(m, (Conv2d8bit, Linear8bit)):  # codes / 127 * scale is the forward's 8-bit weight
            entry = data["layers"][name]
            decoded = entry["codes"].to(torch.float32) / 127 * entry["scale"]
            assert torch.equal(decoded, quantize_8bit(m.weight.detach())), name
        if isinstance(m, QuantConv2d):
            entry = data["layers"][name]
            fake = quantize_weight(m.weight.detach(), m.weight_alpha.detach(), m.weight_levels)
            assert torch.equal(entry["weight_values"][entry["codes"].long()], fake)
            floats = [v for v in entry.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
            assert all(v.shape != m.weight.shape for v in floats)
    coded = [e["codes"].flatten().long() for e in data["layers"].values() if e["kind"] == "quant_conv"]
    codes = torch.cat(coded)
    assert codes.unique().numel() > 2  # the alphas spread the weights over several levels


# ------------------------------------------------------------------------------------------ size
def fit_int8(model: nn.Module) -> nn.Module:
    """Make max(w) the largest magnitude in the 8-bit layers, so their codes fit int8."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (Conv2d8bit, Linear8bit)):
                m.weight.view(-1)[0] = m.weight.abs().max() * 1.01
    return model


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_packed_size_matches_the_formula(arch: str) -> None:
    width, classes = 16, 10
    weights, convs, bn, fc_in = quantized_conv_weights(arch, width)
    fp32_model = create_model(arch, 32, width=width)
    fp32_params = sum(p.numel() for p in fp32_model.parameters()) + 2 * bn  # + running mean and var
    for bit in LEVEL_BITS:
        model = fit_int8(create_model(arch, bit, power=True, width=width).eval())
        size = ex.export_model(model, config_of(arch, bit, True, width), {})["size"]
        eight_bit = 49 * width + fc_in * classes
        # BN (4 per channel), fc bias, two alphas per quantized conv, two 8-bit scales, the two level sets
        floats = 4 * bn + classes + 2 * convs + 2 + (2**bit - 1) + 2**bit
        expected = weights * math.ceil(math.log2(2**bit - 1)) + 8 * eight_bit + 32 * floats
        assert size["packed_bits"] == expected
        assert size["fp32_bits"] == 32 * fp32_params
        assert size["size_kb"] == expected / 8 / 1024
        assert size["compression"] == pytest.approx(32 * fp32_params / expected)
        if arch == "resnet18" and bit == 4:
            assert size["compression"] >= 7  # the goal: at most 1/7 of FP32


def test_8bit_codes_below_int8_are_kept_exact_and_counted() -> None:
    """The reference scales by max(w): a more negative minimum gives codes below -128 (int16, 9 bits)."""
    model = fit_int8(trained_like("resnet10", 4, True))
    base = ex.export_model(model, config_of("resnet10", 4, True), {})
    with torch.no_grad():
        model.conv1.weight.view(-1)[1] = -2 * model.conv1.weight.max()  # code -254
    export = ex.export_model(model, config_of("resnet10", 4, True), {})
    codes = export["layers"]["conv1"]["codes"]
    assert codes.dtype == torch.int16 and int(codes.min()) == -254
    assert export["size"]["packed_bits"] - base["size"]["packed_bits"] == codes.numel()  # 9 bits, not 8
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(ex.build_model(export)(x), model(x))


def test_index_dtype_per_bit_width() -> None:
    for bit in LEVEL_BITS:
        model = fit_int8(trained_like("resnet10", bit, False))
        export = ex.export_model(model, config_of("resnet10", bit, False), {})
        for name, entry in export["layers"].items():
            if entry["kind"] == "quant_conv":
                assert entry["codes"].dtype == torch.uint8, name  # 2**bit - 1 <= 63 levels
                assert int(entry["codes"].max()) < 2**bit - 1
            else:
                assert entry["codes"].dtype == torch.int8, name
    assert [ex.index_dtype(n) for n in (3, 63, 256, 257, 2**15, 2**15 + 1)] == \
        [torch.uint8] * 3 + [torch.int16] * 2 + [torch.int32]
    assert [ex.code_dtype(lo, hi) for lo, hi in ((-128, 127), (-129, 127), (0, 128), (-2**15 - 1, 0))] == \
        [torch.int8, torch.int16, torch.int16, torch.int32]


# ------------------------------------------------------------------------------------------ CLI, real run
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist_root: Path) -> Path:
    """apot.train's --out folder after one real epoch (resnet10 4-bit APoT, width 4) on the synthetic set."""
    from apot.train import main as train_main

    out = tmp_path_factory.mktemp("trained") / "run"
    rc = train_main(["--arch", "resnet10", "--bit", "4", "--width", "4", "--epochs", "1",
                     "--batch-size", "64", "--train-subset", "256", "--data-dir", str(synthetic_mnist_root),
                     "--device", "cpu", "--out", str(out)])
    assert rc == 0
    return out


def test_cli_export_and_verify(trained: Path, synthetic_mnist_root: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "r10.pt"
    assert ex.main(["--checkpoint", str(trained), "--out", str(file)]) == 0
    assert "wrote" in capsys.readouterr().out
    data = torch.load(file, weights_only=True)  # plain tensors and containers only
    assert data["format"] == ex.FORMAT and (data["arch"], data["bit"], data["quantizer"]) == \
        ("resnet10", 4, "apot")
    assert data["source"]["checkpoint"] == str((trained / CHECKPOINT_FILE).resolve())

    assert ex.main(["--verify", str(file), "--data-dir", str(synthetic_mnist_root)]) == 0
    out = capsys.readouterr().out.splitlines()
    final_acc = json.loads((trained / "result.json").read_text())["final_test_acc"]
    assert out[0].startswith(f"test accuracy of the loaded export: {final_acc:.2f}% ")  # = training's number
    assert "differing from the fake-quantized checkpoint: 0 of 256 (logits bit-identical)" in out[1]
    assert out[2] == ex.size_line(data["size"])


def test_verify_exits_1_when_a_prediction_differs(trained: Path, synthetic_mnist_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """An export whose model no longer predicts what its checkpoint does (here: the fc bias pushed towards
    one class, as a wrong decode would) fails --verify with exit code 1 and the count of differing images."""
    file = tmp_path / "r10.pt"
    assert ex.main(["--checkpoint", str(trained), "--out", str(file)]) == 0
    data = torch.load(file, weights_only=True)
    bias = data["layers"]["fc"]["bias"]
    bias[int(bias.argmin())] += 1000.0  # every image now goes to one class
    torch.save(data, file)
    capsys.readouterr()
    assert ex.main(["--verify", str(file), "--data-dir", str(synthetic_mnist_root)]) == 1
    line = capsys.readouterr().out.splitlines()[1]
    differing = int(re.search(r"checkpoint: (\d+) of 256", line).group(1))
    assert differing > 0 and "bit-identical" not in line, line


def test_trial_folder_picks_the_latest_checkpoint(trained: Path, tmp_path: Path) -> None:
    trial = tmp_path / "train" / "resnet10_b4_apot_s0"
    for epoch in (999, 1000):
        (trial / f"checkpoint_epoch{epoch:03d}").mkdir(parents=True)
        (trial / f"checkpoint_epoch{epoch:03d}" / CHECKPOINT_FILE).write_bytes(
            (trained / CHECKPOINT_FILE).read_bytes())
    (trial / "checkpoint_epoch2000").mkdir()  # no checkpoint.pt inside: not a candidate
    assert ex.find_checkpoint(trial) == trial / "checkpoint_epoch1000"  # by number, not by name
    first = trial / "checkpoint_epoch999"
    assert ex.find_checkpoint(first / CHECKPOINT_FILE) == ex.find_checkpoint(first) == first


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], pattern: str) -> str:
    assert ex.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and re.search(pattern, err), err
    return err


def test_bad_checkpoints_get_one_line(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "x.pt")
    good = (trained / CHECKPOINT_FILE).read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "corrupt": bytes(range(256)) * 64,
    }
    for name, data in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / CHECKPOINT_FILE).write_bytes(data)
        err = _one_line_error(capsys, ["--checkpoint", str(tmp_path / name), "--out", out],
                              r"cannot read checkpoint")
        assert str(tmp_path / name / CHECKPOINT_FILE) in err
    # a torch file that is not an apot checkpoint
    (tmp_path / "foreign").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "foreign" / CHECKPOINT_FILE)
    _one_line_error(capsys, ["--checkpoint", str(tmp_path / "foreign"), "--out", out],
                    r"not an apot checkpoint")
    # not a checkpoint at all: a JSON file, an empty folder, a missing path
    _one_line_error(capsys, ["--checkpoint", str(trained / "result.json"), "--out", out],
                    r"result\.json: not a trial checkpoint")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["--checkpoint", str(tmp_path / "empty"), "--out", out], r"no checkpoint\.pt")
    _one_line_error(capsys, ["--checkpoint", str(tmp_path / "nowhere"), "--out", out], r"no such file")
    _one_line_error(capsys, ["--checkpoint", str(trained), "--out", str(tmp_path)], r"is a folder")
    _one_line_error(capsys, ["--checkpoint", str(trained), "--out", str(trained / CHECKPOINT_FILE)],
                    r"is the checkpoint itself")
    assert (trained / CHECKPOINT_FILE).read_bytes() == good
    assert not Path(out).exists()


def test_full_precision_and_diverged_checkpoints_get_one_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    def checkpoint(folder: Path, model: nn.Module, bit: int) -> Path:
        config = {"arch": "resnet10", "bit": bit, "power": True, "width": WIDTH}
        save_checkpoint({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1,
                         "history": [], "config": config}, folder)
        return folder

    fp32 = checkpoint(tmp_path / "fp32", create_model("resnet10", 32, width=WIDTH), 32)
    _one_line_error(capsys, ["--checkpoint", str(fp32), "--out", str(tmp_path / "x.pt")],
                    r"full-precision \(bit 32\) checkpoint")
    model = create_model("resnet10", 4, width=WIDTH)
    with torch.no_grad():
        model.layer1[0].conv1.weight[0] = float("nan")
    nan = checkpoint(tmp_path / "nan", model, 4)
    _one_line_error(capsys, ["--checkpoint", str(nan), "--out", str(tmp_path / "x.pt")],
                    r"layer layer1\.0\.conv1: non-finite")


def test_bad_exports_get_one_line(trained: Path, synthetic_mnist_root: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "good.pt"
    assert ex.main(["--checkpoint", str(trained), "--out", str(file)]) == 0
    capsys.readouterr()
    good = file.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pt").write_text("hello")
    data = ["--data-dir", str(synthetic_mnist_root)]
    for name in ("truncated.pt", "text.pt"):
        _one_line_error(capsys, ["--verify", str(tmp_path / name), *data], rf"{name}: cannot read export")
    _one_line_error(capsys, ["--verify", str(trained / CHECKPOINT_FILE), *data],
                    r"not an apot export.*a training checkpoint")
    _one_line_error(capsys, ["--verify", str(tmp_path / "none.pt"), *data], r"no such export file")
    with pytest.raises(ex.ExportError, match=r"truncated\.pt: cannot read export"):
        ex.load(tmp_path / "truncated.pt")
    # well-formed files with ill-formed content
    export = torch.load(file, weights_only=True)
    torch.save({"format": ex.FORMAT, "arch": "resnet10"}, tmp_path / "partial.pt")
    _one_line_error(capsys, ["--verify", str(tmp_path / "partial.pt"), *data],
                    r"partial\.pt: incomplete export")
    export["layers"]["layer1.0.conv2"]["codes"] = export["layers"]["layer1.0.conv2"]["codes"][:1]
    torch.save(export, tmp_path / "shape.pt")
    with pytest.raises(ex.ExportError, match=r"shape\.pt: layer layer1\.0\.conv2: codes must be an integer"):
        ex.load(tmp_path / "shape.pt")
    # an export whose checkpoint is another model
    other = tmp_path / "other"
    model = create_model("resnet10", 2, width=4)
    save_checkpoint({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1, "history": [],
                     "config": {"arch": "resnet10", "bit": 2, "power": True, "width": 4}}, other)
    _one_line_error(capsys, ["--verify", str(file), "--checkpoint", str(other), *data],
                    r"not the export's model \(bit=2; the export has bit=4\)")
