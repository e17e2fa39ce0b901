"""report.json (every number) + report.html (grids, curves, tables) that a person opens in a browser."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .atomic import atomic_dir
from .imageio import png_bytes
from .sampling import image_grid


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _curves_png(report: dict) -> bytes | None:
    runs = {k: r for k, r in report["runs"].items() if r.get("curve")}
    if not runs:
        return None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["target_accuracy"] + [f"similarity_{e}" for e in report["embedders"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, r in runs.items():
            pts = [(c["step"], c[key]) for c in r["curve"] if c.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel("attack step")
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _budget_curves_png(redteam: dict) -> bytes | None:
    """Best target accuracy found within s attack steps, per model: guarded (solid), unguarded (dashed)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    drawn = False
    for i, (name, m) in enumerate(redteam["models"].items()):
        colour = f"C{i % 10}"
        for key, style, label in (("budget_curve", "-", name), ("budget_curve_unguarded", "--", f"{name} (unguarded)")):
            pts = [(p["steps"], p["best_target"]) for p in m.get(key) or [] if p.get("best_target") is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, marker="o", markersize=3, label=label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("attack steps (budget)")
    ax.set_ylabel("best target accuracy found")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _redteam_section(redteam: dict, put, winner_grids: dict[str, bytes]) -> str:
    """The worst case a release lets through (from `immunize-cli redteam`): table, budget curves, winners."""
    def pct(v):
        return "–" if v is None else f"{v:.1%}"

    def config(a):
        return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(a.items()))

    from .redteam.sweep import model_trial_counts

    rows, failures = [], []
    for name, m in redteam["models"].items():
        w, u = m.get("worst_case"), m.get("worst_case_unguarded")
        done = [t for t in m.get("trials", []) if t.get("status") == "done"]
        passed = sum(bool(t.get("guarded")) for t in done)
        counts = model_trial_counts(m)
        if not counts["done"]:  # crashed trials measured nothing: never read as protection
            none = f"FAILED: no trial completed ({counts['failed']} failed, {counts['stopped']} stopped early)"
        else:
            none = "none survived re-scoring" if passed else "none passed the guard"
        if counts["failed"]:
            failures.append(f"{name}: {counts['failed']} of {sum(counts.values())} trials FAILED"
                            + ("" if counts["done"] else ", none completed: no worst case was measured"))
        refs = "; ".join(f"{r['attack']['method']} ({r['steps']} steps): {pct(r['target'])}, others "
                         f"{pct(r['others'])}" for r in m.get("reference_attacks", [])) or "–"
        label = name if not m.get("same_as") else f"{name} (same weights and mask as {m['same_as']}: its sweep)"
        rows.append([label, pct(m["unattacked"]["target"]), pct(m["unattacked"]["others"]), refs,
                     pct(w and w["target"]), "–" if not w else f"{w['ci95'][0]:.0%}–{w['ci95'][1]:.0%}",
                     pct(w and w["others"]),
                     none if not w else config(w["attack"]) + (" (reference attack)" if w.get("source") == "reference"
                                                               else ""),
                     pct(u and u["target"]), pct(u and u["others"]),
                     f"{counts['done']} / {counts['stopped']} / "
                     + (f"{counts['failed']} FAILED" if counts["failed"] else "0") + f" / {passed}"])
    parts = [f"<h2 id='worst-case'>Worst case (red team): the strongest attack found within "
             f"{html.escape(str(redteam['budget']))} attack steps</h2>",
             f"<p>Space <code>{html.escape(str(redteam['space']))}</code>, target "
             f"<code>{html.escape(str(redteam['concept']))}</code>, seed {html.escape(str(redteam.get('seed', 0)))}. "
             f"A trial counts only if the attacked model keeps ≥ {html.escape(str(redteam['guard']))} × its unattacked "
             "accuracy on the "
             "other concepts (capability guard); the strongest guarded trials were re-scored with fresh seeds and "
             "more samples before the worst case was declared.</p>",
             _table(["model", "no attack: target", "no attack: others", "reference attacks (re-scored)",
                     "worst case (guarded, re-scored)",
                     "95% interval", "others", "winning attack", "unguarded worst: target", "unguarded: others",
                     "trials done / stopped early / failed / passed the guard"], rows)]
    if failures:  # before the table: a reader must not take crashed trials for protection
        parts.insert(2, "<p class='failed'><strong>Failed trials.</strong> " + "; ".join(html.escape(f)
                     for f in failures) + ". The worst case is taken from the completed trials only; a model "
                     "without a completed trial was not measured.</p>")
    curves = _budget_curves_png(redteam)
    if curves:
        parts.append(f"<h3>Budget curves</h3><img src='{put('budget_curves.png', curves)}' alt='budget curves'>")
    if winner_grids:
        parts.append("<h3>The winning attacks' samples of the target</h3><div class='grids'>")
        for name, data in winner_grids.items():
            src = put(f"{_safe(name)}_winner.png", data)
            parts.append(f"<figure><img src='{src}' alt='{html.escape(name)} winner'>"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
        parts.append("</div>")
    return "\n".join(parts)


def write_report(out: Path, report: dict, images: dict[str, dict[str, np.ndarray]], reference: np.ndarray | None,
                 overwrite: bool = False, scale: int = 3) -> Path:
    def grid_bytes(imgs, cols=12):
        g = image_grid(imgs[: cols * 2], cols=cols)
        return png_bytes(g.repeat(scale, 0).repeat(scale, 1))

    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        files: dict[str, str] = {}

        def put(name: str, data: bytes) -> str:
            (tmp / "images" / name).write_bytes(data)
            files[name] = f"images/{name}"
            return files[name]

        parts = [f"<h1>Red-team report: target <code>{html.escape(report['target'])}</code></h1>"]
        parts.append(f"<p>Settings: {html.escape(json.dumps(report['settings']))}</p>")
        if report.get("redteam"):
            grids = {f"worst-{m}": grid_bytes(images[f"worst-{m}"]["target"]) for m in report["redteam"]["models"]
                     if f"worst-{m}" in images}
            parts.append(_redteam_section(report["redteam"], put, grids))
        parts.append("<h2>Target concept</h2><div class='grids'>")
        if reference is not None and len(reference):
            parts.append(f"<figure><img src='{put('reference.png', grid_bytes(reference))}' alt='reference'>"
                         "<figcaption>reference images</figcaption></figure>")
        for name, imgs in images.items():
            src = put(f"{_safe(name)}_target.png", grid_bytes(imgs["target"]))
            parts.append(f"<figure><img src='{src}' alt='{html.escape(name)} target'>"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
        parts.append("</div>")
        rows = []
        for name, r in report["runs"].items():
            rows.append([name, r["attack"] or "none", (r.get("hardening") or {}).get("method", "none"),
                         r["target_accuracy"], r["other_accuracy_mean"],
                         *[r["similarity_to_reference"][e] for e in report["embedders"]]])
        parts.append("<h2>Runs</h2>" + _table(
            ["run", "attack", "hardening", "target accuracy", "other concepts accuracy",
             *[f"M(ref, target) [{e}]" for e in report["embedders"]]], rows))
        if report.get("targets"):  # several protected concepts: each one's accuracy, and the least protected
            names = list(report["targets"])
            rows = [[name, *[r["target_accuracy_by_concept"][t] for t in names], r["target_accuracy"],
                     r["target_accuracy_max"]] for name, r in report["runs"].items()]
            parts.append("<h2>Target accuracy per protected concept</h2>"
                         + _table(["run", *names, "mean", "worst (max)"], rows))
        if report.get("gaps"):
            rows = [[name, e, g["SGR"], g["RSGR"], g["M_target_base_vs_run"], g["M_other_base_vs_run"]]
                    for name, per in report["gaps"].items() for e, g in per.items()]
            parts.append(f"<h2>Similarity gaps against baseline <code>{html.escape(report['baseline'])}</code></h2>"
                         + _table(["run", "embedder", "SGR", "RSGR", "M(x_A, x_I)", "M(x_A^o, x_I^o)"], rows))
        others = sorted({k for r in report["runs"].values() for k in r["other_accuracy"]})
        if others:
            rows = [[o, *[report["runs"][n]["other_accuracy"][o] for n in report["runs"]]] for o in others]
            parts.append("<h2>Other concepts (legal use): classifier accuracy</h2>"
                         + _table(["concept", *report["runs"].keys()], rows))
            parts.append("<div class='grids'>")
            for name, imgs in images.items():
                sample = np.concatenate([imgs[o][:4] for o in others if o in imgs])
                src = put(f"{_safe(name)}_others.png", grid_bytes(sample, cols=16))
                parts.append(f"<figure><img src='{src}' alt='{html.escape(name)} others'>"
                             f"<figcaption>{html.escape(name)}: other concepts</figcaption></figure>")
            parts.append("</div>")
        curves = _curves_png(report)
        if curves:
            parts.append(f"<h2>Against attack steps</h2><img src='{put('curves.png', curves)}' alt='curves'>")
        if report.get("crossed"):
            attacks = sorted({a for row in report["crossed"].values() for a in row})
            rows = [[h, *[report["crossed"][h].get(a) for a in attacks]] for h in sorted(report["crossed"])]
            parts.append("<h2>Crossed adaptation: target accuracy (rows: the attacked model, by what it was hardened "
                         "with or against; columns: attack)</h2>" + _table(["attacked model", *attacks], rows))
        report = {**report, "images": files}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.html").write_text(_PAGE.format(body="\n".join(parts)))
    return Path(out)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>immunize-cli report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
.grids {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
figure {{ margin: 0; }} figcaption {{ font-size: 0.9em; color: #555; }}
.failed {{ color: #b00020; border-left: 4px solid #b00020; padding-left: 0.6em; }}
img {{ image-rendering: pixelated; }}
</style></head>
<body>
{body}
</body></html>
"""
