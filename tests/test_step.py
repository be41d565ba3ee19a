"""The training step builder (apot/step.py): padded tables, eager vs compiled, DDP + compile, CUDA graphs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apot.layers import QuantConv2d
from apot.quant import (
    LEVEL_BITS,
    TABLE_SCALE,
    ActQuantFn,
    WeightQuantFn,
    levels,
    lookup_table,
    midpoints,
    nearest_level,
    project,
    project_table,
    table_levels,
)
from apot.step import CACHE_DIR_ENV, CACHE_ENV, build_step, make_capturable, resolve_mode, use_compile_cache

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
VARIANTS = [(bit, power, signed) for bit in LEVEL_BITS for power in (True, False) for signed in (True, False)]


def _probe_points(level_set: torch.Tensor) -> torch.Tensor:
    """Every midpoint and its float32 neighbours, every level, a dense grid over [-1.5, 1.5], and NaN-free
    extremes: where a wrong bin or a wrong compare would show."""
    bounds = midpoints(level_set)
    up = torch.nextafter(bounds, torch.full_like(bounds, 2.0))
    down = torch.nextafter(bounds, torch.full_like(bounds, -2.0))
    grid = torch.linspace(-1.5, 1.5, 30001)
    gen = torch.Generator().manual_seed(0)
    return torch.cat([bounds, up, down, level_set, grid, torch.rand(20000, generator=gen) * 2.2 - 1.1,
                      torch.tensor([-1e30, 1e30, -1.0, 1.0, 0.0])])


# ---------------------------------------------------------------------------------------- padded tables
@pytest.mark.parametrize(("bit", "power", "signed"), VARIANTS)
def test_padded_table_projects_exactly_as_the_unpadded_one(bit: int, power: bool, signed: bool) -> None:
    lv = levels(bit, power, signed)
    small, padded = lookup_table(lv), lookup_table(lv, TABLE_SCALE)
    assert padded.shape == (3, 2 * TABLE_SCALE)  # one shape for every variant: one compiled graph
    u = _probe_points(lv)
    expected = project(u, lv)
    assert torch.equal(project_table(u, small), expected)
    assert torch.equal(project_table(u, padded), expected)
    assert torch.equal(table_levels(padded), lv)  # the exact level set, for the fallback projection
    assert torch.equal(nearest_level(u.double(), table_levels(padded)), project(u.double(), lv))


@pytest.mark.parametrize(("bit", "power"), [(b, p) for b in LEVEL_BITS for p in (True, False)])
def test_padded_tables_quantize_weights_and_activations_exactly(bit: int, power: bool) -> None:
    gen = torch.Generator().manual_seed(bit)
    w = torch.randn(8, 4, 3, 3, generator=gen)
    x = torch.randn(2, 4, 6, 6, generator=gen).relu() * 3
    alpha = torch.tensor(1.7)
    for fn, t, signed in ((WeightQuantFn, w, True), (ActQuantFn, x, False)):
        lv = levels(bit, power, signed)
        outs, grads = [], []
        for level_set, table in ((lv, lookup_table(lv)), (None, lookup_table(lv, TABLE_SCALE))):
            t_req, a_req = t.clone().requires_grad_(), alpha.clone().requires_grad_()
            out = fn.apply(t_req, a_req, level_set, table)
            out.backward(torch.ones_like(out))
            outs.append(out.detach())
            grads.append((t_req.grad, a_req.grad))
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_lookup_table_refuses_a_scale_too_small_or_not_a_power_of_two() -> None:
    lv = levels(4, True, False)
    with pytest.raises(ValueError, match=r"scale 2: must be a power of two >= 64"):
        lookup_table(lv, 2)
    with pytest.raises(ValueError, match=r"scale 96: must be a power of two"):
        lookup_table(lv, 96)


# ---------------------------------------------------------------------------------------- modes
def test_resolve_mode() -> None:
    assert resolve_mode("auto", CPU) == "eager"  # not shown to pay off on a CPU (apot.step.CPU_AUTO_MODE)
    assert resolve_mode("auto", torch.device("cuda", 0)) == "cudagraph"
    assert resolve_mode("auto", torch.device("cuda", 0), world_size=2) == "compile"
    assert resolve_mode("compile", CPU, world_size=2) == "compile"
    with pytest.raises(ValueError, match=r"compile: cudagraph needs a CUDA device, this trial runs on cpu"):
        resolve_mode("cudagraph", CPU)
    with pytest.raises(ValueError, match=r"cudagraph captures a single-rank step, this trial has 2 DDP"):
        resolve_mode("cudagraph", torch.device("cuda", 0), world_size=2)
    with pytest.raises(ValueError, match=r"compile: 'fast' is not one of auto, eager, compile, cudagraph"):
        resolve_mode("fast", CPU)


@pytest.fixture
def compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`use_compile_cache` for one test: the environment variables and torch settings it changes are put
    back afterwards, so later tests do not compile into (or load from) this test's folder."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for name in (*CACHE_ENV, "TORCHINDUCTOR_CACHE_DIR", CACHE_DIR_ENV):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # records the old value (or its absence)
        if not os.environ[name]:
            monkeypatch.delenv(name)
    for config, name in ((inductor_config, "fx_graph_cache"), (functorch_config, "enable_autograd_cache"),
                         (functorch_config, "autograd_cache_allow_custom_autograd_functions")):
        if hasattr(config, name):
            monkeypatch.setattr(config, name, getattr(config, name))
    return use_compile_cache(tmp_path / "cache")


def _tiny(bit: int = 4, power: bool = True, seed: int = 0) -> nn.Module:
    """The smallest net that still runs both quantizers: ReLU -> QuantConv2d -> BN -> linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.ReLU(), QuantConv2d(2, 4, 3, padding=1, bit=bit, power=power), nn.BatchNorm2d(4),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 2, 6, 6, generator=gen) * 4, torch.randint(0, 10, (16,), generator=gen)


