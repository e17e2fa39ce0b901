"""`immunize-cli mask ...`: a release's freeze mask for other trainers (export) and for model hubs (check)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded

mask_app = typer.Typer(help="The freeze mask outside this tool: export it to other trainers, check a derivative.",
                       no_args_is_help=True)


@mask_app.command()
@guarded
def export(
    release: str = typer.Argument(..., help="The release folder (a `harden` output with freeze_mask.safetensors), its "
                                  "object-storage URI (s3://, gs://), or a hub id in the local hub cache "
                                  "(org/name[@REVISION])."),
    format: str = typer.Option(..., "--format", help="names (frozen tensors, one per line) | regex (one pattern "
                               "that full-matches them) | peft (LoraConfig target_modules / exclude_modules, JSON) "
                               "| kohya (frozen layers in kohya's LoRA naming: sd-scripts has no module filter) | "
                               "onetrainer (layer_filter regex, JSON)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="The mask file (default: RELEASE/freeze_mask.safetensors)."),
    out: Optional[Path] = typer.Option(None, "--out", help="File to write (default: print it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is a file."),
):
    """Write the mask as a trainer reads it: frozen tensor names for full fine-tuning, and for LoRA trainers a
    module filter that keeps adapters off every layer whose weight is frozen. The header names the mask's ratio
    and the release's UNet hash."""
    from raystack.errors import UserError
    from raystack.mask_tools import FORMATS, export_mask, load_release
    from raystack.outputs import check_disjoint, shown

    if format not in FORMATS:
        raise UserError(f"--format {shown(format)}: expected one of {', '.join(FORMATS)}")
    from raystack.verification import release_folder

    release = release_folder(release)
    if out is not None:
        from raystack.outputs import check_output_file

        check_disjoint(out, [("RELEASE", release), ("--mask", mask)])
        check_output_file(out, overwrite, "--out")
    text = export_mask(load_release(release, mask, flag="RELEASE"), format)
    if out is None:
        typer.echo(text, nl=False)
        return
    from raystack.atomic import atomic_write_text

    atomic_write_text(out, text)
    console.print(f"wrote {out}")


@mask_app.command()
@guarded
def check(
    release: str = typer.Option(..., "--release", help="The release folder (its UNet weights and freeze mask) or its "
                                "object-storage URI; it must pass `immunize-cli verify` first."),
    derivative: Path = typer.Option(..., "--derivative", help="What was published from it: a pipeline folder, a "
                                    "unet folder, a UNet .safetensors, a weight index .json, or a LoRA/adapter "
                                    ".safetensors (peft, diffusers or kohya naming). In a folder every weight file "
                                    "a diffusers/peft loader could read is checked: each variant, each shard of "
                                    "an index, each adapter (also at the pipeline's root)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="The mask file (default: RELEASE/freeze_mask.safetensors)."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="Ed25519 public key (PEM) of the publisher: "
                                              "the release's manifest signature must match it (as in `verify`)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --json file if it exists."),
):
    """Exit 0 if no weight file a loader would read from the derivative changes a frozen tensor (full weights:
    bitwise equal to the release's; adapters: none on a frozen module), 1 with a table of the violations
    otherwise, or if the release does not verify. A weight file that cannot be read or attributed (a pickle,
    unknown tensors) is a violation."""
    from rich.markup import escape
    from rich.table import Table

    from raystack.atomic import atomic_write_text
    from raystack.errors import UserError
    from raystack.mask_tools import check_derivative, load_release
    from raystack.outputs import check_disjoint, shown
    from raystack.verification import release_folder, verified_release

    release = release_folder(release, "--release")

    if json_out is not None:
        check_disjoint(json_out, [("--release", release), ("--derivative", derivative), ("--mask", mask)],
                       flag="--json")
        from raystack.outputs import check_output_file

        check_output_file(json_out, overwrite, "--json")
    if not derivative.exists():
        raise UserError(f"--derivative {shown(str(derivative))}: no such file or folder")
    verified = verified_release(release, public_key)
    rel = load_release(release, mask)
    result = check_derivative(rel, derivative)
    for f in result.files:
        state = "[red]NOT compliant[/]" if f.violations else "[green]compliant[/]"
        what = {"full": "frozen tensors compared", "shards": "frozen tensors compared over its shards",
                "shard": "frozen tensors compared", "lora": "UNet modules adapted or tensors replaced",
                "unverifiable": "cannot be checked"}[f.kind]
        console.print(f"{state} {escape(f.file)}: {f.kind}, {f.checked} {what}"
                      + (f", {len(f.violations)} violation(s)" if f.violations else ""), highlight=False)
    if result.violations:
        table = Table(title=f"{len(result.violations)} violation(s) of the freeze mask ({result.kind} derivative)")
        table.add_column("tensor / module", overflow="fold")
        table.add_column("problem", overflow="fold")
        for name, why in result.violations[:50]:
            table.add_row(escape(name), escape(why))
        if len(result.violations) > 50:
            table.caption = f"... and {len(result.violations) - 50} more (--json lists all)"
        console.print(table)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"{'NOT compliant' if result.violations else 'compliant'}: {len(result.files)} weight file(s), "
                  f"{result.checked} frozen tensors / adapted UNet modules checked against {rel.mask_path.name} "
                  f"({len(rel.frozen)} of {len(rel.mask)} UNet tensors frozen; release verified"
                  f"{', signed' if verified.signer else ''})", highlight=False)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps({
            "compliant": result.compliant, "kind": result.kind, "checked": result.checked,
            "violations": [{"name": n, "problem": w} for n, w in result.violations], "notes": result.notes,
            "files": [{"file": f.file, "kind": f.kind, "checked": f.checked, "compliant": f.compliant,
                       "violations": [{"name": n, "problem": w} for n, w in f.violations], "notes": f.notes}
                      for f in result.files],
            "release_verified": True, "release_signed_by": verified.signer,
            "release_unet_sha256": rel.unet_sha256, "frozen": len(rel.frozen), "tensors": len(rel.mask)}, indent=2))
    if result.violations:
        raise typer.Exit(1)
