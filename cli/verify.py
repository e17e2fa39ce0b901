"""`immunize-cli verify DIR`: check every output file against the SHA-256 in its manifest.json, every weight
for NaN/inf, and (with --public-key) the manifest's Ed25519 signature."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded


@guarded
def verify(out: Path = typer.Argument(..., help="A folder written by `harden` (with manifest.json)."),
           public_key: Optional[Path] = typer.Option(
               None, "--public-key", help="Ed25519 public key (PEM) of the publisher: the manifest's signature "
               "(manifest.sig) must match it.")):
    """Recompute the SHA-256 of every file the manifest lists and check every weight is finite; exit 1 on any
    difference, a non-finite weight, or (with --public-key) a missing or wrong signature."""
    from raystack.errors import RunFailed, UserError
    from raystack.hardening.driver import MANIFEST, hash_tree
    from raystack.signing import SIGNATURE_FILE, check_signature

    mf = out / MANIFEST
    if not mf.is_file():
        raise UserError(f"{out}: no {MANIFEST} (not a harden output)")
    manifest_bytes = mf.read_bytes()
    try:
        expected = json.loads(manifest_bytes)["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{mf}: corrupt manifest") from None
    if not isinstance(expected, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in expected.items()):
        raise UserError(f"{mf}: corrupt manifest (\"files\" must map each file to its SHA-256)")
    signer = check_signature(out, manifest_bytes, public_key) if public_key is not None else None
    actual = {k: v for k, v in hash_tree(out).items() if k not in (MANIFEST, SIGNATURE_FILE)}
    bad = sorted(k for k in expected if actual.get(k) != expected[k])
    extra = sorted(set(actual) - set(expected))
    for k in bad:
        console.print(f"[red]{'MISSING' if k not in actual else 'CHANGED'}[/] {k}")
    for k in extra:
        console.print(f"[yellow]EXTRA[/] {k}")
    if bad or extra:
        raise typer.Exit(1)
    nonfinite = nonfinite_weights(out, [k for k in expected if k.endswith(".safetensors")])
    for f, name in nonfinite:
        console.print(f"[red]NOT FINITE[/] {f}: {name}")
    if nonfinite:
        raise RunFailed(f"{out}: {len(nonfinite)} weight tensors hold NaN or inf; do not release it")
    console.print(f"[green]OK[/] {len(expected)} files match {mf}; every weight is finite")
    if signer:
        console.print(f"[green]SIGNED[/] manifest signature matches the key {signer[:16]}…")
    elif (out / SIGNATURE_FILE).is_file():
        console.print(f"[yellow]signed, signature not checked[/]: pass --public-key to check {SIGNATURE_FILE}")


def nonfinite_weights(root: Path, files: list[str]) -> list[tuple[str, str]]:
    """(file, tensor) for every floating-point tensor holding NaN or inf, one tensor in memory at a time."""
    import torch
    from safetensors import safe_open

    out = []
    for rel in sorted(files):
        with safe_open(str(root / rel), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    out.append((rel, name))
    return out