def test_compiled_matches_eager_forward_and_gradients(tmp_path: Path, compile_cache: Path,
                                                       one_thread: None) -> None:
    """Inductor (C++ on CPU) against eager, through build_step, from the same weights on the same batches:
    loss, logits, the input gradient, both alpha gradients and the weight gradient of the first step, then
    the weights after a second step, all within float32 reduction-order noise (rtol 1e-4, atol 1e-5)."""
    runs = []
    for mode in ("eager", "compile"):
        model = _tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        step = build_step(model, opt, F.cross_entropy, mode=mode, device=CPU)
        x, y = _batch(0)
        x.requires_grad_()  # the step's backward also reaches the input
        loss, logits = step(x, y)
        conv = model[1]
        first = [loss, logits, x.grad, conv.weight_alpha.grad, conv.act_alpha.grad, conv.weight.grad]
        first = [t.detach().clone() for t in first]
        step(*_batch(1))
        assert step.mode == mode and (step.setup_s > 0) == (mode == "compile")
        runs.append((first, [p.detach().clone() for p in model.parameters()]))
    (eager_first, eager_params), (comp_first, comp_params) = runs
    for eager, comp in zip(eager_first, comp_first, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    assert eager_first[3].abs() > 0 and eager_first[4].abs() > 0  # the alphas do get gradients
    for eager, comp in zip(eager_params, comp_params, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("compile-*.lock"))) == 1  # one graph, compiled under its lock


