#!/usr/bin/env bash
# scripts/gpu_check.sh: the GPU check, one command for a lent GPU machine (one H100: about 6-8 minutes).
#
#   bash scripts/gpu_check.sh                 # on the GPU machine (the device tool sets OUT; carry .gpu-bundle)
#   bash scripts/gpu_check.sh --dry-run       # here, on the CPU: every step at tiny size (tests/test_gpu_scripts.py)
#
# Steps, each in its own process session with a time limit; one failing never stops the others:
#   install        the wheels of scripts/gpu_bundle.sh (.gpu-bundle) and the project, --no-index --no-deps: nothing
#                  fetched, the machine's own torch kept (GPU mode; --dry-run skips it unless --install)
#   env            versions, the GPU, the idle memory in use
#   world          an SD-1.5-shaped pipeline (published architecture, random weights) at UNet width 320, 512 px
#                  (--dry-run: width 32, 64 px), and two tiny-world image folders
#   plan           `immunize-cli plan` of the IMMA job
#   imma-kill      IMMA harden through Ray Train + DeepSpeed (--use-gpu, bf16, ZeRO-2), SIGKILLed (driver, Ray and
#                  workers) after its first checkpoint ...
#   imma-resume    ... and resumed with --resume: its manifest must say where it resumed from
#   freezeasguard  FreezeAsGuard harden, same settings
#   attack         a LoRA attack on the IMMA release (--device cuda, bf16)
#   evaluate       `evaluate --device cuda` of the tiny world's pipeline (its classifier judges 32-px models only)
#   zero3-gc       FreezeAsGuard, ZeRO-3, gradient checkpointing  } run while the time budget allows
#   erase          ESD-x erasure job                              } (GPU_CHECK_BUDGET_S, default 420 s),
#   scale          bench/scale.py, its tables written to $OUT     } else listed as skipped
#   summary        $OUT/summary.md and summary.json: every step's status and seconds, and per harden job the plan
#                  beside the measured peak
# Memory: every Python process of a step (the Ray Train worker included) runs a probe thread (a sitecustomize on
# PYTHONPATH) that records torch.cuda.max_memory_reserved, the device memory in use outside torch's allocator (CUDA
# context, NCCL, DeepSpeed's and the libraries' own allocations: cudaMemGetInfo's used minus memory_reserved), the
# process's own use as NVML sees it, and its peak resident memory; nvidia-smi samples the whole device beside it.
# measured = max(max_memory_reserved + outside-allocator peak, NVML's peak for the process, nvidia-smi's peak for
# the device less its idle use); the plan is said to cover a job only when plan >= measured. On the CPU
# (--dry-run) measured is the worker's peak resident memory.
#
# $OUT gets small files only (at most 8, what the device tool brings back): gpu_check.log, summary.md,
# summary.json, scale_*.{md,json}. Pipelines, releases and checkpoints go to a work folder under /tmp
# (GPU_CHECK_WORK), removed at the end unless --keep-work. Exit status: 0 only when every step run passed.
#
# Options: --dry-run, --install / --no-install, --only STEP,STEP, --skip STEP,STEP, --keep-work, --bundle DIR.
# Environment: OUT (default runs/gpu-check), PY (default python3; --dry-run: .venv/bin/python if there),
#   GPU_CHECK_WORK, GPU_CHECK_BUDGET_S (optional steps start only below it), GPU_CHECK_DEADLINE_S (no step runs past
#   it: the summary is always written; default 540 s on the GPU), GPU_CHECK_WIDTH / _RES / _BATCH (sizes),
#   GPU_CHECK_FAIL_STEP=NAME (testing: that step's command gets a bad flag, so it fails as a real failure would).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/gpu_check.sh"
cd "$ROOT"

STEPS="install env world plan imma-kill imma-resume freezeasguard attack evaluate zero3-gc erase scale"
OPTIONAL="zero3-gc erase scale"

# --- one step (run as `gpu_check.sh --step NAME` in its own session; the configuration comes in GC_* variables) ---
cli() { "$PY" -m cli.main "$@" ${GC_INJECT:+--gpu-check-injected-failure}; }
injected() { [ -n "${GC_INJECT:-}" ] && { echo "injected failure (GPU_CHECK_FAIL_STEP)"; return 0; }; return 1; }
read_args() { mapfile -t JOB < "$GC_WORK/jobs/$1.args"; }
keep_manifest() { cp "$1/manifest.json" "$GC_WORK/manifests/$2.json" 2>/dev/null || { echo "no manifest in $1"; return 1; }; }

