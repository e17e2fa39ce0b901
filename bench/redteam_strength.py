"""Is the red team's search as strong as a person who tries the obvious? For each model and seed, the sweep's
declared worst case beside the best guarded attack of an exhaustive grid over the space's strong corners, at the
same attack budget.

    .venv/bin/python bench/redteam_strength.py --seeds 0,1 \\
        --model hardened=runs/demo/hardened:mask --model original=tiny --data runs/demo/data/attacker

The corner grid: every corner of `raystack.redteam.space.strong_corners` (each method at the longest steps, at
the top of the lr range and a decade below, with and without min-SNR + offset noise, the largest rank, AdamW,
the whole UNet), each run to its end (no early stopping). Both are `immunize-cli redteam` commands with the same
space, guard, re-scoring and seed (the grid is the space with `samples` = the corners and `scheduler: fifo`,
so its trials are exactly the corners), one run per model (a masked model: its compliant attacker,
`--compliant-only`); each is resumable (rerun the same command after a stop). Ratio: the sweep's declared worst
case over the grid's best guarded attack, both re-scored with fresh seeds (goal >= 1.0). Writes
bench/results/redteam_strength.{json,md} after every finished pair, so a stopped run keeps what it measured."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cli: str, space: Path, model: str, data: str, target: str, out: Path, seed: int, guard: float,
        concurrent: int, extra: list[str]) -> dict:
    if not (out / "redteam.json").is_file():
        argv = [cli, "redteam", "--space", str(space), "--model", model, "--compliant-only", "--data", data,
                "--target", target, "--out", str(out), "--set", f"seed={seed}", "--set", f"guard={guard}",
                "--max-concurrent", str(concurrent), *extra] + (["--resume"] if out.exists() else [])
        print("+", " ".join(argv), flush=True)
        subprocess.run(argv, check=True)
    return json.loads((out / "redteam.json").read_text())


def pct(v):
    return "—" if v is None else f"{v:.1%}"


def counts(c):
    return "—" if not c else f"{c.get('done', 0)}/{c.get('stopped', 0)}/{c.get('failed', 0)}"


def described(w: dict | None) -> str:
    if not w:
        return "—"
    a = w.get("attack") or {}
    keys = ("method", "lr", "steps", "snr_gamma", "noise_offset")
    return ", ".join(f"{k} {a[k]:.2g}" if isinstance(a.get(k), float) and k == "lr" else f"{k} {a[k]}"
                     for k in keys if k in a) + (" (reference)" if w.get("source") == "reference" else "")


def table(res: dict) -> list[str]:
    lines = [f"Made by `.venv/bin/python bench/{res['command']}` on this 2-core CPU machine (no GPU). Space "
             f"`{Path(res['space']).name}`; the corner grid is its {res['corners']} strong corners, each run to its "
             f"end; guard {res['guard']}; both worst cases re-scored with fresh seeds ({res['rescored_samples']} "
             "target samples) as the red team declares them. Ratio: the sweep's declared worst case over the grid's "
             "best guarded attack (goal >= 1.0). Trials: done/stopped early/failed.", "",
             "| model | seed | sweep's worst case | its attack | grid's best guarded | its attack | ratio "
             "| sweep trials | grid trials |", "|---|---|---|---|---|---|---|---|---|"]
    for seed, rows in res["seeds"].items():
        for name, r in rows.items():
            ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append(f"| {name} | {seed} | {pct(r['sweep_worst'])} (others {pct(r['sweep_others'])}) | "
                         f"{r['sweep_attack']} | {pct(r['grid_best'])} (others {pct(r['grid_others'])}) | "
                         f"{r['grid_attack']} | {ratio} | {counts(r['sweep_trials'])} | {counts(r['grid_trials'])} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(ROOT / "attack_spaces" / "default.yaml"))
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR or NAME=DIR:MASK (repeatable)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--target", default="sunset")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--guard", type=float, default=0.5)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs" / "strength"))
    ap.add_argument("--dest", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    from _results import write_results

    from raystack.redteam.space import load_attack_space, strong_corners

    space = load_attack_space(Path(args.space))
    corners = len(strong_corners(space))
    cli = str(ROOT / ".venv" / "bin" / "immunize-cli")
    work = Path(args.work)
    res = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "space": args.space, "guard": args.guard,
           "corners": corners, "rescored_samples": space.eval_samples * space.rescore_factor, "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for model in args.model:
            name = model.partition("=")[0]
            sweep = run(cli, Path(args.space), model, args.data, args.target, work / f"sweep-{name}-s{seed}", seed,
                        args.guard, args.max_concurrent, [])
            grid = run(cli, Path(args.space), model, args.data, args.target, work / f"grid-{name}-s{seed}", seed,
                       args.guard, args.max_concurrent, ["--set", f"samples={corners}", "--set", "scheduler=fifo"])
            for key, m in sweep["models"].items():
                g = grid["models"].get(key) or {}
                s_w, g_w = m.get("worst_case"), g.get("worst_case_sweep")
                res["seeds"].setdefault(str(seed), {})[key] = {
                    "sweep_worst": s_w and s_w["target"], "sweep_others": s_w and s_w["others"],
                    "sweep_attack": described(s_w), "grid_best": g_w and g_w["target"],
                    "grid_others": g_w and g_w["others"], "grid_attack": described(g_w),
                    "ratio": (s_w["target"] / g_w["target"]) if s_w and g_w and g_w["target"] > 0 else None,
                    "sweep_trials": m.get("trial_counts"), "grid_trials": g.get("trial_counts"),
                    "unattacked": m.get("unattacked"), "sweep_seconds": m.get("sweep_seconds"),
                    "grid_seconds": g.get("sweep_seconds")}
            write_results(Path(args.dest), "redteam_strength", res, table(res))


if __name__ == "__main__":
    main()
