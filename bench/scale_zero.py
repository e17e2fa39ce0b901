"""Per-rank memory of FreezeAsGuard on two ranks at each ZeRO stage: is its second UNet copy (θ_d) partitioned?

    .venv/bin/python bench/scale_zero.py [--width 160] [--resolution 256] [--stages 0,2,3] [--workers 2]

Builds an SD-1.5-shaped pipeline (raystack/models/shapes.py: the published architecture, random weights) at
`--width`, then per ZeRO stage starts `--workers` gloo processes that each run the product's own loop
(`raystack.hardening.worker.run_method`: the phase in a DeepSpeed engine, exactly what a Ray Train worker runs,
without Ray) for 2 mask steps after a 1-step preparation. Each rank records its peak resident memory (VmHWM)
and the bytes of θ_d it holds (read through the `on_step` hook). Next to them: `immunize-cli plan` for the same
run. Writes bench/results/scale_zero.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


def _rank(rank: int, world: int, port: int, values: dict, out: str) -> None:
    """One rank: the product's loop on its share of the data; writes its peak and θ_d's bytes on this rank."""
    os.environ.update(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    from raystack.hardening.spec import HardenSpec
    from raystack.hardening.worker import run_method
    from raystack.models.pipeline_io import load_pipeline
    from raystack.runtime import configure_threads
    from scale import _status_bytes

    configure_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec = HardenSpec(**values)
    pipe = load_pipeline(spec.model)
    held: dict = {}
    times: list = []
    t = [time.perf_counter()]

    def on_step(phase, done, losses):
        held["theta_d_bytes"] = phase.theta_d.local_bytes()
        now = time.perf_counter()
        times.append(now - t[0])
        t[0] = now

    run_method(spec, pipe, rank, world, on_step=on_step)
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss": _status_bytes("VmHWM"),
                                                         "step_seconds": times[-1], **held}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--stages", default="0,2,3")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dest", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    import torch.multiprocessing as mp
    from _results import write_results

    from raystack.hardening.spec import HardenSpec
    from raystack.models.shapes import build_pipeline_folder
    from raystack.planning import header_shapes, numel, plan_harden
    from raystack.tinyworld.folder import write_concept_folder

    work = Path(tempfile.mkdtemp(prefix="bench-scale-zero-"))
    model = build_pipeline_folder("sd15", work / "sd15", width=args.width, image_size=512)
    write_concept_folder(work / "t", ["circle", "square"], ["red"], ["sunset"], 1, 1, None, True)
    write_concept_folder(work / "l", ["cross"], ["blue"], ["striped", "dotted"], 1, 1, None, True)
    unet_bytes = 4 * sum(numel(s) for s in header_shapes(model / "unet").values())
    rows = []
    for stage in [int(s) for s in args.stages.split(",")]:
        values = {"method": "freezeasguard", "model": str(model), "target": [str(work / "t")],
                  "legal": str(work / "l"), "out": str(work / "o"), "steps": 2, "batch_size": 2, "user_steps": 1,
                  "finetune_steps": 1, "resolution": args.resolution, "workers": args.workers, "zero_stage": stage,
                  "checkpoint_every": 100, "rho": 0.3}
        plan = plan_harden(HardenSpec(**{**values, "target": [work / "t"], "legal": work / "l", "out": work / "o"}))
        lines = {x.what: x.bytes for x in plan["phases"]["freezeasguard"]}
        out = work / f"zero{stage}"
        out.mkdir()
        mp.start_processes(_rank, args=(args.workers, _free_port(), values, str(out)), nprocs=args.workers,
                           start_method="spawn")
        for r in range(args.workers):
            m = json.loads((out / f"rank{r}.json").read_text())
            rows.append({"zero_stage": stage, **m, "plan_peak": plan["peak"],
                         "plan_theta_d": lines["θ_d (a UNet copy)"],
                         "plan_prep_adam": next(v for k, v in lines.items() if k.startswith("preparation"))})
            print(rows[-1], flush=True)
    res = {"command": "python bench/scale_zero.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.node()} ({os.cpu_count()} CPUs, no GPU)", "when": time.strftime("%Y-%m-%d %H:%M"),
           "width": args.width, "resolution": args.resolution, "workers": args.workers, "unet_bytes": unet_bytes,
           "load_at_end": os.getloadavg()[0], "rows": rows}
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    md = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}, 1-minute load {res['load_at_end']:.1f} at "
          f"the end). SD-1.5-shaped pipeline (published architecture, random weights) at UNet width {args.width} "
          f"(SD-1.5: 320; this UNet: {gib(unet_bytes)} GiB in fp32), FreezeAsGuard trained at {args.resolution} px, "
          f"batch 2, on {args.workers} gloo ranks, each running the product's loop (`run_method`, the phase in a "
          "DeepSpeed engine) for a 1-step preparation and 2 mask steps. θ_d held = the bytes of the second copy on "
          "that rank; peak = the rank's peak resident memory; plan = `immunize-cli plan` for the same run. GiB.", "",
          "| ZeRO stage | rank | θ_d held | plan: θ_d | plan: preparation's Adam | measured peak | plan: peak |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['zero_stage']} | {r['rank']} | {gib(r['theta_d_bytes'])} | {gib(r['plan_theta_d'])} | "
                  f"{gib(r['plan_prep_adam'])} | {gib(r['peak_rss'])} | {gib(r['plan_peak'])} |")
    write_results(args.dest, "scale_zero", res, md)


if __name__ == "__main__":
    main()