step_install() {
  injected && return 1
  ls "$GC_BUNDLE"/*.whl >/dev/null 2>&1 || { echo "no wheels in $GC_BUNDLE: run scripts/gpu_bundle.sh, carry it"; return 1; }
  local had_build=0
  [ -e build ] && had_build=1
  "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir -q \
      --disable-pip-version-check "$GC_BUNDLE"/*.whl || return 1
  if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir -q \
      --disable-pip-version-check .; then
    echo "the project did not build here: importing it from $ROOT instead (a .pth file)"
    "$PY" -c "import site, sys; open(site.getsitepackages()[0] + '/immunize-cli-src.pth', 'w').write(sys.argv[1])" \
        "$ROOT" || return 1
  fi
  [ "$had_build" = 1 ] || rm -rf build
  (cd /tmp && "$PY" -c "import ray, deepspeed, diffusers, optuna, raystack, cli.main, torch
print('installed: ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__,
      'optuna', optuna.__version__, '| torch', torch.__version__, '(the machine\'s own)')")
}

step_env() {
  injected && return 1
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits | head -1 > "$GC_WORK/idle_mib.txt"
  fi
  "$PY" - "$GC_WORK/env.json" "$GC_MODE" <<'PY'
import json, platform, sys
from importlib.metadata import PackageNotFoundError, version
import torch
env = {"python": platform.python_version(), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
       "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
for name in ("ray", "deepspeed", "diffusers", "transformers", "peft", "huggingface_hub", "safetensors", "optuna",
             "pydantic", "typer", "numpy", "immunize-cli"):
    try:
        env[name] = version(name)
    except PackageNotFoundError:
        env[name] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 2), gpu_count=torch.cuda.device_count(),
               capability=f"{p.major}.{p.minor}")
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
if sys.argv[2] == "gpu" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: the GPU check needs one (--dry-run runs on the CPU)")
PY
}

step_world() {
  injected && return 1
  "$PY" - "$GC_WORK/w" "$GC_WIDTH" "$GC_RES" "$GC_TEXT" <<'PY'
import sys, time
from pathlib import Path
from raystack.models.shapes import build_pipeline_folder
from raystack.tinyworld.folder import write_concept_folder
w, width, res, text = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.time()
build_pipeline_folder("sd15", w / "sd15", width=width, image_size=res, text_width=text)
size = sum(p.stat().st_size for p in (w / "sd15").rglob("*") if p.is_file())
print(f"sd15-shaped pipeline, width {width}, {res} px, text width {text}: {size / 2**30:.2f} GiB in {time.time() - t0:.0f} s")
write_concept_folder(w / "t", ["circle"], ["red", "green"], ["sunset"], 2, 1, None, True)  # every caption: circle
write_concept_folder(w / "l", ["cross"], ["blue"], ["striped", "dotted"], 1, 2, None, True)
PY
}

step_plan() {
  read_args imma
  cli plan "${JOB[@]}"
}

step_imma_kill() {
  injected && return 1
  read_args imma
  local out="$GC_WORK/w/imma" pid ck="" i=0 limit=$((GC_STEP_LIMIT - 20))
  rm -rf "$out" "$out.run"
  setsid "$PY" -m cli.main harden "${JOB[@]}" --out "$out" &
  pid=$!
  while [ $i -lt $((limit * 5)) ] && kill -0 "$pid" 2>/dev/null; do
    ck=$(ls -d "$out.run"/harden/checkpoint_* 2>/dev/null | head -1)
    [ -n "$ck" ] && break
    sleep 0.2
    i=$((i + 1))
  done
  if [ -z "$ck" ]; then
    kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid"
    echo "no checkpoint appeared (the run ended or took too long): nothing to kill at a checkpoint"
    return 1
  fi
  kill -KILL -- "-$pid"  # the driver, its embedded Ray and the Ray Train worker: a lost machine
  wait "$pid" 2>/dev/null
  echo "SIGKILLed the run's process group at $(basename "$ck")"
  [ ! -e "$out" ] || { echo "a killed run left a release at $out"; return 1; }
  echo "killed at $(basename "$ck")" > "$GC_WORK/note"
}

step_imma_resume() {
  read_args imma
  cli harden "${JOB[@]}" --out "$GC_WORK/w/imma" --resume || return 1
  keep_manifest "$GC_WORK/w/imma" imma || return 1
  "$PY" - "$GC_WORK/manifests/imma.json" "$GC_WORK/note" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
r = m.get("resumed_from")
if not r:
    sys.exit("the resumed run's manifest has no resumed_from: it started over")
open(sys.argv[2], "w").write(f"resumed from {r}, {m.get('wall_seconds')} s")
print("resumed_from", r)
PY
}

# a job whose release nothing later reads: run it (`cli VERB` with the step's arguments), keep its manifest's
# numbers, then drop its large output
job_then_drop() {  # VERB STEP FOLDER
  read_args "$2"
  cli "$1" "${JOB[@]}" --out "$GC_WORK/w/$3" --overwrite || return 1
  keep_manifest "$GC_WORK/w/$3" "$2"
  local rc=$?
  rm -rf "$GC_WORK/w/$3"
  return $rc
}

step_freezeasguard() { job_then_drop harden freezeasguard fag; }
step_zero3_gc() { job_then_drop harden zero3-gc z3; }
step_erase() { job_then_drop erase erase erased; }

step_attack() {
  [ -d "$GC_WORK/w/imma" ] || { echo "no IMMA release to attack (imma-resume failed or did not run)"; return 1; }
  cli attack --method lora --model "$GC_WORK/w/imma" --data "$GC_WORK/w/t" --steps "$GC_ATTACK_STEPS" \
      --device "$GC_DEVICE" --precision bf16 --out "$GC_WORK/w/attack" --overwrite || return 1
  cp "$GC_WORK/w/attack/attack.json" "$GC_WORK/manifests/attack.json" 2>/dev/null
  rm -rf "$GC_WORK/w/imma" "$GC_WORK/w/attack"
}

step_evaluate() {
  cli evaluate --run tiny="$ROOT/raystack/tinyworld/assets/tiny-sd" --target circle --out "$GC_WORK/w/eval" \
      --samples "$GC_EVAL_SAMPLES" --other-samples 1 --steps "$GC_EVAL_STEPS" --no-curves --device "$GC_DEVICE" \
      --overwrite || return 1
  cp "$GC_WORK/w/eval/report.json" "$GC_WORK/manifests/evaluate.json" 2>/dev/null
  rm -rf "$GC_WORK/w/eval"
}

step_scale() {
  injected && return 1
  # its worker processes measure torch's own peak allocation, without Ray or DeepSpeed: the summary says so
  "$PY" bench/scale.py --device "$GC_DEVICE" --width "$GC_WIDTH" --text-width "$GC_TEXT" --resolution "$GC_RES" \
      --batch 1 --methods "$GC_SCALE_METHODS" --precisions bf16 --out "$GC_OUT" --name "scale_$GC_MODE" || return 1
  ! grep -q '"error"' "$GC_OUT/scale_$GC_MODE.json" || { echo "a row of bench/scale.py failed"; return 1; }
}

step_summary() {
  injected && return 1
  "$PY" - "$GC_WORK" "$GC_OUT" "$GC_MODE" <<'PY'
"""$OUT/summary.md and summary.json from the work folder: steps.tsv, env.json, jobs/*.args, mem/<step>/*.json,
manifests/*.json."""
import json, sys, time, typing
from pathlib import Path

work, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
gpu = mode == "gpu"
GiB = 2**30
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, secs, note = (line.split("\t") + ["", "", ""])[:4]
    steps.append({"step": name, "status": status, "seconds": float(secs) if secs else None, "note": note})
env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
idle = None
if (work / "idle_mib.txt").is_file():
    idle = float((work / "idle_mib.txt").read_text().split(",")[0]) * 2**20


def args_to_spec(args):
    """HardenSpec from the flags a job ran with (the same spec `plan` and `harden` build)."""
    from raystack.hardening.spec import HardenSpec

    hints = typing.get_type_hints(HardenSpec)
    fields = HardenSpec.__dataclass_fields__
    values, i = {}, 0
    while i < len(args):
        key = args[i][2:].replace("-", "_")
        if key == "cpu":
            values["use_gpu"], i = False, i + 1
            continue
        if hints.get(key) is bool:
            values[key], i = True, i + 1
            continue
        raw, i = args[i + 1], i + 2
        hint, default = str(hints[key]), fields[key].default
        if key == "target":
            values.setdefault("target", []).append(Path(raw))
        elif isinstance(default, bool):
            values[key] = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, int) or (default is None and "int" in hint and "float" not in hint):
            values[key] = int(raw)
        elif isinstance(default, float) or (default is None and "float" in hint):
            values[key] = float(raw)
        elif "Path" in hint:
            values[key] = Path(raw)
        else:
            values[key] = raw
    values.setdefault("out", work / "plan-out")
    return HardenSpec(**values)


def probes(step):
    recs = []
    for p in sorted((work / "mem" / step).glob("*.json")):
        try:
            recs.append(json.loads(p.read_text()))
        except ValueError:
            pass
    return recs


def smi_peak(step):
    f = work / "mem" / step / "smi.csv"
    vals = [float(x) for x in f.read_text().split() if x.replace(".", "").isdigit()] if f.is_file() else []
    return max(vals) * 2**20 - (idle or 0) if vals else None


def measure(step):
    """The step's worker: on the GPU the process that held the most device memory, else the Ray Train worker
    (or, in-process commands, the driver) with the largest peak resident memory."""
    recs = probes(step)
    if not recs:
        return None
    cuda = [r for r in recs if r.get("max_reserved") is not None]
    if cuda:
        r = max(cuda, key=lambda r: r.get("max_reserved", 0) + r.get("outside_max", 0))
        inner = r["max_reserved"] + r.get("outside_max", 0)
        return {"where": "gpu", "pid": r["pid"], "argv": r.get("argv"), "max_reserved": r["max_reserved"],
                "max_allocated": r.get("max_allocated"), "outside_allocator": r.get("outside_max"),
                "nvml_process": r.get("nvml_max"), "device_used_smi": smi_peak(step),
                "cuda_processes": len(cuda), "measured": max(inner, r.get("nvml_max") or 0, smi_peak(step) or 0),
                "rss_peak": r.get("vmhwm")}
    workers = ([r for r in recs if r.get("hardening") and (r.get("argv") or [""])[0] == "default_worker.py"]
               or [r for r in recs if r.get("hardening")] or recs)
    r = max(workers, key=lambda r: r.get("vmhwm", 0))
    return {"where": "cpu", "pid": r["pid"], "argv": r.get("argv"), "rss_peak": r.get("vmhwm"),
            "measured": r.get("vmhwm")}


jobs = []
for step, job in (("imma-resume", "imma"), ("freezeasguard", "freezeasguard"), ("zero3-gc", "zero3-gc"),
                  ("erase", "erase")):
    status = next((s["status"] for s in steps if s["step"] == step), "not run")
    args_file = work / "jobs" / f"{job}.args"
    row = {"job": job, "step": step, "status": status,
           "flags": " ".join(args_file.read_text().split("\n")).strip() if args_file.is_file() else None}
    if status != "not run" and args_file.is_file():
        try:
            from raystack.planning import plan_harden

            p = plan_harden(args_to_spec([a for a in args_file.read_text().split("\n") if a]))
            row.update(plan_peak=p["peak"], plan_runtime=p["runtime"], plan_phase=p["peak_phase"])
        except Exception as e:  # noqa: BLE001 - the summary names it and goes on
            row["plan_error"] = f"{type(e).__name__}: {e}"[:200]
    m = measure(step) if status == "ok" else None
    if m:
        row["measured"] = m
        if row.get("plan_peak") and m.get("measured"):
            row["plan_over_measured"] = row["plan_peak"] / m["measured"]
            row["verdict"] = ("plan covers the measured peak" if row["plan_peak"] >= m["measured"] else
                              f"plan UNDER the measured peak by {(m['measured'] - row['plan_peak']) / GiB:.2f} GiB")
    if (work / "manifests" / f"{job}.json").is_file():
        man = json.loads((work / "manifests" / f"{job}.json").read_text())
        row["manifest"] = {k: man.get(k) for k in ("wall_seconds", "worker_seconds", "resumed_from", "frozen_ratio")}
    jobs.append(row)
others = {s: measure(s) for s in ("imma-kill", "attack", "evaluate") if measure(s)}

failed = [s["step"] for s in steps if s["status"].startswith("FAILED")]
res = {"mode": mode, "made": time.strftime("%Y-%m-%d %H:%M:%S"), "env": env, "idle_device_used": idle,
       "steps": steps, "failed": failed, "jobs": jobs, "other_memory": others,
       "sizes": json.loads((work / "sizes.json").read_text())}
out.mkdir(parents=True, exist_ok=True)
(out / "summary.json").write_text(json.dumps(res, indent=1, default=str))

g = lambda b: "–" if b is None else f"{b / GiB:.2f}"  # noqa: E731
RUNTIME = next((j["plan_runtime"] for j in jobs if j.get("plan_runtime")), None)
sz = res["sizes"]
where = (f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB), torch {env.get('torch')} (CUDA {env.get('cuda')})"
         if gpu else f"CPU dry run ({env.get('machine')}), torch {env.get('torch')}")
lines = [f"# GPU check: {'PASSED' if not failed else 'FAILED (' + ', '.join(failed) + ')'}", "",
         f"`scripts/gpu_check.sh{'' if gpu else ' --dry-run'}` on {where}, {res['made']}; Python {env.get('python')}, "
         f"ray {env.get('ray')}, deepspeed {env.get('deepspeed')}, diffusers {env.get('diffusers')}, transformers "
         f"{env.get('transformers')}. SD-1.5-shaped pipeline (published architecture, random weights) at UNet width "
         f"{sz['width']}, text width {sz['text']}, {sz['res']} px, batch {sz['batch']}; one Ray Train worker.", "",
         "| step | status | seconds | note |", "|---|---|---|---|"]
for s in steps:
    lines.append(f"| {s['step']} | {s['status']} | {'' if s['seconds'] is None else round(s['seconds'])} | "
                 f"{s['note']} |")
lines += ["", "## Memory: the plan beside the measured peak (GiB, one rank)", ""]
if gpu:
    lines += ["measured = the largest of: the worker's torch.cuda.max_memory_reserved + the peak of the device "
              "memory in use outside torch's allocator (CUDA context, NCCL, DeepSpeed's and the libraries' own "
              "cudaMalloc); NVML's peak for the worker process; nvidia-smi's peak for the whole GPU less its idle use "
              "(device). The plan's peak includes its "
              f"{g(RUNTIME)} GiB for 'python, torch and libraries' (a CPU figure) and no CUDA context. The plan covers "
              "a job only when plan >= measured.", "",
              "| job | flags | plan: peak | max reserved | max allocated | outside allocator | NVML process | "
              "device (smi) | measured | plan / measured | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
else:
    lines += ["CPU dry run: measured = the Ray Train worker's peak resident memory (VmHWM), the plan's own unit on "
              "the CPU. Tiny sizes: these numbers check the plumbing, not the plan.", "",
              "| job | flags | plan: peak | measured (worker RSS) | plan / measured | verdict |",
              "|---|---|---|---|---|---|"]
for j in jobs:
    m = j.get("measured") or {}
    ratio = f"{j['plan_over_measured']:.2f}" if j.get("plan_over_measured") else "–"
    verdict = j.get("verdict") or j.get("plan_error") or (f"not measured ({j['status']})")
    flags = (j.get("flags") or "").replace(str(work), "W")
    if gpu:
        lines.append(f"| {j['job']} | `{flags}` | {g(j.get('plan_peak'))} | {g(m.get('max_reserved'))} | "
                     f"{g(m.get('max_allocated'))} | {g(m.get('outside_allocator'))} | {g(m.get('nvml_process'))} | "
                     f"{g(m.get('device_used_smi'))} | {g(m.get('measured'))} | {ratio} | {verdict} |")
    else:
        lines.append(f"| {j['job']} | `{flags}` | {g(j.get('plan_peak'))} | {g(m.get('measured'))} | {ratio} | "
                     f"{verdict} |")
if others:
    lines += ["", "Other steps (no plan): " + "; ".join(
        f"{k}: " + (f"max reserved {g(v.get('max_reserved'))}, outside allocator {g(v.get('outside_allocator'))}, "
                    f"NVML {g(v.get('nvml_process'))}" if v["where"] == "gpu" else f"peak RSS {g(v.get('rss_peak'))}")
        + " GiB" for k, v in others.items())]
lines += ["", "Not covered on one GPU: several workers (ZeRO partitioning across ranks, NCCL between GPUs), several "
          "nodes. bench/scale.py's rows (scale_*.md, if run) measure one process with the method's own torch "
          "optimizer and no DeepSpeed; on the GPU their peak is torch.cuda.max_memory_allocated: not a check of the "
          "plan."]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
}

# --- the driver: configuration, then the steps in order ----------------------------------------------------------
probe_source() {
  cat <<'PY'
"""scripts/gpu_check.sh's memory probe: in a Python process started with GPU_CHECK_MEM_DIR set, a daemon thread
writes this process's peaks to $GPU_CHECK_MEM_DIR/<pid>.json every 0.25 s once torch is imported. Then any other
sitecustomize on sys.path runs, as it would have without this one."""
import os
import sys


def _gpu_check_probe(folder):
    import json
    import threading
    import time

    pid = os.getpid()
    path = os.path.join(folder, f"{pid}.json")
    rec = {"pid": pid, "argv": [os.path.basename(a) for a in sys.argv[:2]]}

    def nvml_used():
        try:
            if "nvml" not in rec:
                try:
                    import pynvml
                except ImportError:
                    from ray._private.thirdparty import pynvml
                pynvml.nvmlInit()
                rec["nvml"] = True
                nvml_used.lib, nvml_used.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            for p in nvml_used.lib.nvmlDeviceGetComputeRunningProcesses(nvml_used.h):
                if p.pid == pid:
                    return p.usedGpuMemory
        except Exception:  # noqa: BLE001 - no NVML here: the other numbers stand
            rec["nvml"] = False
        return None

    def run():
        while True:
            time.sleep(0.25)
            torch = sys.modules.get("torch")
            if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
                continue  # not imported, or still importing
            try:
                rec["hardening"] = "raystack.hardening.worker" in sys.modules and "ray" in sys.modules
                for line in open("/proc/self/status"):
                    if line.startswith("VmHWM:"):
                        rec["vmhwm"] = int(line.split()[1]) * 1024
                if torch.cuda.is_initialized():
                    free, total = torch.cuda.mem_get_info(0)
                    reserved = torch.cuda.memory_reserved(0)
                    rec["max_reserved"] = torch.cuda.max_memory_reserved(0)
                    rec["max_allocated"] = torch.cuda.max_memory_allocated(0)
                    rec["outside_max"] = max(rec.get("outside_max", 0), total - free - reserved)
                    rec["device_used_max"] = max(rec.get("device_used_max", 0), total - free)
                    used = nvml_used() if rec.get("nvml", True) else None
                    if used is not None:
                        rec["nvml_max"] = max(rec.get("nvml_max", 0), used)
                with open(path + ".tmp", "w") as f:
                    json.dump(rec, f)
                os.replace(path + ".tmp", path)
                rec.pop("probe_error", None)
            except Exception as e:  # noqa: BLE001 - a probe never breaks the process it watches
                rec["probe_error"] = repr(e)[:200]

    threading.Thread(target=run, daemon=True, name="gpu-check-probe").start()


if os.environ.get("GPU_CHECK_MEM_DIR"):
    try:
        os.makedirs(os.environ["GPU_CHECK_MEM_DIR"], exist_ok=True)
        _gpu_check_probe(os.environ["GPU_CHECK_MEM_DIR"])
    except Exception:  # noqa: BLE001
        pass
_here = os.path.dirname(os.path.abspath(__file__))
for _p in sys.path:
    _f = os.path.join(_p or ".", "sitecustomize.py")
    if os.path.abspath(_p or ".") != _here and os.path.isfile(_f):
        exec(compile(open(_f).read(), _f, "exec"), {"__name__": "sitecustomize", "__file__": _f})
        break
PY
}

write_jobs() {  # the flags of each harden job, one per line ($GC_WORK/jobs/NAME.args): run by the steps, planned by summary
  local w="$GC_WORK/w" dev=--use-gpu
  [ "$GC_MODE" = gpu ] || dev=--cpu
  local common=(--model "$w/sd15" --target "$w/t" --legal "$w/l" --resolution "$GC_RES" --batch-size "$GC_BATCH"
                --precision bf16 --workers 1 --seed 0 "$dev")
  mkdir -p "$GC_WORK/jobs"
  printf '%s\n' --method imma --against lora --zero-stage 2 --steps "$GC_IMMA_STEPS" --checkpoint-every \
      "$GC_CKPT" "${common[@]}" > "$GC_WORK/jobs/imma.args"
  printf '%s\n' --method freezeasguard --zero-stage 2 --steps "$GC_FAG_STEPS" --user-steps "$GC_FAG_STEPS" \
      --finetune-steps "$GC_FAG_STEPS" --checkpoint-every 100 "${common[@]}" > "$GC_WORK/jobs/freezeasguard.args"
  # IMMA refuses ZeRO-3 (its attacker's adapter is set by hand inside the UNet): FreezeAsGuard runs under it
  printf '%s\n' --method freezeasguard --zero-stage 3 --gradient-checkpointing --steps "$GC_FAG_STEPS" --user-steps \
      "$GC_FAG_STEPS" --finetune-steps "$GC_FAG_STEPS" --checkpoint-every 100 "${common[@]}" \
      > "$GC_WORK/jobs/zero3-gc.args"
  printf '%s\n' --method esd-x --concept circle --anchor square --zero-stage 2 --steps "$GC_FAG_STEPS" \
      --checkpoint-every 100 "${common[@]}" > "$GC_WORK/jobs/erase.args"
}

now() { date +%s.%N; }
elapsed() { awk -v a="$T0" -v b="$(now)" 'BEGIN {printf "%d", b - a}'; }

run_step() {  # NAME LIMIT_S: the step in its own session (killed whole at its limit), its status in steps.tsv
  local name=$1 limit=$2 t rc smi="" wd pid note=""
  local left=$((GC_DEADLINE - $(elapsed) - 25))
  [ "$name" = summary ] && left=$((left + 25))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped\t\tthe deadline (%ss) is near\n' "$name" "$GC_DEADLINE" >> "$GC_WORK/steps.tsv"
    echo "=== $name: skipped (deadline)"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name (limit ${limit}s, at $(elapsed)s)"
  rm -f "$GC_WORK/note"
  mkdir -p "$GC_WORK/mem/$name"
  if [ "$GC_MODE" = gpu ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$GC_WORK/mem/$name/smi.csv" 2>/dev/null &
    smi=$!
  fi
  t=$(now)
  GC_STEP_LIMIT=$limit GPU_CHECK_MEM_DIR="$GC_WORK/mem/$name" GC_INJECT=$([ "$name" = "${GPU_CHECK_FAIL_STEP:-}" ] && echo 1) \
      setsid bash "$SELF" --step "$name" &
  pid=$!
  ( sleep "$limit" & sp=$!
    trap 'kill $sp 2>/dev/null; exit 0' TERM  # the step ended first: no sleeper left behind
    wait $sp
    kill -TERM -- "-$pid" 2>/dev/null
    sleep 10 & sp=$!
    wait $sp
    kill -KILL -- "-$pid" 2>/dev/null
  ) >/dev/null 2>&1 &
  wd=$!
  wait "$pid"
  rc=$?
  kill "$wd" 2>/dev/null
  wait "$wd" 2>/dev/null
  [ -n "$smi" ] && { kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null; }
  t=$(awk -v a="$t" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}')
  [ -f "$GC_WORK/note" ] && note=$(tr '\t\n' '  ' < "$GC_WORK/note")
  if [ "$rc" = 0 ]; then
    printf '%s\tok\t%s\t%s\n' "$name" "$t" "$note" >> "$GC_WORK/steps.tsv"
  else
    [ "$rc" -ge 124 ] && [ "$(awk -v t="$t" -v l="$limit" 'BEGIN {print (t >= l)}')" = 1 ] && note="killed at its ${limit}s limit. $note"
    printf '%s\tFAILED (exit %s)\t%s\t%s\n' "$name" "$rc" "$t" "$note" >> "$GC_WORK/steps.tsv"
  fi
  echo "=== $name: exit $rc in ${t}s"
}

main() {
  T0=$(now)
  echo "gpu_check: mode $GC_MODE, OUT $GC_OUT, work $GC_WORK, python $PY"
  mkdir -p "$GC_WORK/manifests" "$GC_WORK/mem" "$GC_WORK/probe"
  : > "$GC_WORK/steps.tsv"
  probe_source > "$GC_WORK/probe/sitecustomize.py"
  export PYTHONPATH="$GC_WORK/probe${PYTHONPATH:+:$PYTHONPATH}"
  write_jobs
  printf '{"width": %s, "text": %s, "res": %s, "batch": %s}\n' "$GC_WIDTH" "$GC_TEXT" "$GC_RES" "$GC_BATCH" \
      > "$GC_WORK/sizes.json"
  local s limit
  for s in $STEPS; do
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$s,"* ]]; then continue; fi
    if [[ ",$SKIP," == *",$s,"* ]]; then continue; fi
    if [ "$s" = install ] && [ "$INSTALL" = 0 ]; then
      printf 'install\tskipped\t\tnot asked for (--install); %s as it is\n' "$PY" >> "$GC_WORK/steps.tsv"
      continue
    fi
    if [[ " $OPTIONAL " == *" $s "* ]] && [ "$(elapsed)" -gt "$GC_BUDGET" ]; then
      printf '%s\tskipped\t\tthe time budget (%ss) was spent\n' "$s" "$GC_BUDGET" >> "$GC_WORK/steps.tsv"
      echo "=== $s: skipped (budget)"
      continue
    fi
    limit=$GC_LIMIT
    case "$s" in install|env|plan) limit=$((GC_LIMIT / 2)) ;; esac
    run_step "$s" "$limit"
  done
  run_step summary 120
  if [ ! -s "$GC_OUT/summary.md" ]; then  # the summary step failed: the steps' table still comes back
    { echo "# GPU check: FAILED (no summary: its step failed)"; echo; echo '| step | status | seconds | note |'
      echo '|---|---|---|---|'; awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$GC_WORK/steps.tsv"
    } > "$GC_OUT/summary.md"
  fi
  # what comes back from $OUT: at most 8 files of 16 MiB each; nothing large may land there
  local n big
  n=$(find "$GC_OUT" -type f | wc -l)
  big=$(find "$GC_OUT" -type f -size +16M | head -3 | tr '\n' ' ')
  if [ "$n" -gt 8 ] || [ -n "$big" ]; then
    echo "gpu_check: $GC_OUT holds $n files${big:+, large: $big}: more than the device tool brings back"
    printf 'out-folder\tFAILED (exit 1)\t\t%s files %s\n' "$n" "$big" >> "$GC_WORK/steps.tsv"
  fi
  local failed
  failed=$(grep -c $'\tFAILED' "$GC_WORK/steps.tsv")
  [ "$KEEP" = 1 ] || rm -rf "$GC_WORK"
  echo "gpu_check: done in $(elapsed)s; $([ "$failed" = 0 ] && echo 'every step run passed' || echo "$failed step(s) FAILED")"
  [ "$failed" = 0 ]
}

entry() {  # the whole entry in one function: bash has read it all before it runs (an edit of this file mid-run
  # cannot change what runs)
  if [ "${1:-}" = "--step" ]; then
    fn="step_${2//-/_}"
    "$fn"
    return $?
  fi

  GC_MODE=gpu INSTALL="" ONLY="" SKIP="" KEEP=0 GC_BUNDLE=.gpu-bundle
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) GC_MODE=dry; shift ;;
      --install) INSTALL=1; shift ;;
      --no-install) INSTALL=0; shift ;;
      --only) ONLY=$2; shift 2 ;;
      --skip) SKIP=$2; shift 2 ;;
      --keep-work) KEEP=1; shift ;;
      --bundle) GC_BUNDLE=$2; shift 2 ;;
      -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
      *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
  done
  for s in ${ONLY//,/ } ${SKIP//,/ }; do
    [[ " $STEPS " == *" $s "* ]] || { echo "gpu_check.sh: no step $s (steps: $STEPS)" >&2; exit 2; }
  done
  if [ "$GC_MODE" = gpu ]; then
    : "${INSTALL:=1}" "${PY:=python3}"
    GC_DEVICE=cuda GC_WIDTH=${GPU_CHECK_WIDTH:-320} GC_TEXT=768 GC_RES=${GPU_CHECK_RES:-512} GC_BATCH=${GPU_CHECK_BATCH:-1}
    GC_IMMA_STEPS=6 GC_CKPT=3 GC_FAG_STEPS=2 GC_ATTACK_STEPS=10 GC_EVAL_SAMPLES=4 GC_EVAL_STEPS=10
    GC_SCALE_METHODS=imma-lora,freezeasguard GC_LIMIT=240
    GC_BUDGET=${GPU_CHECK_BUDGET_S:-420} GC_DEADLINE=${GPU_CHECK_DEADLINE_S:-540}
  else  # tiny: every step's code path on the CPU, in a few minutes
    : "${INSTALL:=0}"
    [ -x .venv/bin/python ] && : "${PY:=$ROOT/.venv/bin/python}"
    : "${PY:=python3}"
    GC_DEVICE=cpu GC_WIDTH=${GPU_CHECK_WIDTH:-32} GC_TEXT=64 GC_RES=${GPU_CHECK_RES:-64} GC_BATCH=${GPU_CHECK_BATCH:-1}
    GC_IMMA_STEPS=12 GC_CKPT=4 GC_FAG_STEPS=1 GC_ATTACK_STEPS=2 GC_EVAL_SAMPLES=2 GC_EVAL_STEPS=2
    GC_SCALE_METHODS=imma-lora GC_LIMIT=600
    GC_BUDGET=${GPU_CHECK_BUDGET_S:-100000} GC_DEADLINE=${GPU_CHECK_DEADLINE_S:-100000}
  fi
  GC_OUT=${OUT:-runs/gpu-check}
  mkdir -p "$GC_OUT"
  GC_OUT=$(cd "$GC_OUT" && pwd)
  GC_WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
  mkdir -p "$GC_WORK"
  GC_WORK=$(cd "$GC_WORK" && pwd)
  case "$GC_WORK/" in "$GC_OUT"/*) echo "gpu_check.sh: the work folder must not be inside OUT ($GC_OUT)" >&2; exit 2 ;; esac
  export PY GC_MODE GC_OUT GC_WORK GC_BUNDLE GC_DEVICE GC_WIDTH GC_TEXT GC_RES GC_BATCH GC_IMMA_STEPS GC_CKPT \
      GC_FAG_STEPS GC_ATTACK_STEPS GC_EVAL_SAMPLES GC_EVAL_STEPS GC_SCALE_METHODS
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
  rm -f "$GC_OUT/gpu_check.log" "$GC_OUT/summary.md" "$GC_OUT/summary.json"
  main 2>&1 | tee "$GC_OUT/gpu_check.log"
  return "${PIPESTATUS[0]}"
}

entry "$@"; exit $?
