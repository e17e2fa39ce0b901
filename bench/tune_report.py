"""Markdown table of a finished sweep whose space grids `method` (FreezeAsGuard vs Random-ρ) and `rho`:
one row per ρ with both methods' objectives side by side, the best trial, and the paper's defaults.

    .venv/bin/python bench/tune_report.py SWEEP_DIR OUT "THE TUNE COMMAND THAT MADE SWEEP_DIR"

Copies the sweep's results.json and pareto.png to OUT.json and OUT.png and writes OUT.md. Numbers are the sweep's own.
"""

import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_RHO = {0.3: "paper, faces", 0.7: "paper, artworks"}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def main() -> None:
    from raystack.atomic import atomic_write_bytes, atomic_write_text

    sweep, out, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    res = json.loads((sweep / "results.json").read_text())
    by = {}
    for r in res["trials"]:
        s = r["setting"]
        by[(s.get("method", "freezeasguard"), float(s["rho"]))] = r
    rhos = sorted({rho for _, rho in by})
    best = res["best"]
    lines = [f"Sweep `{res['space']}`, objective `{res['objective']}` (mitigation: held-out style's accuracy after "
             f"the attack, lower is better; utility: other concepts' accuracy after a legal fine-tune). "
             f"Machine: {platform.machine()}, {__import__('os').cpu_count()} logical CPUs, 1 torch thread per "
             f"process. Command: `{command}`, then `python bench/tune_report.py {sweep} {out} ...`.", "",
             "| ρ | FreezeAsGuard mitigation | utility | objective | Random-ρ mitigation | utility | objective |",
             "|---|---|---|---|---|---|---|"]
    for rho in rhos:
        f, r = by.get(("freezeasguard", rho), {}), by.get(("random-freeze", rho), {})
        label = f"{rho:g}" + (f" ({PAPER_RHO[rho]})" if rho in PAPER_RHO else "")
        obj = lambda x: "-" if x.get("objective") is None else f"{x['objective']:.3f}"  # noqa: E731
        lines.append(f"| {label} | {_pct(f.get('mitigation'))} | {_pct(f.get('utility'))} | {obj(f)} | "
                     f"{_pct(r.get('mitigation'))} | {_pct(r.get('utility'))} | {obj(r)} |")
    lines += ["", f"Best trial: {best['setting']} (objective {best['objective']:.3f}). "
              f"Pareto front: {', '.join(res['pareto'])}."]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=2))
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_bytes(out.with_suffix(".png"), (sweep / "pareto.png").read_bytes())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
