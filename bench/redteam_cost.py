"""What a red-team sweep costs: trials per hour, and where the time goes, at 1 and 2 concurrent trials.

    .venv/bin/python bench/redteam_cost.py                 # the measurement (about 10 min on 2 idle cores)
    .venv/bin/python bench/redteam_cost.py --from runs/redteam-bench-s0/redteam.json   # rows from real runs too

Each measurement is the real command, `immunize-cli redteam` in a fresh process (Ray start and all), on the
tiny world: a fixed attacker space (LoRA and full fine-tunes of 100-200 steps, random search with a fixed
seed, no early stopping, so both concurrencies run the same trials). From the run's redteam.json:

- trials/hour: trials (run to the end or stopped early by ASHA) per hour of sweep wall time (the Ray Tune
  fit, not the scoring of the unattacked model and the re-scoring around it);
- set-up share: of the trial slots' time (sweep wall x concurrent trials), the part not spent attacking or
  scoring: a trial's own set-up (pipeline copy, data encoding, first step: `setup_s`) plus the slot time
  outside any trial (Ray placing the trial, starting or resetting its process). Goal: <= 20%.

Writes bench/results/redteam_cost.{json,md}.
"""

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
CLI = [str(ROOT / ".venv" / "bin" / "immunize-cli")]
SETS = ["name=cost", "budget=200", "samples=8", "search.method.choice=[lora, full]", "search.lr.loguniform=[3e-4, 3e-3]",
        "search.steps.choice=[100, 200]", "fixed.checkpoint_every=50", "eval_samples=8", "other_samples=2",
        "eval_steps=10", "rescore_top=1", "rescore_factor=2", "algorithm=random", "scheduler=fifo"]


def cost_row(report: dict, label: str, command_seconds: float | None = None) -> list[dict]:
    """One row per model: every trial's last report carries its time so far (set-up, attack, scoring), early-
    stopped trials included; a sweep whose trials lack it (made before the split was reported) shows '—'."""
    rows = []
    conc = report.get("max_concurrent", 1)
    for name, m in report["models"].items():
        trials = m["trials"]
        if not trials or not m.get("sweep_seconds") or m.get("resumed"):
            continue  # a resumed sweep's wall time misses the interrupted attempt
        wall = m["sweep_seconds"]
        slots = wall * conc
        timed = [t for t in trials if t.get("setup_s") is not None]
        complete = len(timed) == len(trials)
        setup, attack, score = (sum(t[k] for t in timed) for k in ("setup_s", "attack_s", "score_s"))
        in_trials = sum(t["seconds"] for t in timed)
        done = sum(t.get("status") == "done" for t in trials)
        rows.append({"run": label, "model": name, "concurrent": conc, "trials": len(trials), "trials_done": done,
                     "trials_stopped_early": len(trials) - done, "sweep_seconds": wall,
                     "trials_per_hour": round(len(trials) / wall * 3600, 1),
                     "trial_setup_s": round(setup, 1), "attack_s": round(attack, 1), "score_s": round(score, 1),
                     "outside_trials_s": round(max(0.0, slots - in_trials), 1) if complete else None,
                     "setup_share": round((slots - attack - score) / slots, 3) if complete else None,
                     "trial_setup_share": round(setup / in_trials, 3) if in_trials else None,
                     "command_seconds": command_seconds})
    return rows


def measure(concurrent: int, work: Path, data: Path) -> tuple[dict, float]:
    out = work / f"c{concurrent}"
    cmd = [*CLI, "redteam", "--space", str(ROOT / "attack_spaces" / "tiny_4.yaml"), "--model", "original=tiny",
           "--data", str(data), "--target", "sunset", "--out", str(out), "--max-concurrent", str(concurrent)]
    for s in SETS:
        cmd += ["--set", s]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "redteam.json").read_text()), time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="sources", nargs="*", default=[], type=Path, help="redteam.json files to add")
    ap.add_argument("--skip-measure", action="store_true", help="only the --from rows")
    args = ap.parse_args()
    rows = []
    if not args.skip_measure:
        with tempfile.TemporaryDirectory(prefix="redteam-cost-") as tmp:
            work = Path(tmp)
            subprocess.run([*CLI, "world", "generate", "--out", str(work / "atk"), "--style", "sunset", "--n", "1",
                            "--seed", "3"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            for conc in (1, 2):
                report, seconds = measure(conc, work, work / "atk")
                rows += cost_row(report, f"fixed 8-trial sweep, {conc} at once", round(seconds, 1))
    for src in args.sources:
        report = json.loads(src.read_text())
        rows += cost_row(report, f"{src.parent.name} (space {report['space']}, budget {report['budget']})")
    machine = f"{platform.machine()}, {os.cpu_count()} logical CPUs, one torch thread per trial"
    res = {"machine": machine, "command": "bench/redteam_cost.py " + " ".join(sys.argv[1:]), "rows": rows}
    outdir = ROOT / "bench" / "results"
    (outdir / "redteam_cost.json").write_text(json.dumps(res, indent=2))
    lines = [f"Machine: {machine}. Command: `.venv/bin/python {res['command'].strip()}`. Set-up share: of the trial "
             "slots' time (sweep wall x concurrent trials), the part not spent attacking or scoring (a trial's own "
             "set-up plus slot time outside any trial); goal <= 20%. Only for sweeps where every trial ran to its "
             "end or reported its time split (every report carries it since this benchmark; earlier sweeps show '—' "
             "for the shares over all trials).", "",
             "| run | model | at once | trials (done / stopped early) | sweep wall | trials/hour | attack | scoring "
             "| trials' own set-up | slot time outside trials | set-up share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "—" if r["setup_share"] is None else f"**{r['setup_share']:.1%}**"
        outside = "—" if r["outside_trials_s"] is None else f"{r['outside_trials_s']:.0f} s"
        lines.append(f"| {r['run']} | {r['model']} | {r['concurrent']} | {r['trials_done']} / "
                     f"{r['trials_stopped_early']} | {r['sweep_seconds']:.0f} s | {r['trials_per_hour']:.0f} | "
                     f"{r['attack_s']:.0f} s | {r['score_s']:.0f} s | {r['trial_setup_s']:.0f} s "
                     f"({'—' if r['trial_setup_share'] is None else format(r['trial_setup_share'], '.1%')}) | "
                     f"{outside} | {share} |")
    (outdir / "redteam_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
