"""ESD-x's retain term: does a stronger one keep the other concepts at >= 0.9x the original? (ESD-x in the paper's
form, guided away from the empty prompt: `--esd-neutral empty`; the product's default now guides away from the
anchor caption, bench/erase.py.)

    .venv/bin/python bench/erase_esdx_retain.py [--work runs/bench-erase] [--weights 30] [--seeds 0,1]

Reads the default ESD-x rows `bench/erase.py` made (`--erase-retain-weight 10`, the default: `s<seed>/eval-erase`)
and, per extra weight W, erases with `immunize-cli erase --method esd-x --erase-steps 200 --esd-guidance 3
--esd-neutral empty --erase-retain-weight W` on the same data and seed (`s<seed>/erased-esd-x-r<W>`, skipped when
it exists) and
scores it with `immunize-cli evaluate` exactly as bench/erase.py does (40 samples of the style, 12 per other
concept, sampling seed 100 + seed). Writes bench/results/erase_esdx_retain.{json,md}.
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
CLI = [str(ROOT / ".venv" / "bin" / "python"), "-m", "cli.main"]
STYLE, ANCHOR = "dotted", "plain"


def _run(argv: list[str]) -> None:
    res = subprocess.run(CLI + argv, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])}: exit {res.returncode}: {res.stderr[-500:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-erase")
    ap.add_argument("--weights", default="30")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--dest", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    from raystack.models.pipeline_io import default_model_path

    data = args.work / "data"
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        s = args.work / f"s{seed}"
        base = json.loads((s / "eval-erase" / "report.json").read_text())["runs"]
        orig = base["original"]
        rows.append({"seed": seed, "retain_weight": 10.0, "style": base["esd-x"]["target_accuracy"],
                     "others": base["esd-x"]["other_accuracy_mean"], "original_style": orig["target_accuracy"],
                     "original_others": orig["other_accuracy_mean"]})
        for w in [float(x) for x in args.weights.split(",")]:
            tag = f"r{w:g}"
            model = s / f"erased-esd-x-{tag}"
            if not (model / "manifest.json").is_file():
                _run(["erase", "--method", "esd-x", "--erase-steps", "200", "--esd-guidance", "3", "--esd-neutral",
                      "empty",
                      "--erase-retain-weight", f"{w:g}", "--concept", STYLE, "--anchor", ANCHOR, "--target",
                      str(data / STYLE / "protect"), "--legal", str(data / "legal"), "--seed", str(seed),
                      "--out", str(model)])
            ev = s / f"eval-esd-x-{tag}"
            if not (ev / "report.json").is_file():
                _run(["evaluate", "--run", f"original={default_model_path()}", "--run", f"esd-x-{tag}={model}",
                      "--target", STYLE, "--samples", "40", "--other-samples", "12", "--no-curves", "--seed",
                      str(100 + seed), "--out", str(ev)])
            r = json.loads((ev / "report.json").read_text())["runs"]
            rows.append({"seed": seed, "retain_weight": w, "style": r[f"esd-x-{tag}"]["target_accuracy"],
                         "others": r[f"esd-x-{tag}"]["other_accuracy_mean"],
                         "original_style": r["original"]["target_accuracy"],
                         "original_others": r["original"]["other_accuracy_mean"]})
    for row in rows:
        row["others_ratio"] = round(row["others"] / row["original_others"], 3)
    res = {"command": "python bench/erase_esdx_retain.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "when": time.strftime("%Y-%m-%d %H:%M"),
           "rows": rows}
    lines = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}). Tiny world, style `{STYLE}` erased "
             f"towards `{ANCHOR}` by ESD-x in the paper's form (guided away from the empty prompt, `--esd-neutral "
             "empty`; 200 steps, guidance 3) with the retain term on the other styles' legal "
             "images at each weight; 40 samples of the style, 12 per other concept, sampling seed 100 + seed. "
             "Acceptance (issue 21): style <= 10% with the other concepts >= 0.9x the original.", "",
             "| seed | retain weight | style | other concepts | others ÷ original |", "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['retain_weight']:g} | {100 * r['style']:.1f}% | {100 * r['others']:.1f}% | "
              f"{r['others_ratio']:.2f} |" for r in rows]
    from _results import write_results

    write_results(args.dest, "erase_esdx_retain", res, lines)


if __name__ == "__main__":
    main()
