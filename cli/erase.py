"""`immunize-cli erase`: take a concept the model knows out of its weights (UCE, ESD-x, concept ablation), as
the same Ray Train + DeepSpeed job as `harden` (checkpoints, --resume, manifest, atomic output)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raystack.hardening.spec import HardenSpec
from raystack.specs import spec_options

from .common import guarded
from .harden import run_job


#: erase's flags: harden's without the hardening methods' sections (`harden --erase` combines both)
ERASE_SECTIONS = ("Model, data and output", "Where and how it runs",
                  "Concept erasure (erase, or harden --erase before --method)")


@guarded
@spec_options(HardenSpec, skip=("erase", "against"), sections=ERASE_SECTIONS,
              overrides={"method": {"help": "The erasure: uce, esd-x or ablation.", "default": None},
                         "out": {"help": "Output folder: the pipeline with the concept erased, manifest.json "
                                         "(written atomically)."}})
def erase(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML spec; keys equal the flags (flags win)."),
    **flags,
):
    """Erase a concept: --method uce | esd-x | ablation, --target images whose captions name it, --concept its
    word(s), --anchor what it becomes, --legal what to keep. `harden --erase METHOD` erases and hardens in one job."""
    from raystack.errors import UserError
    from raystack.hardening.erase import ERASERS
    from raystack.outputs import shown
    from raystack.specs import spec_from_cli

    def refuse(method):
        raise UserError(f"--method {shown(method)}: erase runs one of {', '.join(ERASERS)} (to erase, then "
                        "harden: `harden --erase METHOD --method ...`)")

    if flags.get("method") is not None and flags["method"] not in ERASERS:
        refuse(flags["method"])  # before the spec's own checks, which are harden's
    spec = spec_from_cli(HardenSpec, config, flags)
    if spec.method not in ERASERS or spec.erase is not None:
        raise UserError(f"--method {shown(spec.method)}: erase runs one of {', '.join(ERASERS)} (to erase, then "
                        "harden: `harden --erase METHOD --method ...`)")
    run_job(spec, config, verb="erase")
