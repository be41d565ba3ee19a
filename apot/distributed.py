"""Where a trial's process sits: its process group, its device, and how that device computes.

Distribution is read from the environment, as nanoGPT does: a process group that exists (Ray Train made one)
is used as it is, ``torchrun``'s ``WORLD_SIZE`` > 1 makes one, and otherwise the trial is a single process
(`DistInfo()`: rank 0 of 1). The collectives here do nothing for a single process, so the loop in
`apot.train` is the same code alone, under ``torchrun`` and in a Ray Train worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CUDA_NUMERICS", "DistInfo", "all_reduce_sum", "check_distinct_gpus", "init_distributed",
           "resolve_device", "setup_distributed", "sync_buffers", "use_cuda_numerics"]


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
    """The device ``name`` (``TrainConfig.device``: auto, cpu, cuda, cuda:N) means for this rank: ``auto`` is
    CUDA if present, else the CPU; ``cuda`` is the GPU of the rank's ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{info.local_rank % max(torch.cuda.device_count(), 1)}"
    return torch.device(name)


def check_distinct_gpus(device: torch.device, info: DistInfo) -> None:
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


def setup_distributed(device_name: str, device: torch.device | None = None) -> tuple[DistInfo, torch.device]:
    """Join this trial's process group (`init_distributed`) and take its device: ``device`` if given (what a
    Ray Train worker was handed), else what ``device_name`` means for this rank (`resolve_device`). A CUDA
    device is made current and computes as `CUDA_NUMERICS` says; ranks sharing a GPU are refused
    (`check_distinct_gpus`)."""
    kind = device.type if device is not None else resolve_device(device_name, DistInfo()).type
    info = init_distributed(kind)
    device = device or resolve_device(device_name, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        use_cuda_numerics()
    check_distinct_gpus(device, info)
    return info, device


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum a few scalars over ranks (float64: exact for counts up to 2**53)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if info.distributed:
        dist.all_reduce(t)
    return t.tolist()


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's BN running statistics.

    DDP broadcasts buffers at the start of each forward, so after the last step each rank holds its own
    update; without this the ranks would score their test shards with slightly different models."""
    if info.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
