"""ONNX export that keeps the integer codes: a standard runtime runs an APoT or uniform model from its codes.

    python -m apot.export --checkpoint PATH --out model.onnx          # write the graph
    python -m apot.export --verify model.onnx --data-dir DIR           # onnxruntime vs the checkpoint

Needs the optional packages ``onnx`` and ``onnxruntime`` (``pip install 'apot[onnx]'``).

**What the graph holds** (built node by node with ``onnx.helper`` from the codes of ``apot.export``, not by
tracing the fake-quantized forward: tracing would store the float weights and the training-time projection;
here every tensor in the file is one the export defines). Input ``image``: ``(N, 1, 28, 28)`` float32,
normalised as ``apot.data.normalize``; output ``logits``: ``(N, classes)``. Initializers are named after
the PyTorch modules (``layer1.0.conv1.codes``, ...).

- quantized conv ``<name>``: ``<name>.codes`` (uint8, the weight's shape) and ``<name>.weight_values``
  (float32, the decode table ``alpha_w * weight_levels``); the weight is ``Gather(weight_values,
  Cast(codes))``, then ``Conv``. No float weight tensor of that conv is in the file.
- its activation quantizer: ``u = x / alpha_a``, then the nearest level of the unsigned level set exactly as
  ``apot.quant.project_table``: bin ``k = clip(floor(u S) + S, 0, 2S - 1)`` (S a power of two, so exact),
  compare ``u`` with the one midpoint in that bin (``Greater``), pick the level below or above it
  (``Gather``), multiply by ``alpha_a``. Values above 1 land in the last bin and project to level 1 (the
  clip of ``min(u, 1)``); ties go to the lower level. The same level for every float32 ``u`` as training
  (tests/test_onnx_export.py checks every midpoint and its float neighbours). One table per graph:
  ``act_table.midpoints`` / ``act_table.levels`` (every quantized conv has the same level set).
- 8-bit stem conv and classifier: ``<name>.codes`` (int8; int16 where ``round(w / max(w) * 127)`` falls
  below -128, see ``apot.export``) and ``<name>.scale``; weight ``Cast(codes) / 127 * scale``.
- BatchNorm as ``BatchNormalization`` (inference), residual ``Add``, ``GlobalAveragePool``, ``Gemm``.
- a full-precision (bit 32) trial: the same network with plain float weights.

The model's ``metadata_props`` record the arch, bit, quantizer, width, source checkpoint and epoch, and the
packed and FP32 sizes (``apot.export.packed_size``), so ``--verify`` needs only the file and the data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from apot.atomic import atomic_write
from apot.export import (
    BN_KEYS,
    FP32_BITS,
    KB,
    Coded8bit,
    CodedQuantConv2d,
    ExportError,
    build_model,
    export_model,
)
from apot.models import create_model
from apot.models.resnet import BasicBlock, Bottleneck, ResNet
from apot.quant import FULL_PRECISION, lookup_table, table_levels

FORMAT = "apot-onnx/1"
OPSET = 17  # every operator used exists since opset 13; 17 runs on any onnxruntime of the last years
IR_VERSION = 8  # the IR version of opset 17
BN_EPS = 1e-5  # nn.BatchNorm2d's default, used by every BatchNorm of apot.models
INPUT, OUTPUT = "image", "logits"
ROUNDING_TOL = 1e-4
"""|ONNX logit - PyTorch logit| of an image, relative to the largest |logit| (at least 1), that float32
rounding explains: onnxruntime sums a convolution in another order than PyTorch. An image above it has had
an activation land on a midpoint within that rounding and take the neighbouring level (rare: a few images
in 1,000 for a trained ResNet-18)."""
EXTRA_HINT = "pip install 'apot[onnx]' (or: pip install onnx onnxruntime)"


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``; ``ExportError`` (one line naming the extra) when either is missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the optional packages onnx and onnxruntime "
                          f"({exc.name or 'onnx'} is not installed): {EXTRA_HINT}") from None
    return onnx, onnxruntime


def available() -> bool:
    """Whether the ``onnx`` extra is installed."""
    try:
        require_onnx()
    except ExportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ graph building
class _GraphBuilder:
    """Collects nodes and initializers; every value is named after the module it belongs to."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()

    def constant(self, name: str, value: torch.Tensor | np.ndarray) -> str:
        from onnx import numpy_helper

        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # 0-dim stays
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Add one node; its single output is named ``name`` (made unique)."""
        out, i = name, 1
        while out in self._names:
            out, i = f"{name}_{i}", i + 1
        self._names.add(out)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _scalar(value: float) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


class _ResNetGraph:
    """Emits the ONNX nodes of an ``apot.models.ResNet`` whose quantized layers are the coded twins of
    ``apot.export.build_model`` (``CodedQuantConv2d``, ``Coded8bit``), or of a full-precision ResNet."""

    def __init__(self, model: ResNet | None) -> None:
        from onnx import TensorProto

        self.g = _GraphBuilder()
        self.int64 = TensorProto.INT64
        self.float = TensorProto.FLOAT
        self._act_table: tuple[str, str, int] | None = None
        self.model = model

    # -- layers
    def conv(self, name: str, m: nn.Module, x: str) -> str:
        g = self.g
        if isinstance(m, CodedQuantConv2d):
            x = self.quantize_activation(name, m, x)
            codes = g.op("Cast", [g.constant(f"{name}.codes", m.codes)], f"{name}.codes_int64", to=self.int64)
            weight = g.op("Gather", [g.constant(f"{name}.weight_values", m.weight_values), codes],
                          f"{name}.weight")
            stride, padding, bias = m.stride, m.padding, None
        elif isinstance(m, Coded8bit):
            weight = self.decode_8bit(name, m)
            stride, padding, bias = m.stride, m.padding, m.bias
        elif type(m) is nn.Conv2d:
            weight = g.constant(f"{name}.weight", m.weight)
            stride, padding, bias = m.stride[0], m.padding[0], m.bias
        else:
            raise ExportError(f"layer {name}: {type(m).__name__} has no ONNX form here")
        kernel = list(m.codes.shape[2:] if hasattr(m, "codes") else m.weight.shape[2:])
        inputs = [x, weight] + ([g.constant(f"{name}.bias", bias)] if bias is not None else [])
        return g.op("Conv", inputs, name, kernel_shape=kernel, strides=[stride, stride],
                    pads=[padding] * 4)

    def linear(self, name: str, m: nn.Module, x: str) -> str:
        g = self.g
        if isinstance(m, Coded8bit):
            weight, bias = self.decode_8bit(name, m), m.bias
        elif type(m) is nn.Linear:
            weight, bias = g.constant(f"{name}.weight", m.weight), m.bias
        else:
            raise ExportError(f"layer {name}: {type(m).__name__} has no ONNX form here")
        inputs = [x, weight] + ([g.constant(f"{name}.bias", bias)] if bias is not None else [])
        return g.op("Gemm", inputs, name, transB=1)

    def batchnorm(self, name: str, m: nn.BatchNorm2d, x: str) -> str:
        g = self.g
        params = [g.constant(f"{name}.{key}", getattr(m, key)) for key in BN_KEYS]
        return g.op("BatchNormalization", [x, *params], name, epsilon=float(m.eps))

    def decode_8bit(self, name: str, m: Coded8bit) -> str:
        """``codes / 127 * scale``: the operations (so the float32 values) of ``apot.export.Coded8bit``."""
        g = self.g
        codes = g.op("Cast", [g.constant(f"{name}.codes", m.codes)], f"{name}.codes_float", to=self.float)
        scaled = g.op("Div", [codes, g.constant(f"{name}.127", _scalar(127.0))], f"{name}.codes_127")
        return g.op("Mul", [scaled, g.constant(f"{name}.scale", m.scale.reshape(()))], f"{name}.weight")

    def quantize_activation(self, name: str, m: CodedQuantConv2d, x: str) -> str:
        """``alpha_a * P(min(x / alpha_a, 1))`` through the lookup table of ``apot.quant.project_table``."""
        g = self.g
        midpoints, levels, scale = self.act_table(m.act_levels)
        alpha = g.constant(f"{name}.act_alpha", m.act_alpha.reshape(()))
        u = g.op("Div", [x, alpha], f"{name}.act_u")
        scaled = g.op("Mul", [u, g.constant(f"{name}.S", _scalar(scale))], f"{name}.act_uS")
        shifted = g.op("Add", [g.op("Floor", [scaled], f"{name}.act_floor"),
                               g.constant(f"{name}.S_offset", _scalar(scale))], f"{name}.act_bin_float")
        clipped = g.op("Clip", [shifted, g.constant(f"{name}.bin_min", _scalar(0.0)),
                                g.constant(f"{name}.bin_max", _scalar(2 * scale - 1))],
                       f"{name}.act_bin_clip")
        k = g.op("Cast", [clipped], f"{name}.act_bin", to=self.int64)
        midpoint = g.op("Gather", [midpoints, k], f"{name}.act_midpoint")
        above = g.op("Greater", [u, midpoint], f"{name}.act_above")
        offset = g.op("Mul", [g.op("Cast", [above], f"{name}.act_above_int", to=self.int64),
                              g.constant(f"{name}.bins", np.asarray(2 * scale, dtype=np.int64))],
                      f"{name}.act_offset")
        index = g.op("Add", [k, offset], f"{name}.act_index")
        level = g.op("Gather", [levels, index], f"{name}.act_level")
        return g.op("Mul", [level, alpha], f"{name}.act_quantized")

    def act_table(self, act_levels: torch.Tensor) -> tuple[str, str, int]:
        """(midpoints, levels, S) initializer names of the smallest ``lookup_table`` of the level set,
        made once per graph (every quantized conv of a model has the same activation levels)."""
        if self._act_table is None:
            table = lookup_table(act_levels)
            if not torch.equal(table_levels(table), act_levels):
                raise ExportError("activation levels do not round-trip through their lookup table")
            mids = self.g.constant("act_table.midpoints", table[0])
            levels = self.g.constant("act_table.levels", table[1:].reshape(-1))  # row 1, then row 2
            self._act_table = (mids, levels, table.shape[1] // 2)
        return self._act_table

    # -- network
    def block(self, name: str, b: BasicBlock | Bottleneck, x: str) -> str:
        g = self.g
        identity = x
        if b.downsample is not None:
            identity = self.batchnorm(f"{name}.downsample.1", b.downsample[1],
                                      self.conv(f"{name}.downsample.0", b.downsample[0], x))
        convs = ("conv1", "conv2", "conv3") if isinstance(b, Bottleneck) else ("conv1", "conv2")
        out = x
        for i, conv in enumerate(convs, start=1):
            out = self.batchnorm(f"{name}.bn{i}", getattr(b, f"bn{i}"), self.conv(f"{name}.{conv}",
                                                                                   getattr(b, conv), out))
            if i < len(convs):
                out = g.op("Relu", [out], f"{name}.relu{i}")
        return g.op("Relu", [g.op("Add", [out, identity], f"{name}.add")], f"{name}.out")

    def network(self) -> str:
        g, m = self.g, self.model
        x = g.op("Relu", [self.batchnorm("bn1", m.bn1, self.conv("conv1", m.conv1, INPUT))], "relu")
        x = g.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(m, stage)):
                x = self.block(f"{stage}.{i}", block, x)
        x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "avgpool")], "flatten", axis=1)
        return self.linear("fc", m.fc, x)


def _check_resnet(model: nn.Module) -> None:
    expected = {"avgpool": nn.AdaptiveAvgPool2d, "maxpool": nn.MaxPool2d}
    if not isinstance(model, ResNet) or any(not isinstance(getattr(model, k), t)
                                            for k, t in expected.items()):
        raise ExportError(f"{type(model).__name__} is not an apot.models ResNet; only those export to ONNX")
    if tuple(model.avgpool.output_size) != (1, 1):
        raise ExportError("the ResNet's average pool is not global; cannot write it as GlobalAveragePool")


def build_onnx(model: ResNet, metadata: dict[str, Any]) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (module docstring), checked with ``onnx.checker``.

    Args:
        model: ``apot.export.build_model``'s coded model of a quantized trial, or a full-precision ResNet;
            eval mode, CPU; read only.
        metadata: stored as the model's ``metadata_props`` (values as strings).
    """
    onnx, _ = require_onnx()
    _check_resnet(model)
    graph = _ResNetGraph(model)
    with torch.no_grad():
        logits = graph.network()
    h = graph.g.helper
    image = h.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, ["N", 1, 28, 28])
    classes = (model.fc.codes if isinstance(model.fc, Coded8bit) else model.fc.weight).shape[0]
    out = h.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, ["N", classes])
    graph.g.nodes.append(h.make_node("Identity", [logits], [OUTPUT], name=OUTPUT))
    proto = h.make_model(h.make_graph(graph.g.nodes, "apot", [image], [out], graph.g.initializers),
                         opset_imports=[h.make_opsetid("", OPSET)], producer_name="apot",
                         doc_string="APoT / uniform quantized ResNet from its codes (apot.onnx_export)")
    proto.ir_version = IR_VERSION
    h.set_model_props(proto, {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}})
    onnx.checker.check_model(proto)
    return proto


