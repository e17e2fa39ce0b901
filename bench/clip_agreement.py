"""Does `evaluate`'s CLIP path (the judge for any model) rank attacked runs as the tiny world's classifier does?

    .venv/bin/python bench/clip_agreement.py [--clip runs/tiny-clip] [--run NAME=ATTACK_DIR ...] [--seeds 0,1]

1. A CLIP that knows the tiny world (`raystack/tinyworld/clip.py`), trained here once if `--clip` holds none;
   its zero-shot style accuracy on fresh generator images is reported.
2. For each seed, `immunize-cli evaluate` twice over the same attacked runs: with the tiny world's classifier
   (`--target sunset`) and with CLIP zero-shot (`--clip DIR --target "a red circle in sunset style" --versus`
   the other four styles). Each gives every run's target accuracy.
3. Agreement: Kendall's tau between the two rankings, and the share of run pairs both judges order the same
   way (ties in either judge left out).
Writes bench/results/clip_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = [str(ROOT / ".venv" / "bin" / "python"), "-m", "cli.main"]

#: attacked runs of the sunset style this repository's runs/ holds (demo and red teams), weakest to strongest
#: protection mixed; any that is missing is skipped
DEFAULT_RUNS = [
    "demo_original=runs/demo/attack_original",
    "demo_hardened=runs/demo/attack_hardened",
    "rt_original_lora=runs/redteam-rho-s0/attacks/default-original/d1be6248",
    "rt_original_db1600=runs/redteam-rho-s0/attacks/default-original/63d4cf08",
    "rt_fag05_lora=runs/redteam-rho-s0/attacks/default-fag05.compliant/240a8f98",
    "rt_fag07_a=runs/redteam-rho-s0/attacks/default-fag07.compliant/26c8befc",
    "rt_random_a=runs/redteam-rho-s0/attacks/default-random.compliant/1d895abc",
]
STYLE_TARGET = "sunset"


def _evaluate(runs: dict[str, Path], extra: list[str], samples: int, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="clip-agree-") as d:
        out = Path(d) / "report"
        argv = CLI + ["evaluate", *sum((["--run", f"{k}={v}"] for k, v in runs.items()), []), *extra,
                      "--samples", str(samples), "--other-samples", "8", "--no-curves", "--seed", str(seed),
                      "--out", str(out)]
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode != 0:
            raise SystemExit(f"evaluate failed ({res.returncode}): {res.stderr[-600:]}")
        report = json.loads((out / "report.json").read_text())
    return {k: float(v["target_accuracy"]) for k, v in report["runs"].items()}


def same_images(runs: dict[str, Path], clip_dir: Path, samples: int, seed: int) -> dict:
    """Both judges on the very same images: per run, `samples` images of the sunset style's own evaluation
    prompts (every trained shape and colour, as `evaluate --target sunset` samples them), judged by the
    classifier (style head, junk refused) and by the product's CLIP zero-shot judge over every caption of the
    world (an image counts for sunset when its most similar caption is a sunset one)."""
    from raystack.attacks.loading import attacked_prompt, load_attacked_pipeline
    from raystack.evaluation import cycled, tiny_world_target
    from raystack.metrics import ClipZeroShot
    from raystack.sampling import generate
    from raystack.tinyworld.classifier import Judge, concept_accuracy
    from raystack.tinyworld.concepts import COLOURS, SHAPES, STYLES, caption

    concept, _ = tiny_world_target(STYLE_TARGET)
    labels = [caption(sh, co, st) for sh in SHAPES for co in COLOURS for st in STYLES]
    label_style = np.array([STYLES.index(st) for sh in SHAPES for co in COLOURS for st in STYLES])
    clip, judge = ClipZeroShot(clip_dir, labels), Judge()
    out: dict = {"classifier": {}, "clip": {}, "both": {}, "neither": {}}
    for name, path in runs.items():
        pipe, info = load_attacked_pipeline(path)
        prompts = [attacked_prompt(info, p) for p in cycled(concept.prompts, samples)]
        images = generate(pipe, prompts, seed=seed)
        pred = judge(images)
        by_cls = _cls_hits(pred)
        by_clip = label_style[clip.predict(images)] == STYLES.index(STYLE_TARGET)
        out["classifier"][name] = round(concept_accuracy(pred, style=STYLE_TARGET), 4)
        out["clip"][name] = round(float(by_clip.mean()), 4)
        out["both"][name] = round(float((by_cls & by_clip).mean()), 4)
        out["neither"][name] = round(float((~by_cls & ~by_clip).mean()), 4)
    return out


def _cls_hits(pred: dict) -> np.ndarray:
    from raystack.tinyworld.classifier import HEADS

    return (pred["junk"] < 0.5) & (pred["style"] == HEADS["style"].index(STYLE_TARGET))


def agreement(a: dict[str, float], b: dict[str, float]) -> dict:
    """Kendall's tau-b over the runs, and the share of strictly ordered pairs (by both) ordered alike."""
    names = sorted(a)
    conc = disc = ties_a = ties_b = 0
    for x, y in itertools.combinations(names, 2):
        da, db = a[x] - a[y], b[x] - b[y]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            conc += 1
        else:
            disc += 1
    denom = ((conc + disc + ties_a) * (conc + disc + ties_b)) ** 0.5
    return {"kendall_tau_b": round((conc - disc) / denom, 3) if denom else None,
            "pairs_ordered_alike": conc, "pairs_ordered_differently": disc,
            "share_alike": round(conc / (conc + disc), 3) if conc + disc else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=Path, default=ROOT / "runs" / "tiny-clip")
    ap.add_argument("--clip-steps", type=int, default=1500)
    ap.add_argument("--run", action="append", default=None, help="NAME=ATTACK_DIR (default: runs/ demo and red teams)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--same-images-only", action="store_true", help="skip the end-to-end `evaluate` comparison")
    args = ap.parse_args()
    from raystack.tinyworld.clip import TinyClipSpec, style_accuracy, train_tiny_clip
    from raystack.tinyworld.concepts import STYLES, caption

    if not (args.clip / "config.json").is_file():
        train_tiny_clip(TinyClipSpec(out=args.clip, steps=args.clip_steps))
    clip_meta = json.loads((args.clip / "tiny_clip.json").read_text())
    zero_shot = style_accuracy(args.clip)
    print("tiny CLIP zero-shot style accuracy:", zero_shot, flush=True)

    runs = {}
    for item in args.run or DEFAULT_RUNS:
        name, _, path = item.partition("=")
        p = (ROOT / path) if not Path(path).is_absolute() else Path(path)
        if (p / "attack.json").is_file():
            runs[name] = p
        else:
            print(f"skipped {name}: no attack output at {p}", flush=True)
    if len(runs) < 2:
        raise SystemExit("need at least two attacked runs")
    target_prompt = caption("circle", "red", STYLE_TARGET)
    versus = sum((["--versus", caption("circle", "red", st)] for st in STYLES if st != STYLE_TARGET), [])
    seeds = [int(s) for s in args.seeds.split(",")]
    same = []
    for seed in seeds:
        t0 = time.time()
        row = same_images(runs, args.clip, args.samples, 100 + seed)
        row = {"seed": seed, **row, **agreement(row["classifier"], row["clip"]), "seconds": round(time.time() - t0, 1)}
        same.append(row)
        print(json.dumps(row), flush=True)
    rows = []
    for seed in ([] if args.same_images_only else seeds):
        t0 = time.time()
        cls = _evaluate(runs, ["--target", STYLE_TARGET], args.samples, seed)
        clip = _evaluate(runs, ["--target", target_prompt, *versus, "--clip", str(args.clip)], args.samples, seed)
        row = {"seed": seed, "classifier": cls, "clip": clip, **agreement(cls, clip),
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"command": "python bench/clip_agreement.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "when": time.strftime("%Y-%m-%d %H:%M"),
           "clip": {"path": str(args.clip), **clip_meta, "zero_shot_style_accuracy": zero_shot},
           "runs": {k: str(v.relative_to(ROOT)) if v.is_relative_to(ROOT) else str(v) for k, v in runs.items()},
           "samples": args.samples, "target_prompt": target_prompt, "same_images": same, "rows": rows}
    lines = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}). Target: the sunset style. Classifier: "
             f"the tiny world's judge (`evaluate --target sunset`). CLIP: `evaluate --clip` zero-shot with a tiny CLIP "
             f"trained on the tiny world's generator ({clip_meta['spec']['steps']} steps, "
             f"{clip_meta['train_seconds']:.0f} s; zero-shot style accuracy on fresh images: "
             + ", ".join(f"{k} {v:.2f}" for k, v in zero_shot.items())
             + ").", "",
             "### Both judges on the same images", "",
             f"Per run and seed, {args.samples} images of the sunset style's own evaluation prompts (every trained shape "
             "and colour; sampling seed 100 + seed). Classifier: style head, junk refused. CLIP: zero-shot over all 125 "
             "captions of the world, a hit when the most similar caption is a sunset one. 'both' / 'neither': share "
             "of images both judges call sunset / neither does.", "",
             "| seed | run | classifier | CLIP | both | neither |", "|---|---|---|---|---|---|"]
    for row in same:
        for name in runs:
            lines.append(f"| {row['seed']} | {name} | {row['classifier'][name]:.3f} | {row['clip'][name]:.3f} | "
                         f"{row['both'][name]:.3f} | {row['neither'][name]:.3f} |")
    lines += ["", "| seed | Kendall tau-b | pairs ordered alike | ordered differently |", "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['kendall_tau_b']} | {r['pairs_ordered_alike']} | {r['pairs_ordered_differently']} |"
              for r in same]
    lines += ["", "### End to end through `evaluate` (each judge its own samples)", "",
              f"`evaluate --target sunset` (classifier) against `evaluate --clip DIR --target \"{target_prompt}\"` "
              f"with the four other styles as `--versus`: {args.samples} samples per run and judge, sampling seed = "
              "seed; the CLIP path samples the red circle's prompt only, the classifier path every shape and colour.",
              "", "| seed | run | classifier | CLIP |", "|---|---|---|---|"]
    for row in rows:
        for name in runs:
            lines.append(f"| {row['seed']} | {name} | {row['classifier'][name]:.3f} | {row['clip'][name]:.3f} |")
    if rows:
        lines += ["", "| seed | Kendall tau-b | pairs ordered alike | ordered differently |", "|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['kendall_tau_b']} | {r['pairs_ordered_alike']} | "
                  f"{r['pairs_ordered_differently']} |" for r in rows]
    from _results import write_results

    write_results(args.out, "clip_agreement", res, lines)


if __name__ == "__main__":
    main()
