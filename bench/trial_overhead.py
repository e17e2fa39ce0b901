"""Sweep trial overhead: how much of a trial is set-up rather than the work, for `tune` and the red team.

    .venv/bin/python bench/trial_overhead.py [--space tune_spaces/tiny_rho_4.yaml] [--redteam DIR ...]

tune: the same sweep twice, alternating, in fresh `immunize-cli tune` processes — once as trials ran before
(each trial starts a one-worker Ray Train group for its hardening: IMMUNIZE_TRIAL_TRAIN_GROUP=1) and once as
they run now (the hardening in the trial's own process). Per trial: `harden_overhead_seconds` (the hardening's
wall time minus the method's own time in the worker: Train controller and worker start, pipeline load, output
assembly) and `trial_seconds`; the overhead share is their ratio.
redteam: a finished `redteam --out` already holds, per trial, `setup_s` (entering the trial to the end of the
first attack step) and `trial_seconds`; Tune reuses trial processes, so a process's first trial is cold
(imports, judge and pipeline load) and its later ones warm. Both shares are given.
Writes bench/results/trial_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REUSED: dict[str, str] = {}  # tune runs taken from an earlier invocation (--reuse): their finishing time


def tune_once(space: Path, out: Path, train_group: bool, log: Path, reuse: bool) -> list[dict]:
    env = {**os.environ, "IMMUNIZE_TRIAL_TRAIN_GROUP": "1" if train_group else "0"}
    if reuse and (out / "results.json").is_file():  # this run finished before (the bench was interrupted)
        REUSED[out.name] = time.strftime("%H:%M", time.localtime((out / "results.json").stat().st_mtime))
        return _tune_rows(out)
    shutil.rmtree(out, ignore_errors=True)  # this bench's own work folder: a fresh sweep
    t0 = time.time()
    with log.open("a") as f:
        f.write(f"\n$ IMMUNIZE_TRIAL_TRAIN_GROUP={env['IMMUNIZE_TRIAL_TRAIN_GROUP']} immunize-cli tune --space {space} "
                f"--out {out}\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "cli.main", "tune", "--space", str(space), "--out", str(out)],
                             stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if rc != 0:
        raise SystemExit(f"tune failed (rc {rc}); see {log}")
    print(f"  tune ({'Train group' if train_group else 'in process'}): {time.time() - t0:.0f} s", flush=True)
    return _tune_rows(out)


def _tune_rows(out: Path) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())["trials"]
    return [{"seconds": r["seconds"], "overhead": r["harden_overhead_seconds"]} for r in rows if r.get("seconds")]


def redteam_trials(folder: Path) -> list[dict]:
    """Every finished trial's (setup_s, trial_seconds, pid-order) from a red-team run's Tune results."""
    out = []
    for result in sorted(folder.glob("tune/*/*/result.json")):
        lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        last = lines[-1] if lines else {}
        if last.get("trial_seconds") and last.get("setup_s") is not None:  # runs before the timing: skipped
            out.append({"pid": last.get("pid"), "start": last.get("timestamp", 0) - last["trial_seconds"],
                        "setup": last["setup_s"], "seconds": last["trial_seconds"]})
    seen, rows = set(), []
    for r in sorted(out, key=lambda r: r["start"]):
        rows.append({**r, "cold": r["pid"] not in seen})
        seen.add(r["pid"])
    return rows


def share(rows: list[dict], key: str) -> float | None:
    total = sum(r["seconds"] for r in rows)
    return round(sum(r[key] for r in rows) / total, 3) if total else None


def main() -> None:
    from _results import write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", type=Path, default=ROOT / "tune_spaces" / "tiny_rho_4.yaml")
    ap.add_argument("--rounds", type=int, default=1, help="alternating pairs of tune runs")
    ap.add_argument("--redteam", type=Path, nargs="*", default=[])
    ap.add_argument("--reuse", action="store_true", help="take finished tune runs in --work as they are")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-trial-overhead")
    ap.add_argument("--dest", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "commands.log"
    tune: dict[str, list] = {"train_group": [], "in_process": []}
    load = os.getloadavg()[0]
    for i in range(args.rounds):
        for mode in ("train_group", "in_process") if i % 2 == 0 else ("in_process", "train_group"):
            tune[mode] += tune_once(args.space, args.work / f"tune-{mode}-{i}", mode == "train_group", log,
                                    args.reuse)
    red = {str(f): redteam_trials(f) for f in args.redteam}
    res = {"command": "python bench/trial_overhead.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "when": time.strftime("%Y-%m-%d %H:%M"),
           "load_average_at_start": round(load, 2), "tune": tune, "redteam": red}
    lines = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}), load average {load:.2f} at start.", "",
             f"**tune** (`{args.space.relative_to(ROOT) if args.space.is_relative_to(ROOT) else args.space}`, "
             f"{args.rounds} alternating pair(s) of runs"
             + (f"; taken from an earlier invocation: {', '.join(f'{k} (finished {v})' for k, v in REUSED.items())}"
                if REUSED else "")
             + "): per trial, the hardening's overhead (its wall time minus the method's own time in the worker) and "
             "the whole trial (hardening, attacks, scoring).", "",
             "| trials run as | trials | median overhead (s) | median trial (s) | overhead ÷ trial time |",
             "|---|---|---|---|---|"]
    for mode, label in (("train_group", "before: a Ray Train group per trial"),
                        ("in_process", "now: hardening in the trial's process")):
        rows = tune[mode]
        if rows:
            lines.append(f"| {label} | {len(rows)} | {statistics.median(r['overhead'] for r in rows):.1f} | "
                         f"{statistics.median(r['seconds'] for r in rows):.1f} | {share(rows, 'overhead'):.0%} |")
    if red:
        lines += ["", "**redteam** (finished runs; Tune reuses each trial process: its first trial is cold, the "
                  "rest warm): set-up = entering the trial to the end of the first attack step.", "",
                  "| run | trials | cold: median set-up (s) | warm: median set-up (s) | set-up ÷ trial time, all |",
                  "|---|---|---|---|---|"]
        for f, rows in red.items():
            cold = [r["setup"] for r in rows if r["cold"]]
            warm = [r["setup"] for r in rows if not r["cold"]]
            lines.append(f"| `{Path(f).name}` | {len(rows)} | {statistics.median(cold) if cold else '–'} | "
                         f"{statistics.median(warm) if warm else '–'} | {share(rows, 'setup'):.0%} |")
    write_results(args.dest, "trial_overhead", res, lines)


if __name__ == "__main__":
    main()