def fp32_size(model: nn.Module) -> dict[str, Any]:
    """``apot.export.packed_size``'s FP32 count for a full-precision model: every weight, bias and BatchNorm
    value at 32 bits (so the sizes of the FP32 and the quantized graphs of one arch compare)."""
    values = sum(p.numel() for p in model.parameters())
    values += sum(m.running_mean.numel() + m.running_var.numel() for m in model.modules()
                  if isinstance(m, nn.BatchNorm2d))
    bits = values * FP32_BITS
    return {"packed_bits": bits, "fp32_bits": bits, "size_kb": bits / 8 / KB, "fp32_kb": bits / 8 / KB,
            "compression": 1.0}


def onnx_of_model(model: nn.Module, config: dict[str, Any], source: dict[str, Any]) -> tuple[Any, dict]:
    """(``onnx.ModelProto``, size) of a trained model in eval mode: quantized trials through their export
    (``apot.export.export_model``: the codes), full-precision ones as float graphs."""
    require_onnx()
    if int(config["bit"]) == FULL_PRECISION:
        coded, size = model, fp32_size(model)
    else:
        export = export_model(model, config, source)
        coded, size = build_model(export), export["size"]
    metadata = {
        "arch": config["arch"], "bit": config["bit"], "width": config["width"],
        "quantizer": "fp32" if int(config["bit"]) == FULL_PRECISION else
        ("apot" if config["power"] else "uniform"),
        "power": config["power"],
        "source_checkpoint": source.get("checkpoint"), "source_epoch": source.get("epoch"),
        "source_test_acc": source.get("test_acc"),
        "packed_kb": size["size_kb"], "fp32_kb": size["fp32_kb"],
    }
    return build_onnx(coded, metadata), size


