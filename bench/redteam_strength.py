"""Is the red team's search as strong as a person who tries the obvious? For each model and seed, the sweep's
declared worst case beside the best guarded attack of an exhaustive grid over the space's corners, at the same
attack budget (each grid attack is one of the space's own settings at its longest steps).

    .venv/bin/python bench/redteam_strength.py --seeds 0,1 \\
        --model original=tiny --model hardened=runs/demo/hardened:mask --data runs/demo/data/attacker

The corner grid: every method of the space x {top lr, a decade below} x min-SNR {off, max} x offset noise
{off, max}, at the longest steps, the largest rank, AdamW, the whole UNet; no early stopping (fifo). Both runs
are `immunize-cli redteam` commands (resumable: rerun the same command after a stop) with the same guard,
re-scoring and seed; the ratio is the sweep's guarded worst case over the grid's (goal >= 1.0). Writes
bench/results/redteam_strength.{json,md}."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def corner_grid_space(space_path: Path, dest: Path) -> Path:
    """The space's corners as a grid space file (same budget, guard, scoring and re-scoring as the space)."""
    import yaml

    from raystack.redteam.space import load_attack_space

    space = load_attack_space(space_path)
    raw = yaml.safe_load(space_path.read_text())
    search = space.search

    def vals(key):
        return list(next(iter(search[key].values())))

    grid = {}
    if "method" in search:
        grid["method"] = {"grid": vals("method")}
    if "lr" in search:
        top = max(vals("lr"))
        low = top / 10 if top / 10 >= min(vals("lr")) else min(vals("lr"))
        grid["lr"] = {"grid": [top, low]}
    for key in ("snr_gamma", "noise_offset"):
        if key in search:
            grid[key] = {"grid": sorted({min(vals(key)), max(vals(key))})}
    fixed = dict(space.fixed)
    for key, value in (("steps", max), ("rank", max)):
        if key in search:
            fixed[key] = value(vals(key))
    if "optimizer" in search:
        fixed["optimizer"] = "adamw"
    if "cross_attention_only" in search:
        fixed["cross_attention_only"] = False
    n = 1
    for g in grid.values():
        n *= len(g["grid"])
    out = {k: v for k, v in raw.items() if k not in ("search", "fixed", "samples", "algorithm", "scheduler", "name")}
    out.update(name=f"{space.name}-corners", search=grid, fixed=fixed, samples=1, algorithm="grid", scheduler="fifo")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(f"# the corner grid of {space_path.name}: {n} attacks (bench/redteam_strength.py)\n"
                    + yaml.safe_dump(out, sort_keys=False))
    return dest


def run(cli: str, space: Path, models: list[str], data: str, target: str, out: Path, seed: int, guard: float,
        concurrent: int) -> dict:
    if not (out / "redteam.json").is_file():
        argv = [cli, "redteam", "--space", str(space), *sum((["--model", m] for m in models), []), "--data", data,
                "--target", target, "--out", str(out), "--set", f"seed={seed}", "--set", f"guard={guard}",
                "--max-concurrent", str(concurrent)] + (["--resume"] if out.exists() else [])
        print("+", " ".join(argv), flush=True)
        subprocess.run(argv, check=True)
    return json.loads((out / "redteam.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(ROOT / "attack_spaces" / "default.yaml"))
    ap.add_argument("--model", action="append", required=True, help="as redteam's --model (repeatable)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--target", default="sunset")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--guard", type=float, default=0.5)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs" / "strength"))
    ap.add_argument("--dest", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    cli = str(ROOT / ".venv" / "bin" / "immunize-cli")
    work = Path(args.work)
    grid_space = corner_grid_space(Path(args.space), work / "corner_grid.yaml")
    res = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "space": args.space,
           "guard": args.guard, "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        sweep = run(cli, Path(args.space), args.model, args.data, args.target, work / f"sweep-s{seed}", seed,
                    args.guard, args.max_concurrent)
        grid = run(cli, grid_space, args.model, args.data, args.target, work / f"grid-s{seed}", seed, args.guard,
                   args.max_concurrent)
        rows = {}
        for name, m in sweep["models"].items():
            g = grid["models"].get(name) or {}
            s_w, g_w = m.get("worst_case"), g.get("worst_case_sweep")
            rows[name] = {"sweep_worst": s_w and s_w["target"], "sweep_attack": s_w and s_w.get("attack"),
                          "grid_best": g_w and g_w["target"], "grid_attack": g_w and g_w.get("attack"),
                          "ratio": (s_w["target"] / g_w["target"]) if s_w and g_w and g_w["target"] > 0 else None,
                          "sweep_trials": m.get("trial_counts"), "grid_trials": g.get("trial_counts")}
        res["seeds"][seed] = rows
    lines = [f"Made by `.venv/bin/python bench/{res['command']}` on this 2-core CPU machine. Space "
             f"`{Path(args.space).name}` and its corner grid (every method x top lr and a decade below x min-SNR "
             f"off/max x offset noise off/max, longest steps, no early stopping), guard {args.guard}; both worst "
             "cases re-scored with fresh seeds as the red team declares them. Ratio: the sweep's guarded worst case "
             "over the grid's best guarded attack (goal >= 1.0).", "",
             "| model | seed | sweep worst case | grid's best guarded | ratio | sweep trials (done/stopped/failed) "
             "| grid trials |", "|---|---|---|---|---|---|---|"]

    def pct(v):
        return "—" if v is None else f"{v:.1%}"

    def counts(c):
        return "—" if not c else f"{c.get('done', 0)}/{c.get('stopped', 0)}/{c.get('failed', 0)}"

    for seed, rows in res["seeds"].items():
        for name, r in rows.items():
            ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append(f"| {name} | {seed} | {pct(r['sweep_worst'])} | {pct(r['grid_best'])} | {ratio} | "
                         f"{counts(r['sweep_trials'])} | {counts(r['grid_trials'])} |")
    from _results import write_results

    write_results(Path(args.dest), "redteam_strength", res, lines)


if __name__ == "__main__":
    main()
