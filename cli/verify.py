"""`immunize-cli verify DIR`: check every output file against the SHA-256 in its manifest.json."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import console, guarded


@guarded
def verify(out: Path = typer.Argument(..., help="A folder written by `harden` (with manifest.json).")):
    """Recompute the SHA-256 of every file the manifest lists; exit 1 on any difference."""
    from raystack.errors import UserError
    from raystack.hardening.launcher import MANIFEST, hash_tree

    mf = out / MANIFEST
    if not mf.is_file():
        raise UserError(f"{out}: no {MANIFEST} (not a harden output)")
    try:
        expected = json.loads(mf.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{mf}: corrupt manifest") from None
    actual = {k: v for k, v in hash_tree(out).items() if k != MANIFEST}
    bad = sorted(k for k in expected if actual.get(k) != expected[k])
    extra = sorted(set(actual) - set(expected))
    for k in bad:
        console.print(f"[red]{'MISSING' if k not in actual else 'CHANGED'}[/] {k}")
    for k in extra:
        console.print(f"[yellow]EXTRA[/] {k}")
    if bad or extra:
        raise typer.Exit(1)
    console.print(f"[green]OK[/] {len(expected)} files match {mf}")
