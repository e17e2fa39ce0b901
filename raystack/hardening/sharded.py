"""A list of tensors that no optimizer owns, partitioned across ranks the way ZeRO-3 partitions parameters.

FreezeAsGuard's θ_d (the second UNet copy) is updated by hand (Eq. 9), read as inner products with the ranks'
mean gradient (Eq. 8) and added to θ(m) when the mask moves. None of that needs the whole copy on any one rank, so under
`--zero-stage 3` each rank keeps 1/world of it: every tensor is flattened and rank r keeps elements
[r·k, (r+1)·k), k = ⌈numel / world⌉ (the last part zero-padded). DeepSpeed's own partitioning is bound to the
parameters of the module its engine trains; this copy is no module's parameter, hence these few collectives.

With one rank (or `world=1`) the parts are the whole tensors and nothing is communicated; `wrap(list)` keeps
views of the caller's tensors, so updates through it are seen in the list.
"""

from __future__ import annotations

import math
from ..distributed import buckets


class ShardedTensors:
    def __init__(self, shapes: list, parts: list, rank: int, world: int):
        self.shapes, self.parts, self.rank, self.world = shapes, parts, rank, world

    @classmethod
    def partition(cls, tensors, rank: int = 0, world: int = 1, device=None) -> "ShardedTensors":
        """Each rank keeps a copy of its own part of every (whole) tensor it is given (on `device` if given:
        a checkpoint is read on the CPU, the run may be on a GPU)."""
        shapes = [tuple(t.shape) for t in tensors]
        store = cls(shapes, [], rank, world)
        store.parts = [store.mine(i, t).to(device, copy=True) if device is not None else store.mine(i, t).clone()
                       for i, t in enumerate(tensors)]
        return store

    @classmethod
    def wrap(cls, tensors) -> "ShardedTensors":
        """One rank, no copy: the parts are views of `tensors` (in-place updates reach them)."""
        if isinstance(tensors, cls):
            return tensors
        return cls([tuple(t.shape) for t in tensors], [t.view(-1) for t in tensors], 0, 1)

    def __len__(self) -> int:
        return len(self.shapes)

    def _numel(self, i: int) -> int:
        return math.prod(self.shapes[i])

    def _part_size(self, i: int) -> int:
        return -(-self._numel(i) // self.world)

    def mine(self, i: int, whole, rank: int | None = None):
        """This rank's (or `rank`'s) part of a whole tensor shaped like tensor i (zero-padded to the part's size)."""
        import torch

        flat = whole.reshape(-1)
        if self.world == 1:
            return flat
        k = self._part_size(i)
        r = self.rank if rank is None else rank
        piece = flat[r * k: (r + 1) * k]
        if piece.numel() < k:
            piece = torch.cat([piece, piece.new_zeros(k - piece.numel())])
        return piece

    def add_(self, i: int, whole, alpha: float) -> None:
        """tensor_i += alpha · whole, with `whole` the same on every rank (each updates its own part)."""
        self.parts[i].add_(self.mine(i, whole), alpha=alpha)

    def mean_dots(self, wholes):
        """<mean over ranks of wholes_i, tensor_i> for every i, where each rank has its own `wholes` (its own
        batch's gradient): a reduce-scatter per bucket hands each rank its parts of the sum, and one all-reduce
        of the len(self) products finishes the inner products. With one rank: the plain inner products."""
        import torch
        import torch.distributed as dist

        if self.world == 1:
            return torch.stack([(g.reshape(-1).float() * d.float()).sum() for g, d in zip(wholes, self.parts)])
        out = torch.zeros(len(self), device=self.parts[0].device)  # nccl reduces device tensors only
        for group in buckets([self.parts[i].numel() * self.world for i in range(len(self))]):
            sizes = [self.parts[i].numel() for i in group]
            send = torch.cat([self.mine(i, wholes[i], r).float() for r in range(self.world) for i in group])
            summed = send.new_empty(sum(sizes))
            dist.reduce_scatter_tensor(summed, send)  # rank-major: each rank receives its parts, summed
            del send
            for i, piece in zip(group, summed.split(sizes)):
                out[i] = (piece * self.parts[i].float()).sum()
        out /= self.world
        dist.all_reduce(out)
        return out

    def full(self, i: int):
        """Tensor i whole on every rank (one all-gather when partitioned; a view with one rank)."""
        import torch.distributed as dist

        if self.world == 1:
            return self.parts[i].view(self.shapes[i])
        part = self.parts[i]
        out = part.new_empty(part.numel() * self.world)
        dist.all_gather_into_tensor(out, part.contiguous())
        return out[: self._numel(i)].view(self.shapes[i])

    def local_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)
