"""Start-up benchmark: from `immunize-cli harden` process start to the first hardening step, phase by phase,
against the in-process floor (the same method code in one plain process: load the pipeline, take a step).

    .venv/bin/python bench/startup.py [--runs 3] [--e2e-steps 300] [--modes embedded-1w,embedded-2w,running-ray,floor]

Modes, run alternately (round 1: every mode, round 2: every mode, ...) so a change of load hits them alike:
- `embedded-1w` / `embedded-2w`: the command starts its own Ray (1 or 2 Ray Train workers);
- `running-ray`: a local Ray started once with `ray start --head` beforehand (the command joins it, 2 workers);
- `embedded-2w-ray-train-defaults`: as embedded-2w with Ray Train's own settings (before the start-up cuts);
- `floor`: no Ray, no DeepSpeed: one process imports, loads the pipeline and runs the method's own loop;
- `ray-train-noop`: Ray Train's own floor: the embedded Ray as `harden` starts it and a one-worker TorchTrainer
  whose loop does nothing but mark its entry (no model, no DeepSpeed).
Phases come from the marks the product writes when IMMUNIZE_STARTUP_LOG is set (`raystack/timing.py`).
With --e2e-steps N (0: skip), one more alternating pair: an N-iteration IMMA harden against the floor's N
iterations, end to end. Writes bench/results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = str(ROOT / ".venv" / "bin" / "immunize-cli")
PY = str(ROOT / ".venv" / "bin" / "python")

#: the harden job timed: IMMA against a LoRA attacker (the demo's IMMA config), a short run
HARDEN = ["--method", "imma", "--against", "lora", "--params", "attn2", "--batch-size", "4", "--seed", "0"]

#: Ray Train's defaults for what `raystack/hardening/driver.py: TRAIN_ENV` changes (the "before" mode)
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "RAY_TRAIN_METRICS_ENABLED": "1",
                      "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}

FLOOR = r"""
import json, os, sys, time
from raystack.timing import mark
mark("command_entered")
import torch
torch.set_num_threads(1)
from raystack.hardening.spec import HardenSpec
from raystack.hardening.worker import run_method
from raystack.models.pipeline_io import load_pipeline
from raystack.runtime import seed_everything
from raystack.specs import build_spec
spec = build_spec(HardenSpec, json.loads(sys.argv[1]), source="bench")
mark("validated")
seed_everything(spec.seed)
pipe = load_pipeline(spec.model)
mark("pipeline_loaded", rank=0)
def on_step(phase, done, losses):
    if done == 1 or done == spec.steps:
        mark("first_step" if done == 1 else "last_step", rank=0)
run_method(spec, pipe, 0, 1, local=True, on_step=on_step)
mark("outputs_written")
"""

#: Ray Train's own floor: the embedded Ray as `harden` starts it, then a one-worker TorchTrainer whose loop only
#: marks its entry (noop_train_loop below): what Ray Train costs before any of our worker code runs
RAY_TRAIN_NOOP = r"""
import os
from raystack.timing import mark
mark("command_entered")
mark("validated")
from raystack.raysession import init_ray
from raystack.hardening.driver import EMBEDDED_TRAIN_ENV, TRAIN_ENV
init_ray(None, False, 2)
mark("ray_ready")
for k, v in {**TRAIN_ENV, **EMBEDDED_TRAIN_ENV}.items():
    os.environ.setdefault(k, v)
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def noop_train_loop(config=None):
    from raystack.timing import mark

    mark("worker_entered")


