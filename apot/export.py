"""Export of a trained quantized model: integer codes, an exact reload, the real (packed) size.

    python -m apot.export --checkpoint PATH --out FILE                  # write the export
    python -m apot.export --verify FILE --data-dir DIR [--checkpoint PATH]   # accuracy, differences, size
    model = apot.export.load(FILE)                                       # an nn.Module from the codes

A FILE ending in ``.onnx`` is an ONNX graph that keeps the codes instead (``apot.onnx_export``; needs the
``onnx`` extra); any other name is the format below.

**What the fake-quantized forward computes, and so what is stored.** A ``QuantConv2d`` convolves
``alpha_a P_a(min(x / alpha_a, 1))`` with ``alpha_w P_w(w')``, ``w' = (w - mean w) / std w``: the weight it
uses is ``alpha_w * weight_levels[i]`` for an integer index ``i`` per weight, in the standardised domain
(the mean and std are never multiplied back; they only choose ``i``, and the following BatchNorm absorbs the
scale). Folding the mean and std in is therefore the identity: the decode table of a layer is
``weight_values = alpha_w * weight_levels`` and its weight is ``weight_values[codes]``, bit for bit the
weight the fake-quantized forward uses (checked at export). The 8-bit stem conv and classifier use
``round(w / m * 127) / 127 * m`` with ``m = max(w)``: stored as the integer codes ``round(w / m * 127)`` and
``scale = m``, decoded with the same operations.

**File** (``torch.save`` of plain dicts, tensors, ints, floats and strings, so ``torch.load(...,
weights_only=True)`` reads it; ``load`` reads it no other way)::

    format       "apot-export/1"
    arch, bit, power, quantizer ("apot" | "uniform"), width, num_classes, config (the trial's TrainConfig)
    source       {"checkpoint": path, "epoch": int, "test_acc": float | None}
    layers       {module name: entry}, in model order; entry "kind" is
                   "quant_conv": codes (uint8, the weight's shape: index into weight_levels),
                                 weight_levels (float32, signed, in units of alpha_w), weight_alpha (0-dim),
                                 weight_values (float32 = weight_alpha * weight_levels: the decode table),
                                 act_levels (float32, unsigned), act_alpha (0-dim), stride, padding
                   "int8_conv" / "int8_linear": codes (int8; int16 where they do not fit, see below),
                                 scale (0-dim, w = codes / 127 * scale), bias (float32 or None),
                                 stride, padding (conv only)
    batchnorm    {"<bn name>.weight" / ".bias" / ".running_mean" / ".running_var": float32}
    size         packed_bits, fp32_bits, size_kb, fp32_kb, compression (``packed_size``)
    max_weight_error   max |decoded - fake-quantized| weight over all layers (0.0: bit for bit)

The float weights of the quantized convs are not in the file.

**Packed size** (``packed_size``): ceil(log2(levels)) bits per quantized-conv weight; 8 bits per weight of
the first and last layers; 32 bits per BatchNorm value (weight, bias, running mean and variance per
channel), per bias, per alpha (two per quantized conv) and per 8-bit scale; the two level sets once (they
are fixed by bit and quantizer). FP32: every weight, bias and BatchNorm value at 32 bits. KB = 1024 bytes;
``compression`` = FP32 / packed.

The reference's 8-bit rule scales by max(w), not max|w|: where a layer's most negative weight is larger in
magnitude than its largest, codes fall below -128 (about one layer in five at initialisation). They are then
stored as int16 and counted at the bits their range needs (9 or more), so the size stays true.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from apot.atomic import atomic_write
from apot.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, model_from_state
from apot.errors import exit_with_error
from apot.layers import Conv2d8bit, Linear8bit, QuantConv2d
from apot.models import create_model
from apot.quant import (
    FULL_PRECISION,
    LEVEL_BITS,
    quantize_8bit,
    quantize_activation,
)
from apot.recipe import quantizer_name

FORMAT = "apot-export/1"
ONNX_SUFFIX = ".onnx"  # --out / --verify FILE.onnx: apot.onnx_export
FP32_BITS = 32
KB = 1024
BN_KEYS = ("weight", "bias", "running_mean", "running_var")
_EPOCH_DIR = re.compile(r"checkpoint_epoch(\d+)")


class ExportError(RuntimeError):
    """Input that cannot be exported or loaded; the message is one line naming the file and the problem."""


# ------------------------------------------------------------------------------------------ integer codes
def index_dtype(num_levels: int) -> torch.dtype:
    """Smallest integer dtype holding the indices 0..num_levels-1 (uint8 up to 256 levels)."""
    if num_levels <= 2**8:
        return torch.uint8
    return torch.int16 if num_levels <= 2**15 else torch.int32


def code_dtype(low: int, high: int) -> torch.dtype:
    """Smallest signed integer dtype holding every code in [low, high] (int8 for [-128, 127])."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ExportError(f"8-bit codes in [{low}, {high}] do not fit int32")


