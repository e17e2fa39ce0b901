"""The `immunize-cli` Typer app. Only typer/rich load here; torch, ray, diffusers and deepspeed load
inside the commands, so `--help` stays fast."""

from __future__ import annotations

import typer

from .attack import attack
from .evaluate import evaluate
from .harden import harden
from .tune import tune
from .verify import verify
from .world import world_app

app = typer.Typer(
    name="immunize-cli",
    help="Harden text-to-image diffusion models against malicious fine-tuning (IMMA, FreezeAsGuard).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command(name="harden")(harden)
app.command(name="attack")(attack)
app.command(name="evaluate")(evaluate)
app.command(name="tune")(tune)
app.command(name="verify")(verify)
app.add_typer(world_app, name="world")


if __name__ == "__main__":  # pragma: no cover
    app()
