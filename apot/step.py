"""The training step, built once per trial: eager, ``torch.compile``d, or replayed as one CUDA graph.

The loop in `apot.train` only ever calls ``loss, logits = step(x, y)``; how that step runs is decided here
(the fast path swaps the step, not the loop). Every mode computes the same thing:

    logits = net(x);  loss = loss_fn(logits, y);  zero the grads;  loss.backward();  optimizer.step()

and returns ``(loss, logits)`` detached. Modes (``TrainConfig.compile``):

    eager      plain PyTorch.
    compile    ``torch.compile`` of the forward and loss (AOTAutograd compiles the backward with it); the
               optimizer step runs eagerly. Works under DDP (the compiled module is the DDP wrapper, so
               Dynamo's DDP optimizer splits the graph at the gradient buckets).
    cudagraph  CUDA, one rank only: the compiled forward, the backward and the optimizer step captured
               together as one CUDA graph after a few warm-up steps, then replayed per batch from static
               input buffers (one launch per step instead of ~900 kernels). Needs an optimizer step free of
               host syncs: `make_capturable` switches SGD to its fused kernel with tensor learning rates
               (schedulers update those in place, so the captured graph follows the schedule).
    auto       cudagraph on one CUDA rank, compile on several, and `CPU_AUTO_MODE` on the CPU.

Compile work shared across trials has one owner, `use_compile_cache`: every trial of a sweep points
Inductor's FX-graph cache and AOTAutograd's cache at one folder in the experiment's storage. With the lookup
tables padded to one size (`apot.quant.TABLE_SCALE`), every bit width and quantizer of an arch has the same
graph, so the first trial of an arch compiles and the others load it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from apot import fused

STEP_MODES = ("auto", "eager", "compile", "cudagraph")
CPU_AUTO_MODE = "eager"
"""What ``auto`` means on a CPU: the fastest CPU step measured (docs/PERFORMANCE.md). Eager on the CPU runs
``channels_last`` (`step_memory_format`) with the quantizers' fused kernels (`apot.fused`, built once per
machine in about a second); ``torch.compile`` of the whole model compiled for minutes and then stepped
slower than eager. ``compile`` is one setting away (``--set train.compile=compile``)."""
COMPILE_BACKEND = os.environ.get("APOT_COMPILE_BACKEND", "inductor")
"""``torch.compile`` backend. ``aot_eager`` traces the same forward and backward graphs (Dynamo +
AOTAutograd) but runs them without code generation: for debugging numerics, and for the DDP test on CPU."""
WARMUP_STEPS = 3
"""Eager/compiled steps before a CUDA graph is captured (cuDNN autotuning, optimizer state, compile)."""

CACHE_DIR_ENV = "APOT_COMPILE_CACHE"  # set by use_compile_cache: where compile_lock keeps its lock files
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Environment read by Inductor/AOTAutograd (also by their compile subprocesses).
CACHE_ENV = {
    "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
    "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    # AOTAutograd skips graphs holding custom autograd Functions (our quantizers) unless told otherwise.
    "TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD": "1",
}


MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 512 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next step (this process, from now on): blocks under
    `MALLOC_MMAP_THRESHOLD` come from its heap, which it gives back to the kernel only above
    `MALLOC_TRIM_THRESHOLD` free. PyTorch's CPU allocator frees every activation to malloc, and glibc's
    adaptive defaults hand much of it back, so each step faulted its memory in again (ResNet-50 FP32: about
    800 page faults and 5-10% of a step; docs/PERFORMANCE.md). Returns False where there is no glibc
    ``mallopt`` (then nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold,
                                                                                  MALLOC_TRIM_THRESHOLD))


def resolve_mode(mode: str, device: torch.device, world_size: int = 1) -> str:
    """The concrete mode (eager, compile or cudagraph) for ``mode`` on ``device`` with ``world_size`` ranks.

    Raises:
        ValueError: unknown mode, or cudagraph asked for on a CPU or with several DDP ranks.
    """
    if mode not in STEP_MODES:
        raise ValueError(f"compile: {mode!r} is not one of {', '.join(STEP_MODES)}")
    if mode == "auto":
        if device.type != "cuda":
            return CPU_AUTO_MODE
        return "cudagraph" if world_size == 1 else "compile"
    if mode == "cudagraph" and device.type != "cuda":
        raise ValueError(f"compile: cudagraph needs a CUDA device, this trial runs on {device}; "
                         "use compile, eager or auto")
    if mode == "cudagraph" and world_size > 1:
        raise ValueError(f"compile: cudagraph captures a single-rank step, this trial has {world_size} DDP "
                         "ranks; use compile (or auto), or resources.workers_per_trial: 1")
    return mode


def step_memory_format(device: torch.device) -> torch.memory_format:
    """The layout of the step's activations: ``channels_last`` on a CPU, where BatchNorm and the
    convolutions run faster in it at these image sizes (docs/PERFORMANCE.md), else contiguous (NCHW).
    Only the batch is converted; the convolutions then hand the layout on. Parameters stay NCHW."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def in_layout(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``x`` with the strides of ``memory_format``, also for one channel (where ``x.contiguous(memory_format=
    torch.channels_last)`` keeps the NCHW strides, and the first convolution would answer in NCHW)."""
    if memory_format == torch.contiguous_format or x.dim() != 4:
        return x.contiguous()
    if x.stride(1) == 1 and x.is_contiguous(memory_format=memory_format):
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format).copy_(x)


def use_compile_cache(folder: str | os.PathLike[str]) -> Path:
    """Point this process's Inductor and AOTAutograd caches at ``folder`` (created, 0700) and enable them.

    Call before the first compile. Every trial of a sweep calls it with the same folder, so graphs compiled by
    one trial are loaded by the next (the caches key on the graph, the torch version and the device, and
    their writes are atomic, so concurrent trials can share the folder). Returns the folder.
    """
    path = Path(folder).resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ.update(CACHE_ENV, TORCHINDUCTOR_CACHE_DIR=str(path), **{CACHE_DIR_ENV: str(path)})
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
        functorch_config.autograd_cache_allow_custom_autograd_functions = True
    return path


@contextlib.contextmanager
def compile_lock(key: str) -> Iterator[None]:
    """Hold an exclusive file lock named ``key`` in the shared compile cache (`use_compile_cache`), if one is
    in use: trials that would compile the same graph at the same time take turns, so only the first
    compiles. Released when the holder exits or dies (``flock``). Single-rank trials only (`TrainStep`)."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if not folder:
        yield
        return
    with open(Path(folder) / f"compile-{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _saved_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s buffers that its state dict saves (BatchNorm statistics), with their names."""
    saved = set(module.state_dict(keep_vars=True))
    return [(n, t) for n, t in module.named_buffers() if n in saved]


COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"


def size_compile_workers(cpus: float) -> int:
    """Size Inductor's pool of compile workers to ``cpus``, the CPUs Ray gave this trial's rank (at least
    one), and return that number. By default Inductor starts as many as the machine has cores, in every
    compiling process: several trials compiling at once would each start that many. Call before the first
    compile; the environment variable reaches Inductor's subprocesses too."""
    workers = max(1, int(cpus))
    os.environ[COMPILE_THREADS_ENV] = str(workers)
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = workers
    return workers


def compile_workers() -> int:
    """The number of compile workers Inductor will use in this process (`size_compile_workers`)."""
    import torch._inductor.config as inductor_config

    return int(inductor_config.compile_threads)


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Switch an SGD optimizer, in place, to a step a CUDA graph can capture: the fused kernel, with every
    group's learning rate a 0-dim tensor on ``device`` (a float lr or the foreach path would sync with the
    host). Values, momentum buffers and parameter groups are unchanged.

    Raises:
        ValueError: not ``torch.optim.SGD`` (the one optimizer this project uses).
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"compile: cudagraph captures torch.optim.SGD steps, got "
                         f"{type(optimizer).__name__}; "
                         "use compile or eager")
    for group in optimizer.param_groups:  # also a tensor lr restored from a checkpoint onto another device
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        group["fused"], group["foreach"] = True, False
    optimizer.defaults.update(fused=True, foreach=False)


