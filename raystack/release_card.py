"""The release's model card (README.md): what a person who downloads it must know — how it was hardened, against
what, what that stops and what it does not, the numbers when a red team or report is given, and how to
fine-tune it within the rules. Made with huggingface_hub's ModelCard, so a hub reads its metadata."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .freeze_mask import MASK_FILE
from .outputs import shown

CARD_FILE = "README.md"

#: What each method's release stops and what it does not (docs/threat-model.md has the measured numbers).
THREAT_MODEL: dict[str, tuple[str, str]] = {
    "freezeasguard": (
        "a user who fine-tunes with the freeze mask (the frozen UNet tensors left unchanged) and keeps the model's "
        "other skills learns the protected concept less well than from the source model",
        "anyone who ignores the mask: the weights are the source's own, so such a user gets what the source gives; "
        "textual inversion and text-encoder fine-tunes (the mask covers the UNet only); training from scratch"),
    "random-freeze": (
        "nothing measurable: a random mask at the same ratio (the baseline FreezeAsGuard is judged against)",
        "every attack"),
    "imma": (
        "fine-tuning that starts from these weights is steered away from re-learning the protected concept "
        "quickly (the simulated attacker's method and budget)",
        "attacks outside the simulated attacker's method and budget, which the red team measures; anyone with the "
        "source weights"),
    "imma+freeze": (
        "IMMA's changed weights, and a freeze mask for users who fine-tune within the rules",
        "anyone who ignores the mask or starts from the source weights; attacks beyond IMMA's simulated budget"),
    "uce": ("the concept when prompted without fine-tuning (closed-form edit of the cross-attention)",
            "fine-tuning on the concept's images brings it back"),
    "esd-x": ("the concept when prompted without fine-tuning (ESD on the cross-attention)",
              "fine-tuning on the concept's images brings it back"),
    "ablation": ("the concept when prompted without fine-tuning (its prompts mapped to an anchor's images)",
                 "fine-tuning on the concept's images brings it back"),
}

#: the settings each method's card lists (besides method, steps, seed, workers, ZeRO stage and precision)
METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    "freezeasguard": ("rho", "against", "lambda1", "lambda2", "mask_lr", "user_steps", "user_lr", "temperature"),
    "random-freeze": ("rho",),
    "imma": ("against", "imma_objective", "outer_lr", "inner_lr", "inner_steps", "params", "retain_weight"),
    "imma+freeze": ("rho", "against", "imma_objective", "outer_lr", "inner_lr", "inner_steps", "params"),
    "uce": ("concept", "anchor", "uce_preserve_scale"),
    "esd-x": ("concept", "anchor", "erase_steps", "erase_lr", "esd_guidance"),
    "ablation": ("concept", "anchor", "erase_steps", "erase_lr"),
}
COMMON_SETTINGS = ("steps", "seed", "workers", "zero_stage", "precision", "attacker_space")


def source_license(src: Path | None) -> str | None:
    """The source model's license id: its own card's `license:` (a hub download), else None."""
    if src is None:
        return None
    card = Path(src) / CARD_FILE
    if card.is_file():
        try:
            from huggingface_hub import ModelCard

            value = ModelCard.load(card).data.to_dict().get("license")
            if isinstance(value, str) and value:
                return value
        except Exception:  # noqa: BLE001 - a source card we cannot parse: the license stays unknown
            return None
    return None


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def redteam_section(redteam: dict) -> str:
    """The red team's verdict per attacked model: unattacked, the reference (default) attacks, the guarded worst
    case with its attack and 95% interval; the attacker space, budget, guard, seed and sample counts."""
    lines = [f"Red team: attacker space `{redteam['space']}`, budget {redteam['budget']} steps per attack, capability "
             f"guard {redteam['guard']} (an attack counts only if the model keeps that share of its other concepts), "
             f"seed {redteam.get('seed', 0)}; judge: {(redteam.get('judge') or {}).get('kind', 'tiny')}."]
    samples = redteam.get("samples")
    if samples:
        lines[0] += (f" Worst cases re-scored on {samples['rescored_target']} target images with fresh seeds.")
    lines += ["", "| attacked model | unattacked | default attacks | worst case (guarded) | its attack |",
              "|---|---|---|---|---|"]
    for name, m in redteam["models"].items():
        refs = ", ".join(f"{r['attack'].get('method')} {_pct(r['target'])}" for r in m.get("reference_attacks", []))
        w = m.get("worst_case")
        if w:
            lo, hi = w.get("ci95", [None, None])
            worst = f"{_pct(w['target'])} [{_pct(lo)}–{_pct(hi)}], others {_pct(w.get('others'))}"
            a = w.get("attack") or {}
            attack = ", ".join(f"{k} {a[k]}" for k in ("method", "lr", "steps", "rank") if k in a)
        else:
            worst, attack = "no guarded attack completed", "—"
        lines.append(f"| {name} | {_pct((m.get('unattacked') or {}).get('target'))} | {refs or '—'} | {worst} | "
                     f"{attack} |")
    return "\n".join(lines)


def make_card(manifest: dict, src: Path | None = None, license_id: str | None = None,
              redteam: dict | None = None, report: dict | None = None, base_model: str | None = None) -> str:
    """The card's text for a release whose manifest is `manifest` (the model card metadata, then the sections)."""
    from huggingface_hub import ModelCard, ModelCardData

    method = manifest["method"]
    spec = manifest.get("spec") or {}
    license_id = license_id or source_license(src) or "other"
    data = ModelCardData(license=license_id, library_name="diffusers", pipeline_tag="text-to-image",
                         tags=["immunize-cli", f"immunize-cli-{method}", "text-to-image"],
                         **({"base_model": base_model} if base_model else {}))
    stops, not_stops = THREAT_MODEL.get(method, ("see the method's documentation", "see the threat model"))
    settings = [("method", f"`{method}`")]
    for key in COMMON_SETTINGS + METHOD_SETTINGS.get(method, ()):
        if spec.get(key) not in (None, "", [], {}):
            settings.append((key, f"`{json.dumps(spec[key]) if not isinstance(spec[key], str) else spec[key]}`"))
    unet = {k: v for k, v in (manifest.get("files") or {}).items() if k.startswith("unet/")
            and k.endswith(".safetensors")}
    source = manifest.get("source_model")
    rows = [("source model", f"`{source}`" if source else "—"),
            ("frozen share of the UNet's tensors", _pct(manifest.get("frozen_ratio"))
             if manifest.get("frozen_ratio") is not None else "no mask"),
            *[(f"`{k}` sha256", f"`{v}`") for k, v in sorted(unet.items())],
            ("tool", f"immunize-cli {(manifest.get('versions') or {}).get('immunize-cli') or ''}".strip())]
    masked = manifest.get("frozen_ratio") is not None
    body = [f"# Hardened with immunize-cli: `{method}`", "",
            "This model was hardened before release so that fine-tuning it on a protected concept is harder, while "
            "legal fine-tuning still works. Read what it stops and what it does not before relying on it.", "",
            "## How it was hardened", "", _table(settings + rows), "",
            "## What it stops, and what it does not", "", f"- **Stops**: {stops}.", f"- **Does not stop**: {not_stops}.",
            "", "## Evaluation", ""]
    if redteam:
        body += [redteam_section(redteam), ""]
    if report and report.get("summary"):
        body += [f"Evaluation report: {report['summary']}", ""]
    if not redteam and not (report and report.get("summary")):
        body += ["Not evaluated in this card. Measure it with `immunize-cli redteam` (the swept attacker, its worst "
                 "case) and `immunize-cli evaluate`, then write the card again with `immunize-cli card RELEASE "
                 "--redteam RUN --report REPORT --out CARD.md`.", ""]
    if masked:
        body += ["## Fine-tuning within the rules", "",
                 f"`{MASK_FILE}` names the UNet tensors a fine-tune must leave unchanged. Give it to your trainer:", "",
                 "```bash",
                 "immunize-cli mask export RELEASE --format peft --out mask_peft.json        # LoraConfig keys",
                 "immunize-cli mask export RELEASE --format kohya --out mask_kohya.txt       # sd-scripts layer names",
                 "immunize-cli mask export RELEASE --format onetrainer --out mask_ot.json    # OneTrainer layer filter",
                 "immunize-cli mask check --release RELEASE --derivative YOUR_MODEL         # did it comply?",
                 "```", "",
                 "In your own diffusers loop, `raystack.freeze_mask.apply(unet, RELEASE)` freezes the tensors and stops "
                 "a trainer that unfreezes them; it needs torch and safetensors only (`pip install --no-deps "
                 "immunize-cli`; see `examples/finetune_with_mask.py`).", ""]
    body += ["## Verify", "", "`immunize-cli verify RELEASE` checks every file against `manifest.json`; with "
             "`--public-key PUB` it also checks the publisher's signature (`manifest.sig`).", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def load_json_input(path: Path, name: str, flag: str) -> dict:
    """A finished run's JSON (redteam.json, report.json) for the card; one line when it is not one."""

    f = Path(path) / name if Path(path).is_dir() else Path(path)
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError):
        raise UserError(f"{flag} {shown(str(path))}: no readable {name}") from None
    try:
        if name == "redteam.json":
            from .redteam.results import check_redteam_report

            check_redteam_report(doc)
        elif not isinstance(doc, dict) or not isinstance(doc.get("summary"), str):
            raise ValueError(name)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise UserError(f"{flag} {shown(str(f))}: not a {name} this tool wrote") from None
    return doc
