"""Rank helpers: the one place that knows about torch.distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank.

    A collective: every rank must call it at the same point. Uses a CPU tensor under gloo and
    the current CUDA device under NCCL.
    """
    if not is_initialized() or world_size() == 1:
        return flag
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def every_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on every rank (a collective, as ``any_rank``)."""
    return not any_rank(not flag)


def rank_zeros(value: str) -> str:
    """Rank 0's ``value`` on every rank (a collective, as ``any_rank``): what the ranks of one
    run must share, such as its identity."""
    if not is_initialized() or world_size() == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return str(shared[0])
