"""report.json (every number) + report.html (grids, curves, tables) that a person opens in a browser."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .atomic import atomic_dir
from .imageio import png_bytes
from .sampling import image_grid
from .atomic import sha256_file
from .evaluation import tiny_world_others
from .redteam.sweep import RUN_FILE, model_trial_counts, wilson_interval


class _Html(str):
    """A table cell that is HTML already (an image, a percentage with its interval): not escaped again."""


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, _Html):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


# ---- percentages and their 95% intervals ------------------------------------------------------------------

def ci95(p: float | None, n: int | None) -> list[float] | None:
    """The Wilson 95% interval of an accuracy p measured on n images (None when p or n is unknown)."""

    if p is None or not n:
        return None
    lo, hi = wilson_interval(float(p), int(n))
    return [lo, hi]


def pct_text(p: float | None, n: int | None = None, ci: list[float] | None = None) -> str:
    """'37.5% [21.2–57.3%]': a percentage and its 95% interval (given, or Wilson's on n images)."""
    if p is None:
        return "not scored"
    ci = ci or ci95(p, n)
    return f"{p:.1%}" + (f" [{ci[0] * 100:.1f}–{ci[1] * 100:.1f}%]" if ci else " [n not recorded]")


def _pct(p: float | None, n: int | None = None, ci: list[float] | None = None) -> _Html | None:
    """A table cell: the percentage, its interval in a span of class ci."""
    if p is None:
        return None
    return _Html(_ci_spans(html.escape(pct_text(p, n, ci))))


def _ci_spans(escaped: str) -> str:
    """Wrap every '[a–b%]' interval of an escaped text in <span class='ci'>."""
    import re

    return re.sub(r"\[(\d+\.\d–\d+\.\d%|n not recorded)\]", r"<span class='ci'>[\1]</span>", escaped)


def _pts(before: float, after: float) -> str:
    d = round((after - before) * 100, 1)
    return ("±0.0" if d == 0 else f"{d:+.1f}".replace("-", "−")) + " pts"


def sample_counts(report: dict, run: dict) -> dict:
    """The images behind a run's accuracies: from the judge's verdicts where recorded, else from the settings.
    target: pooled over the scored targets (target_accuracy is their mean: equal counts, so the pooled rate);
    others: pooled over the scored other concepts (other_accuracy_mean)."""
    s = report.get("settings") or {}
    verdicts = run.get("verdicts") or {}
    per_target = {k: len(v) for k, v in (verdicts.get("targets") or {}).items() if v is not None}
    per_other = {k: len(v) for k, v in (verdicts.get("others") or {}).items() if v is not None}
    if not per_target and run.get("target_accuracy") is not None:
        names = list(report.get("targets") or [report.get("target")])
        by = run.get("target_accuracy_by_concept") or {names[0]: run["target_accuracy"]}
        per_target = {k: s.get("samples") for k, v in by.items() if v is not None}
    if not per_other:
        n_o = s.get("other_samples") or s.get("samples")
        per_other = {k: n_o for k, v in (run.get("other_accuracy") or {}).items() if v is not None}
    pooled = lambda d: sum(d.values()) if d and all(d.values()) else None  # noqa: E731
    return {"target": pooled(per_target), "target_by_concept": per_target, "others": pooled(per_other),
            "other_by_concept": per_other,
            "curve": (s.get("curve_samples") or 0) * max(1, len(per_target)) or None}


def with_intervals(report: dict) -> dict:
    """The report with, on every run, the image counts (`n`) behind its accuracies and their Wilson 95% intervals
    (`ci95`), on every curve point too; the summary line (`summary`, `summary_details`)."""
    runs = {}
    for name, r in report["runs"].items():
        n = sample_counts(report, r)
        ci = {"target_accuracy": ci95(r.get("target_accuracy"), n["target"]),
              "other_accuracy_mean": ci95(r.get("other_accuracy_mean"), n["others"]),
              "other_accuracy": {k: ci95(v, n["other_by_concept"].get(k)) for k, v in
                                 (r.get("other_accuracy") or {}).items()}}
        if r.get("target_accuracy_by_concept") is not None:
            by = r["target_accuracy_by_concept"]
            ci["target_accuracy_by_concept"] = {k: ci95(v, n["target_by_concept"].get(k)) for k, v in by.items()}
            worst = max((k for k, v in by.items() if v is not None), key=lambda k: by[k], default=None)
            ci["target_accuracy_max"] = ci95(r.get("target_accuracy_max"), worst and n["target_by_concept"].get(worst))
        run = {**r, "n": n, "ci95": ci}
        if r.get("curve"):
            run["curve"] = [{**c, "n": n["curve"], "ci95": ci95(c.get("target_accuracy"), n["curve"])}
                            for c in r["curve"]]
        runs[name] = run
    out = {**report, "runs": runs}
    text, details = summary_line(out)
    return {**out, "summary": text, "summary_details": details}


# ---- the summary line -------------------------------------------------------------------------------------

def redteam_run_names(report: dict) -> set[str]:
    """The runs `--redteam` added: its models' worst cases (worst-<model>)."""
    return {f"worst-{m}" for m in ((report.get("redteam") or {}).get("models") or {})}


def choose_baseline(report: dict) -> tuple[str | None, str]:
    """(the baseline run, how it was chosen) or (None, why none could be): `--baseline`, else the one run of an
    unhardened model (hardening none), the runs `--redteam` added counted only when there is nothing else."""
    runs = report["runs"]
    if report.get("baseline") in runs:
        return report["baseline"], "named by --baseline"
    red = redteam_run_names(report)
    pool = [n for n in runs if n not in red] or list(runs)
    plain = [n for n in pool if not runs[n].get("hardening")]
    if len(plain) == 1:
        return plain[0], "the only run of an unhardened model"
    if not plain:
        return None, "no run of an unhardened model to compare with (pass --baseline NAME)"
    return None, (f"{len(plain)} runs of unhardened models ({', '.join(plain)}): cannot tell which is the baseline "
                  "(pass --baseline NAME)")


def _attack_words(r: dict) -> str:
    return f"{r['attack']}, {r.get('steps')} steps" if r.get("attack") else "no attack"


def summary_line(report: dict) -> tuple[str, dict]:
    """One line a reader cannot misread: the target's accuracy and the other concepts' from the baseline run to
    each hardened run, with 95% intervals, and the red team's worst case (or that it was not run)."""
    runs = report["runs"]
    target = report.get("target", "target")
    base, why = choose_baseline(report)
    details: dict = {"baseline": base, "baseline_from": why, "compared": []}
    acc = lambda r, k: pct_text(r.get(k), ci=(r.get("ci95") or {}).get(k))  # noqa: E731
    if base is None:
        listed = "; ".join(f"{n} ({_attack_words(r)}) {acc(r, 'target_accuracy')}" for n, r in runs.items())
        head = f"{target}: {why}" + (f"; per run: {listed}" if listed else "")
    else:
        red = redteam_run_names(report)
        group = [n for n in runs if (n in red) == (base in red) and n != base]
        hardened = [n for n in group if runs[n].get("hardening")]
        b = runs[base]
        if not hardened:
            head = (f"{target}: no run of a hardened model to compare with the baseline {base} ({_attack_words(b)}): "
                    f"{acc(b, 'target_accuracy')}, other concepts {acc(b, 'other_accuracy_mean')}")
        else:
            same = {_attack_words(runs[n]) for n in [base, *hardened]}
            tag = (lambda n: "") if len(same) == 1 else (lambda n: f" ({_attack_words(runs[n])})")  # noqa: E731
            context = "" if len(same) != 1 else (" without an attack" if not b.get("attack")
                                                 else f" after the attack ({_attack_words(b)})")
            parts = {}
            for key, label in (("target_accuracy", f"{target}{context}: "), ("other_accuracy_mean", "other concepts ")):
                changes = []
                for n in hardened:
                    h = runs[n]
                    row = {"run": n, "metric": key, "baseline": b.get(key), "run_value": h.get(key)}
                    if b.get(key) is None or h.get(key) is None:
                        changes.append(f"{n}{tag(n)} {acc(h, key)}")
                    else:
                        cb, ch = (b.get("ci95") or {}).get(key), (h.get("ci95") or {}).get(key)
                        overlap = bool(cb and ch and cb[0] <= ch[1] and ch[0] <= cb[1])
                        row.update(change_pts=round((h[key] - b[key]) * 100, 1), intervals_overlap=overlap)
                        changes.append(f"{n}{tag(n)} {acc(h, key)} ({_pts(b[key], h[key])}"
                                       + ("; the intervals overlap" if overlap else "") + ")")
                    details["compared"].append(row)
                parts[key] = f"{label}{base}{tag(base)} {acc(b, key)} → " + ", ".join(changes)
            head = "; ".join(parts.values())
    rt = redteam_phrase(report.get("redteam"))
    details["redteam"] = rt
    text = f"{head}. {rt[0].upper()}{rt[1:]}."
    return text + (" Brackets: 95% intervals." if "%]" in text else ""), details


def redteam_phrase(redteam: dict | None) -> str:
    """The red team's worst case per model (guarded, re-scored), or 'red team not run'."""
    if not redteam:
        return "red team not run"

    per = []
    for name, m in redteam["models"].items():
        w = m.get("worst_case")
        if not model_trial_counts(m)["done"]:
            per.append(f"{name} FAILED (no trial completed: not measured)")
        elif not w:
            per.append(f"{name}: no attack passed the guard")
        else:
            per.append(f"{name} {pct_text(w['target'], ci=w.get('ci95'))} ({(w.get('attack') or {}).get('method')})")
    return (f"red team worst case within {redteam.get('budget')} attack steps (guarded, re-scored): "
            + ("; ".join(per) or "no model"))


# ---- the releases' hashes ---------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _manifest_files(folder: Path) -> dict | None:
    try:
        files = json.loads((folder / "manifest.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def unet_hash(folder: Path) -> dict:
    """The sha256 of a model folder's UNet weights: from its manifest.json (a release of this tool), else
    computed. Several weight files (shards, variants): the sha256 of their 'name sha256' lines, each listed."""
    import hashlib

    folder = Path(folder)
    unet = folder / "unet"
    if not unet.is_dir():
        return {"folder": str(folder), "error": "no unet folder here"}
    weights = sorted(f for f in unet.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        return {"folder": str(folder), "error": "no UNet weights here"}
    listed = _manifest_files(folder) or {}
    names = [f"unet/{f.name}" for f in weights]
    source = "manifest.json" if all(n in listed for n in names) else "computed"
    files = {n: (listed[n] if source == "manifest.json" else sha256_file(f)) for n, f in zip(names, weights)}
    digest = next(iter(files.values())) if len(files) == 1 else \
        hashlib.sha256("".join(f"{n} {h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    return {"folder": str(folder), "unet_sha256": digest, "from": source, "files": files}


def mask_hash(mask: Path) -> dict:
    from .atomic import sha256_file

    mask = Path(mask)
    listed = _manifest_files(mask.parent) or {}
    if mask.name in listed:
        return {"file": str(mask), "sha256": listed[mask.name], "from": "manifest.json"}
    if not mask.is_file():
        return {"file": str(mask), "error": "no such file"}
    return {"file": str(mask), "sha256": sha256_file(mask), "from": "computed"}


def with_release_hashes(report: dict) -> dict:
    """Each run with `release`: the sha256 of the evaluated model's UNet weights (the attacked release for an
    attack output), and of the freeze mask the attack kept, if any. Each folder is hashed once."""
    seen: dict[str, dict] = {}
    runs = {}
    for name, r in report["runs"].items():
        folder = r.get("model") or r.get("path")
        if folder not in seen:
            seen[folder] = unet_hash(Path(folder))
        release = dict(seen[folder])
        if r.get("mask"):
            release["mask"] = mask_hash(Path(r["mask"]))
        runs[name] = {**r, "release": release}
    return {**report, "runs": runs}


def redteam_sample_counts(folder: Path) -> dict | None:
    """The images behind the red team's unattacked and sweep scores (its space's eval_samples and other_samples,
    from redteam_run.json; a resume keeps them), or None where that file is missing or unreadable."""

    try:
        space = json.loads((Path(folder) / RUN_FILE).read_text())["space"]
        counts = {"target": int(space["eval_samples"]), "others_per_concept": int(space["other_samples"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return counts if all(v >= 0 for v in counts.values()) else None


def _table(headers: list[str], rows: list[list], cls: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{f' class={cls!r}' if cls else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
                line, = ax.plot(*zip(*pts), marker="o", label=name)
                band = [(c["step"], *c["ci95"]) for c in r["curve"] if key == "target_accuracy" and c.get("ci95")]
                if band:  # the accuracy's 95% interval at each checkpoint
                    ax.fill_between(*zip(*band), color=line.get_color(), alpha=0.15, linewidth=0)
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
    """The worst case a release lets through (from `immunize-cli redteam`): table, budget curves, winners. Every
    percentage with its 95% interval: the recorded one (re-scored winners), else Wilson's on the images it was
    measured on (`samples`: the space's eval_samples and other_samples; the others pooled over the concepts)."""

    counts_rt = redteam.get("samples") or {}
    try:
        k = len(tiny_world_others(redteam["concept"]))
    except Exception:  # noqa: BLE001 - a concept this version does not know: no pooled count
        k = None
    n_target = counts_rt.get("target")
    n_others = counts_rt.get("others_per_concept") and k and counts_rt["others_per_concept"] * k
    trials_by_id = {}

    def pct(v, n=None, ci=None):
        return "–" if v is None else _pct(v, n, ci)

    def others_n(w, m):
        """The images behind a worst case's others: its re-scored trial's or its reference attack's count."""
        if not w or not k:
            return None
        if w.get("source") == "reference":
            src = next((r for r in m.get("reference_attacks", []) if r.get("attack_dir") == w.get("attack_dir")), {})
        else:
            src = (trials_by_id.get(w.get("trial")) or {}).get("rescored") or {}
        return src.get("others_samples") and src["others_samples"] * k

    def config(a):
        return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(a.items()))

    from .redteam.sweep import model_trial_counts

    rows, failures = [], []
    for name, m in redteam["models"].items():
        w, u = m.get("worst_case"), m.get("worst_case_unguarded")
        trials_by_id = {t.get("trial"): t for t in m.get("trials", []) if isinstance(t, dict)}
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
        refs = _Html("; ".join(f"{html.escape(str(r['attack']['method']))} ({r['steps']} steps): "
                               f"{pct(r['target'], r.get('samples'), r.get('ci95'))}, others "
                               f"{pct(r['others'], k and r.get('others_samples') and r['others_samples'] * k)}"
                               for r in m.get("reference_attacks", [])) or "–")
        label = name if not m.get("same_as") else f"{name} (same weights and mask as {m['same_as']}: its sweep)"
        rows.append([label, pct(m["unattacked"]["target"], n_target), pct(m["unattacked"]["others"], n_others),
                     refs, pct(w and w["target"], ci=w and w.get("ci95")), pct(w and w["others"], others_n(w, m)),
                     none if not w else config(w["attack"]) + (" (reference attack)" if w.get("source") == "reference"
                                                               else ""),
                     pct(u and u["target"], n_target), pct(u and u["others"], n_others),
                     f"{counts['done']} / {counts['stopped']} / "
                     + (f"{counts['failed']} FAILED" if counts["failed"] else "0") + f" / {passed}"])
    parts = [f"<h2 id='worst-case'>Worst case (red team): the strongest attack found within "
             f"{html.escape(str(redteam['budget']))} attack steps</h2>",
             f"<p>Space <code>{html.escape(str(redteam['space']))}</code>, target "
             f"<code>{html.escape(str(redteam['concept']))}</code>, seed {html.escape(str(redteam.get('seed', 0)))}. "
             f"A trial counts only if the attacked model keeps ≥ {html.escape(str(redteam['guard']))} × its unattacked "
             "accuracy on the "
             "other concepts (capability guard); the strongest guarded trials were re-scored with fresh seeds and "
             "more samples before the worst case was declared. Brackets: 95% intervals (the re-scored worst "
             "case's as the red team recorded it; else Wilson's on the images behind the number"
             + (f": {n_target} per target score, {n_others} per others score (pooled over {k} concepts)"
                if n_target and n_others else "; not recorded for the unattacked and unguarded scores of this run")
             + ").</p>",
             _table(["model", "no attack: target", "no attack: others", "reference attacks (re-scored)",
                     "worst case (guarded, re-scored)", "others", "winning attack", "unguarded worst: target", "unguarded: others",
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


#: sample images shown per concept and run in the paired tables (all verdicts are in report.json)
PAIRED_TARGET, PAIRED_OTHER = 12, 4
THUMB = 96

_SETTING_MEANING = {
    "device": "where the runs were sampled",
    "samples": "images per target concept and run",
    "other_samples": "images per other (legal) concept and run",
    "curve_samples": "images per target concept at each attack checkpoint (curves)",
    "steps": "sampling steps per image",
    "guidance": "classifier-free guidance scale",
    "seed": "sampling seed: image k of a concept starts from the same noise in every run",
    "curves": "every attack checkpoint evaluated",
}


def _settings_table(report: dict) -> str:
    s = report.get("settings") or {}
    rows = []
    for key, value in s.items():
        if key == "other_samples" and value is None:
            value = f"as samples ({s.get('samples')})"
        rows.append([key, value if isinstance(value, str) else json.dumps(value), _SETTING_MEANING.get(key, "")])
    runs_first = next(iter(report["runs"].values()), {})
    others = list((runs_first.get("other_accuracy") or {}))
    base, why = choose_baseline(report)
    rows += [["target", report.get("target"), "the concept the hardening protects (several: each scored alone)"],
             ["other concepts", ", ".join(others) or "none", f"{len(others)} concepts whose quality must survive"],
             ["similarity embedders", ", ".join(report.get("embedders") or []) or "none",
              "M: mean cosine similarity of image embeddings"],
             ["baseline", base or "none", why]]
    return "<h2 id='settings'>Settings</h2>" + _table(["setting", "value", "meaning"], rows, cls="settings")


def _thumb(img: np.ndarray) -> bytes:
    """One sample at about THUMB pixels: small images enlarged pixel by pixel, large ones scaled down."""
    h, w = img.shape[:2]
    if h <= THUMB:
        s = max(1, THUMB // h)
        return png_bytes(img.repeat(s, 0).repeat(s, 1))
    from PIL import Image

    return png_bytes(np.asarray(Image.fromarray(img).resize((max(1, THUMB * w // h), THUMB))))


def _paired_section(report: dict, images: dict, put, kind: str) -> str:
    """Samples paired across runs: column k holds image k of a concept from every run (the same prompt and the
    same starting noise), each marked with the judge's verdict (✓ counted as the concept, ✗ not)."""
    runs = [n for n in report["runs"] if n in images]
    if not runs:
        return ""
    s = report.get("settings") or {}
    if kind == "target":
        names = list(report.get("targets") or [report["target"]])
        n_each = s.get("samples") or 0
        concepts = [(t, "target", i * n_each, "targets") for i, t in enumerate(names)]
        shown_k = PAIRED_TARGET
    else:
        concepts = [(c, c, 0, "others") for c in sorted({c for n in runs for c in images[n] if c != "target"})]
        shown_k = PAIRED_OTHER
    prompts = report.get("prompts") or {}
    parts = []
    for ci, (concept, key, offset, group) in enumerate(concepts):
        total = min(len(images[n][key]) - offset for n in runs if key in images[n])
        total = min(total, n_each) if kind == "target" and n_each else total
        k_max = min(shown_k, total)
        if k_max <= 0:
            continue
        plist = prompts.get(concept) or []
        head = "<th>run</th>" + "".join(
            f"<th>#{k + 1}" + (f"<br><small>{html.escape(plist[k % len(plist)])}</small>" if plist else "") + "</th>"
            for k in range(k_max)) + "<th>✓ in the row</th>"
        body = []
        for ri, run in enumerate(runs):
            if key not in images[run]:
                continue
            verdicts = ((report["runs"][run].get("verdicts") or {}).get(group) or {}).get(concept)
            cells, hits = [], 0
            for k in range(k_max):
                v = None if verdicts is None or k >= len(verdicts) else bool(verdicts[k])
                hits += bool(v)
                cls, mark, word = {True: ("hit", "✓", "hit"), False: ("miss", "✗", "miss"),
                                   None: ("unscored", "·", "not scored")}[v]
                src = put(f"{_safe(run)}-r{ri}_{kind}{ci}_{k + 1}.png", _thumb(images[run][key][offset + k]))
                alt = html.escape(f"{run} {concept} #{k + 1}: {word}")
                cells.append(f"<td class='cell {cls}'><span class='thumb'><img src='{src}' alt='{alt}' "
                             f"title='{alt}'><span class='mark'>{mark}</span></span></td>")
            tally = f"{hits} / {k_max}" if verdicts is not None else "not scored"
            body.append(f"<tr><td>{html.escape(run)}</td>{''.join(cells)}<td>{tally}</td></tr>")
        more = f" (the first {k_max} of {total}; every verdict is in report.json)" if total > k_max else ""
        parts.append(f"<h3>{html.escape(concept)}{html.escape(more)}</h3>"
                     f"<div class='scroll'><table class='paired'><thead><tr>{head}</tr></thead>"
                     f"<tbody>{''.join(body)}</tbody></table></div>")
    if not parts:
        return ""
    title = "Target concept: samples paired across runs" if kind == "target" else \
        "Other concepts: samples paired across runs"
    return (f"<h2 id='paired-{kind}'>{title}</h2><p class='legend'>Column #k is image k of the concept in every run: "
            f"the same prompt and the same starting noise (seed {html.escape(str(s.get('seed')))}); a "
            "textual-inversion attack's prompt names its learnt token instead. ✓: the judge counts the image as the "
            "concept; ✗: it does not.</p>" + "\n".join(parts))


def _releases_table(report: dict) -> str:
    rows = []
    for name, r in report["runs"].items():
        rel = r.get("release")
        if not rel:
            continue
        mask = rel.get("mask") or {}
        unet = _Html(f"<code>{html.escape(rel['unet_sha256'])}</code>") if rel.get("unet_sha256") else \
            f"not found: {rel.get('error')}"
        mcell = None if not mask else (_Html(f"<code>{html.escape(mask['sha256'])}</code> ({html.escape(mask['from'])})")
                                       if mask.get("sha256") else f"not found: {mask.get('error')}")
        rows.append([name, rel.get("folder"), unet, rel.get("from", "–"), mcell])
    if not rows:
        return ""
    return ("<h2 id='releases'>Releases evaluated</h2><p>The sha256 of each run's model UNet weights (for an attack "
            "output: the release it attacked; several weight files: the sha256 of their 'name sha256' lines), from "
            "the release's manifest.json where it has one (check the files against it with "
            "<code>immunize-cli verify</code>), else computed here; and of the freeze mask an attack kept.</p>"
            + _table(["run", "model folder", "UNet weights sha256", "from", "freeze mask sha256"], rows,
                     cls="releases"))


def write_report(out: Path, report: dict, images: dict[str, dict[str, np.ndarray]], reference: np.ndarray | None,
                 overwrite: bool = False, scale: int = 3) -> Path:
    def grid_bytes(imgs, cols=12):
        g = image_grid(imgs[: cols * 2], cols=cols)
        return png_bytes(g.repeat(scale, 0).repeat(scale, 1))

    report = with_intervals(report)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        files: dict[str, str] = {}

        def put(name: str, data: bytes) -> str:
            (tmp / "images" / name).write_bytes(data)
            files[name] = f"images/{name}"
            return files[name]

        title = "Evaluation and red-team report" if report.get("redteam") else "Evaluation report"
        parts = [f"<h1 id='title'>{title}: target <code>{html.escape(report['target'])}</code></h1>",
                 f"<p id='summary' class='summary'><strong>Summary.</strong> "
                 f"{_ci_spans(html.escape(report['summary']))}</p>",
                 _settings_table(report)]
        if report.get("redteam"):
            grids = {f"worst-{m}": grid_bytes(images[f"worst-{m}"]["target"]) for m in report["redteam"]["models"]
                     if f"worst-{m}" in images}
            parts.append(_redteam_section(report["redteam"], put, grids))
        rows = []
        for name, r in report["runs"].items():
            ci = r.get("ci95") or {}
            rows.append([name, r["attack"] or "none", (r.get("hardening") or {}).get("method", "none"),
                         _pct(r["target_accuracy"], ci=ci.get("target_accuracy")) or "not scored",
                         _pct(r["other_accuracy_mean"], ci=ci.get("other_accuracy_mean")) or "not scored",
                         *[r["similarity_to_reference"][e] for e in report["embedders"]]])
        parts.append("<h2 id='runs'>Runs</h2><p>Accuracy: the share of images the judge counts as the concept; "
                     "brackets: its 95% interval (Wilson) on the images behind it (report.json: <code>n</code>, "
                     "<code>ci95</code> per run).</p>" + _table(
                         ["run", "attack", "hardening", "target accuracy", "other concepts accuracy",
                          *[f"M(ref, target) [{e}]" for e in report["embedders"]]], rows))
        parts.append(_releases_table(report))
        parts.append(_paired_section(report, images, put, "target"))
        if reference is not None and len(reference):
            parts.append(f"<h3>Reference images of the target</h3><figure><img src='{put('reference.png', grid_bytes(reference))}' "
                         "alt='reference'><figcaption>reference images</figcaption></figure>")
        if report.get("targets"):  # several protected concepts: each one's accuracy, and the least protected
            names = list(report["targets"])
            rows = [[name, *[_pct(r["target_accuracy_by_concept"][t],
                                  ci=r["ci95"].get("target_accuracy_by_concept", {}).get(t)) for t in names],
                     _pct(r["target_accuracy"], ci=r["ci95"].get("target_accuracy")),
                     _pct(r["target_accuracy_max"], ci=r["ci95"].get("target_accuracy_max"))]
                    for name, r in report["runs"].items()]
            parts.append("<h2>Target accuracy per protected concept</h2>"
                         + _table(["run", *names, "mean", "worst (max)"], rows))
        if report.get("gaps"):
            rows = [[name, e, g["SGR"], g["RSGR"], g["M_target_base_vs_run"], g["M_other_base_vs_run"]]
                    for name, per in report["gaps"].items() for e, g in per.items()]
            parts.append(f"<h2>Similarity gaps against baseline <code>{html.escape(report['baseline'])}</code></h2>"
                         + _table(["run", "embedder", "SGR", "RSGR", "M(x_A, x_I)", "M(x_A^o, x_I^o)"], rows))
        others = sorted({k for r in report["runs"].values() for k in r["other_accuracy"]})
        if others:
            rows = [[o, *[_pct(report["runs"][n]["other_accuracy"].get(o),
                               ci=report["runs"][n]["ci95"]["other_accuracy"].get(o)) for n in report["runs"]]]
                    for o in others]
            parts.append("<h2>Other concepts (legal use): classifier accuracy</h2>"
                         + _table(["concept", *report["runs"].keys()], rows))
            parts.append(_paired_section(report, images, put, "others"))
        curves = _curves_png(report)
        if curves:
            parts.append(f"<h2>Against attack steps</h2><p>Shaded: the target accuracy's 95% interval (Wilson) on "
                         f"the images sampled at each checkpoint.</p><img src='{put('curves.png', curves)}' "
                         "alt='curves'>")
        if report.get("crossed"):
            attacks = sorted({a for row in report["crossed"].values() for a in row})
            ns = {r["n"]["target"] for r in report["runs"].values() if r.get("attack")}
            n_cell = next(iter(ns)) if len(ns) == 1 else None
            rows = [[h, *[_pct(report["crossed"][h].get(a), n_cell) for a in attacks]]
                    for h in sorted(report["crossed"])]
            parts.append("<h2>Crossed adaptation: target accuracy (rows: the attacked model, by what it was hardened "
                         "with or against; columns: attack)</h2>" + _table(["attacked model", *attacks], rows))
        report = {**report, "images": files}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.html").write_text(_PAGE.format(title=html.escape(title), thumb=THUMB,
                                                      body="\n".join(p for p in parts if p)))
    return Path(out)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
.grids {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
figure {{ margin: 0; }} figcaption {{ font-size: 0.9em; color: #555; }}
.failed {{ color: #b00020; border-left: 4px solid #b00020; padding-left: 0.6em; }}
img {{ image-rendering: pixelated; }}
.summary {{ font-size: 1.15em; background: #f6f8fa; border-left: 4px solid #0366d6; padding: 0.6em 0.9em; }}
.ci {{ color: #666; font-size: 0.9em; white-space: nowrap; }}
table.settings td, table.settings th, table.releases td, table.releases th {{ text-align: left; }}
table.paired td.cell {{ padding: 2px; text-align: center; }}
table.paired .thumb {{ position: relative; display: inline-block; }} table.paired .thumb img {{ display: block; }}
table.paired .mark {{ position: absolute; top: 3px; right: 5px; font-weight: bold; font-size: 1.1em;
  background: rgba(255, 255, 255, 0.85); border-radius: 3px; padding: 0 3px; }}
table.paired .hit .mark {{ color: #1a7f37; }} table.paired .miss .mark {{ color: #b00020; }}
table.paired .unscored .mark {{ color: #666; }}
table.paired th small {{ font-weight: normal; color: #555; display: block; max-width: {thumb}px; }}
.scroll {{ overflow-x: auto; }}
table.releases td:nth-child(2) {{ max-width: 22em; overflow-wrap: anywhere; }}
table.releases code {{ font-size: 0.8em; word-break: break-all; }}
</style></head>
<body>
{body}
</body></html>
"""
