"""`immunize-cli attack`: simulate a malicious fine-tune of a pipeline on a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded, quiet_libraries


@guarded
def attack(
    method: str = typer.Option(..., "--method", help="lora | dreambooth | dreambooth-lora | textual-inversion | full"),
    data: Path = typer.Option(..., "--data", help="Image folder with metadata.jsonl (file_name, text)."),
    out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
    model: Optional[str] = typer.Option(None, "--model", help="Pipeline folder to attack (default: the tiny world)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default per method)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default per method)."),
    batch_size: int = typer.Option(4, "--batch-size"),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank (default per method: 8)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (default: rank)."),
    token: str = typer.Option("sks", "--token", help="Attacker's identifier in captions (TI replaces it)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One caption for all images (instance prompt)."),
    cross_attention_only: bool = typer.Option(False, "--cross-attention-only", help="dreambooth/full: attn2 only."),
    prior_preservation: bool = typer.Option(False, "--prior-preservation", help="dreambooth: class-prior loss."),
    class_prompt: Optional[str] = typer.Option(None, "--class-prompt", help="dreambooth prior: class prompt."),
    num_class_images: int = typer.Option(16, "--num-class-images"),
    prior_loss_weight: float = typer.Option(1.0, "--prior-loss-weight"),
    num_vectors: int = typer.Option(1, "--num-vectors", help="textual-inversion: vectors of the new token."),
    initializer_token: str = typer.Option("emblem", "--initializer-token", help="textual-inversion: init word."),
    snr_gamma: Optional[float] = typer.Option(None, "--snr-gamma",
                                              help="Min-SNR loss weight γ; 0 = plain MSE (default per method)."),
    noise_offset: Optional[float] = typer.Option(None, "--noise-offset", help="Offset noise, e.g. 0.1 (default per "
                                                 "method): lets the attack change overall colour."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Save weights every N steps."),
    freeze_mask: Optional[Path] = typer.Option(None, "--freeze-mask", help="FreezeAsGuard mask to respect."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
):
    """Fine-tune like a malicious user would; saves safetensors, checkpoints and a per-step loss log."""
    from raystack.attacks.spec import AttackSpec

    spec = AttackSpec(method=method, data=data, out=out, model=model, steps=steps, lr=lr, batch_size=batch_size,
                      rank=rank, alpha=alpha, token=token, prompt=prompt, cross_attention_only=cross_attention_only,
                      prior_preservation=prior_preservation, class_prompt=class_prompt,
                      num_class_images=num_class_images, prior_loss_weight=prior_loss_weight,
                      num_vectors=num_vectors, initializer_token=initializer_token,
                      snr_gamma=snr_gamma, noise_offset=noise_offset, checkpoint_every=checkpoint_every,
                      freeze_mask=freeze_mask, seed=seed, device=device, overwrite=overwrite)
    from raystack.errors import UserError
    from raystack.models.pipeline_io import resolve_model_path
    from raystack.outputs import check_disjoint

    check_disjoint(out, [("--data", data), ("--model", resolve_model_path(model)), ("--freeze-mask", freeze_mask)])
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: already exists (pass --overwrite to replace it)")
    from raystack.outputs import check_replaceable

    check_replaceable(out)
    quiet_libraries()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from raystack.attacks.recipe import run_attack
    from raystack.runtime import configure_threads

    configure_threads()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), "{task.completed}/{task.total}",
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console) as prog:
        task = prog.add_task(f"attack {method}", total=spec.steps, loss=float("nan"))
        info = run_attack(spec, on_step=lambda s, l: prog.update(task, completed=s, loss=l))
    console.print(f"{method}: {info['steps']} steps in {info['wall_seconds']:.0f}s, final loss "
                  f"{info['final_loss']:.4f} -> {out}")