class TrainStep:
    """``step(x, y) -> (loss, logits)``, detached: one optimizer step on the batch (see the module doc).

    Attributes:
        mode: the concrete mode (eager, compile, cudagraph).
        memory_format: the layout the batch is put in before the forward (`step_memory_format`).
        setup_s: wall seconds of the calls that compiled or captured (their training work included), and on
            a CPU the build of the quantizers' kernels (`apot.fused.prepare`, about a second once per machine,
            else 0). What a trial records as its compile time.
    """

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, mode: str,
                 world_size: int = 1, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.net, self.optimizer, self.loss_fn, self.mode = net, optimizer, loss_fn, mode
        self.memory_format = memory_format
        self.world_size = world_size
        self.setup_s = 0.0
        self.steps = 0
        self.forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._forward
        if mode != "eager":
            self.forward = torch.compile(self._forward, dynamic=False, backend=COMPILE_BACKEND)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, ...] = ()

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = in_layout(x, self.memory_format)
        logits = self.net(x)
        return self.loss_fn(logits, y), logits

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.forward(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.steps += 1
        if self.steps == 1 and x.device.type == "cpu":
            self.setup_s += fused.prepare()
        if self.mode == "eager" or (self.mode == "compile" and self.steps > 1):
            return self._eager_step(x, y)
        if self._graph is not None:
            if x.shape == self._static[0].shape and y.shape == self._static[1].shape:
                static_x, static_y, loss, logits = self._static
                static_x.copy_(x)
                static_y.copy_(y)
                self._graph.replay()
                return loss, logits
            # Another shape cannot replay the graph, and an eager step would rebind p.grad away from the
            # graph's gradient buffers (every later replay would then update from stale gradients).
            captured = (tuple(self._static[0].shape), tuple(self._static[1].shape))
            raise ValueError(f"compile: cudagraph captured the step for batches of {captured[0]} and labels "
                             f"{captured[1]}, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}; feed full batches only (apot.data drops the last partial "
                             "batch), or use compile")
        start = time.perf_counter()
        # The first call compiles: under the shared cache, one trial compiles a graph while the others
        # with the same graph wait, then load it from the cache instead of compiling it again. Never across
        # DDP ranks: a rank waiting for the lock would block the holder's collectives (a deadlock).
        lock = self.steps == 1 and self.world_size == 1
        with compile_lock(self._graph_key(x)) if lock else contextlib.nullcontext():
            if self.mode == "compile":
                out = self._eager_step(x, y)
            elif self.steps <= WARMUP_STEPS:  # warm up on a side stream, as torch.cuda.graphs asks
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self._eager_step(x, y)
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
            else:
                out = self._capture(x, y)
        self.setup_s += time.perf_counter() - start
        return out

    def _graph_key(self, x: torch.Tensor) -> str:
        """What identifies the compiled graph, so trials compiling the same one take turns (`compile_lock`):
        the names and shapes of the parameters and saved buffers (an arch's FP32 model has no clipping
        parameters, so another key), the batch, the device, the mode and the backend. Unsaved buffers are
        left out: the level sets, whose shapes differ per bit width, are not graph inputs, and the lookup
        tables have one shape for every bit width and quantizer (`apot.quant.TABLE_SCALE`), so all
        quantized trials of an arch share one key."""
        shapes = [(n, tuple(t.shape)) for n, t in [*self.net.named_parameters(), *_saved_buffers(self.net)]]
        text = repr((shapes, tuple(x.shape), x.device.type, self.mode, COMPILE_BACKEND))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Capture forward + backward + optimizer step on static copies of this batch, then replay it once
        (capturing records the kernels without running them)."""
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the grads from its own pool
        # thread_local: only this thread's CUDA calls are checked for capture safety; Ray's and NCCL's
        # threads keep running beside the capture, and the default (global) mode would fail on theirs.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            loss, logits = self.forward(static_x, static_y)
            loss.backward()
            self.optimizer.step()
        self._graph = graph
        self._static = (static_x, static_y, loss.detach(), logits.detach())
        graph.replay()
        torch.cuda.synchronize()
        return self._static[2], self._static[3]


def build_step(
    net: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, *, mode: str = "auto",
    device: torch.device, world_size: int = 1, memory_format: torch.memory_format | None = None,
) -> TrainStep:
    """Build the training step of ``net`` (the module the loop trains: the model, or its DDP wrapper). On a
    CPU this also makes the process keep its freed memory (`keep_freed_memory`).

    Args:
        net: called as ``net(x)`` for the logits.
        optimizer: built by the caller (any parameter groups); only ``cudagraph`` changes it
            (`make_capturable`).
        loss_fn: ``loss_fn(logits, y)`` -> scalar loss.
        mode: one of `STEP_MODES` (``auto`` resolves with `resolve_mode`).
        device, world_size: where the step runs and the number of DDP ranks.
        memory_format: the batch's layout in the step; None: `step_memory_format` of ``device``.
    """
    concrete = resolve_mode(mode, device, world_size)
    if concrete == "cudagraph":
        make_capturable(optimizer, device)
    if concrete != "eager" and device.type == "cuda":
        import torch._inductor.config as inductor_config

        # Triton's fp32 division is approximate by default, eager's correctly rounded; the quantizers project
        # x / alpha onto the levels, so a last-bit difference could move a value across a midpoint.
        if hasattr(inductor_config, "eager_numerics"):
            inductor_config.eager_numerics.division_rounding = True
    if device.type == "cpu":
        keep_freed_memory()
    memory_format = step_memory_format(device) if memory_format is None else memory_format
    return TrainStep(net, optimizer, loss_fn, concrete, world_size, memory_format)
