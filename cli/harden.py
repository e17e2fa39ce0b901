"""`immunize-cli harden`: IMMA / FreezeAsGuard / Random-ρ as a Ray Train job with DeepSpeed ZeRO."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raystack.hardening.spec import HardenSpec
from raystack.specs import spec_options

from .common import console, guarded, quiet_libraries


@guarded
@spec_options(HardenSpec)
def harden(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML spec; keys equal the flags (flags win)."),
    **flags,
):
    """Harden a model so that fine-tuning fails to teach it the target concept(s)."""
    from raystack.specs import spec_from_cli
    from raystack.timing import mark

    mark("command_entered")
    run_job(spec_from_cli(HardenSpec, config, flags), config)


def run_job(spec: HardenSpec, config: Optional[Path], verb: str = "harden") -> None:
    """Validate, run the Ray Train job with a progress bar, and say what was written (harden and erase)."""
    from raystack.hardening.driver import validate_inputs
    from raystack.timing import mark
    from raystack.outputs import check_disjoint

    remote = spec.out if isinstance(spec.out, str) else None  # an object-storage URI
    run_storage = None
    if remote is not None:  # the release is made in this machine's staging folder (ours to replace), then uploaded
        from raystack.storage import staging_dir

        overwrite_remote = spec.overwrite or spec.resume  # the URI's scheme was checked with the spec
        from raystack.storage import uri_with

        run_storage = uri_with(remote, ".run")  # the run's checkpoints, in the bucket (every node reaches them)
        spec.out, spec.overwrite = staging_dir(remote), True
    if spec.out is not None and config is not None:
        check_disjoint(spec.out, [("--config", config)], with_run_dir=True)
    validate_inputs(spec)
    if remote is not None:  # the bucket, the prefix and write access, once the local inputs passed
        from raystack.storage import preflight_output

        preflight_output(remote, "--out", overwrite=overwrite_remote)
    mark("validated")
    if spec.model is None:  # said, so that a forgotten --model is not mistaken for a hardened release of one's own
        console.print(f"{verb}: no --model given, so the tiny world this package ships (a demo model)")
    quiet_libraries(spec.use_gpu)  # a GPU run never gets DeepSpeed's CPU accelerator
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from raystack.hardening.driver import run_harden

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), "{task.completed}/{task.total}",
                  TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console) as prog:
        task = prog.add_task(f"{verb} {spec.method} (starting Ray)", total=spec.steps, losses="")

        def show(state):
            losses = " ".join(f"{k} {v:.4f}" for k, v in state["losses"].items() if isinstance(v, (int, float)))
            prog.update(task, description=f"{verb} {state['phase']}", completed=state["step"], total=state["total"],
                        losses=losses)

        manifest = run_harden(spec, on_progress=show, on_info=lambda line: prog.console.print(f"ray: {line}"),
                              validated=True, run_storage=run_storage)
    if remote is not None:
        import shutil

        from raystack.storage import upload_release

        names = upload_release(spec.out, remote, "--out", replace=True)
        shutil.rmtree(spec.out, ignore_errors=True)  # the staging copy; a rerun with --resume needs only <out>.run
        if not spec.keep_run:  # the release is up: nothing left to resume
            from raystack.errors import UserError
            from raystack.storage import remove_prefix

            try:
                remove_prefix(run_storage, "--out")
            except UserError as e:  # the release is complete: leftover checkpoints are only untidy
                console.print(f"note: {e} (the release is complete; remove {run_storage} by hand)")
        console.print(f"uploaded {len(names)} files to {remote} (manifest.json last)")
    mark("outputs_written")
    console.print(f"{spec.method}: {remote or spec.out} ({manifest['wall_seconds']:.0f}s"
                  + (f", frozen ratio {manifest['frozen_ratio']:.3f}" if manifest["frozen_ratio"] is not None else "")
                  + ")")
