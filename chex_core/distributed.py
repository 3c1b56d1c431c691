"""torch.distributed glue: torchrun environment → process group, rank helpers, broadcasts.

Launch with ``torchrun`` (or the legacy ``torch.distributed.launch``); the environment carries ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``. NCCL on CUDA, gloo on CPU. Without that environment everything runs as a single
process and the helpers are no-ops.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "is_dist", "get_rank", "get_world_size", "is_main_process", "barrier",
           "broadcast_tensor_", "broadcast_object", "all_reduce_mean", "all_reduce_max", "all_gather_object",
           "unwrap_model", "cleanup"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise the default process group from torchrun's environment (if present) and pick the device.

    Args:
        backend: ``nccl``/``gloo``; default nccl when CUDA is used, else gloo.
        device: ``cuda``/``cpu``; default cuda when available.
        timeout_s: collective timeout, so a dead rank ends the job instead of hanging it forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        kw = {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one agent store across restart rounds, but env:// adds no per-round prefix: after a
            # --max-restarts restart the new gloo/nccl mesh could read the dead round's addresses and hang
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                                  timeout=datetime.timedelta(seconds=timeout_s))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            kw = dict(store=dist.PrefixStore(f"/chex/attempt_{attempt}", store), rank=rank, world_size=world)
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistInfo(rank, local_rank, world, dev, distributed)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _comm_device() -> torch.device:
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensor_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy (no-op in a single process)."""
    if not is_dist():
        return tensor
    dev = _comm_device()
    buf = tensor.detach().to(dev).contiguous()
    dist.broadcast(buf, src)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable object, on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a new tensor; the input is left alone)."""
    if not is_dist():
        return tensor.detach().clone()
    dev = _comm_device()
    buf = tensor.detach().to(dev, copy=True)
    dist.all_reduce(buf)
    return (buf / get_world_size()).to(tensor.device)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (a new tensor; the input is left alone), e.g. to agree on error flags."""
    if not is_dist():
        return tensor.detach().clone()
    buf = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.to(tensor.device)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
