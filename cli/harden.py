"""`immunize-cli harden`: IMMA / FreezeAsGuard / Random-ρ as a Ray Train job with DeepSpeed ZeRO."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded, quiet_libraries


@guarded
def harden(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML spec; keys equal the flags (flags win)."),
    method: Optional[str] = typer.Option(None, "--method", help="imma | freezeasguard | random-freeze | imma+freeze"),
    model: Optional[str] = typer.Option(None, "--model", help="Pipeline folder (default: the tiny world)."),
    target: Optional[list[Path]] = typer.Option(None, "--target", help="Image folder of a concept to protect (repeatable)."),
    legal: Optional[Path] = typer.Option(None, "--legal", help="Image folder of legal data."),
    against: Optional[str] = typer.Option(None, "--against", help="Simulated attack: lora | dreambooth | "
                                          "dreambooth-lora | textual-inversion | full"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (written atomically)."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Ray address ('auto': the running cluster)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers (DeepSpeed ranks)."),
    zero_stage: Optional[int] = typer.Option(None, "--zero-stage", help="DeepSpeed ZeRO stage 0-3."),
    use_gpu: Optional[bool] = typer.Option(None, "--use-gpu/--cpu", help="One GPU per worker (nccl)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Outer iterations (IMMA I, FreezeAsGuard K)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every"),
    outer_lr: Optional[float] = typer.Option(None, "--outer-lr", help="IMMA α."),
    inner_lr: Optional[float] = typer.Option(None, "--inner-lr", help="IMMA β (default: the attack's lr)."),
    inner_optimizer: Optional[str] = typer.Option(None, "--inner-optimizer",
                                                  help="IMMA's simulated attacker: adamw (the attack's) | sgd."),
    inner_steps: Optional[int] = typer.Option(None, "--inner-steps"),
    params: Optional[str] = typer.Option(None, "--params", help="IMMA S: name patterns, comma-separated."),
    retain_weight: Optional[float] = typer.Option(None, "--retain-weight", help="IMMA retain term on --legal."),
    retain_target: Optional[str] = typer.Option(None, "--retain-target",
                                                help="IMMA retain term: data (denoising loss) | original "
                                                "(match the unhardened UNet)."),
    outer_timesteps: Optional[str] = typer.Option(None, "--outer-timesteps",
                                                  help="IMMA: timesteps LO-HI of the outer ascent (default: all)."),
    token: Optional[str] = typer.Option(None, "--token", help="Defender's identifier (not the attacker's)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank of the simulated attacker."),
    jpeg_mix: Optional[float] = typer.Option(None, "--jpeg-mix"),
    rho: Optional[float] = typer.Option(None, "--rho", help="Freezing ratio ρ in [0, 1]."),
    lambda1: Optional[float] = typer.Option(None, "--lambda1"),
    lambda2: Optional[float] = typer.Option(None, "--lambda2"),
    mask_lr: Optional[float] = typer.Option(None, "--mask-lr", help="η1."),
    user_lr: Optional[float] = typer.Option(None, "--user-lr", help="η2."),
    user_steps: Optional[int] = typer.Option(None, "--user-steps", help="L."),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    finetune_steps: Optional[int] = typer.Option(None, "--finetune-steps"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    max_failures: Optional[int] = typer.Option(None, "--max-failures",
                                               help="Restart failed workers from the last checkpoint N times."),
    resume: Optional[bool] = typer.Option(None, "--resume", help="Continue the run in <out>.run."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace --out if it exists."),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="Ed25519 private key (PEM): sign the "
                                            "manifest (verify --public-key checks it)."),
    placement_timeout: Optional[float] = typer.Option(None, "--placement-timeout",
                                                      help="Seconds to wait for a cluster to grow (autoscaling) or "
                                                      "free resources until the workers are placed (default: fail "
                                                      "at once if too small in total, wait 600 s while busy)."),
):
    """Harden a model so that fine-tuning fails to teach it the target concept(s)."""
    from raystack.hardening.spec import HardenSpec
    from raystack.specs import build_spec, read_yaml

    values = read_yaml(config) if config else {}
    flags = dict(method=method, model=model, target=target or None, legal=legal, against=against, out=out,
                 cluster=cluster, workers=workers, zero_stage=zero_stage, use_gpu=use_gpu, steps=steps,
                 batch_size=batch_size, checkpoint_every=checkpoint_every, outer_lr=outer_lr, inner_lr=inner_lr,
                 inner_optimizer=inner_optimizer, inner_steps=inner_steps, params=params,
                 retain_weight=retain_weight, retain_target=retain_target, outer_timesteps=outer_timesteps,
                 token=token, rank=rank,
                 jpeg_mix=jpeg_mix, rho=rho, lambda1=lambda1, lambda2=lambda2, mask_lr=mask_lr, user_lr=user_lr,
                 user_steps=user_steps, temperature=temperature, finetune_steps=finetune_steps, seed=seed,
                 max_failures=max_failures, resume=resume, overwrite=overwrite, sign_key=sign_key,
                 placement_timeout=placement_timeout)
    values.update({k: v for k, v in flags.items() if v is not None})
    spec = build_spec(HardenSpec, values, source=str(config) if config else "flags")
    from raystack.hardening.driver import validate_inputs
    from raystack.outputs import check_disjoint

    if spec.out is not None and config is not None:
        check_disjoint(spec.out, [("--config", config)], with_run_dir=True)
    validate_inputs(spec)
    quiet_libraries()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from raystack.hardening.driver import run_harden

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), "{task.completed}/{task.total}",
                  TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console) as prog:
        task = prog.add_task(f"harden {spec.method} (starting Ray)", total=spec.steps, losses="")

        def show(state):
            losses = " ".join(f"{k} {v:.4f}" for k, v in state["losses"].items() if isinstance(v, (int, float)))
            prog.update(task, description=f"harden {state['phase']}", completed=state["step"], losses=losses)

        manifest = run_harden(spec, on_progress=show, on_info=lambda line: prog.console.print(f"ray: {line}"))
    console.print(f"{spec.method}: {spec.out} ({manifest['wall_seconds']:.0f}s"
                  + (f", frozen ratio {manifest['frozen_ratio']:.3f}" if manifest["frozen_ratio"] is not None else "")
                  + ")")
