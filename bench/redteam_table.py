"""Red-team runs (one per seed) as one markdown table: worst cases beside the reference (default) attacks.

    .venv/bin/python bench/redteam_table.py runs/redteam-bench-s0/redteam.json runs/redteam-bench-s1/redteam.json \\
        --dest bench/results/redteam_demo --command "immunize-cli redteam ..."

Writes DEST.json ({seed: the run's redteam.json}; runs of the same seed merged model by model) and DEST.md. The "passes 0.8" column counts the finished
trials that would also pass the space's default capability guard of 0.8 (on their sweep numbers)."""

import argparse
import json
from pathlib import Path


def fmt(v) -> str:
    return "—" if v is None else f"{v:.1%}"


def interval(w) -> str:
    return "—" if not w else f"{w['ci95'][0]:.0%}–{w['ci95'][1]:.0%}"


def attack_label(a: dict) -> str:
    keep = ("method", "lr", "steps", "rank", "optimizer", "cross_attention_only", "snr_gamma", "noise_offset")
    return ", ".join(f"{k}={a[k]:.2g}" if isinstance(a[k], float) else f"{k}={a[k]}" for k in keep if k in a)


def references(m: dict) -> str:
    refs = m.get("reference_attacks") or []
    return "<br>".join(f"{r['attack']['method']} {r['steps']}: {fmt(r['target'])} ({fmt(r['others'])})"
                       for r in refs) or "—"


def table(reports: dict[str, dict], command: str) -> str:
    first = next(iter(reports.values()))
    lines = [f"Made by `{command}` on this 2-core CPU machine (one run per seed). Space `{first['space']}`, budget "
             f"{first['budget']} attack steps, capability guard {first['guard']} (a trial counts only if the attacked "
             f"model keeps ≥ {first['guard']} × its unattacked accuracy on the other concepts), target "
             f"`{first['concept']}`. Target accuracy (others in brackets); the reference attacks and the worst case "
             "are re-scored with fresh seeds on 3x the samples.", "",
             "| model | seed | no attack | reference attacks (default settings) | worst case (guarded, re-scored) | "
             "95% interval | others | winning attack | unguarded worst | trials done / stopped early / pass guard "
             "/ pass 0.8 |", "|---|---|---|---|---|---|---|---|---|---|"]
    models = list(dict.fromkeys(name for r in reports.values() for name in r["models"]))
    for name in models:
        for seed, report in reports.items():
            m = report["models"].get(name)
            if m is None:
                continue
            w, u = m["worst_case"], m["worst_case_unguarded"]
            done = [t for t in m["trials"] if t["status"] == "done"]
            base = m["unattacked"]["others"] or 0
            at_08 = sum(t["others"] is not None and t["others"] >= 0.8 * base for t in done)
            passed = sum(t["guarded"] for t in done)
            none = "none survived re-scoring" if passed else "none passed the guard"
            label = name if not m.get("same_as") else f"{name} (= {m['same_as']}: same weights, no mask)"
            lines.append(f"| {label} | {seed} | {fmt(m['unattacked']['target'])} ({fmt(m['unattacked']['others'])}) "
                         f"| {references(m)} | **{fmt(w and w['target'])}** | {interval(w)} | "
                         f"{fmt(w and w['others'])} | {none if not w else attack_label(w['attack']) + (' (a reference attack)' if w.get('source') == 'reference' else '')} | "
                         f"{'—' if not u else fmt(u['target']) + ' (' + fmt(u['others']) + ')'} | "
                         f"{len(done)} / {len(m['trials']) - len(done)} / {passed} / "
                         f"{at_08} |")
    lines += ["", "Budget curves: best target accuracy found within s attack steps (guarded trials; unguarded in "
              "brackets), sweep numbers (not re-scored).", ""]
    steps = sorted({c["steps"] for r in reports.values() for m in r["models"].values()
                    for c in m["budget_curve_unguarded"]})
    lines.append("| model | seed | " + " | ".join(str(s) for s in steps) + " |")
    lines.append("|---|---|" + "---|" * len(steps))
    for name in models:
        for seed, report in reports.items():
            m = report["models"].get(name)
            if m is None:
                continue
            if m.get("same_as"):
                continue  # the same sweep as the model it names
            g = {c["steps"]: c["best_target"] for c in m["budget_curve"]}
            u = {c["steps"]: c["best_target"] for c in m["budget_curve_unguarded"]}
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{fmt(g.get(s))} [{fmt(u.get(s))}]" for s in steps)
                         + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", type=Path, nargs="+")
    ap.add_argument("--dest", type=Path, required=True, help="bench/results/NAME (without suffix)")
    ap.add_argument("--command", required=True)
    args = ap.parse_args()
    reports = {}
    for p in args.reports:
        r = json.loads(p.read_text())
        key = str(r.get("seed", len(reports)))
        if key in reports:  # several runs of one seed (e.g. models split across runs): one column of models
            reports[key]["models"].update(r["models"])
        else:
            reports[key] = r
    args.dest.with_suffix(".json").write_text(json.dumps(reports, indent=2))
    args.dest.with_suffix(".md").write_text(table(reports, args.command))
    print(args.dest.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
