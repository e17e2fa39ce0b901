"""`immunize-cli verify DIR`: check that DIR is a release of this tool (its manifest.json, the files its method
always releases, no symbolic link), every file against the SHA-256 in the manifest, every weight for NaN/inf,
and (with --public-key) the manifest's Ed25519 signature. What is checked: raystack/verification.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded


@guarded
def verify(out: str = typer.Argument(..., help="A folder written by `harden` or `erase` (with manifest.json), an "
                                     "object-storage URI (s3://, gs://) of one, or a hub id in the local hub cache "
                                     "(org/name[@REVISION])."),
           public_key: Optional[Path] = typer.Option(
               None, "--public-key", help="Ed25519 public key (PEM) of the publisher: the manifest's signature "
               "(manifest.sig) must match it."),
           strict: bool = typer.Option(False, "--strict", help="Also fail on files the manifest does not cover that "
                                       "no loader reads (a model card, a hub's .gitattributes); without it they are "
                                       "listed as NOT COVERED. A weight or config file it does not cover always "
                                       "fails.")):
    """Check that the folder is a release of this tool (its manifest names a method of it and lists the files that
    method releases; no symbolic links), recompute the SHA-256 of every file and check every weight is finite;
    exit 1 on any difference, an extra file a loader could read (any file with --strict), a non-finite or
    unreadable weight, a missing or corrupt manifest, or (with --public-key) a missing or wrong signature. A hub
    cache snapshot (snapshots/<rev>/ linking into blobs/) verifies through its links."""
    from rich.markup import escape

    from raystack.errors import RunFailed
    from raystack.verification import MANIFEST, check_release
    from raystack.signing import SIGNATURE_FILE

    from raystack.verification import release_folder

    out = release_folder(out)
    v = check_release(out, public_key, strict=strict)
    colors = {"EXTRA": "yellow", "NOT COVERED": "yellow"}
    for label, what in v.problems + v.uncovered:
        console.print(f"[{colors.get(label, 'red')}]{label}[/] {escape(what)}", highlight=False)
    if not v.ok:
        raise RunFailed(v.failure)
    console.print(f"[green]OK[/] {v.files} files match {escape(str(out / MANIFEST))} ({v.manifest['method']} "
                  "release); every weight is finite" + (f"; {len(v.uncovered)} file(s) not covered by it (no loader "
                  "reads them; --strict fails on them)" if v.uncovered else ""), highlight=False)
    if v.signer:
        console.print(f"[green]SIGNED[/] manifest signature matches the key {v.signer[:16]}…")
    elif v.signed_unchecked:
        console.print(f"[yellow]signed, signature not checked[/]: pass --public-key to check {SIGNATURE_FILE}")

