"""`immunize-cli plan`: what one rank of a harden run will hold in memory, printed before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raystack.hardening.spec import HardenSpec
from raystack.specs import spec_options

from .common import console, guarded


@guarded
@spec_options(HardenSpec)
def plan(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML spec; keys equal the flags (flags win)."),
    **flags,
):
    """Print the expected per-rank memory of `harden` with these flags (weights, the method's copies, DeepSpeed's
    gradients and optimizer state for this ZeRO stage and worker count, counted activations); runs nothing."""
    from rich.table import Table

    from raystack.planning import plan_harden
    from raystack.specs import spec_from_cli

    flags = {**flags, "target": flags.get("target") or ["."]}  # the images are not read: counts come from headers
    spec = spec_from_cli(HardenSpec, config, flags)
    p = plan_harden(spec)
    def gib(b: int) -> str:
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"

    table = Table(title=f"{spec.method} on {Path(p['model']).name}: {spec.workers} worker(s), ZeRO-{spec.zero_stage}, "
                        f"batch {spec.batch_size}, {p['resolution']} px, per rank")
    for col in ("part", "memory", "note"):
        table.add_column(col, justify="right" if col == "memory" else "left")
    for line in p["weights"]:
        table.add_row(line.what, gib(line.bytes), line.note)
    for name, lines in p["phases"].items():
        for line in lines:
            table.add_row(f"{name}: {line.what}", gib(line.bytes), line.note)
        size, how = p["activations"][name]
        table.add_row(f"{name}: activations kept for backward", gib(size), f"counted on the meta device ({how})")
    table.add_row("python, torch and libraries", gib(p["runtime"]), "measured on CPU")
    for line in p.get("gpu", []):
        table.add_row(f"GPU: {line.what}", gib(line.bytes), line.note)
    table.add_row("[bold]peak per rank[/bold]", f"[bold]{gib(p['peak'])}[/bold]",
                  f"weights, runtime and the largest phase ({p['peak_phase']})"
                  + (", and the GPU's own (estimates)" if p.get("gpu") else ""))
    console.print(table)
