"""FreezeAsGuard's θ_d partitioned across ranks (ZeRO-3): two gloo processes, each with its own part, must give
what one whole copy gives: the whole tensors back, the Eq. 9 update, and Eq. 8's inner products with the ranks'
mean gradient."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from raystack.hardening.sharded import ShardedTensors

SHAPES = [(5,), (3, 4), (2, 3, 3), (1,)]  # odd sizes: the last part is padded


def _tensors(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _rank_main(rank: int, world: int, port: int, out_dir: str, bucket: int) -> None:
    import torch.distributed as dist

    from raystack import distributed as comm

    comm.BUCKET_ELEMENTS = bucket  # 8: several collectives per call, as a real UNet needs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = ShardedTensors.partition(_tensors(0), rank, world)
        update = _tensors(1)  # the same on every rank (an all-reduced gradient)
        for i, u in enumerate(update):
            d.add_(i, u, 0.5)
        own_grads = _tensors(10 + rank)  # each rank's own batch
        dots = d.mean_dots(own_grads)
        averaged = _tensors(10 + rank)
        comm.all_reduce_mean(averaged)
        whole = [d.full(i) for i in range(len(d))]
        from safetensors.torch import save_file

        save_file({**{f"whole{i}": w.contiguous() for i, w in enumerate(whole)}, "dots": dots,
                   **{f"mean{i}": t for i, t in enumerate(averaged)},
                   "bytes": torch.tensor(d.local_bytes())}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("bucket", [1 << 23, 8])
def test_two_ranks_hold_half_each_and_compute_what_one_whole_copy_does(tmp_path, bucket):
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path), bucket), nprocs=2, start_method="spawn")
    ref = [t + 0.5 * u for t, u in zip(_tensors(0), _tensors(1))]
    mean_grad = [(a + b) / 2 for a, b in zip(_tensors(10), _tensors(11))]
    ref_dots = torch.stack([(g * d).sum() for g, d in zip(mean_grad, ref)])
    total = sum(t.numel() for t in ref) * 4
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert all(torch.equal(got[f"whole{i}"], b) for i, b in enumerate(ref))
        assert torch.allclose(got["dots"], ref_dots, rtol=1e-5, atol=1e-6)
        assert all(torch.allclose(got[f"mean{i}"], g, atol=1e-7) for i, g in enumerate(mean_grad))
        assert int(got["bytes"]) <= total // 2 + 4 * len(SHAPES)  # half of the copy (plus at most one pad per tensor)


def test_one_rank_wraps_the_list_without_copying():
    ts = _tensors(0)
    d = ShardedTensors.wrap(ts)
    d.add_(1, torch.ones(3, 4), 2.0)
    assert torch.equal(ts[1], _tensors(0)[1] + 2.0) and d.full(1) is not None
    assert torch.allclose(d.mean_dots(ts), torch.stack([(t * t).sum() for t in ts]))


def test_buckets_bound_each_collective_and_keep_order():
    from raystack.distributed import buckets

    assert buckets([3, 3, 3], 6) == [[0, 1], [2]]
    assert buckets([1, 10, 1], 6) == [[0], [1], [2]]  # one larger than a bucket goes alone
    assert buckets([], 6) == [] and buckets([0, 0, 7], 6) == [[0, 1], [2]]
