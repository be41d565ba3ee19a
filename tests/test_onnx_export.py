"""apot.onnx_export: onnxruntime runs every arch x bit x quantizer from its codes with the checkpoint's
predictions; the activation quantizer's ONNX form projects exactly as training does; the file holds codes,
not float weights, and its size is accounted for; the CLI on a real checkpoint; bad inputs in one line."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from apot import export as ex
from apot.calibrate import calibrate_act_alphas
from apot.checkpoint import CHECKPOINT_FILE, save_checkpoint
from apot.data import load_split, normalize
from apot.layers import Conv2d8bit, Linear8bit, QuantConv2d
from apot.models import create_model, list_models
from apot.quant import LEVEL_BITS, TABLE_SCALE, levels, lookup_table, midpoints, quantize_activation

onnx = pytest.importorskip("onnx", reason="the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="the onnx extra: pip install -e '.[onnx]'")
from onnx import TensorProto, numpy_helper  # noqa: E402

from apot import onnx_export as ox  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 2
BEYOND_ROUNDING = 0.05
"""The tolerance: every image's logits within ``ox.ROUNDING_TOL`` (1e-4 of the largest |logit|) of the
fake-quantized model's, except at most this share of the images, and no prediction changed.

onnxruntime sums a convolution in another order than PyTorch (float32 rounding, ~1e-6 relative); a conv
output within that rounding of a midpoint then takes the neighbouring level in the next activation
quantizer and moves that image's logits by up to about one level step times a weight (measured on a
trained ResNet-18 4-bit APoT: 11 images in 10,000, by up to 1.3)."""


@pytest.fixture(scope="module")
def batch(synthetic_mnist_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split(synthetic_mnist_root, train=False)
    return normalize(images[:64]), labels[:64]


def calibrated(arch: str, bit: int, power: bool, x: torch.Tensor, width: int = WIDTH) -> nn.Module:
    """A model in eval mode as training starts it (activation alphas calibrated on ``x``), with BatchNorm
    running statistics of ``x`` (not the initial 0 / 1) and a random fc bias."""
    torch.manual_seed(bit)
    model = create_model(arch, bit, power=power, width=width)
    if bit != 32:
        calibrate_act_alphas(model, x[:16])
    with torch.no_grad():
        model.fc.bias.normal_()
        model.train()
        model(x[:32])
    return model.eval()


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(ox.session(path, threads=1).run([ox.OUTPUT], {ox.INPUT: x.numpy()})[0])


def quantized_names(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d)}


# ------------------------------------------------------------------------------------------ the projection
@pytest.mark.parametrize("power", [True, False], ids=["apot", "uniform"])
@pytest.mark.parametrize("bit", LEVEL_BITS)
def test_activation_quantizer_projects_exactly_as_training(bit: int, power: bool, tmp_path: Path) -> None:
    """Every midpoint, its float32 neighbours, every level, values past 1 and random ones: the ONNX
    activation quantizer gives the training forward's value bit for bit (alpha 1: u is exactly x)."""
    level_set = levels(bit, power)
    bounds = midpoints(level_set)
    up, down = torch.full_like(bounds, float("inf")), torch.full_like(bounds, float("-inf"))
    u = torch.cat([bounds, torch.nextafter(bounds, up), torch.nextafter(bounds, down), level_set,
                   torch.tensor([0.0, 1.0, 1.0 + 1e-7, 1.5, 7.0, 1e6]), torch.rand(4000, generator=
                   torch.Generator().manual_seed(bit)) * 1.2])
    for alpha in (1.0, 1.7321):
        x = (u * alpha).reshape(1, 1, 1, -1)
        layer = SimpleNamespace(act_levels=level_set, act_alpha=torch.tensor(alpha))
        graph = ox._ResNetGraph(None)  # only its activation quantizer
        out = graph.quantize_activation("q", layer, "x")
        h = onnx.helper
        proto = h.make_model(h.make_graph(graph.g.nodes, "q", [h.make_tensor_value_info(
            "x", TensorProto.FLOAT, list(x.shape))], [h.make_tensor_value_info(out, TensorProto.FLOAT, None)],
            graph.g.initializers), opset_imports=[h.make_opsetid("", ox.OPSET)])
        proto.ir_version = ox.IR_VERSION
        path = ox.write_onnx(proto, tmp_path / "q.onnx")
        got = torch.from_numpy(ox.session(path, threads=1).run([out], {"x": x.numpy()})[0])
        table = lookup_table(level_set, TABLE_SCALE)  # the padded table the layers train with
        assert torch.equal(got, quantize_activation(x, torch.tensor(alpha), None, table)), alpha
        assert torch.equal(got, quantize_activation(x, torch.tensor(alpha), level_set)), alpha