trainer = TorchTrainer(noop_train_loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                       run_config=RunConfig(name="noop", storage_path=os.environ["NOOP_STORAGE"]))
mark("fit_called")
trainer.fit()
mark("fit_returned")
mark("outputs_written")
"""


def _world(tmp: Path) -> tuple[Path, Path]:
    target, legal = tmp / "protect", tmp / "legal"
    subprocess.run([CLI, "world", "generate", "--out", str(target), "--style", "sunset", "--n", "2", "--seed", "1"],
                   check=True, capture_output=True)
    subprocess.run([CLI, "world", "generate", "--out", str(legal), "--style", "striped", "--style", "dotted",
                    "--n", "1", "--seed", "2"], check=True, capture_output=True)
    return target, legal


def _marks(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def _first(marks: list[dict], event: str, rank: int | None = None) -> float | None:
    ts = [m["t"] for m in marks if m["event"] == event and (rank is None or m.get("rank") == rank)]
    return min(ts) if ts else None


def phases(marks: list[dict], launched: float, ended: float) -> dict:
    """Seconds per phase (None where the mode has no such phase), from the marks of one run."""
    def span(a, b):
        return None if a is None or b is None else round(b - a, 3)

    m = {e: _first(marks, e) for e in ("command_entered", "validated", "ray_ready", "fit_called", "worker_entered",
                                       "fit_returned", "outputs_written")}
    w0 = {e: _first(marks, e, 0) for e in ("worker_imported", "pipeline_loaded", "first_step", "last_step",
                                          "worker_done")}
    ds = {e: _first(marks, e) for e in ("deepspeed_import", "deepspeed_initialize", "deepspeed_ready")}
    return {
        "python_and_cli_imports": span(launched, m["command_entered"]),
        "spec_and_validation": span(m["command_entered"], m["validated"]),
        "ray_init": span(m["validated"], m["ray_ready"]),
        "driver_until_fit": span(m["ray_ready"], m["fit_called"]),
        "train_controller_and_worker_start": span(m["fit_called"], m["worker_entered"]),
        "worker_imports": span(m["worker_entered"], w0["worker_imported"]),
        "pipeline_load": span(w0["worker_imported"] or m["validated"], w0["pipeline_loaded"]),
        "deepspeed_import": span(ds["deepspeed_import"], ds["deepspeed_initialize"]),
        "deepspeed_initialize": span(ds["deepspeed_initialize"], ds["deepspeed_ready"]),
        "method_setup_and_first_step": span(w0["pipeline_loaded"], w0["first_step"]),
        "start_to_worker_loop": span(launched, m["worker_entered"]),
        "start_to_first_step": span(launched, w0["first_step"]),
        "steps": span(w0["first_step"], w0["last_step"]),
        "after_last_step": span(w0["last_step"], ended),
        "final_report_and_worker_exit": span(w0["last_step"], w0["worker_done"]),
        "fit_return_and_outputs": span(w0["worker_done"], m["outputs_written"]),
        "shutdown": span(m["outputs_written"], ended),
        "total": round(ended - launched, 3),
    }


def run_once(mode: str, steps: int, tmp: Path, target: Path, legal: Path, env_ray: dict) -> dict:
    log = tmp / f"marks-{mode}-{secrets.token_hex(4)}.jsonl"
    env = {**os.environ, "IMMUNIZE_STARTUP_LOG": str(log), "OMP_NUM_THREADS": "1"}
    out = tmp / f"out-{secrets.token_hex(4)}"
    if mode == "ray-train-noop":
        argv = [PY, "-c", RAY_TRAIN_NOOP]
        env["NOOP_STORAGE"] = str(tmp / f"{out.name}.run")
    elif mode == "floor":
        spec = {"method": "imma", "against": "lora", "params": "attn2", "batch_size": 4, "seed": 0, "steps": steps,
                "target": [str(target)], "legal": str(legal), "out": str(out), "checkpoint_every": 10**6}
        argv = [PY, "-c", FLOOR, json.dumps(spec)]
    else:
        workers = "1" if mode.startswith("embedded-1w") else "2"
        argv = [CLI, "harden", *HARDEN, "--steps", str(steps), "--checkpoint-every", str(max(steps, 1)),
                "--workers", workers, "--zero-stage", "2", "--target", str(target), "--legal", str(legal),
                "--out", str(out)]
        if mode == "running-ray":
            env.update(env_ray)
        if mode.endswith("ray-train-defaults"):  # before the start-up cuts: Ray Train's own settings
            env.update(RAY_TRAIN_DEFAULTS)
    launched = time.time()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
    ended = time.time()
    if res.returncode != 0:
        raise SystemExit(f"{mode}: exit {res.returncode}: {res.stderr[-800:]}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tmp / f"{out.name}.run", ignore_errors=True)
    return {"mode": mode, "steps": steps, "phases": phases(_marks(log), launched, ended)}


def start_local_ray(tmp: Path) -> tuple[dict, callable]:
    """`ray start --head` as a user would (token auth on), and the environment a command joins it with."""
    from raystack.ray_reaper import ENV as SESSION_ENV, reap

    token, marker = secrets.token_hex(32), secrets.token_hex(8)
    temp_dir = tempfile.mkdtemp(prefix="rayb-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1",
           SESSION_ENV: marker}  # every process of this head carries the marker: stopped by it alone
    subprocess.run([str(ROOT / ".venv" / "bin" / "ray"), "start", "--head", "--num-cpus", "3",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                    "--port", "6391"], check=True, capture_output=True, env=env)
    join = {"RAY_ADDRESS": "127.0.0.1:6391", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}

    def stop():  # never `ray stop`: it stops every Ray on the machine, other users' runs included
        reap(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
    return join, stop


def _median(rows: list[dict], key: str):
    vals = [r["phases"][key] for r in rows if r["phases"].get(key) is not None]
    return round(statistics.median(vals), 2) if vals else None


def table(results: dict) -> str:
    modes = [m for m in results["modes"] if results["runs"].get(m)]
    keys = ["python_and_cli_imports", "spec_and_validation", "ray_init", "driver_until_fit",
            "train_controller_and_worker_start", "worker_imports", "pipeline_load", "deepspeed_import",
            "deepspeed_initialize", "method_setup_and_first_step", "start_to_worker_loop", "start_to_first_step", "steps",
            "final_report_and_worker_exit", "fit_return_and_outputs", "shutdown", "after_last_step", "total"]
    lines = [f"Made by `{results['command']}` on {results['machine']} ({results['when']}); load average at start "
             f"{results['load_at_start']}. Median seconds of {results['rounds']} alternating runs per mode, "
             f"{results['steps']} IMMA steps each ('-': the mode has no such phase). Nested phases: DeepSpeed's "
             "import and initialize are inside method set-up; the after-last-step row is the sum of the three "
             "rows above it.", "",
             "| phase | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for k in keys:
        vals = [_median(results["runs"][m], k) for m in modes]
        name = f"**{k}**" if k in ("start_to_first_step", "total") else k
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    e2e = results.get("e2e")
    if e2e:
        lines += ["", f"End to end, {e2e['steps']} IMMA iterations (one run each, alternated): harden with the "
                  f"embedded Ray and 1 worker {e2e['harden_s']:.1f} s, in-process loop {e2e['floor_s']:.1f} s: "
                  f"**+{e2e['harden_s'] - e2e['floor_s']:.1f} s** (target: at most +15 s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--e2e-steps", type=int, default=300)
    ap.add_argument("--modes", default="embedded-1w,embedded-2w,embedded-2w-ray-train-defaults,running-ray,"
                    "ray-train-noop,floor")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    modes = args.modes.split(",")
    results = {"command": "python bench/startup.py " + " ".join(sys.argv[1:]), "machine":
               f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
               "when": time.strftime("%Y-%m-%d %H:%M"), "load_at_start": round(os.getloadavg()[0], 2),
               "rounds": args.runs, "steps": args.steps, "modes": modes, "runs": {m: [] for m in modes}}
    with tempfile.TemporaryDirectory(prefix="startup-") as d:
        tmp = Path(d)
        target, legal = _world(tmp)
        for r in range(args.runs):
            for mode in modes:
                # the local head runs only while its own mode is timed: an idle head beside an embedded Ray's start
                # slowed ray.init from ~3.5 s to ~7 s on two cores (the other modes are timed on an idle machine)
                join, stop = start_local_ray(tmp) if mode == "running-ray" else ({}, lambda: None)
                try:
                    row = run_once(mode, args.steps, tmp, target, legal, join)
                finally:
                    stop()
                results["runs"][mode].append(row)
                print(f"round {r + 1} {mode}: first step at {row['phases']['start_to_first_step']} s, "
                      f"total {row['phases']['total']} s", flush=True)
        if args.e2e_steps:
            h = run_once("embedded-1w", args.e2e_steps, tmp, target, legal, {})
            f = run_once("floor", args.e2e_steps, tmp, target, legal, {})
            results["e2e"] = {"steps": args.e2e_steps, "harden_s": h["phases"]["total"], "floor_s": f["phases"]["total"],
                              "harden": h, "floor": f}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(results, indent=2))
    (args.out / "startup.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
