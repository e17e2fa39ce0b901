"""Memory and time of one hardening step at SD-1.5's width on this CPU, next to what `immunize-cli plan` predicts
for the same run (its formula: raystack/planning.py).

    .venv/bin/python bench/scale.py [--width 320] [--resolution 256] [--methods imma-lora,imma-full,freezeasguard]

Builds an SD-1.5-shaped pipeline (raystack/models/shapes.py: the published architecture, random weights) at
`--width` (320 = SD-1.5's own), then per method and precision runs one process that loads it and takes 2 outer
steps of the method with its own torch optimizer (one rank; the plan is asked for 1 worker, ZeRO-0, whose
accounting that matches), recording the process's peak resident memory (VmHWM) and the seconds per step.
Writes bench/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {
    "imma-lora": {"method": "imma", "against": "lora", "retain_weight": 1.0},
    "imma-full": {"method": "imma", "against": "full"},
    "freezeasguard": {"method": "freezeasguard", "user_steps": 1, "finetune_steps": 1},
}


def _status_bytes(key: str) -> int:
    """VmHWM (peak resident memory) or VmRSS of this process from /proc: unlike ru_maxrss, the peak starts afresh
    at exec, so a parent's memory does not leak into a child's measurement."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def one_run(config: dict) -> dict:
    """In a fresh process: peak RSS and seconds per step of `config`'s method, 2 steps."""
    import torch

    from raystack.hardening.spec import HardenSpec
    from raystack.hardening.worker import run_method
    from raystack.models.pipeline_io import load_pipeline
    from raystack.runtime import configure_threads

    configure_threads(1)
    torch.set_num_threads(2)
    from diffusers import StableDiffusionPipeline  # noqa: F401 - the libraries a run loads, before any model
    from transformers import CLIPTextModel  # noqa: F401

    rss0 = _status_bytes("VmRSS")
    spec = HardenSpec(**config["spec"])
    device = config.get("device", "cpu")
    pipe = load_pipeline(spec.model, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: list = []
    t = [time.perf_counter()]

    def on_step(phase, done, losses):
        now = time.perf_counter()
        times.append(now - t[0])
        t[0] = now

    run_method(spec, pipe, local=True, on_step=on_step)
    if device == "cuda":  # the GPU's peak (what `plan` sizes there; the runtime is the CUDA context's)
        return {"runtime_rss": torch.cuda.memory_reserved() - torch.cuda.memory_allocated(),
                "peak_rss": torch.cuda.max_memory_allocated(), "step_seconds": times[-1] if times else None,
                "first_step_seconds": times[0] if times else None, "device": torch.cuda.get_device_name()}
    return {"runtime_rss": rss0, "peak_rss": _status_bytes("VmHWM"),
            "step_seconds": times[-1] if times else None, "first_step_seconds": times[0] if times else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--text-width", type=int, default=768)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="scale", help="results file name (scale_gpu for the GPU check)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (scripts/gpu_check.sh)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(one_run(json.loads(args.worker))))
        return

    from _results import write_results

    from raystack.hardening.spec import HardenSpec
    from raystack.models.shapes import build_pipeline_folder
    from raystack.planning import plan_harden
    from raystack.tinyworld.folder import write_concept_folder

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    t0 = time.time()
    model = build_pipeline_folder("sd15", work / "sd15", width=args.width, image_size=512, text_width=args.text_width)
    build_s = time.time() - t0
    write_concept_folder(work / "t", ["circle", "square"], ["red"], ["sunset"], 1, 1, None, True)
    write_concept_folder(work / "l", ["cross"], ["blue"], ["striped", "dotted"], 1, 1, None, True)
    rows = []
    for name in args.methods.split(","):
        for precision in args.precisions.split(","):
            values = {**METHODS[name], "model": str(model), "target": [str(work / "t")], "legal": str(work / "l"),
                      "out": str(work / "o"), "steps": 2, "batch_size": args.batch, "resolution": args.resolution,
                      "precision": precision, "workers": 1, "zero_stage": 0, "checkpoint_every": 100}
            plan = plan_harden(HardenSpec(**{**values, "target": [work / "t"], "legal": work / "l",
                                             "out": work / "o"}))
            env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
            res = subprocess.run([sys.executable, __file__, "--worker", json.dumps({"spec": values,
                                                                                   "device": args.device})],
                                 capture_output=True, text=True, env=env)
            line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                rows.append({"method": name, "precision": precision, "error": res.stderr.strip().splitlines()[-1:]})
                continue
            m = json.loads(line[7:])
            top = plan["peak_phase"]
            rows.append({"method": name, "precision": precision, **m, "plan_peak": plan["peak"],
                         "plan_weights": sum(x.bytes for x in plan["weights"]),
                         "plan_method_state": sum(x.bytes for x in plan["phases"][top]),
                         "plan_activations": plan["activations"][top][0],
                         "plan_over_measured": plan["peak"] / m["peak_rss"]})
            print(rows[-1], flush=True)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
           "command": "python bench/scale.py " + " ".join(sys.argv[1:]), "width": args.width,
           "text_width": args.text_width, "resolution": args.resolution, "batch": args.batch,
           "build_seconds": round(build_s, 1), "load_at_start": os.getloadavg()[0], "rows": rows}
    res["device"] = next((r["device"] for r in rows if r.get("device")), "cpu")
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    where = res["machine"] if res["device"] == "cpu" else f"{res['device']} (peak = torch's peak GPU allocation)"
    lines = [f"Made by `{res['command']}` on {where} (1-minute load {res['load_at_start']:.1f} at the end). "
             f"SD-1.5-shaped pipeline (published architecture, random weights) at UNet width {args.width} "
             f"(SD-1.5: 320), text width {args.text_width}, trained at {args.resolution} px, batch {args.batch}; one "
             "process per row, 2 outer steps with the method's own torch optimizer (one rank). Peak = the process's "
             "peak resident memory; plan = `immunize-cli plan` for the same run (1 worker, ZeRO-0), GiB.", "",
             "| method | precision | s/step | measured peak | plan: weights | plan: method state | plan: activations "
             "| runtime measured (plan: 0.45) | plan: peak | plan / measured |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['precision']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['precision']} | {r['step_seconds']:.1f} | {gib(r['peak_rss'])} | "
                     f"{gib(r['plan_weights'])} | {gib(r['plan_method_state'])} | {gib(r['plan_activations'])} | "
                     f"{gib(r['runtime_rss'])} | {gib(r['plan_peak'])} | {r['plan_over_measured']:.2f} |")
    write_results(args.out, args.name, res, lines)


if __name__ == "__main__":
    main()