def write_onnx(proto: Any, out: Path | str) -> Path:
    """Atomically write ``proto`` to ``out``; returns the path."""
    out = Path(out)
    atomic_write(out, lambda f: f.write(proto.SerializeToString()))
    return out


def export_state_onnx(state: dict[str, Any], source: dict[str, Any], out: Path | str) -> tuple[Path, dict]:
    """Write the ONNX graph of an in-memory checkpoint ``state`` (``model`` and ``config``) to ``out``."""
    config = state["config"]
    model = create_model(config["arch"], config["bit"], power=config["power"], width=config["width"])
    model.load_state_dict({k: v.detach().cpu() for k, v in state["model"].items()})
    proto, size = onnx_of_model(model.eval(), config, source)
    return write_onnx(proto, out), size


# ------------------------------------------------------------------------------------------ running it
def read_onnx(path: Path | str) -> tuple[Any, dict[str, str]]:
    """(``onnx.ModelProto``, metadata) of an apot ONNX file; ``ExportError`` (one line) when the file is
    absent, unreadable or not written by apot."""
    onnx, _ = require_onnx()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError, ...
        text = str(exc).strip().splitlines()
        raise ExportError(f"{path}: cannot read it as ONNX ({type(exc).__name__}: "
                          f"{text[0][:120] if text else ''}); the file is truncated or corrupt: export it "
                          "again") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: not an apot ONNX export (format {meta.get('format')!r}, expected "
                          f"{FORMAT!r})")
    return proto, meta


