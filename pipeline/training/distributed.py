"""DistributedDataParallel when launched by `torchrun` (NCCL on GPUs, gloo on CPU), and the
collective steps the loop needs so that every rank stops together and holds the same model."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: bool = False  # joined a torch.distributed process group (launched by torchrun)

    @property
    def enabled(self) -> bool:
        """The distributed code path (sampler, DDP, collectives) runs: under torchrun, at any world size,
        so `torchrun --nproc_per_node=1` exercises on one GPU exactly what N GPUs run."""
        return self.group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT), world size 1 included: NCCL on GPUs, gloo on CPU. A plain process runs alone."""
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return DistInfo()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # bind the rank to its GPU up front: NCCL otherwise guesses from the rank
            torch.cuda.set_device(local)
            dist.init_process_group(backend, device_id=torch.device("cuda", local))
        else:
            dist.init_process_group(backend)
        atexit.register(dist.destroy_process_group)  # NCCL warns about (and may leak) a group left open
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, group=True)


def dist_info() -> DistInfo:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), group=True)
    return DistInfo()


def train_device(info: DistInfo | None = None) -> torch.device:
    info = info or dist_info()
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def distributed_loader(loader: DataLoader, info: DistInfo) -> DataLoader:
    """Each rank a disjoint shard of `loader`'s data set (the loader itself when not distributed).
    A wrapper with `inner` and `rewrap` (e.g. distillation's live-teacher loader) is rebuilt over
    the shard of the loader it wraps."""
    if not info.enabled:
        return loader
    if hasattr(loader, "rewrap"):
        return loader.rewrap(distributed_loader(loader.inner, info))
    from torch.utils.data import WeightedRandomSampler
    from torch.utils.data.distributed import DistributedSampler

    if isinstance(loader.sampler, WeightedRandomSampler):
        from pipeline.errors import ConfigError

        raise ConfigError("data.balance: 'sampler' does not shard across torchrun processes; use 'weights'")

    sampler = DistributedSampler(loader.dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler)


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device, wrapped: nn.Module, trainable: tuple | None):
    """(ddp model, trainable set): a new DDP wrapper when the trainable set changed since `trainable`
    (progressive unfreezing), else `wrapped` as it is."""
    now = tuple(p.requires_grad for p in model.parameters())
    if now == trainable:
        return wrapped, trainable
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None), now


def all_finite(loss: torch.Tensor, info: DistInfo) -> bool:
    ok = torch.isfinite(loss.detach()).all()
    if info.enabled:  # every rank must stop together, or the others hang in all-reduce
        import torch.distributed as dist

        flag = ok.float().reshape(1).to(loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = flag.item() > 0
    return bool(ok)


def average_buffers(model: nn.Module, info: DistInfo) -> None:
    """DDP syncs parameters, and broadcasts buffers only at the start of each forward: average the
    BatchNorm running statistics over the ranks after an epoch so every rank holds the same model."""
    if not info.enabled:
        return
    import torch.distributed as dist

    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(info.world_size)
