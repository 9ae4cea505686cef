"""Processes: this process's place in a torchrun job, the process group, DDP wrapping, and seeding.

Randomness (shuffling, augmentation) is reseeded at the start of every epoch from (seed, epoch, rank),
so the epoch number in a run's train state fixes every random stream: a resumed run repeats the
straight run bit for bit on CPU, for any number of processes and DataLoader workers.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from ftwt_cli.errors import BadInput
from ftwt_cli.io.config import resolve_device


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (world_size 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch_dist.all_reduce(tensor)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (plain picklable values)."""
        if not self.enabled:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BN running statistics) on every rank. DDP broadcasts them before each forward,
        so after an epoch's last step every rank holds its own update; evaluation and checkpoints need one."""
        if self.enabled:
            for buffer in module.buffers():
                torch_dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def start_processes(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank), device


def stop_processes(dist: Distributed) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap_for_processes(model: nn.Module, dist: Distributed, device: torch.device, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """(model, net): under torchrun ``net`` is the DDP wrapper, and with ``sync_bn`` every BatchNorm of
    ``model`` becomes a SyncBatchNorm (same parameters and buffers, so optimizers and checkpoints are
    unchanged) that normalises with the statistics of the whole global batch."""
    if not dist.enabled:
        if sync_bn:
            warnings.warn("--sync-bn has no effect in a single process (run under torchrun)", stacklevel=2)
        return model, model
    if sync_bn:
        if device.type != "cuda":
            raise BadInput("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU); drop --sync-bn")
        model = sync_batchnorm(model)
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of ``model`` (inside gated blocks too) as a SyncBatchNorm holding the same
    parameter and buffer tensors: optimizers built before stay valid, state_dict keys do not change."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every random stream of an epoch is a function of (seed, epoch, rank)."""
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63
    torch.manual_seed(value)
    random.seed(value)


def shard(dataset: Dataset, dist: Distributed) -> Dataset:
    """A strided shard per rank, so every evaluation image is counted exactly once."""
    if not dist.enabled:
        return dataset
    return Subset(dataset, range(dist.rank, len(dataset), dist.world_size))


def broadcast_model(model: nn.Module, dist: Distributed) -> None:
    """Rank 0's parameters and buffers on every rank (after rank 0 alone loaded a checkpoint)."""
    if dist.enabled:
        for tensor in [*model.parameters(), *model.buffers()]:
            torch_dist.broadcast(tensor.data, src=0)
