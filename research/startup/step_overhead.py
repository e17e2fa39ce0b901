"""Where harden's slower steps go: the same IMMA step in one process, with the method's own torch optimizer
(`run_method(local=True)`, as bench/startup.py's in-process floor) and inside a DeepSpeed engine (ZeRO-0 and
ZeRO-2, as a one-worker harden job), alternating; mean ms per step after 10 warm-up steps.

    .venv/bin/python research/startup/step_overhead.py [--steps 60] [--rounds 2]

Writes research/startup/results/step_overhead.md. Uses the product's public hooks only (HardenSpec, run_method,
seeded_pipeline, the worker's environment).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "data",
                    help="a folder with protect/ and legal/ (the demo's data)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from raystack.hardening.spec import HardenSpec
    from raystack.hardening.worker import WORKER_ENV, run_method, seeded_pipeline
    from raystack.specs import build_spec

    torch.set_num_threads(1)
    for k, v in {**WORKER_ENV, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for mode in ("torch optimizer", "DeepSpeed ZeRO-0", "DeepSpeed ZeRO-2"):
            stage = 2 if mode.endswith("2") else 0
            spec = build_spec(HardenSpec, {"method": "imma", "against": "lora", "params": "attn2", "batch_size": 4,
                                           "seed": 0, "steps": args.steps, "zero_stage": stage,
                                           "target": [str(args.data / "protect")], "legal": str(args.data / "legal"),
                                           "out": "/tmp/unused"}, source="research")
            pipe = seeded_pipeline(spec)
            ts: list[float] = []
            run_method(spec, pipe, 0, 1, local=mode == "torch optimizer", on_step=lambda *a: ts.append(time.time()))
            d = [b - a for a, b in zip(ts[10:], ts[11:])]
            results.setdefault(mode, []).append(1000 * sum(d) / len(d))
            print(mode, f"{results[mode][-1]:.1f} ms/step", flush=True)
    lines = [f"Made by `python research/startup/step_overhead.py --steps {args.steps} --rounds {args.rounds}` on "
             f"{platform.node()} ({os.cpu_count()} CPUs) ({time.strftime('%Y-%m-%d %H:%M')}, load "
             f"{os.getloadavg()[0]:.1f}). IMMA vs LoRA, attn2, batch 4, one process, one torch thread.", "",
             "| step taken with | ms per step, each round |", "|---|---|"]
    lines += [f"| {m} | {' / '.join(f'{v:.1f}' for v in vals)} |" for m, vals in results.items()]
    out = ROOT / "research" / "startup" / "results" / "step_overhead.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
