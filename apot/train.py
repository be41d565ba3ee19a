"""One trial: train a quantized ResNet on MNIST and measure it on the 10k test split.

The same loop runs alone (``python -m apot.train``), under ``torchrun`` and inside a Ray Train worker
(``apot.sweep``). Distribution is read from the environment: if a process group exists (Ray Train made one,
or ``torchrun`` set ``WORLD_SIZE``), the model is wrapped in DDP and every count is all-reduced, so all ranks
agree on every metric. What happens to a finished epoch (save a file, report to Ray) is the caller's
``on_epoch`` callback; the loop itself only builds the checkpoint state.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from apot.calibrate import CALIBRATION_IMAGES, calibrate_act_alphas, init_weight_alphas
from apot.checkpoint import (
    RESULT_FILE,
    CheckpointError,
    load_checkpoint,
    load_init_weights,
    save_checkpoint,
    write_json,
)
from apot.data import DeviceMNIST, MNISTDataError, resolve_data_dir
from apot.errors import exit_with_error
from apot.models import create_model
from apot.quant import FULL_PRECISION
from apot.recipe import (
    ALPHA_INIT_CALIBRATE,
    ALPHA_INIT_MSE,
    AUGMENTS,
    INIT_FROM_FP32,
    PRESETS,
    SCHEDULES,
    TrainConfig,
)
from apot.step import STEP_MODES, build_step, use_compile_cache

__all__ = ["SCHEDULES", "TrainConfig", "init_alphas", "make_optimizer", "run_trial"]

# (metrics of the finished epoch, checkpoint state) -> None; called on every rank, rank 0 persists the state.
EpochCallback = Callable[[dict[str, Any], dict[str, Any]], None]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly trivial) process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistInfo:
    """Use the existing process group (Ray Train) or create one from torchrun's environment."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    if not dist.is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{info.local_rank % max(torch.cuda.device_count(), 1)}"
    return torch.device(name)


def _check_distinct_gpus(device: torch.device, info: DistInfo) -> None:
    """NCCL cannot run two ranks of one group on one GPU; fail clearly instead of hanging or erroring deep."""
    if device.type != "cuda" or not info.distributed:
        return
    uuids: list[Any] = [None] * info.world_size
    dist.all_gather_object(uuids, str(torch.cuda.get_device_properties(device).uuid))
    if len(set(uuids)) < len(uuids):
        raise RuntimeError(
            f"two DDP ranks of this trial share a GPU ({uuids}); give each rank a whole GPU "
            "(resources.gpus_per_worker >= 1) or use one worker per trial"
        )