def session(path: Path | str, threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` of ``path`` (``threads``: intra-op threads; None = ORT's)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_onnx(sess: Any, reference: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 batch: int = 500) -> dict[str, Any]:
    """Score the ONNX session on uint8 ``images`` and compare it with ``reference`` (the fake-quantized
    model): ``correct``, ``total``, ``accuracy`` (percent), ``differing`` (images whose argmax differs),
    ``max_logit_diff``, ``beyond_rounding`` (images whose logits differ by more than ``ROUNDING_TOL``),
    ``seconds`` (onnxruntime's share)."""
    from apot.data import normalize

    correct = differing = beyond = 0
    max_diff, seconds = 0.0, 0.0
    with torch.no_grad():
        for lo in range(0, images.shape[0], batch):
            x = normalize(images[lo:lo + batch])
            y = labels[lo:lo + batch]
            t0 = time.perf_counter()
            a = torch.from_numpy(sess.run([OUTPUT], {INPUT: x.numpy()})[0])
            seconds += time.perf_counter() - t0
            b = reference(x)
            correct += int((a.argmax(1) == y).sum())
            differing += int((a.argmax(1) != b.argmax(1)).sum())
            diff = (a - b).abs().amax(1)
            max_diff = max(max_diff, float(diff.max()))
            beyond += int((diff > ROUNDING_TOL * max(1.0, float(b.abs().max()))).sum())
    total = int(images.shape[0])
    return {"correct": correct, "total": total, "accuracy": 100.0 * correct / total, "differing": differing,
            "max_logit_diff": max_diff, "beyond_rounding": beyond, "seconds": seconds}


def size_line(path: Path, fp32_kb: float, packed_kb: float | None) -> str:
    """The file's size on disk against FP32 (and the packed size of a quantized model)."""
    size_kb = path.stat().st_size / KB
    packed = "" if packed_kb is None else f"; packed {packed_kb:.1f} KB"
    return (f"ONNX file {size_kb:.1f} KB (FP32 {fp32_kb:.1f} KB: 1/{fp32_kb / size_kb:.2f} of it{packed}; "
            "codes stored one byte each)")


# ------------------------------------------------------------------------------------------ CLI parts
def export_main(checkpoint: str, out: str) -> int:
    """``--checkpoint PATH --out FILE.onnx``."""
    from apot.export import model_from_checkpoint

    require_onnx()  # before reading the checkpoint
    model, config, source = model_from_checkpoint(checkpoint, allow_fp32=True)
    proto, size = onnx_of_model(model, config, source)
    path = write_onnx(proto, out)
    kind = "FP32" if int(config["bit"]) == FULL_PRECISION else \
        f"{config['bit']}-bit {'APoT' if config['power'] else 'uniform'}"
    packed = None if int(config["bit"]) == FULL_PRECISION else size["size_kb"]
    print(f"wrote {path}: {config['arch']} {kind} (width {config['width']}), from {source['checkpoint']} "
          f"epoch {source['epoch']}; {size_line(path, size['fp32_kb'], packed)}")
    return 0


def verify_main(file: str, data_dir: str | None, checkpoint: str | None) -> int:
    """``--verify FILE.onnx --data-dir DIR [--checkpoint PATH]``: exit 0 when no prediction differs."""
    from apot.data import resolve_data_dir
    from apot.export import _test_split, model_from_checkpoint

    path = Path(file)
    _, meta = read_onnx(path)  # every input checked before the long part
    ckpt = checkpoint or meta.get("source_checkpoint")
    if not ckpt or ckpt == "None":
        raise ExportError(f"{path}: records no source checkpoint; pass --checkpoint PATH")
    if checkpoint is None and not Path(ckpt).exists():
        raise ExportError(f"{path}: its source checkpoint {ckpt} is gone; pass --checkpoint PATH")
    reference, config, _ = model_from_checkpoint(ckpt, allow_fp32=True)
    mismatch = [k for k in ("arch", "bit", "width") if str(config.get(k)) != meta.get(k)]
    if int(config["bit"]) != FULL_PRECISION and str(config.get("power")) != meta.get("power"):
        mismatch.append("power")
    if mismatch:
        theirs = ", ".join(f"{k}={config.get(k)!r}" for k in mismatch)
        ours = ", ".join(f"{k}={meta.get(k)}" for k in mismatch)
        raise ExportError(f"{ckpt}: is not the ONNX file's model ({theirs}; the file has {ours})")
    sess = session(path)
    images, labels = _test_split(str(resolve_data_dir(data_dir, None)))
    result = compare_onnx(sess, reference, images, labels)
    print(f"test accuracy of the ONNX model (onnxruntime CPU): {result['accuracy']:.2f}% "
          f"({result['correct']}/{result['total']} test images, {result['seconds']:.1f} s)")
    print(f"predictions differing from the fake-quantized checkpoint: {result['differing']} of "
          f"{result['total']} (max |logit difference| {result['max_logit_diff']:.3g}; "
          f"{result['beyond_rounding']} images beyond float32 rounding, where an activation on a midpoint "
          "took its neighbouring level)")
    packed = None if meta.get("quantizer") == "fp32" else float(meta["packed_kb"])
    print(size_line(path, float(meta["fp32_kb"]), packed))
    return 0 if result["differing"] == 0 else 1


def export_trial_onnx(state: dict[str, Any], source: dict[str, Any], out: Path) -> dict[str, Any]:
    """The sweep's ONNX step for a finished trial: ``{}`` without the extra, else the record's fields
    ``onnx_export`` (the file name) or ``onnx_export_error`` (one line). Never raises."""
    if not available():
        return {}
    try:
        path, _ = export_state_onnx(state, source, out)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return {"onnx_export": None, "onnx_export_error": f"{type(exc).__name__}: {text[-1] if text else ''}"}
    return {"onnx_export": f"{path.parent.name}/{path.name}", "onnx_kb": path.stat().st_size / KB}
