"""A red-team run's redteam.json as a markdown table (worst cases, winning attacks, budget curves).

    .venv/bin/python bench/redteam_table.py runs/redteam-demo2/redteam.json bench/results/redteam_demo_quick \\
        --command "immunize-cli redteam ..."

Writes NAME.json (a copy of the run's redteam.json) and NAME.md."""

import argparse
import json
import shutil
from pathlib import Path


def fmt(v) -> str:
    return "—" if v is None else f"{v:.1%}"


def interval(w) -> str:
    return "—" if not w else f"{w['ci95'][0]:.0%}–{w['ci95'][1]:.0%}"


def attack_label(a: dict) -> str:
    return ", ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(a.items()))


def table(report: dict, command: str) -> str:
    lines = [f"Made by `{command}` on this 2-core CPU machine. Space `{report['space']}`, budget {report['budget']} "
             f"attack steps, capability guard {report['guard']} (a trial counts only if the attacked model keeps "
             f"≥ {report['guard']} × its unattacked accuracy on the other concepts), target `{report['concept']}`.",
             "", "| model | no attack: target / others | worst case (guarded, re-scored) | 95% interval | others "
             "| winning attack | unguarded worst: target / others | trials done / rejected by guard |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        w, u = m["worst_case"], m["worst_case_unguarded"]
        done = sum(t["status"] == "done" for t in m["trials"])
        lines.append(f"| {name} | {fmt(m['unattacked']['target'])} / {fmt(m['unattacked']['others'])} | "
                     f"{fmt(w and w['target'])} | {interval(w)} | "
                     f"{fmt(w and w['others'])} | {'—' if not w else attack_label(w['attack'])} | "
                     f"{'—' if not u else fmt(u['target']) + ' / ' + fmt(u['others'])} | "
                     f"{done} / {len(m['rejected_by_guard'])} |")
    lines += ["", "Budget curves: best target accuracy found within s attack steps (guarded trials; unguarded in "
              "brackets).", ""]
    steps = sorted({c["steps"] for m in report["models"].values() for c in m["budget_curve_unguarded"]})
    lines.append("| model | " + " | ".join(str(s) for s in steps) + " |")
    lines.append("|---|" + "---|" * len(steps))
    for name, m in report["models"].items():
        g = {c["steps"]: c["best_target"] for c in m["budget_curve"]}
        u = {c["steps"]: c["best_target"] for c in m["budget_curve_unguarded"]}
        lines.append(f"| {name} | " + " | ".join(f"{fmt(g.get(s))} [{fmt(u.get(s))}]" for s in steps) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", type=Path)
    ap.add_argument("dest", type=Path, help="bench/results/NAME (without suffix)")
    ap.add_argument("--command", required=True)
    args = ap.parse_args()
    report = json.loads(args.report.read_text())
    shutil.copy(args.report, args.dest.with_suffix(".json"))
    args.dest.with_suffix(".md").write_text(table(report, args.command))
    print(args.dest.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