DDP_COMPILE = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from torch._dynamo.utils import counters
    from apot.recipe import TrainConfig
    from apot.train import run_trial
    cfg = TrainConfig(arch="resnet10", bit=3, width=4, batch_size=64, epochs=2, train_subset=256,
                      data_dir=sys.argv[1], device="cpu", compile=sys.argv[3])
    out = {}
    def on_epoch(metrics, state):
        out["model"] = {k: v.clone() for k, v in state["model"].items()}
        out.setdefault("graphs", []).append(counters["stats"]["unique_graphs"])  # Dynamo's graphs so far
    result = run_trial(cfg, on_epoch=on_epoch, compile_cache=sys.argv[2] + "/cache")
    out.update(result={k: result[k] for k in ("step_mode", "compile_s", "history")},
               world=dist.get_world_size())
    torch.save(out, f"{sys.argv[2]}/{sys.argv[3]}_rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
""")


def test_ddp_with_a_compiled_step_over_gloo(synthetic_mnist_root: Path, tmp_path: Path) -> None:
    """Two real gloo ranks train through the compiled step (Dynamo's DDP graph split, AOTAutograd; the
    ``aot_eager`` backend keeps CI time down, inductor is covered above): both ranks end with the same
    weights, the loss falls, and the record says how the step ran."""
    script = tmp_path / "ddp_compile.py"
    script.write_text(DDP_COMPILE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "APOT_COMPILE_BACKEND": "aot_eager",
           "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*torchrun, str(script), str(synthetic_mnist_root), str(tmp_path), "compile"], check=True,
                   env=env, capture_output=True, timeout=300, cwd=REPO)
    r0, r1 = (torch.load(tmp_path / f"compile_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["result"]["step_mode"] == "compile" and r0["result"]["compile_s"] > 0
    for key, tensor in r0["model"].items():
        assert torch.equal(tensor, r1["model"][key]), key  # the gradients were all-reduced
    history = r0["result"]["history"]
    assert [h["step_mode"] for h in history] == ["compile", "compile"]
    assert r0["graphs"][0] > 0 and r0["graphs"][1] == r0["graphs"][0]  # compiled in epoch 1, never again
    assert history[0]["compile_s"] > 0
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert (tmp_path / "cache").is_dir()  # the shared cache
    assert not list((tmp_path / "cache").glob("compile-*.lock"))  # no lock across ranks: it would deadlock


# ---------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["compile", "cudagraph"])
def test_cuda_step_matches_eager(mode: str, compile_cache: Path) -> None:
    """A few SGD steps (momentum, weight decay, a scheduled tensor lr) replayed from a CUDA graph (or
    compiled) against eager on the same batches: same losses and weights within float32 noise."""
    device = torch.device("cuda")
    runs = []
    for m in ("eager", mode):
        model = _tiny().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
        step = build_step(model, opt, F.cross_entropy, mode=m, device=device)
        losses = []
        for i in range(8):  # 3 warm-up steps, the capture, then replays
            x, y = _batch(i)
            losses.append(step(x.to(device), y.to(device))[0].clone())
            if i == 5:
                sched.step()  # a tensor lr is updated in place: the graph follows
        torch.cuda.synchronize()
        assert step.mode == m
        runs.append((torch.stack(losses).cpu(), [p.detach().cpu() for p in model.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudagraph_trial_records_its_mode(synthetic_mnist_root: Path, tmp_path: Path) -> None:
    from apot.recipe import TrainConfig
    from apot.train import run_trial

    cfg = TrainConfig(arch="resnet10", bit=4, width=8, batch_size=64, epochs=2,
                      data_dir=str(synthetic_mnist_root), device="cuda", compile="auto")
    result = run_trial(cfg, compile_cache=tmp_path / "cache")
    assert result["step_mode"] == "cudagraph" and result["compile_s"] > 0
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]


def test_make_capturable_keeps_values_and_moves_the_lr() -> None:
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt.param_groups[0]["lr"] = torch.tensor(0.025, dtype=torch.float64)  # e.g. restored from a checkpoint
    make_capturable(opt, CPU)
    group = opt.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].dtype == torch.float32
    assert float(group["lr"]) == pytest.approx(0.025) and group["fused"] and not group["foreach"]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match=r"cudagraph captures torch.optim.SGD steps, got Adam"):
        make_capturable(torch.optim.Adam(model.parameters()), CPU)


# ---------------------------------------------------------------------------- work shared across trials
def test_one_compile_lock_key_for_every_bit_and_quantizer_of_an_arch() -> None:
    """Trials whose compiled graphs are the same take turns compiling (compile_lock), so the first compiles
    and the rest load it: every bit width and quantizer of an arch must have one key; FP32 (no clipping
    parameters: another graph) and another arch have others."""
    from apot.models import create_model
    from apot.quant import LEVEL_BITS

    x = torch.zeros(8, 1, 28, 28)

    def key(arch: str, bit: int, power: bool) -> str:
        torch.manual_seed(0)
        model = create_model(arch, bit, power=power, width=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = build_step(model, opt, F.cross_entropy, mode="compile", device=torch.device("cpu"))
        return step._graph_key(x)

    quantized = {key("resnet18", bit, power) for bit in LEVEL_BITS for power in (True, False)}
    assert len(quantized) == 1
    assert key("resnet18", 32, True) not in quantized
    assert key("resnet10", 4, True) not in quantized


def test_a_captured_step_refuses_a_batch_of_another_shape() -> None:
    """After capture, a batch of another shape must fail in one line: an eager step outside the graph would
    rebind the gradients away from the graph's buffers and every later replay would train on stale ones.
    (The check runs before any CUDA call, so a stand-in graph shows it on the CPU.)"""
    model = nn.Linear(4, 3)
    step = build_step(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, mode="eager",
                      device=torch.device("cpu"))
    replays: list[int] = []

    class Graph:
        def replay(self) -> None:
            replays.append(1)

    static = (torch.zeros(8, 4), torch.zeros(8, dtype=torch.long), torch.zeros(()), torch.zeros(8, 3))
    step.mode, step._graph, step._static = "cudagraph", Graph(), static
    step(torch.ones(8, 4), torch.ones(8, dtype=torch.long))
    assert replays == [1] and torch.equal(static[0], torch.ones(8, 4))  # a full batch replays
    with pytest.raises(ValueError, match=r"^compile: cudagraph captured the step for batches of \(8, 4\) and "
                                         r"labels \(8,\), got \(5, 4\) and \(5,\); feed full batches only"):
        step(torch.ones(5, 4), torch.ones(5, dtype=torch.long))
    assert replays == [1] and all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_capture_tolerates_cuda_work_on_another_thread() -> None:
    """Ray's and NCCL's threads run beside the capture: with capture_error_mode="thread_local" another
    thread's CUDA calls do not invalidate it."""
    import threading

    device = torch.device("cuda")
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    step = build_step(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                      mode="cudagraph", device=device)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            torch.cuda.is_available()
            torch.cuda.current_stream(device).query()

    other = threading.Thread(target=busy)
    other.start()
    try:
        x, y = torch.randn(8, 16, device=device), torch.randint(0, 4, (8,), device=device)
        for _ in range(5):
            loss, _ = step(x, y)
    finally:
        stop.set()
        other.join()
    assert step._graph is not None and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------- CPU memory
def test_keep_freed_memory_stops_the_page_faults_of_reallocating_freed_memory() -> None:
    """200 MiB of tensors allocated, freed and allocated again, in a fresh process whose glibc was first set
    to hand freed blocks back to the kernel (its static defaults, 128 KiB thresholds): every round faults its
    pages in again. `keep_freed_memory` called after that makes the process reuse them (almost no faults).
    (glibc's own adaptive defaults fall either way, by what the process freed before, so neither arm relies
    on them.) Two warm-up rounds, then one measured: the first reuse still faults a few MiB in elsewhere."""
    script = textwrap.dedent("""
        import ctypes, resource, sys, torch
        from apot.step import keep_freed_memory
        torch.set_num_threads(1)
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (AttributeError, OSError):
            print("no-mallopt"); raise SystemExit
        m_trim_threshold, m_mmap_threshold = -1, -3
        assert mallopt(m_mmap_threshold, 128 << 10) and mallopt(m_trim_threshold, 128 << 10)
        if sys.argv[1] == "keep":
            assert keep_freed_memory()
        def allocate_and_free():
            blocks = [torch.ones(1 << 18) for _ in range(200)]  # 200 x 1 MiB, written
            del blocks
        allocate_and_free()
        allocate_and_free()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        allocate_and_free()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {}
    for arm in ("return", "keep"):
        run = subprocess.run([sys.executable, "-c", script, arm], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        if run.stdout.strip() == "no-mallopt":
            pytest.skip("no glibc mallopt in this process")
        faults[arm] = int(run.stdout)
    pages = 200 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults["return"] > pages // 2, faults  # the measure sees memory that went back to the kernel
    assert faults["keep"] < pages // 20, faults


def test_the_cpu_step_builder_keeps_freed_memory(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("apot.step.keep_freed_memory", lambda: calls.append(1) or True)
    model = nn.Linear(3, 2)
    build_step(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, mode="eager", device=CPU)
    assert calls == [1]
