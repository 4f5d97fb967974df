"""Data-parallel training on PyTorch's own engine: ``torchrun --nproc_per_node N -m mixprec.run ...``.

torchrun starts N processes and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init` joins
them into a process group (NCCL on CUDA, gloo on CPU) and gives each its device. The model is
wrapped in ``DistributedDataParallel``, which all-reduces (averages) the gradients during backward,
in the model's own precision: manual mode's FP16 gradients are all-reduced before they are unscaled.

Everything else here is a small collective with a no-op when there is one process, so that the
training loop reads the same either way:

- :func:`any_overflow_`: the found-inf flag is all-reduced (max), so one rank's overflow skips the
  step on every rank;
- :func:`check_same`: the loss scale is compared across ranks at every progress update;
- :func:`shard`, :func:`gather_rows`, :func:`sum_`: evaluation is sharded and gathered;
- :func:`any_rank`: a stop signal is acted on by all ranks at the same step.

``--batch-size`` stays the global batch size: each rank takes its ``1/N`` slice of every batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

_DEVICE = torch.device("cpu")  # where the small collectives' tensors live: this rank's device


def init(device: torch.device) -> torch.device:
    """Join the torchrun process group if this process was started by torchrun with ``WORLD_SIZE`` > 1
    (once; later calls only return the device), and return this rank's device (``cuda:LOCAL_RANK`` on
    CUDA). A single process gets ``device`` back."""
    global _DEVICE
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    from . import device as dev

    _DEVICE = device = dev.local_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the group :func:`init` joined; 0 for a single process."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run directory and logs: rank 0, or the only process. Before :func:`init`
    has joined the group (a usage error in the options, say), torchrun's ``RANK`` says."""
    return rank() == 0 if dist.is_initialized() else os.environ.get("RANK", "0") == "0"


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when there are several processes; ``model`` itself otherwise.

    DDP broadcasts rank 0's parameters and buffers, and every forward pass re-broadcasts the buffers
    (BatchNorm's running statistics) from rank 0, so all ranks evaluate the same model."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def any_overflow_(found_inf: torch.Tensor) -> torch.Tensor:
    """All-reduce (max) the found-inf flag in place: every rank skips a step if any rank overflowed."""
    if world_size() > 1:
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    return found_inf


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) ``tensor`` in place."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank must call it at the same point)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=_DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_same(value: float, what: str) -> None:
    """Raise if ``value`` differs between ranks (a bug, not a user error): a cheap periodic invariant check."""
    if world_size() == 1:
        return
    t = torch.tensor([value, -value], dtype=torch.float64, device=_DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    low, high = -t[1].item(), t[0].item()
    if low != high:
        raise RuntimeError(f"{what} differs between ranks: from {low:g} to {high:g}")


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` items: the first ranks get ``ceil(n / N)``, the last may get fewer."""
    per = -(-n // world_size())
    return slice(min(rank() * per, n), min((rank() + 1) * per, n))


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` rows of a tensor sharded with :func:`shard`, gathered in order on every rank."""
    if world_size() == 1:
        return local
    per = -(-n // world_size())
    padded = local.new_zeros((per, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: len(range(n)[slice(r * per, (r + 1) * per)])] for r, p in enumerate(parts)])


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics, updated by each rank's own last step)."""
    if world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)