def signed_bits(low: int, high: int) -> int:
    """Bits of the narrowest two's-complement integer, at least 8, holding every code in [low, high]."""
    bits = 8
    while not (-(2 ** (bits - 1)) <= low and high <= 2 ** (bits - 1) - 1):
        bits += 1
    return bits


def level_codes(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Index into ``values`` of every element of ``weight`` (each must equal one of ``values``), int64."""
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    pos = torch.searchsorted(ordered, weight.reshape(-1)).clamp_(max=values.numel() - 1)
    return order[pos].reshape(weight.shape)


def _finite(name: str, *tensors: torch.Tensor) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ExportError(f"layer {name}: non-finite weights or alpha (the trial diverged); "
                          "nothing to export")


def _quant_conv_entry(name: str, m: QuantConv2d) -> tuple[dict[str, Any], float]:
    """(entry, max |decoded - fake-quantized|); raises if the codes do not reproduce the weight exactly."""
    w, alpha = m.weight.detach(), m.weight_alpha.detach()
    _finite(name, w, alpha, m.act_alpha.detach())
    fake = m.quantized_weight()  # exactly what forward() convolves with
    values = m.weight_levels * alpha  # the same products as the forward's levels[i] * alpha
    codes = level_codes(values, fake)
    if not torch.equal(values[codes], fake):
        raise ExportError(f"layer {name}: weights are not on alpha_w * levels; cannot encode them")
    entry = {
        "kind": "quant_conv",
        "codes": codes.to(index_dtype(values.numel())),
        "weight_levels": m.weight_levels.clone(),
        "weight_alpha": alpha.clone(),
        "weight_values": values.clone(),
        "act_levels": m.act_levels.clone(),
        "act_alpha": m.act_alpha.detach().clone(),
        "stride": int(m.stride[0]),
        "padding": int(m.padding[0]),
    }
    return entry, 0.0


def _int8_entry(name: str, m: nn.Conv2d | nn.Linear) -> tuple[dict[str, Any], float]:
    """The codes ``round(w / m * 127)`` and scale m of ``quantize_8bit``; error vs its forward's weight."""
    w = m.weight.detach()
    _finite(name, w)
    top = w.max()
    top = torch.where(top == 0, torch.ones_like(top), top)
    rounded = (w / top * 127).round()
    codes = rounded.to(code_dtype(int(rounded.min()), int(rounded.max())))
    decoded = codes.to(w.dtype) / 127 * top
    error = float((decoded - quantize_8bit(w)).abs().max())
    conv = isinstance(m, nn.Conv2d)
    entry: dict[str, Any] = {
        "kind": "int8_conv" if conv else "int8_linear",
        "codes": codes,
        "scale": top.clone(),
        "bias": None if m.bias is None else m.bias.detach().clone(),
    }
    if conv:
        entry.update(stride=int(m.stride[0]), padding=int(m.padding[0]))
    return entry, error


def export_model(model: nn.Module, config: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The export dict (module docstring) of a fake-quantized model (``apot.models``, bit < 32).

    Args:
        model: the trained model, any device; read only.
        config: the trial's TrainConfig as a dict (``arch``, ``bit``, ``power``, ``width`` are used).
        source: where it came from (``checkpoint``, ``epoch``, ``test_acc``), stored as given.
    """
    bit = int(config["bit"])
    if bit == FULL_PRECISION:
        raise ExportError("a full-precision (bit 32) model has no quantized weights to export; "
                          f"export a trial with bit in {LEVEL_BITS}")
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()  # the caller's model stays where it is
    layers: dict[str, dict[str, Any]] = {}
    batchnorm: dict[str, torch.Tensor] = {}
    max_error = 0.0
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QuantConv2d):
                layers[name], error = _quant_conv_entry(name, m)
            elif isinstance(m, (Conv2d8bit, Linear8bit)):
                layers[name], error = _int8_entry(name, m)
            elif isinstance(m, nn.BatchNorm2d):
                for key in BN_KEYS:
                    batchnorm[f"{name}.{key}"] = getattr(m, key).detach().clone()
                continue
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                raise ExportError(f"layer {name} is a full-precision {type(m).__name__}; nothing to export")
            else:
                continue
            max_error = max(max_error, error)
    fc = layers.get("fc")
    export = {
        "format": FORMAT,
        "arch": str(config["arch"]),
        "bit": bit,
        "power": bool(config["power"]),
        "quantizer": quantizer_name(config["power"]),
        "width": int(config["width"]),
        "num_classes": int(fc["codes"].shape[0]) if fc else 10,
        "config": dict(config),
        "source": dict(source),
        "layers": layers,
        "batchnorm": batchnorm,
        "max_weight_error": max_error,
    }
    export["size"] = packed_size(export)
    return export


# ------------------------------------------------------------------------------------------ size
def packed_size(export: dict[str, Any]) -> dict[str, Any]:
    """Packed and FP32 sizes of an export (the formula in the module docstring).

    Returns ``{"packed_bits", "fp32_bits", "size_kb", "fp32_kb", "compression"}`` (KB = 1024 bytes,
    compression = fp32 / packed).
    """
    packed = fp32 = 0
    level_sets = 0
    for entry in export["layers"].values():
        codes = entry["codes"]
        fp32 += codes.numel() * FP32_BITS
        if entry["kind"] == "quant_conv":
            packed += codes.numel() * math.ceil(math.log2(entry["weight_levels"].numel()))
            packed += 2 * FP32_BITS  # alpha_w, alpha_a
            level_sets = (entry["weight_levels"].numel() + entry["act_levels"].numel()) * FP32_BITS
        else:
            packed += codes.numel() * signed_bits(int(codes.min()), int(codes.max())) + FP32_BITS  # + scale
            if entry["bias"] is not None:
                packed += entry["bias"].numel() * FP32_BITS
                fp32 += entry["bias"].numel() * FP32_BITS
    bn = sum(t.numel() for t in export["batchnorm"].values()) * FP32_BITS
    packed += bn + level_sets
    fp32 += bn
    return {
        "packed_bits": packed,
        "fp32_bits": fp32,
        "size_kb": packed / 8 / KB,
        "fp32_kb": fp32 / 8 / KB,
        "compression": fp32 / packed,
    }


# ------------------------------------------------------------------------------------------ the reload
class CodedQuantConv2d(nn.Module):
    """Inference twin of ``QuantConv2d`` rebuilt from codes: conv(alpha_a P_a(min(x / alpha_a, 1)),
    weight_values[codes]). The decoded weight is computed once, here (a non-persistent buffer);
    ``act_table`` is the lookup table ``QuantConv2d`` builds for these activation levels."""

    def __init__(self, entry: dict[str, Any], act_table: torch.Tensor) -> None:
        super().__init__()
        self.stride, self.padding = entry["stride"], entry["padding"]
        self.register_buffer("codes", entry["codes"])
        self.register_buffer("weight_values", entry["weight_values"])
        self.register_buffer("act_levels", entry["act_levels"])
        self.register_buffer("act_alpha", entry["act_alpha"])
        self.register_buffer("act_table", act_table, persistent=False)
        self.register_buffer("weight", entry["weight_values"][entry["codes"].long()], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activation(x, self.act_alpha, self.act_levels, self.act_table)
        return F.conv2d(x, self.weight, None, self.stride, self.padding)


class Coded8bit(nn.Module):
    """Inference twin of ``Conv2d8bit`` / ``Linear8bit``: weight = codes / 127 * scale, decoded once."""

    def __init__(self, entry: dict[str, Any]) -> None:
        super().__init__()
        self.conv = entry["kind"] == "int8_conv"
        self.stride, self.padding = entry.get("stride", 1), entry.get("padding", 0)
        self.register_buffer("codes", entry["codes"])
        self.register_buffer("scale", entry["scale"])
        self.register_buffer("bias", entry["bias"])
        self.register_buffer("weight", entry["codes"].to(torch.float32) / 127 * entry["scale"],
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return F.linear(x, self.weight, self.bias)


def _fail(path: Path | str, problem: str) -> ExportError:
    return ExportError(f"{path}: {problem}")


def read_export(path: Path | str) -> dict[str, Any]:
    """The export dict of ``path``, read with ``weights_only=True``; ``ExportError`` (one line) when the file
    is absent, unreadable (truncated, corrupt) or not an apot export."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such export file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        if "Weights only load failed" in str(exc):  # a well-formed pickle of arbitrary objects: never run it
            raise _fail(path, "not an apot export: it holds Python objects, not only tensors and plain "
                              "containers (a training checkpoint? export it with --checkpoint)") from None
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
        raise _fail(path, f"cannot read export ({type(exc).__name__}: {text[0][:120] if text else ''}); "
                          "the file is truncated, corrupt or not an apot export: export it again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        hint = " (a training checkpoint: export it with --checkpoint)" if isinstance(data, dict) and \
            "optimizer" in data else ""
        raise _fail(path, f"not an apot export (format {found!r}, expected {FORMAT!r}){hint}")
    return data


def _check_entry(path: Path, name: str, entry: Any, skeleton: nn.Module) -> None:
    """One line if ``entry`` cannot replace ``skeleton`` (wrong kind, shape, dtype or code range)."""
    kind = "quant_conv" if isinstance(skeleton, QuantConv2d) else \
        "int8_conv" if isinstance(skeleton, nn.Conv2d) else "int8_linear"
    if not isinstance(entry, dict) or entry.get("kind") != kind:
        raise _fail(path, f"layer {name}: expected a {kind} entry")
    codes = entry.get("codes")
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or \
            codes.shape != skeleton.weight.shape:
        raise _fail(path, f"layer {name}: codes must be an integer tensor of shape "
                          f"{tuple(skeleton.weight.shape)}")
    if kind == "quant_conv":
        values = entry.get("weight_values")
        if not isinstance(values, torch.Tensor) or values.shape != skeleton.weight_levels.shape:
            levels = skeleton.weight_levels.numel()
            raise _fail(path, f"layer {name}: weight_values must hold {levels} levels")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= values.numel()):
            raise _fail(path, f"layer {name}: codes outside 0..{values.numel() - 1}")
        for key in ("weight_levels", "act_levels"):
            value = entry.get(key)
            if not isinstance(value, torch.Tensor) or not torch.equal(value, getattr(skeleton, key)):
                raise _fail(path, f"layer {name}: {key} are not those of {skeleton.config.bit}-bit "
                                  f"{'APoT' if skeleton.config.power else 'uniform'}")


def build_model(export: dict[str, Any], path: Path | str = "<export>") -> nn.Module:
    """The ``nn.Module`` (eval mode, CPU) of an export dict: the arch's network with every quantized layer
    replaced by its coded twin and the BatchNorm values loaded. ``ExportError`` if the dict does not fit."""
    path = Path(path)
    try:
        arch, bit, power = export["arch"], export["bit"], export["power"]
        model = create_model(arch, bit, power=power, num_classes=export["num_classes"], width=export["width"])
        layers, batchnorm = export["layers"], export["batchnorm"]
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"incomplete export ({type(exc).__name__}: {exc}); export it again") from None
    kinds = (QuantConv2d, Conv2d8bit, Linear8bit)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    if set(quantized) != set(layers):
        extra = sorted(set(layers) ^ set(quantized))[:3]
        raise _fail(path, f"layers do not match {arch} width {export['width']} (e.g. {', '.join(extra)})")
    for name, skeleton in quantized.items():
        entry = layers[name]
        _check_entry(path, name, entry, skeleton)
        if isinstance(skeleton, QuantConv2d):
            twin: nn.Module = CodedQuantConv2d(entry, skeleton.act_table)
        else:
            twin = Coded8bit(entry)
        model.set_submodule(name, twin)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            for key in BN_KEYS:
                value = batchnorm.get(f"{name}.{key}")
                if not isinstance(value, torch.Tensor) or value.shape != getattr(m, key).shape:
                    raise _fail(path, f"batchnorm {name}.{key} missing or of the wrong shape")
                with torch.no_grad():
                    getattr(m, key).copy_(value)
    return model.eval()


def load(path: Path | str) -> nn.Module:
    """Rebuild the quantized model of an export file (eval mode, CPU); same predictions as the checkpoint's
    fake-quantized model. Raises ``ExportError`` (one line) for a missing, corrupt or foreign file."""
    return _rebuild(read_export(path), path)


def _rebuild(export: dict[str, Any], path: Path | str) -> nn.Module:
    """``build_model`` with any failure turned into one ``ExportError`` line naming ``path``."""
    try:
        return build_model(export, path)
    except ExportError:
        raise
    except Exception as exc:  # a well-formed file with ill-formed content
        text = str(exc).strip().splitlines()
        raise _fail(path, f"malformed export ({type(exc).__name__}: {text[0][:120] if text else ''}); "
                          "export it again") from None


# ------------------------------------------------------------------------------------------ checkpoints
def find_checkpoint(path: Path | str) -> Path:
    """The checkpoint folder a user means by ``path``: a ``checkpoint.pt`` file's folder, a folder holding
    ``checkpoint.pt`` (``apot.train --out``, a sweep's ``checkpoint_epochNNN``) or a sweep trial folder
    (``<experiment>/train/<trial>``: its latest ``checkpoint_epochNNN``)."""
    path = Path(path)
    if path.is_file():
        if path.name == CHECKPOINT_FILE:
            return path.parent
        raise _fail(path, f"not a trial checkpoint (expected {CHECKPOINT_FILE}, a checkpoint folder, a sweep "
                          "trial folder <experiment>/train/<trial> or the --out folder of apot.train)")
    if not path.is_dir():
        raise _fail(path, "no such file or folder")
    if (path / CHECKPOINT_FILE).is_file():
        return path
    epochs = [(int(m.group(1)), p) for p in path.iterdir()
              if (m := _EPOCH_DIR.fullmatch(p.name)) and (p / CHECKPOINT_FILE).is_file()]
    if not epochs:
        raise _fail(path, f"no {CHECKPOINT_FILE} and no checkpoint_epochNNN/ folder here; pass a sweep trial "
                          "folder <experiment>/train/<trial> or the --out folder of apot.train")
    return max(epochs)[1]


def model_from_checkpoint(path: Path | str, allow_fp32: bool = False
                          ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(fake-quantized model on CPU in eval mode, its config, source) of a trial checkpoint
    (``find_checkpoint``), read through ``apot.checkpoint.load_checkpoint``. One-line ``ExportError`` /
    ``CheckpointError`` for an unreadable or foreign file, a bit-32 checkpoint (unless ``allow_fp32``: the
    ONNX export writes those as float graphs), or a model that does not match its config."""
    folder = find_checkpoint(path)
    state = load_checkpoint(folder)
    file = folder / CHECKPOINT_FILE
    if state is None:
        raise _fail(file, "no such checkpoint")
    config = state["config"]
    if not isinstance(config, dict) or any(k not in config for k in ("arch", "bit", "power", "width")):
        raise _fail(file, "not an apot checkpoint (its config lacks arch, bit, power or width)")
    if config["bit"] == FULL_PRECISION and not allow_fp32:
        raise _fail(file, "a full-precision (bit 32) checkpoint has no quantized weights to export; "
                          f"export a trial with bit in {LEVEL_BITS} (or --out FILE.onnx: a float graph)")
    try:
        model = model_from_state(state)
    except (ValueError, RuntimeError, TypeError) as exc:
        problem = str(exc).strip().splitlines()[0][:160]
        raise _fail(file, f"model weights do not match its config ({problem})") from None
    history = state.get("history") or []
    source = {
        "checkpoint": str(file.resolve()),
        "epoch": int(state["epoch"]),
        "test_acc": history[-1].get("test_acc") if history and isinstance(history[-1], dict) else None,
    }
    return model.eval(), config, source


def export_state(state: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The export dict of an in-memory checkpoint ``state`` (``model`` state dict and ``config``)."""
    return export_model(model_from_state(state).eval(), state["config"], source)


def write_export(export: dict[str, Any], out: Path | str) -> Path:
    """Atomically ``torch.save`` the export dict to ``out``; returns the path."""
    out = Path(out)
    atomic_write(out, lambda f: torch.save(export, f))
    return out


# ------------------------------------------------------------------------------------------ verify
def _test_split(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    from apot.data import load_split

    return load_split(data_dir, train=False, download=False)


def compare(
    exported: nn.Module, reference: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000
) -> dict[str, Any]:
    """Score ``exported`` on uint8 ``images`` and compare it with ``reference`` (the fake-quantized model).

    Returns ``correct``, ``total``, ``accuracy`` (percent), ``differing`` (images whose argmax differs),
    ``identical`` (every logit bit for bit equal) and ``max_logit_diff``.
    """
    from apot.data import normalize

    correct = differing = 0
    identical, max_diff = True, 0.0
    with torch.no_grad():
        for lo in range(0, images.shape[0], batch):
            x = normalize(images[lo:lo + batch])
            y = labels[lo:lo + batch]
            a, b = exported(x), reference(x)
            correct += int((a.argmax(1) == y).sum())
            differing += int((a.argmax(1) != b.argmax(1)).sum())
            identical = identical and torch.equal(a, b)
            max_diff = max(max_diff, float((a - b).abs().max()))
    total = int(images.shape[0])
    return {"correct": correct, "total": total, "accuracy": 100.0 * correct / total, "differing": differing,
            "identical": identical, "max_logit_diff": max_diff}


def size_line(size: dict[str, Any]) -> str:
    return (f"packed size {size['size_kb']:.1f} KB (FP32 {size['fp32_kb']:.1f} KB; "
            f"1/{size['compression']:.2f} of FP32)")


def _check_out(checkpoint: str, out: str) -> None:
    if Path(out).is_dir():
        raise _fail(out, "is a folder; --out takes the export file to write")
    if Path(out).resolve() == (find_checkpoint(checkpoint) / CHECKPOINT_FILE).resolve():
        raise _fail(out, "is the checkpoint itself; write the export to another file")


def _export_main(checkpoint: str, out: str) -> int:
    _check_out(checkpoint, out)
    model, config, source = model_from_checkpoint(checkpoint)
    export = export_model(model, config, source)
    path = write_export(export, out)
    quantizer = "APoT" if export["power"] else "uniform"
    print(f"wrote {path}: {export['arch']} {export['bit']}-bit {quantizer} (width {export['width']}), "
          f"from {source['checkpoint']} epoch {source['epoch']}; {size_line(export['size'])}; "
          f"file {path.stat().st_size / KB:.1f} KB on disk (uint8 codes, unpacked)")
    return 0


def _verify_main(file: str, data_dir: str, checkpoint: str | None) -> int:
    from apot.data import resolve_data_dir

    export = read_export(file)  # every input checked before the long part
    exported = _rebuild(export, file)
    ckpt = checkpoint or export.get("source", {}).get("checkpoint")
    if not ckpt:
        raise _fail(file, "records no source checkpoint; pass --checkpoint PATH")
    if checkpoint is None and not Path(ckpt).exists():
        raise _fail(file, f"its source checkpoint {ckpt} is gone; pass --checkpoint PATH")
    reference, config, _ = model_from_checkpoint(ckpt)
    mismatch = [k for k in ("arch", "bit", "power", "width") if config.get(k) != export.get(k)]
    if mismatch:
        theirs = ", ".join(f"{k}={config.get(k)!r}" for k in mismatch)
        ours = ", ".join(f"{k}={export.get(k)!r}" for k in mismatch)
        raise _fail(ckpt, f"is not the export's model ({theirs}; the export has {ours})")
    images, labels = _test_split(str(resolve_data_dir(data_dir, None)))
    result = compare(exported, reference, images, labels)
    logits = "logits bit-identical" if result["identical"] else \
        f"max |logit difference| {result['max_logit_diff']:.3g}"
    print(f"test accuracy of the loaded export: {result['accuracy']:.2f}% "
          f"({result['correct']}/{result['total']} test images)")
    print(f"predictions differing from the fake-quantized checkpoint: {result['differing']} of "
          f"{result['total']} ({logits})")
    print(size_line(export["size"]))
    return 0 if result["differing"] == 0 else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m apot.export",
        description="Export a trained quantized model as integer codes, or verify an export.")
    p.add_argument("--checkpoint", help="trial checkpoint: checkpoint.pt, its folder, a sweep trial folder "
                                        "or apot.train's --out (with --verify: overrides the stored one)")
    p.add_argument("--out", help="export file to write (FILE.onnx: an ONNX graph of the codes, needs the "
                                 "onnx extra; else apot's own format)")
    p.add_argument("--verify", metavar="FILE", help="export file (.pt or .onnx) to check against the "
                                                    "checkpoint")
    p.add_argument("--data-dir", default=None,
                   help="MNIST root for --verify (default: $APOT_DATA_DIR or ./data)")
    args = p.parse_args(argv)
    if args.verify is None and (args.checkpoint is None or args.out is None):
        p.error("give --checkpoint PATH --out FILE, or --verify FILE --data-dir DIR")
    if args.verify is not None and args.out is not None:
        p.error("--out and --verify do not go together")
    return args


def main(argv: list[str] | None = None) -> int:
    from apot import onnx_export
    from apot.data import MNISTDataError

    args = parse_args(argv)
    try:
        if args.verify is not None:
            if Path(args.verify).suffix == ONNX_SUFFIX:
                return onnx_export.verify_main(args.verify, args.data_dir, args.checkpoint)
            return _verify_main(args.verify, args.data_dir, args.checkpoint)
        if Path(args.out).suffix == ONNX_SUFFIX:
            _check_out(args.checkpoint, args.out)
            return onnx_export.export_main(args.checkpoint, args.out)
        return _export_main(args.checkpoint, args.out)
    except (ExportError, CheckpointError, MNISTDataError) as exc:
        return exit_with_error(exc)


if __name__ == "__main__":
    sys.exit(main())