# ------------------------------------------------------------------------------------------ round trip
def _check_codes_not_weights(path: Path, model: nn.Module, bit: int) -> None:
    """Read the file: each quantized conv is uint8 codes + a decode table feeding Gather -> Conv; no float
    tensor of a quantized weight's shape; the 8-bit layers are int8 (or int16) codes and a scale."""
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    convs = {node.name: node for node in proto.graph.node if node.op_type == "Conv"}
    quantized = quantized_names(model)
    for name, m in quantized.items():
        codes = inits[f"{name}.codes"]
        assert codes.data_type == TensorProto.UINT8 and list(codes.dims) == list(m.weight.shape), name
        assert numpy_helper.to_array(inits[f"{name}.weight_values"]).shape == (2**bit - 1,)
        assert f"{name}.weight" not in inits
        gather = producers[convs[name].input[1]]
        assert gather.op_type == "Gather" and gather.input[0] == f"{name}.weight_values", name
        assert producers[gather.input[1]].input == [f"{name}.codes"]
    shapes = {tuple(m.weight.shape) for m in quantized.values()}
    floats = [t for t in inits.values() if t.data_type == TensorProto.FLOAT]
    assert not any(tuple(t.dims) in shapes for t in floats)
    for name, m in model.named_modules():
        if isinstance(m, (Conv2d8bit, Linear8bit)):
            assert inits[f"{name}.codes"].data_type in (TensorProto.INT8, TensorProto.INT16), name
            assert list(inits[f"{name}.scale"].dims) == []
    if not quantized:  # full precision: plain float weights
        assert all(inits[f"{n}.weight"].data_type == TensorProto.FLOAT for n, m in model.named_modules()
                   if type(m) in (nn.Conv2d, nn.Linear))


@pytest.mark.parametrize("arch", list_models())
def test_every_arch_bit_and_quantizer_round_trips(arch: str, batch, tmp_path: Path) -> None:
    x, _ = batch
    for bit in (*LEVEL_BITS, 32):
        for power in ((True, False) if bit != 32 else (True,)):
            model = calibrated(arch, bit, power, x)
            config = {"arch": arch, "bit": bit, "power": power, "width": WIDTH}
            proto, size = ox.onnx_of_model(model, config, {"epoch": 1})
            path = ox.write_onnx(proto, tmp_path / f"{arch}_{bit}_{power}.onnx")
            got = run_onnx(path, x)
            with torch.no_grad():
                want = model(x)
            what = f"{arch} {bit}-bit {'APoT' if power else 'uniform'}"
            assert torch.equal(got.argmax(1), want.argmax(1)), what
            diff = (got - want).abs().amax(1)
            beyond = int((diff > ox.ROUNDING_TOL * max(1.0, float(want.abs().max()))).sum())
            assert beyond <= BEYOND_ROUNDING * x.shape[0], (what, beyond, float(diff.max()))
            assert want.std(0).mean() > 1e-3, what  # the logits depend on the image: not a constant model
            _check_codes_not_weights(path, model, bit)
            meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
            assert (meta["format"], meta["arch"], meta["bit"]) == (ox.FORMAT, arch, str(bit))
            assert float(meta["packed_kb"]) == size["size_kb"]


def test_file_size_is_the_codes_at_a_byte_each(batch, tmp_path: Path) -> None:
    """The file's tensors are the export's codes (one byte each), the decode tables, BatchNorm, alphas,
    scales and biases; so it is at least the packed size, about a quarter of the FP32 graph at width 16."""
    model = calibrated("resnet18", 4, True, batch[0], width=16)
    config = {"arch": "resnet18", "bit": 4, "power": True, "width": 16}
    path = ox.write_onnx(ox.onnx_of_model(model, config, {})[0], tmp_path / "q.onnx")
    export = ex.export_model(model, config, {})
    code_bytes = sum(e["codes"].numel() * e["codes"].element_size() for e in export["layers"].values())
    proto = onnx.load(str(path))
    init_bytes = {t.name: len(t.raw_data) for t in proto.graph.initializer}
    assert sum(v for k, v in init_bytes.items() if k.endswith(".codes")) == code_bytes
    floats = sum(v for k, v in init_bytes.items() if not k.endswith(".codes"))
    bn = sum(t.numel() for t in export["batchnorm"].values()) * 4
    assert bn <= floats <= bn + 64 * 1024  # + tables, alphas, scales, the fc bias, scalar constants
    file_size = path.stat().st_size
    assert export["size"]["packed_bits"] / 8 <= file_size <= code_bytes + floats + 128 * 1024
    fp32 = create_model("resnet18", 32, width=16).eval()
    fp32_path = ox.write_onnx(ox.onnx_of_model(fp32, {**config, "bit": 32}, {})[0], tmp_path / "f.onnx")
    assert 3.0 < fp32_path.stat().st_size / file_size < 4.0


