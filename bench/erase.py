"""erase → harden on the tiny world, through the CLI: what each erasure takes out, what a LoRA re-learns after it,
and what IMMA on the erased weights keeps from being re-learnt — single concept and three concepts at once.

    .venv/bin/python bench/erase.py [--seeds 0,1] [--samples 40] [--parts erase,relearn,relearn-esd,three]
        [--work DIR]

Every model is made and judged by `immunize-cli` commands (erase, harden, attack, evaluate), each a fresh process
as a user runs them; a step whose output exists is skipped, so an interrupted run continues where it stopped.
Parts (the style: dotted, trained into the tiny model; anchor: plain):
- erase:   `erase --method {uce,ablation,esd-x}`; `evaluate` the style and the other concepts (no attack).
- relearn: the ablation-erased model, then `harden --method imma --against lora` on it (S = attn2, batch 8, outer lr
           3e-3, retain weight 10, retain target = the erased model, 300 steps); the default `attack --method lora`
           on the attacker's own images of the style against original, erased and erased + IMMA (and UCE-erased);
           `evaluate` after the attack with a fresh sampling seed.
- relearn-esd: the same with the ESD-x-erased model (IMMA's own setting, Tab. 3: ESD-erased weights), its own
           `evaluate` (eval-relearn-esd-x).
- three:   dotted, striped and checkered erased with UCE and hardened with IMMA in one job (`harden --erase uce`,
           one --target folder per concept: balanced draws); one LoRA re-learning all three; `evaluate` with the
           three --target flags (each concept on its own, the mean and the worst).
Writes bench/results/erase.{json,md}.
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
CLI = [sys.executable, "-m", "cli.main"]
STYLE, ANCHOR = "dotted", "plain"
THREE = ("dotted", "striped", "checkered")
#: per erasure method: its flags (trained methods: steps and learning rate of the cross-attention fine-tune)
ERASERS = {"uce": [], "ablation": ["--erase-steps", "40"], "esd-x": ["--erase-steps", "200"]}
IMMA = ["--method", "imma", "--against", "lora", "--steps", "300", "--batch-size", "8", "--outer-lr", "3e-3",
        "--retain-weight", "10", "--params", "attn2", "--retain-target", "original"]


def imma_flags(**changes) -> list[str]:
    """IMMA's flags with some changed: flag=value replaces or adds `--flag value`, flag=None drops the flag."""
    flags = list(IMMA)
    for k, v in changes.items():
        flag = "--" + k.replace("_", "-")
        if v is None:
            i = flags.index(flag)
            del flags[i:i + 2]
        elif flag in flags:
            flags[flags.index(flag) + 1] = v
        else:
            flags += [flag, v]
    return flags


