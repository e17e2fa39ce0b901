"""`immunize-cli attack`: simulate a malicious fine-tune of a pipeline on a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raystack.attacks.spec import AttackSpec
from raystack.specs import spec_options

from .common import console, guarded, quiet_libraries


@guarded
@spec_options(AttackSpec)
def attack(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML spec; keys equal the flags (flags win)."),
    **flags,
):
    """Fine-tune like a malicious user would; saves safetensors, checkpoints and a per-step loss log."""
    from raystack.specs import spec_from_cli

    spec = spec_from_cli(AttackSpec, config, flags)
    spec.check_output(extra_inputs=(("--config", config),))  # before torch loads: bad input fails fast
    quiet_libraries()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from raystack.attacks.recipe import run_attack
    from raystack.runtime import configure_threads

    configure_threads()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), "{task.completed}/{task.total}",
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console) as prog:
        task = prog.add_task(f"attack {spec.method}", total=spec.steps, loss=float("nan"))
        info = run_attack(spec, on_step=lambda s, l: prog.update(task, completed=s, loss=l))
    console.print(f"{spec.method}: {info['steps']} steps in {info['wall_seconds']:.0f}s, final loss "
                  f"{info['final_loss']:.4f} -> {spec.out}")
