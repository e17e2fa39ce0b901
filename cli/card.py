"""`immunize-cli card RELEASE`: the release's model card again, now with its evaluation (a red team's worst
case, an evaluation report's summary): what `harden` wrote before anything was measured, completed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded


@guarded
def card(release: Path = typer.Argument(..., help="A release written by `harden` or `erase` (it must verify)."),
         redteam: Optional[Path] = typer.Option(None, "--redteam", help="A finished `redteam --out` folder (or its "
                                                "redteam.json): its worst cases, attacker space, budget and guard."),
         report: Optional[Path] = typer.Option(None, "--report", help="An `evaluate --out` folder (or its "
                                               "report.json): its summary line."),
         license_id: Optional[str] = typer.Option(None, "--license", help="The card's license id (default: the "
                                                  "source's, as harden found it)."),
         base_model: Optional[str] = typer.Option(None, "--base-model", help="The hub id of the source model, "
                                                  "for the card's base_model."),
         out: Path = typer.Option(..., "--out", help="The card file to write, e.g. RELEASE/README.md (the card is "
                                  "not covered by the manifest: the release still verifies)."),
         overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists.")):
    """Write the release's model card (huggingface_hub's format: license, tags, base model) with the evaluation
    numbers of --redteam and --report, the method's settings, what it stops and what it does not, the UNet's
    hash and how to fine-tune it with its mask."""
    from raystack.atomic import atomic_write_text
    from raystack.errors import UserError
    from raystack.outputs import check_output_file, shown
    from raystack.release_card import CARD_FILE, load_json_input, make_card
    from raystack.verification import verified_release

    check_output_file(out, overwrite, "--out")
    if out.exists() and out.name != CARD_FILE:
        raise UserError(f"--out {shown(str(out))}: --overwrite replaces a model card ({CARD_FILE}) only")
    v = verified_release(release, flag="release")
    rt = load_json_input(redteam, "redteam.json", "--redteam") if redteam else None
    rep = load_json_input(report, "report.json", "--report") if report else None
    old = release / CARD_FILE
    if license_id is None and old.is_file():
        from huggingface_hub import ModelCard

        try:
            license_id = ModelCard.load(old).data.to_dict().get("license")
        except Exception:  # noqa: BLE001 - an unreadable earlier card: the source's license is looked up below
            license_id = None
    text = make_card(v.manifest, None, license_id=license_id, redteam=rt, report=rep, base_model=base_model)
    atomic_write_text(out, text)
    console.print(f"card written to {out}")
