"""Collective helpers that are no-ops in a single process, so the bilevel steps run with or without Ray."""

from __future__ import annotations


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


#: elements per collective buffer: a gradient is averaged (and θ_d's inner products are reduced) bucket by
#: bucket, so the flat copy a collective needs is at most this (32 MiB in fp32; torch DDP's bucket is 25 MB),
#: not a second whole UNet
BUCKET_ELEMENTS = 1 << 23


def buckets(sizes: list[int], cap: int | None = None) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes add up to at most `cap` (BUCKET_ELEMENTS; a larger
    one alone)."""
    cap = BUCKET_ELEMENTS if cap is None else cap
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if not out or total + n > cap:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def all_reduce_mean(tensors) -> None:
    """Average tensors in place across ranks, coalesced into one flat buffer per bucket."""
    import torch
    import torch.distributed as dist

    n = world_size()
    tensors = [t for t in tensors if t is not None]
    if n == 1 or not tensors:
        return
    for group in buckets([t.numel() for t in tensors]):
        flat = torch.cat([tensors[i].reshape(-1).float() for i in group])
        dist.all_reduce(flat)
        flat /= n
        off = 0
        for i in group:
            t = tensors[i]
            k = t.numel()
            t.copy_(flat[off : off + k].view_as(t).to(t.dtype))
            off += k


def partitioned_optimizer(params, optimizer_class, zero_stage: int, **kwargs):
    """`optimizer_class` over `params`; from ZeRO-1 on, with several ranks, wrapped in torch's
    ZeroRedundancyOptimizer so that each rank keeps the moments of its share of the tensors only (for state that
    lives outside the DeepSpeed engine: FreezeAsGuard's preparation fine-tune, IMMA's simulated attacker). Every
    rank steps its share with the all-reduced gradients and broadcasts it: the weights are the plain optimizer's."""
    params = list(params)
    if zero_stage >= 1 and world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, **kwargs)
    return optimizer_class(params, **kwargs)


def full_optimizer_state(opt) -> dict | None:
    """The optimizer's whole state_dict on rank 0 (None elsewhere); a partitioned one is first gathered there,
    so every rank must call this together."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(opt, ZeroRedundancyOptimizer):
        opt.consolidate_state_dict(to=0)
    return opt.state_dict() if rank() == 0 else None


def indexed_param_groups(opt) -> list[dict]:
    """The optimizer's param_groups as a state_dict lists them (parameters by running index), without
    building its state_dict (a partitioned optimizer's needs a gathering first)."""
    out, start = [], 0
    for g in opt.param_groups:
        n = len(g["params"])
        out.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
        start += n
    return out
