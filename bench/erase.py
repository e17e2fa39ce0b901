"""Concept erasure on the tiny world: how much of a trained style each method takes out, and what the other
concepts keep (no attack; whether it comes back under attack is the red team's question).

    .venv/bin/python bench/erase.py [--seeds 0,1] [--steps 40] [--samples 16]

Each method runs in one process through the method interface (`run_method`, as the Ray worker runs it);
erasure and sampling seeds vary together. Writes bench/results/erase.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--style", default="dotted")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from raystack.evaluation import other_concepts_accuracy, sampled_accuracy, tiny_world_target
    from raystack.hardening.spec import HardenSpec
    from raystack.hardening.worker import run_method
    from raystack.models.pipeline_io import load_pipeline
    from raystack.tinyworld.classifier import Judge
    from raystack.tinyworld.concepts import TRAINED_STYLES
    from raystack.tinyworld.folder import write_concept_folder

    judge = Judge()
    concept, _ = tiny_world_target(args.style)
    keep = [s for s in TRAINED_STYLES if s != args.style]

    def scores(pipe, seed):
        return (sampled_accuracy(pipe, concept.prompts, concept.criterion, args.samples, judge, seed=seed, steps=15),
                other_concepts_accuracy(pipe, args.style, max(1, args.samples // 4), judge, seed=seed + 1, steps=15))

    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_concept_folder(d / "t", None, None, [args.style], 2, 1, None, True)
        write_concept_folder(d / "l", None, None, keep, 1, 2, None, True)
        for seed in [int(s) for s in args.seeds.split(",")]:
            target, others = scores(load_pipeline(None), seed)
            rows.append({"seed": seed, "method": "none", "target": target, "others": others, "seconds": 0.0})
            for method in ("uce", "ablation", "esd-x"):
                pipe = load_pipeline(None)
                spec = HardenSpec(method=method, concept=args.style, anchor="plain", target=[d / "t"], legal=d / "l",
                                  out=d / "o", erase_steps=args.steps, batch_size=8, seed=seed)
                t0 = time.time()
                run_method(spec, pipe, local=True)
                seconds = round(time.time() - t0, 1)
                target, others = scores(pipe, seed)
                rows.append({"seed": seed, "method": method, "target": target, "others": others, "seconds": seconds})
                print(rows[-1], flush=True)
    res = {"command": "python bench/erase.py " + " ".join(sys.argv[1:]), "style": args.style, "steps": args.steps,
           "samples": args.samples, "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
           "when": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    lines = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}). Tiny world, trained style "
             f"`{args.style}` erased with anchor `plain`; {args.samples} samples of the style and "
             f"{max(1, args.samples // 4)} of each other concept; erasure ({args.steps} steps for the trained "
             "methods, batch 8, retain weight 10 on the other trained styles) and sampling seeded by the seed; no "
             "attack.", "", "| seed | method | style accuracy | other concepts | erase seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['method']} | {r['target']:.1%} | {r['others']:.1%} | {r['seconds']} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "erase.json").write_text(json.dumps(res, indent=2))
    (args.out / "erase.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
