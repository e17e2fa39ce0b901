"""Peak memory of encoding a training set with the SD VAE: bounded by the chunk size, not by the set's size.

    .venv/bin/python bench/memory.py [--size 512] [--counts 4,64] [--single-call 8]

The VAE is SD-1.5's (its real configuration, full width, random weights: memory does not depend on the values).
Each row runs in a fresh process: the peak resident memory (ru_maxrss) while `LatentBank.encode` encodes N
random images, minus the resident memory just before (VAE built, images in memory). `--single-call N` adds the
old behaviour for contrast: N images in one VAE call. Writes bench/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: SD-1.5's VAE (AutoencoderKL) configuration, as published with the model
SD15_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
            "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215}


def measure(n: int, size: int, batch: int | None) -> dict:
    """In this process: build the VAE, make n images, encode them; the peak RSS increase in MiB."""
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from diffusers import AutoencoderKL

    from raystack.diffusion import LatentBank, images_per_call

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE).eval()
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.time()
    bank = LatentBank.encode(vae, images, batch=batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert bank.mean.shape == (n, 4, size // 8, size // 8)
    return {"images": n, "size": size, "per_call": batch or images_per_call(size, size),
            "peak_increase_mib": round(peak - before), "seconds": round(time.time() - t0, 1)}


def main() -> None:
    from _results import write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--counts", default="4,64")
    ap.add_argument("--single-call", type=int, default=8, help="also encode this many in one call (0: skip)")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # n size batch: a single measurement (child)
    ap.add_argument("--dest", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if args.one:
        n, size, batch = (int(x) for x in args.one)
        print(json.dumps(measure(n, size, batch or None)))
        return
    plan = [(int(c), 0) for c in args.counts.split(",")] + ([(args.single_call, args.single_call)]
                                                           if args.single_call else [])
    rows = []
    for n, batch in plan:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), str(args.size), str(batch)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "mode": "one call" if batch else "chunked"})
        print(rows[-1], flush=True)
    res = {"command": "python bench/memory.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "when": time.strftime("%Y-%m-%d %H:%M"),
           "torch_threads": 1, "rows": rows}
    chunked = {r["images"]: r["peak_increase_mib"] for r in rows if r["mode"] == "chunked"}
    lines = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}), one torch thread, CPU. SD-1.5's VAE "
             "(real configuration, full width, random weights); peak resident memory while `LatentBank.encode` "
             "encodes N random images, minus the memory just before. Each row a fresh process.", "",
             "| images | size | images per VAE call | peak increase (MiB) | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['images']} | {r['size']} px | {r['per_call']}{' (one call)' if r['mode'] == 'one call' else ''} "
              f"| {r['peak_increase_mib']} | {r['seconds']} |" for r in rows]
    if len(chunked) >= 2:
        lo, hi = min(chunked), max(chunked)
        lines += ["", f"Encoding {hi} images peaks {chunked[hi] - chunked[lo]} MiB above encoding {lo}."]
    write_results(args.dest, "memory", res, lines)


if __name__ == "__main__":
    main()
