"""Collective helpers that are no-ops in a single process, so the bilevel steps run with or without Ray."""

from __future__ import annotations


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_mean(tensors) -> None:
    """Average tensors in place across ranks, coalesced into one flat buffer per call."""
    import torch
    import torch.distributed as dist

    n = world_size()
    tensors = [t for t in tensors if t is not None]
    if n == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= n
    off = 0
    for t in tensors:
        k = t.numel()
        t.copy_(flat[off : off + k].view_as(t).to(t.dtype))
        off += k

