"""One trial: train a quantized ResNet on MNIST and measure it on the 10k test split.

The same loop runs alone (``python -m apot.train``), under ``torchrun`` and inside a Ray Train worker
(``apot.sweep``). Distribution is read from the environment (`apot.distributed`): if a process group exists
(Ray Train made one, or ``torchrun`` set ``WORLD_SIZE``), the model is wrapped in DDP and every count is
all-reduced, so all ranks agree on every metric. What happens to a finished epoch (save a file, report to
Ray) is the caller's ``on_epoch`` callback; the loop itself only builds the checkpoint state.

`run_trial` reads top to bottom; each part it calls lives with its own idea: the process group and device
(`apot.distributed`), the RNG streams (`apot.rng`), the optimizer and schedule (`apot.optim`), where a fresh
model starts (`apot.checkpoint.start_from_checkpoint` for ``init_from``, `apot.calibrate.init_alphas`), and
how one step runs (`apot.step`). Beside it: `evaluate`, the trial record (`summarize`) and the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from apot.calibrate import init_alphas
from apot.checkpoint import (
    RESULT_FILE,
    CheckpointError,
    init_source,
    load_checkpoint,
    save_checkpoint,
    start_from_checkpoint,
    write_json,
)
from apot.data import DeviceMNIST, MNISTDataError, resolve_data_dir
from apot.distributed import DistInfo, all_reduce_sum, setup_distributed, sync_buffers
from apot.errors import exit_with_error
from apot.models import create_model
from apot.optim import make_optimizer, make_scheduler
from apot.recipe import ALPHA_INIT_CALIBRATE, ALPHA_INIT_MSE, AUGMENTS, PRESETS, SCHEDULES, TrainConfig
from apot.rng import rng_state, seed_everything, set_rng_state
from apot.step import STEP_MODES, build_step, use_compile_cache

__all__ = ["EpochCallback", "evaluate", "main", "parse_args", "run_trial", "summarize"]

# (metrics of the finished epoch, checkpoint state) -> None; called on every rank, rank 0 persists the state.
EpochCallback = Callable[[dict[str, Any], dict[str, Any]], None]


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
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], data.device, info)
    return loss_sum / count, 100.0 * correct / count


def _mean_alpha(model: nn.Module, name: str) -> float | None:
    values = [p.detach().float() for n, p in model.named_parameters() if n.endswith(name)]
    return float(torch.stack(values).mean()) if values else None


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
    info, device = setup_distributed(cfg.device, device)
    per_rank_batch = cfg.per_rank_batch(info.world_size)

    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    data = DeviceMNIST.from_root(cfg.data_dir, device=device, train_subset=cfg.train_subset,
                                 augment=cfg.augment)
    model = create_model(cfg.arch, cfg.bit, power=cfg.power, width=cfg.width, ws_grad=cfg.ws_grad).to(device)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume_state is not None:  # continue where the checkpoint stopped, RNG streams included
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        set_rng_state(resume_state["rng"])
        history = list(resume_state["history"])
        start_epoch = int(resume_state["epoch"])
    else:  # a fresh model: its weights from a checkpoint if init_from says so, then its clipping thresholds
        source = init_source(cfg, init_checkpoint)
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
        loss_sum_, correct_, seen_ = all_reduce_sum([float(loss_sum), float(correct), float(seen)], device,
                                                    info)
        sched.step()
        sync_buffers(model, info)
        test_loss, test_acc = evaluate(model, data, info)
        metrics = {
            "epoch": epoch + 1,
            "epochs": cfg.epochs,
            "train_loss": loss_sum_ / seen_,
            "train_acc": 100.0 * correct_ / seen_,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "best_test_acc": max([h["test_acc"] for h in history] + [test_acc]),
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
                "rng": rng_state(),
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
