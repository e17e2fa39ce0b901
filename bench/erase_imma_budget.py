"""Erase + IMMA with a larger defender budget: does IMMA on ablation-erased weights keep the default LoRA's
re-learning to <= 0.5x of erase-only on both seeds when it runs twice the steps?

    .venv/bin/python bench/erase_imma_budget.py [--work runs/bench-erase] [--seeds 0,1] [--steps 600]

bench/erase.py's IMMA (300 steps) reached 0.53x / 0.49x of erase-only (bench/results/erase_rescore.md, 120
samples). This hardens the same ablation-erased models with the same IMMA flags but `--steps N`
(`s<seed>/erased-ablation+imma<N>`), re-learns with the same default LoRA (`s<seed>/lora-ablation-imma<N>`), and
scores it beside the existing erase-only and 300-step runs with one `immunize-cli evaluate`: 120 samples of the
style, 24 of each other concept, sampling seed 300 + seed (not used before). Every step is an `immunize-cli`
command; an output that exists is reused. Writes bench/results/erase_imma_budget.{json,md}.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    from erase import follow_up_args

    ap = follow_up_args(__doc__, 120, 24)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    from _results import write_results
    from erase import IMMA, STYLE, once, report

    work = args.work.resolve()
    d, log = work / "data", work / "commands.log"
    imma = list(IMMA)
    imma[imma.index("--steps") + 1] = str(args.steps)
    n = args.steps
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        s = work / f"s{seed}"
        erased = s / "erased-ablation"
        if not (erased.is_dir() and (s / "lora-ablation").is_dir() and (s / "lora-ablation-imma").is_dir()):
            raise SystemExit(f"run bench/erase.py --parts erase,relearn --seeds {seed} first")
        hardened = once(s / f"erased-ablation+imma{n}", log, "harden", *imma, "--model", str(erased), "--target",
                        str(d / STYLE / "protect"), "--legal", str(d / "legal"), "--seed", str(seed))
        attacked = once(s / f"lora-ablation-imma{n}", log, "attack", "--method", "lora", "--model", str(hardened),
                        "--data", str(d / STYLE / "attacker"), "--seed", "0")
        runs = {"ablation": erased, "ablation-imma300": s / "erased-ablation+imma", f"ablation-imma{n}": hardened,
                "ablation.lora": s / "lora-ablation", "ablation-imma300.lora": s / "lora-ablation-imma",
                f"ablation-imma{n}.lora": attacked}
        ev = once(s / f"eval-imma-budget{n}", log, "evaluate", *sum((["--run", f"{k}={v}"] for k, v in runs.items()),
                                                                     []),
                  "--target", STYLE, "--samples", str(args.samples), "--other-samples", str(args.other_samples),
                  "--no-curves", "--seed", str(300 + seed))
        r = report(ev)
        base = r["ablation.lora"]["target_accuracy"]
        for m in ("ablation", "ablation-imma300", f"ablation-imma{n}"):
            rows.append({"seed": seed, "model": m, "style_no_attack": r[m]["target_accuracy"],
                         "others_no_attack": r[m]["other_accuracy_mean"],
                         "others_ratio": r[m]["other_accuracy_mean"] / r["ablation"]["other_accuracy_mean"],
                         "style_after_lora": r[f"{m}.lora"]["target_accuracy"],
                         "after_lora_ratio": r[f"{m}.lora"]["target_accuracy"] / base if base else None})
    res = {"command": "python bench/erase_imma_budget.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "when": time.strftime("%Y-%m-%d %H:%M"),
           "imma": imma, "rows": rows}
    pct = lambda v: f"{v:.1%}"  # noqa: E731
    md = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}); every model made and scored by "
          f"`immunize-cli` commands (the script's log: {log.name}). Tiny world, style `dotted` erased by 40 steps "
          f"of ablation (bench/erase.py), IMMA `{' '.join(imma)}` and bench/erase.py's 300-step run; re-learning: "
          f"the default `attack --method lora` (seed 0). {args.samples} samples of the style, {args.other_samples} "
          "per other concept, sampling seed 300 + seed. Acceptance (issue 21): after the LoRA, erase + IMMA <= 0.5x "
          "of erase-only, others >= 0.8x.", "",
          "| seed | model | others, no attack (÷ erase-only) | style after LoRA | ÷ erase-only after LoRA |",
          "|---|---|---|---|---|"]
    for x in rows:
        ratio = "–" if x["model"] == "ablation" or x["after_lora_ratio"] is None else f"{x['after_lora_ratio']:.2f}"
        md.append(f"| {x['seed']} | {x['model']} | {pct(x['others_no_attack'])} ({x['others_ratio']:.2f}) | "
                  f"{pct(x['style_after_lora'])} | {ratio} |")
    write_results(args.dest, "erase_imma_budget", res, md)


if __name__ == "__main__":
    main()