def make_scheduler(
    opt: torch.optim.Optimizer, schedule: str, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch LR multiplier for the three schedules (see ``TrainConfig``)."""
    if schedule == "cosine":
        factor = lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs))  # noqa: E731
    elif schedule == "step":
        milestones = (max(1, epochs // 2), max(1, (3 * epochs) // 4))  # never before the first epoch ends
        factor = lambda e: 0.1 ** sum(e >= m for m in milestones)  # noqa: E731
    else:
        factor = lambda e: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum: group 0 the weights (and BN's scale and shift) at ``lr`` / ``weight_decay``; with
    ``cfg.alpha_lr`` set, group 1 every clipping threshold (``*_alpha``) at ``alpha_lr`` /
    ``alpha_weight_decay`` (``weight_decay`` when None). Without it, one group holds everything."""
    params = list(model.named_parameters())
    alphas = [p for n, p in params if n.endswith("_alpha")] if cfg.alpha_group else []
    ids = {id(p) for p in alphas}
    groups: list[dict[str, Any]] = [{"params": [p for _, p in params if id(p) not in ids]}]
    if alphas:
        wd = cfg.weight_decay if cfg.alpha_weight_decay is None else cfg.alpha_weight_decay
        groups.append({"params": alphas, "lr": cfg.alpha_lr, "weight_decay": wd})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def start_from_checkpoint(model: nn.Module, cfg: TrainConfig, source: str | os.PathLike[str] | None = None,
                          ) -> None:
    """Load the weights and BN statistics of ``source`` (default ``cfg.init_from``) into a fresh ``model``:
    progressive initialisation. Its clipping thresholds are skipped: `init_alphas` sets them afresh.

    Raises ``CheckpointError`` (one line) for a missing, unreadable or mismatched checkpoint."""
    source = source if source is not None else cfg.init_from
    if source == INIT_FROM_FP32:
        raise CheckpointError(f"init_from: {INIT_FROM_FP32!r} names a sweep's full-precision trial; "
                              "outside a sweep give the checkpoint itself (e.g. the --out of a --bit 32 run)")
    weights = {k: v for k, v in load_init_weights(source, cfg.arch, cfg.width).items()
               if not k.endswith("_alpha")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_alpha")]
    if missing or unexpected:
        raise CheckpointError(f"init_from: {source}: its weights do not fit {cfg.arch} (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")


def init_source(cfg: TrainConfig, init_checkpoint: str | os.PathLike[str] | None) -> str | None:
    """The checkpoint this trial starts from: ``init_checkpoint`` (what a sweep resolved
    ``fp32`` to), else ``cfg.init_from``; None for a trial from scratch, FP32 trials of a sweep included."""
    if cfg.init_from is None or (cfg.init_from == INIT_FROM_FP32 and cfg.bit == FULL_PRECISION):
        return None
    return str(init_checkpoint) if init_checkpoint is not None else cfg.init_from


def init_alphas(model: nn.Module, cfg: TrainConfig, data: DeviceMNIST) -> None:
    """Starting clipping thresholds of a fresh model (never on resume: the checkpoint holds the alphas).

    ``weight_alpha_init`` / ``act_alpha_init``: a number, or ``mse`` / ``calibrate`` (``apot.calibrate``);
    the calibration batch is the first ``CALIBRATION_IMAGES`` of the trial seed's epoch-0 order, unaugmented,
    the same on every rank."""
    weight = cfg.weight_alpha_init
    init_weight_alphas(model, None if weight == ALPHA_INIT_MSE else float(weight))
    if cfg.act_alpha_init == ALPHA_INIT_CALIBRATE:
        size = min(CALIBRATION_IMAGES, data.num_train)
        images, _ = next(data.train_batches(0, cfg.seed, 0, 1, size, augment=False))
        calibrate_act_alphas(model, images)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("act_alpha"):
                    p.fill_(float(cfg.act_alpha_init))


CUDA_NUMERICS = "float32 (TF32 off), cudnn.benchmark off"
"""How a GPU trial computes (`use_cuda_numerics`), as the provenance records it.

float32, not TF32: TF32 rounds a convolution's inputs to a 10-bit mantissa, and the quantized weights
(alpha x level) and activations feed the convolutions; in float32 a GPU trial computes what the CPU's does
(within summation order), so CPU and GPU results, and the reference's, compare directly. The speed TF32 could
buy is small here: a quantized step's time goes to the quantizers' elementwise work, not the convolutions.
cudnn.benchmark off: cuDNN then picks its algorithms by heuristics, the same in every process on the same GPU
and shapes, rather than by timing them, which can pick differently in a run and in its resume."""


def use_cuda_numerics() -> None:
    """Set `CUDA_NUMERICS` for this process (before the model's first CUDA kernel)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, lists and numbers: a checkpoint then loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        # One state per device visible when saved; a resume may see fewer (or more) devices. Device i gets
        # saved state i where both exist: a trial's own device is device 0 under Ray (one GPU visible per
        # worker), so its stream continues; states of devices not visible now are dropped.
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mean_alpha(model: nn.Module, name: str) -> float | None:
    values = [p.detach().float() for n, p in model.named_parameters() if n.endswith(name)]
    return float(torch.stack(values).mean()) if values else None


def _all_reduce(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum a few scalars over ranks (float64: exact for counts up to 2**53)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if info.distributed:
        dist.all_reduce(t)
    return t.tolist()


def _sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's BN running statistics.

    DDP broadcasts buffers at the start of each forward, so after the last step each rank holds its own
    update; without this the ranks would score their test shards with slightly different models."""
    if info.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def evaluate(
    model: nn.Module, data: DeviceMNIST, info: DistInfo, batch_size: int = 1000
) -> tuple[float, float]:
    """(mean loss, accuracy in percent) over the full test split; each rank scores its shard."""
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for x, y in data.test_batches(info.rank, info.world_size, batch_size):
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            count += y.numel()
    loss_sum, correct, count = _all_reduce([loss_sum, correct, count], data.device, info)
    return loss_sum / count, 100.0 * correct / count


def run_trial(
    cfg: TrainConfig,
    *,
    on_epoch: EpochCallback | None = None,
    resume_state: dict[str, Any] | None = None,
    device: torch.device | None = None,
    compile_cache: str | os.PathLike[str] | None = None,
    init_checkpoint: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` from scratch or from ``resume_state`` (a checkpoint dict) and return the trial result.

    After every epoch, every rank calls ``on_epoch(metrics, state)`` with the checkpoint dict ``state``
    (references to the live tensors, not copies); by convention only rank 0 persists it. The result's
    ``final_test_acc`` is the last epoch's test accuracy: the tables' number, with no model selection on
    the test set. ``compile_cache``: a folder shared by the trials of a sweep for compiled graphs
    (`apot.step.use_compile_cache`); unused by eager steps. ``init_checkpoint``: the checkpoint a fresh
    trial with ``cfg.init_from`` set starts from (the sweep resolves ``fp32`` to its FP32 trial's file).
    """
    kind = device.type if device is not None else resolve_device(cfg.device, DistInfo()).type
    info = init_distributed(kind)
    device = device or resolve_device(cfg.device, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        use_cuda_numerics()
    _check_distinct_gpus(device, info)
    per_rank_batch = cfg.per_rank_batch(info.world_size)

    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    data = DeviceMNIST.from_root(cfg.data_dir, device=device, train_subset=cfg.train_subset,
                                 augment=cfg.augment)
    model = create_model(cfg.arch, cfg.bit, power=cfg.power, width=cfg.width, ws_grad=cfg.ws_grad).to(device)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        _set_rng_state(resume_state["rng"])
        history = list(resume_state["history"])
        start_epoch = int(resume_state["epoch"])
    source = init_source(cfg, init_checkpoint)
    if resume_state is None:
        if source is not None:
            start_from_checkpoint(model, cfg, source)  # (a sweep's FP32 trials start from scratch)
        init_alphas(model, cfg, data)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if info.distributed else model
    if compile_cache is not None and cfg.compile != "eager":
        use_compile_cache(compile_cache)
    step = build_step(net, opt, F.cross_entropy, mode=cfg.compile, device=device, world_size=info.world_size)

    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        lr = float(opt.param_groups[0]["lr"])  # a tensor under cudagraph (apot.step.make_capturable)
        setup_before = step.setup_s
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for x, y in data.train_batches(epoch, cfg.seed, info.rank, info.world_size, per_rank_batch):
            loss, logits = step(x, y)  # forward, backward, optimizer step: eager, compiled or a CUDA graph
            # accumulate on the device: no host sync per step
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t0
        loss_sum_, correct_, seen_ = _all_reduce([float(loss_sum), float(correct), float(seen)], device, info)
        sched.step()
        _sync_buffers(model, info)
        test_loss, test_acc = evaluate(model, data, info)
        best = max([h["test_acc"] for h in history] + [test_acc])
        metrics = {
            "epoch": epoch + 1,
            "epochs": cfg.epochs,
            "train_loss": loss_sum_ / seen_,
            "train_acc": 100.0 * correct_ / seen_,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "best_test_acc": best,
            "lr": lr,
            "images_per_s": seen_ / train_s,
            "epoch_s": time.perf_counter() - t0,
            "weight_alpha_mean": _mean_alpha(model, "weight_alpha"),
            "act_alpha_mean": _mean_alpha(model, "act_alpha"),
            "step_mode": step.mode,
            "compile_s": step.setup_s - setup_before,  # compile/capture seconds inside this epoch
            "gpu_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        }
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch + 1,
                "rng": _rng_state(),
                "history": history,
                "config": asdict(cfg),
            })
    return summarize(cfg, history)


def summarize(cfg: TrainConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial record (see docs/ARCHITECTURE.md) from the per-epoch history."""
    done = len(history)
    best = max(history, key=lambda h: h["test_acc"]) if history else None
    return {
        "arch": cfg.arch,
        "bit": cfg.bit,
        "power": cfg.power,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "state": "TERMINATED" if done == cfg.epochs else "INCOMPLETE",
        "final_test_acc": history[-1]["test_acc"] if done == cfg.epochs else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_train_acc": history[-1]["train_acc"] if history else None,
        "epochs_done": done,
        "wall_time_s": sum(h["epoch_s"] for h in history),
        "compile_s": sum(h.get("compile_s", 0.0) for h in history),
        "step_mode": history[-1].get("step_mode") if history else None,
        "error": None,
        "history": history,
    }


def _format_epoch(m: dict[str, Any]) -> str:
    return (
        f"epoch {m['epoch']}/{m['epochs']}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2f}%  "
        f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.2f}%  lr {m['lr']:.4g}  "
        f"{m['images_per_s']:.0f} img/s  {m['epoch_s']:.1f}s"
    )


def _number_or(keyword: str) -> Callable[[str], float | str | None]:
    """argparse type: ``keyword`` as itself (``none`` as None), anything else as a float."""
    def parse(text: str) -> float | str | None:
        if text == keyword:
            return None if keyword == "none" else keyword
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither {keyword!r} nor a number") from None
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags for every `TrainConfig` field; a flag not given is absent, so the preset's value (or the
    field default) applies (`TrainConfig.from_preset`)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m apot.train", description="Train one quantized ResNet.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="named recipe (apot.recipe.PRESETS); flags given explicitly override its values")
    p.add_argument("--arch", help=f"default {d.arch}")
    p.add_argument("--bit", type=int, help=f"2..6, or 32 for full precision (default {d.bit})")
    p.add_argument("--power", choices=("apot", "uniform"), help="quantizer (default apot)")
    p.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--batch-size", type=int, help=f"global batch over all ranks (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"default {d.lr}")
    p.add_argument("--momentum", type=float, help=f"default {d.momentum}")
    p.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"default {d.schedule}")
    p.add_argument("--width", type=int, help=f"default {d.width}")
    p.add_argument("--train-subset", type=int, help="first N training images (default all)")
    p.add_argument("--augment", choices=AUGMENTS, help=f"training augmentation (default {d.augment})")
    p.add_argument("--act-alpha-init", type=_number_or(ALPHA_INIT_CALIBRATE),
                   help=f"'calibrate' or a number (default {d.act_alpha_init})")
    p.add_argument("--weight-alpha-init", type=_number_or(ALPHA_INIT_MSE),
                   help=f"'mse' or a number (default {d.weight_alpha_init})")
    p.add_argument("--alpha-lr", type=_number_or("none"),
                   help=f"lr of the alphas' own group; 'none': the weights' group (default {d.alpha_lr})")
    p.add_argument("--alpha-weight-decay", type=_number_or("none"),
                   help=f"weight decay of the alphas' group; 'none': --weight-decay "
                        f"(default {d.alpha_weight_decay})")
    p.add_argument("--ws-grad", action=argparse.BooleanOptionalAction,
                   help=f"gradient through the weight standardisation (default {d.ws_grad})")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start the weights from this trusted apot checkpoint (file or folder), e.g. a "
                        "--bit 32 run's --out (default: from scratch)")
    p.add_argument("--data-dir", default=None, help="MNIST root (default: $APOT_DATA_DIR or ./data)")
    p.add_argument("--device", help=f"default {d.device}")
    p.add_argument("--compile", choices=STEP_MODES,
                   help="training step: auto (a CUDA graph on one GPU, eager on CPU), eager, compile, "
                        f"cudagraph (default {d.compile})")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt and result.json (resumes from it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    explicit = {k: v for k, v in vars(args).items() if k not in ("preset", "out", "data_dir")}
    if "power" in explicit:
        explicit["power"] = explicit["power"] == "apot"
    try:
        cfg = TrainConfig.from_preset(
            args.preset, **explicit, data_dir=str(resolve_data_dir(args.data_dir, None))
        )
        resume = load_checkpoint(out, asdict(cfg))
    except (ValueError, CheckpointError) as exc:
        return exit_with_error(exc)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(asdict(cfg), out / "config.json")
        if resume is not None:
            print(f"resuming {out / 'checkpoint.pt'} after epoch {resume['epoch']}", flush=True)

    def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        if is_main:
            save_checkpoint(state, out)
            print(_format_epoch(metrics), flush=True)

    try:
        result = run_trial(cfg, on_epoch=on_epoch, resume_state=resume)
    except (ValueError, MNISTDataError, CheckpointError) as exc:  # bad input: one line, no traceback
        return exit_with_error(exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if is_main:
        write_json(result, out / RESULT_FILE)
        print(f"final test accuracy {result['final_test_acc']:.2f}% (best {result['best_test_acc']:.2f}% "
              f"at epoch {result['best_epoch']}); result in {out / RESULT_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
