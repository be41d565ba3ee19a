"""Fused CPU kernels of the quantizers: one pass forward, one pass backward (``fused_quant.c``).

The quantizers in `apot.quant` call these on float32 CPU tensors in a dense layout (NCHW or
``channels_last``) when the kernels are available; elsewhere (CUDA, other dtypes, under ``torch.compile``,
no C compiler) they run the same math as torch operations. Both give the same projections bit for bit; the
alpha gradients are summed in double here, in float32 by torch, so they agree to float32 rounding.

Per activation quantizer and step, the kernels read the input once and write the output once (forward),
then read the input and the incoming gradient once and write the input gradient once (backward, which
recomputes the projection instead of storing it); torch operations take about ten passes for the same.

The C file is compiled once per machine with the system C compiler (``cc``, or ``$CC``) into a private cache
folder, ``$APOT_KERNEL_CACHE`` or ``~/.cache/apot/kernels`` (0700), named by a hash of the source, the flags
and the CPU, and loaded with ``ctypes``; a build takes about a second (`build_seconds`). ``APOT_FUSED=0``
turns the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fused_quant.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp")
"""No -ffast-math and no fused multiply-add: every float operation is the one torch performs."""

_state: dict[str, object] = {"lib": None, "error": None, "enabled": os.environ.get("APOT_FUSED", "1") != "0",
                             "claimed_s": 0.0}
build_seconds = 0.0
"""Seconds this process spent compiling the kernels (0 when it loaded them from the cache)."""


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags (a build is never shared across CPUs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "apot" / "kernels"
    path = Path(os.environ.get("APOT_KERNEL_CACHE", default))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:  # a library loaded from here runs as this user
        raise RuntimeError(f"kernel cache {path} is not private (owned by uid {info.st_uid}, mode "
                           f"{info.st_mode & 0o777:o}); make it yours, mode 0700, or set APOT_KERNEL_CACHE")
    return path


def _build() -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernels; raises RuntimeError naming what failed."""
    global build_seconds
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC, or APOT_FUSED=0 to silence this)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(repr((source, FLAGS, compiler, _cpu_signature())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"fused_quant-{key}.so"
    if not target.exists():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # private; renamed into place atomically
            built = Path(tmp) / target.name
            run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                                 capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {run.stderr.strip()[-500:]}")
            os.replace(built, target)
        build_seconds += time.perf_counter() - start
    lib = ctypes.CDLL(str(target))
    p, n, f, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_double
    signatures = {
        "quant_forward": ([p, p, n, f, f, f, p, i, i], None),
        "quant_backward": ([p, p, p, n, f, f, f, i, p, i, f, f, i], d),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None when turned off or when the build failed (`error`)."""
    if not _state["enabled"] or _state["error"] is not None:
        return None
    if _state["lib"] is None:
        try:
            _state["lib"] = _build()
        except (OSError, RuntimeError) as exc:
            _state["error"] = str(exc)
            return None
    return _state["lib"]  # type: ignore[return-value]


def prepare() -> float:
    """Build or load the kernels now; returns the build seconds not yet returned by an earlier call (what a
    trial counts as its compile time: `apot.step.TrainStep` calls this on its first CPU step)."""
    library()
    seconds = build_seconds - _state["claimed_s"]  # type: ignore[operator]
    _state["claimed_s"] = build_seconds
    return seconds


def error() -> str | None:
    """Why the kernels are unavailable (None if they are, or were not tried yet)."""
    return _state["error"]  # type: ignore[return-value]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the quantizers as torch operations inside this block (the reference the kernels are tested on)."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def usable(t: torch.Tensor, table: torch.Tensor | None) -> bool:
    """True when the kernels can quantize ``t`` with ``table``: float32 on the CPU, a dense layout, eager
    (not traced by ``torch.compile``), and the kernels built."""
    return (
        table is not None and t.dtype == torch.float32 and table.dtype == torch.float32
        and t.device.type == "cpu" and table.device.type == "cpu" and table.is_contiguous() and _dense(t)
        and not torch.compiler.is_compiling() and library() is not None
    )


def _like(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``g`` in ``t``'s memory layout (the kernels walk both in memory order)."""
    return g if g.stride() == t.stride() else torch.empty_like(t).copy_(g)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def act_forward(x: torch.Tensor, alpha: float, table: torch.Tensor) -> torch.Tensor:
    """alpha * P(x / alpha), in ``x``'s layout."""
    return _forward(x, 0.0, alpha, alpha, table)


def act_backward(x: torch.Tensor, g: torch.Tensor, alpha: float, table: torch.Tensor, high: float,
                 need_grad_x: bool) -> tuple[torch.Tensor | None, float]:
    """(g keep(u), sum g (P(u) - u keep(u))) with u = x / alpha; keep(u) = [u < high]."""
    return _backward(x, g, 0.0, alpha, 1.0, True, table, float("-inf"), high, need_grad_x)


def weight_forward(w: torch.Tensor, mean: float, scale: float, alpha: float,
                   table: torch.Tensor) -> torch.Tensor:
    """alpha * P((w - mean) / scale), in ``w``'s layout."""
    return _forward(w, mean, scale, alpha, table)


def weight_backward(w: torch.Tensor, g: torch.Tensor, mean: float, scale: float, std: float,
                    table: torch.Tensor, low: float, high: float,
                    need_grad_w: bool) -> tuple[torch.Tensor | None, float]:
    """(g / std, sum g (P(u) - u keep(u))) with u = (w - mean) / scale; keep(u) = [low < u < high]."""
    return _backward(w, g, mean, scale, std, False, table, low, high, need_grad_w)


def _forward(x: torch.Tensor, shift: float, scale: float, alpha: float, table: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    library().quant_forward(x.data_ptr(), out.data_ptr(), x.numel(), shift, scale, alpha, table.data_ptr(),
                            table.shape[1], torch.get_num_threads())
    return out


def _backward(x: torch.Tensor, g: torch.Tensor, shift: float, scale: float, grad_div: float,
              mask_grad: bool, table: torch.Tensor, low: float, high: float,
              need_grad: bool) -> tuple[torch.Tensor | None, float]:
    g = _like(g, x)
    grad_x = torch.empty_like(x) if need_grad else None
    total = library().quant_backward(x.data_ptr(), g.data_ptr(), _ptr(grad_x), x.numel(), shift, scale,
                                     grad_div, int(mask_grad), table.data_ptr(), table.shape[1], low, high,
                                     torch.get_num_threads())
    return grad_x, total
