"""Re-score bench/erase.py's re-learning rows with fresh sampling seeds and three times the samples.

    .venv/bin/python bench/erase_rescore.py [--work runs/bench-erase] [--seeds 0,1] [--samples 120]

bench/erase.py judged the erased style after the default LoRA re-learning on 40 samples (about ±13 points at
35%): erase + IMMA kept 0.67x / 0.43x of erase-only on seeds 0 / 1. This scores the very same models and attack
outputs again (nothing is retrained) with `immunize-cli evaluate`: `--samples 120` of the style, 24 of each
other concept, sampling seed 200 + seed (never used before). Rows: the original, the ablation-erased and the
ablation-erased + IMMA models unattacked, and both after the LoRA re-learning. Writes
bench/results/erase_rescore.{json,md}.
"""

from __future__ import annotations

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
CLI = [str(ROOT / ".venv" / "bin" / "python"), "-m", "cli.main"]
STYLE = "dotted"


def main() -> None:
    from erase import follow_up_args

    ap = follow_up_args(__doc__, 120, 24)
    args = ap.parse_args()
    from raystack.models.pipeline_io import default_model_path

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        s = args.work / f"s{seed}"
        runs = {"original": default_model_path(), "ablation": s / "erased-ablation",
                "ablation-imma": s / "erased-ablation+imma", "ablation.lora": s / "lora-ablation",
                "ablation-imma.lora": s / "lora-ablation-imma"}
        missing = [str(p) for p in runs.values() if not p.is_dir()]
        if missing:
            raise SystemExit(f"run bench/erase.py --parts erase,relearn first: missing {missing[0]}")
        with tempfile.TemporaryDirectory(prefix="erase-rescore-") as d:
            argv = CLI + ["evaluate", *sum((["--run", f"{k}={v}"] for k, v in runs.items()), []), "--target", STYLE,
                          "--samples", str(args.samples), "--other-samples", str(args.other_samples), "--no-curves",
                          "--seed", str(200 + seed), "--out", str(Path(d) / "r")]
            t0 = time.time()
            res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode != 0:
                raise SystemExit(f"evaluate: exit {res.returncode}: {res.stderr[-500:]}")
            rep = json.loads((Path(d) / "r" / "report.json").read_text())["runs"]
        r = {k: {"style": v["target_accuracy"], "others": v["other_accuracy_mean"]} for k, v in rep.items()}
        rows.append({"seed": seed, "runs": r, "seconds": round(time.time() - t0, 1),
                     "relearned_ratio": (r["ablation-imma.lora"]["style"] / r["ablation.lora"]["style"]
                                         if r["ablation.lora"]["style"] else None),
                     "others_imma_vs_original": r["ablation-imma"]["others"] / r["original"]["others"],
                     "others_imma_lora_vs_original": r["ablation-imma.lora"]["others"] / r["original"]["others"]})
        print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python bench/erase_rescore.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "when": time.strftime("%Y-%m-%d %H:%M"),
           "samples": args.samples, "other_samples": args.other_samples, "rows": rows}
    lines = [f"Made by `{out['command']}` on {out['machine']} ({out['when']}). The models and attack outputs of "
             f"bench/erase.py (style `{STYLE}` ablation-erased, then IMMA; the default LoRA re-learning), judged "
             f"again on {args.samples} samples of the style and {args.other_samples} of each other concept, sampling "
             "seed 200 + seed. Acceptance (issue 21): after the LoRA, erase + IMMA <= 0.5x erase-only, others "
             ">= 0.8x.", "",
             "| seed | model | style, no attack | others, no attack | style after LoRA | others after LoRA |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        r = row["runs"]
        lines.append(f"| {row['seed']} | original | {100 * r['original']['style']:.1f}% | "
                     f"{100 * r['original']['others']:.1f}% | – | – |")
        for m in ("ablation", "ablation-imma"):
            lines.append(f"| {row['seed']} | {m} | {100 * r[m]['style']:.1f}% | {100 * r[m]['others']:.1f}% | "
                         f"{100 * r[m + '.lora']['style']:.1f}% | {100 * r[m + '.lora']['others']:.1f}% |")
    lines += ["", "| seed | after LoRA: erase + IMMA ÷ erase-only | others (IMMA, no attack) ÷ original | "
              "others (IMMA, after LoRA) ÷ original |", "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['relearned_ratio']:.2f} | {r['others_imma_vs_original']:.2f} | "
              f"{r['others_imma_lora_vs_original']:.2f} |" for r in rows]
    from _results import write_results

    write_results(args.dest, "erase_rescore", out, lines)


if __name__ == "__main__":
    main()