def cli(log: Path, *argv: str) -> None:
    """One immunize-cli command as a user runs it; its output goes to the log, a failure stops the bench."""
    t0 = time.time()
    with log.open("a") as f:
        f.write(f"\n$ immunize-cli {' '.join(argv)}\n")
        f.flush()
        rc = subprocess.call([*CLI, *argv], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        f.write(f"# rc={rc} in {time.time() - t0:.0f} s\n")
    if rc != 0:
        raise SystemExit(f"immunize-cli {argv[0]} failed (rc {rc}); see {log}")
    print(f"  {argv[0]} {argv[-1]}: {time.time() - t0:.0f} s", flush=True)


def once(out: Path, log: Path, *argv: str) -> Path:
    """Run the command unless its --out (written atomically) is already there."""
    if not out.exists():
        cli(log, *argv, "--out", str(out))
    return out


def data(work: Path) -> Path:
    """protect / attacker / legal folders per style, laid out as research/imma/imma_relearn.py's."""
    from raystack.tinyworld.concepts import TRAINED_STYLES
    from raystack.tinyworld.folder import write_concept_folder

    d = work / "data"
    if not (d / "done").exists():
        for st in THREE:
            write_concept_folder(d / st / "protect", None, None, [st], 2, 1, None, True)
            write_concept_folder(d / st / "attacker", ["circle", "square", "triangle", "cross"], None, [st], 1, 3,
                                 None, True)
        write_concept_folder(d / "legal", None, None, [s for s in TRAINED_STYLES if s != STYLE], 1, 2, None, True)
        write_concept_folder(d / "legal-three", None, None, [s for s in TRAINED_STYLES if s not in THREE], 2, 2,
                             None, True)
        write_concept_folder(d / "attacker-three", ["circle", "square", "triangle", "cross"], None, list(THREE), 1, 3,
                             None, True)
        (d / "done").write_text("")
    return d


def follow_up_args(doc: str, samples: int, other_samples: int) -> argparse.ArgumentParser:
    """The flags of the benches that continue this one's work folder (erase_rescore, erase_imma_budget,
    erase_imma_variants): where the models are, which seeds, how many samples, where the results go."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-erase")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--samples", type=int, default=samples)
    ap.add_argument("--other-samples", type=int, default=other_samples)
    ap.add_argument("--dest", type=Path, default=ROOT / "bench" / "results")
    return ap


def report(path: Path) -> dict:
    return json.loads((path / "report.json").read_text())["runs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--samples", type=int, default=40, help="images per protected concept")
    ap.add_argument("--other-samples", type=int, default=12, help="images per other concept")
    ap.add_argument("--parts", default="erase,relearn,relearn-esd,three")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-erase")
    ap.add_argument("--dest", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    from raystack.models.pipeline_io import default_model_path

    original = str(default_model_path())
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    d = data(work)
    log = work / "commands.log"
    parts = args.parts.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    n = str(args.samples)
    evaluate_n = ["--samples", n, "--other-samples", str(args.other_samples)]
    rows: dict[str, list] = {"erase": [], "relearn": [], "three": []}  # relearn-esd adds to relearn
    common = ["--concept", STYLE, "--anchor", ANCHOR, "--target", str(d / STYLE / "protect"), "--legal",
              str(d / "legal")]
    for seed in seeds:
        s = work / f"s{seed}"
        sample_seed = str(100 + seed)  # sampling never reuses a training seed
        erased = {}
        if "erase" in parts or "relearn" in parts:
            for m, flags in ERASERS.items():
                if m == "esd-x" and "erase" not in parts:
                    continue
                erased[m] = once(s / f"erased-{m}", log, "erase", "--method", m, *flags, *common, "--seed", str(seed))
        if "erase" in parts:
            ev = once(s / "eval-erase", log, "evaluate", "--run", f"original={original}",
                      *[a for m, p in erased.items() for a in ("--run", f"{m}={p}")], "--target", STYLE, *evaluate_n,
                      "--no-curves", "--seed", sample_seed)
            runs = report(ev)
            for m in ("original", *erased):
                r = runs[m]
                rows["erase"].append({"seed": seed, "method": "none" if m == "original" else m,
                                      "target": r["target_accuracy"], "others": r["other_accuracy_mean"],
                                      "others_ratio": r["other_accuracy_mean"] / runs["original"]["other_accuracy_mean"]})
        if "relearn" in parts:
            hardened = once(s / "erased-ablation+imma", log, "harden", *IMMA, "--model", str(erased["ablation"]),
                            "--target", str(d / STYLE / "protect"), "--legal", str(d / "legal"), "--seed", str(seed))
            models = {"original": original, "uce": erased["uce"], "ablation": erased["ablation"],
                      "ablation-imma": hardened}
            # the original is scored unattacked only: it draws the style already (research/imma: 80-88% after
            # the LoRA too), and 2 cores cannot afford every attack
            attacked = {m: once(s / f"lora-{m}", log, "attack", "--method", "lora", "--model", str(p), "--data",
                                str(d / STYLE / "attacker"), "--seed", "0") for m, p in models.items()
                        if m != "original"}
            ev = once(s / "eval-relearn", log, "evaluate",
                      *[a for m, p in models.items() for a in ("--run", f"{m}={p}")],
                      *[a for m, p in attacked.items() for a in ("--run", f"{m}.lora={p}")],
                      "--target", STYLE, *evaluate_n, "--no-curves", "--seed", sample_seed)
            runs = report(ev)
            for m in models:
                lora = runs.get(f"{m}.lora") or {}
                rows["relearn"].append({"seed": seed, "model": m, "target_no_attack": runs[m]["target_accuracy"],
                                        "others_no_attack": runs[m]["other_accuracy_mean"],
                                        "target_after_lora": lora.get("target_accuracy"),
                                        "others_after_lora": lora.get("other_accuracy_mean")})
        if "relearn-esd" in parts:  # IMMA's own setting: ESD-erased weights (IMMA Tab. 3), re-learnt by LoRA
            esd = once(s / "erased-esd-x", log, "erase", "--method", "esd-x", *ERASERS["esd-x"], *common, "--seed",
                       str(seed))
            hardened = once(s / "erased-esd-x+imma", log, "harden", *IMMA, "--model", str(esd),
                            "--target", str(d / STYLE / "protect"), "--legal", str(d / "legal"), "--seed", str(seed))
            models = {"esd-x": esd, "esd-x-imma": hardened}
            attacked = {m: once(s / f"lora-{m}", log, "attack", "--method", "lora", "--model", str(p), "--data",
                                str(d / STYLE / "attacker"), "--seed", "0") for m, p in models.items()}
            ev = once(s / "eval-relearn-esd-x", log, "evaluate",
                      *[a for m, p in models.items() for a in ("--run", f"{m}={p}")],
                      *[a for m, p in attacked.items() for a in ("--run", f"{m}.lora={p}")],
                      "--target", STYLE, *evaluate_n, "--no-curves", "--seed", sample_seed)
            runs = report(ev)
            for m in models:
                lora = runs[f"{m}.lora"]
                rows["relearn"].append({"seed": seed, "model": m, "target_no_attack": runs[m]["target_accuracy"],
                                        "others_no_attack": runs[m]["other_accuracy_mean"],
                                        "target_after_lora": lora["target_accuracy"],
                                        "others_after_lora": lora["other_accuracy_mean"]})
        if "three" in parts:
            targets = [a for st in THREE for a in ("--target", str(d / st / "protect"))]
            hardened = once(s / "three-uce+imma", log, "harden", "--erase", "uce", "--concept", ",".join(THREE),
                            "--anchor", ANCHOR, *IMMA, *targets, "--legal", str(d / "legal-three"), "--seed", str(seed))
            erased3 = once(s / "three-uce", log, "erase", "--method", "uce", "--concept", ",".join(THREE), "--anchor",
                           ANCHOR, *targets, "--legal", str(d / "legal-three"), "--seed", str(seed))
            models = {"original": original, "uce": erased3, "uce-imma": hardened}
            attacked = {m: once(s / f"three-lora-{m}", log, "attack", "--method", "lora", "--model", str(p), "--data",
                                str(d / "attacker-three"), "--seed", "0") for m, p in models.items()
                        if m != "original"}
            ev = once(s / "eval-three", log, "evaluate",
                      *[a for m, p in models.items() for a in ("--run", f"{m}={p}")],
                      *[a for m, p in attacked.items() for a in ("--run", f"{m}.lora={p}")],
                      *[a for st in THREE for a in ("--target", st)], *evaluate_n, "--no-curves",
                      "--seed", sample_seed)
            runs = report(ev)
            for m in models:
                for when, key in (("no attack", m), ("after LoRA", f"{m}.lora")):
                    if key not in runs:
                        continue
                    r = runs[key]
                    rows["three"].append({"seed": seed, "model": m, "when": when, **r["target_accuracy_by_concept"],
                                          "mean": r["target_accuracy"], "worst": r["target_accuracy_max"],
                                          "others": r["other_accuracy_mean"]})
    write(args, rows)


def write(args, rows: dict) -> None:
    """Merge these rows into bench/results/erase.json (by part and seed) and rewrite the markdown."""
    path = args.dest / "erase.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(old.get("rows"), dict):  # the earlier, one-process bench's file: replaced
        old = {}
    merged = {}
    for part in ("erase", "relearn", "three"):
        new = rows[part]
        fresh = {(r["seed"], r.get("model")) for r in new}  # relearn rows are merged by model too (two parts fill it)
        merged[part] = sorted([r for r in old.get("rows", {}).get(part, [])
                               if (r["seed"], r.get("model")) not in fresh and (r["seed"], None) not in fresh] + new,
                              key=lambda r: r["seed"])
    command = "python bench/erase.py " + " ".join(sys.argv[1:])
    commands = [c for c in old.get("commands", []) if c != command] + [command]
    res = {"command": "; ".join(commands), "commands": commands, "samples": args.samples,
           "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "when": time.strftime("%Y-%m-%d %H:%M"),
           "erasers": ERASERS, "imma": IMMA, "rows": merged}
    pct = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}); every model made and scored by "
             f"`immunize-cli` commands (the exact ones: the script's log). Tiny world; {args.samples} samples per "
             f"protected concept and {args.other_samples} per other concept, sampling seed 100 + seed. Style `dotted` "
             "erased towards `plain`; erasure flags "
             f"{json.dumps(ERASERS)}; IMMA `{' '.join(IMMA)}`; re-learning: the default `attack --method lora` "
             "(seed 0) on the attacker's own images of the style(s).", ""]
    if merged["erase"]:
        lines += ["### Erasure (no attack)", "", "| seed | method | style accuracy | other concepts | others ÷ original |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['method']} | {pct(r['target'])} | {pct(r['others'])} | {r['others_ratio']:.2f} |"
                  for r in merged["erase"]]
    if merged["relearn"]:
        lines += ["", "### Re-learning by LoRA after erasure, and IMMA on the erased weights", "",
                  "| seed | model | style, no attack | others, no attack | style after LoRA | others after LoRA "
                  "| after LoRA ÷ erase-only |", "|---|---|---|---|---|---|---|"]
        for r in merged["relearn"]:
            ratio = "–"
            if r["model"].endswith("-imma"):  # X-imma against X, the same erasure without IMMA
                ref = next(x for x in merged["relearn"] if x["seed"] == r["seed"] and x["model"] == r["model"][:-5])
                if ref["target_after_lora"]:
                    ratio = f"{r['target_after_lora'] / ref['target_after_lora']:.2f}"
                ratio += f" (others {r['others_no_attack'] / ref['others_no_attack']:.2f}× unattacked)"
            lines.append(f"| {r['seed']} | {r['model']} | {pct(r['target_no_attack'])} | {pct(r['others_no_attack'])} "
                         f"| {pct(r['target_after_lora'])} | {pct(r['others_after_lora'])} | {ratio} |")
    if merged["three"]:
        lines += ["", "### Three concepts at once: UCE erasure + IMMA in one job, one LoRA re-learning all three", "",
                  f"| seed | model | when | {' | '.join(THREE)} | mean | worst | other concepts |",
                  "|---|---|---|" + "---|" * (len(THREE) + 3)]
        lines += [f"| {r['seed']} | {r['model']} | {r['when']} | {' | '.join(pct(r[c]) for c in THREE)} | "
                  f"{pct(r['mean'])} | {pct(r['worst'])} | {pct(r['others'])} |" for r in merged["three"]]
    args.dest.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    (args.dest / "erase.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