# ------------------------------------------------------------------------------------------ CLI, real run
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synthetic_mnist_root: Path) -> Path:
    """apot.train's --out folder after one real epoch (resnet10 3-bit uniform, width 4), synthetic data."""
    from apot.train import main as train_main

    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_main(["--arch", "resnet10", "--bit", "3", "--power", "uniform", "--width", "4", "--epochs",
                       "1", "--batch-size", "64", "--train-subset", "256", "--data-dir",
                       str(synthetic_mnist_root), "--device", "cpu", "--out", str(out)]) == 0
    return out


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], pattern: str) -> None:
    assert ex.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


def _checkpoint(folder: Path, arch: str, bit: int, power: bool = True) -> Path:
    model = create_model(arch, bit, power=power, width=4)
    save_checkpoint({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1, "history": [],
                     "config": {"arch": arch, "bit": bit, "power": power, "width": 4}}, folder)
    return folder


def test_cli_export_and_verify(trained: Path, synthetic_mnist_root: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    import json

    file = tmp_path / "r10.onnx"
    assert ex.main(["--checkpoint", str(trained), "--out", str(file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {file}: resnet10 3-bit uniform (width 4)") and "ONNX file" in out
    data = ["--data-dir", str(synthetic_mnist_root)]
    assert ex.main(["--verify", str(file), *data]) == 0
    lines = capsys.readouterr().out.splitlines()
    final_acc = json.loads((trained / "result.json").read_text())["final_test_acc"]
    assert lines[0].startswith(f"test accuracy of the ONNX model (onnxruntime CPU): {final_acc:.2f}% ")
    assert re.search(r"differing from the fake-quantized checkpoint: 0 of 256 \(max \|logit difference\| "
                     r"\S+; \d+ images beyond float32 rounding", lines[1]), lines[1]
    size_kb = file.stat().st_size / 1024
    assert lines[2].startswith(f"ONNX file {size_kb:.1f} KB (FP32 ")
    # another model of the same config as the reference: predictions differ, exit 1
    other = _checkpoint(tmp_path / "other", "resnet10", 3, power=False)
    assert ex.main(["--verify", str(file), "--checkpoint", str(other), *data]) == 1
    out = capsys.readouterr().out
    assert re.search(r"differing from the fake-quantized checkpoint: [1-9]\d* of 256", out), out
    # a full-precision checkpoint exports as a float graph (the .pt export refuses it)
    fp32 = _checkpoint(tmp_path / "fp32", "resnet10", 32)
    assert ex.main(["--checkpoint", str(fp32), "--out", str(tmp_path / "fp32.onnx")]) == 0
    assert "resnet10 FP32 (width 4)" in capsys.readouterr().out
    assert ex.main(["--verify", str(tmp_path / "fp32.onnx"), *data]) == 0
    capsys.readouterr()


def test_bad_inputs_get_one_line(trained: Path, synthetic_mnist_root: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ["--data-dir", str(synthetic_mnist_root)]
    file = tmp_path / "good.onnx"
    assert ex.main(["--checkpoint", str(trained), "--out", str(file)]) == 0
    capsys.readouterr()
    good = file.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(good[: len(good) // 2])
    _one_line_error(capsys, ["--verify", str(tmp_path / "truncated.onnx"), *data],
                    r"truncated\.onnx: cannot read it as ONNX")
    _one_line_error(capsys, ["--verify", str(tmp_path / "none.onnx"), *data],
                    r"none\.onnx: no such ONNX file")
    foreign = onnx.load(str(file))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    _one_line_error(capsys, ["--verify", str(tmp_path / "foreign.onnx"), *data], r"not an apot ONNX export")
    other = _checkpoint(tmp_path / "r18", "resnet18", 3, power=False)
    _one_line_error(capsys, ["--verify", str(file), "--checkpoint", str(other), *data],
                    r"is not the ONNX file's model \(arch='resnet18'; the file has arch=resnet10\)")
    _one_line_error(capsys, ["--checkpoint", str(trained), "--out", str(tmp_path)], r"is a folder")
    _one_line_error(capsys, ["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.onnx")],
                    r"no such file or folder")
    moved = tmp_path / "moved.onnx"  # its source checkpoint is gone
    proto = onnx.load(str(file))
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        "source_checkpoint": str(tmp_path / "gone" / CHECKPOINT_FILE)})
    onnx.save(proto, str(moved))
    _one_line_error(capsys, ["--verify", str(moved), *data], r"source checkpoint .*gone.* is gone")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the extra not installed
    _one_line_error(capsys, ["--checkpoint", str(trained), "--out", str(tmp_path / "y.onnx")],
                    r"needs the optional packages onnx and onnxruntime .*pip install 'apot\[onnx\]'")
    assert not (tmp_path / "y.onnx").exists()
    assert ox.export_trial_onnx({}, {}, tmp_path / "z.onnx") == {}  # the sweep skips it
