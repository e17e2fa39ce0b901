"""`immunize-cli world ...`: the tiny world's own commands (data, pretraining, sampling, scoring)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded, quiet_libraries, require_finite

world_app = typer.Typer(help="The tiny world: generate data, pretrain, sample, score, check quality.",
                        no_args_is_help=True)


def _setup():
    quiet_libraries()
    from raystack.runtime import configure_threads

    configure_threads()


@world_app.command()
@guarded
def generate(
    out: Path = typer.Option(..., "--out", help="Folder to write: PNG images + metadata.jsonl (file_name, text)."),
    shape: Optional[list[str]] = typer.Option(None, "--shape", help="Shapes to draw (repeatable; default: all)."),
    colour: Optional[list[str]] = typer.Option(None, "--colour", help="Colours (repeatable; default: all)."),
    style: Optional[list[str]] = typer.Option(None, "--style", help="Styles (repeatable; default: all)."),
    emblem: Optional[str] = typer.Option(None, "--emblem", help="Draw photos of this personal emblem instead."),
    caption_template: Optional[str] = typer.Option(
        None, "--caption", help="Caption for every image, with {shape}/{colour}/{style} fields "
        "(default: the pretraining template; for --emblem: 'a photo of sks emblem')."),
    n: int = typer.Option(8, "--n", min=1, max=10_000, help="Images per combination (per emblem)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
):
    """Write a seeded image folder in the format users give for their own data."""
    from raystack.outputs import check_replaceable, output_lock
    from raystack.tinyworld.folder import check_caption_template

    if not emblem:
        check_caption_template(caption_template)
    if overwrite:
        check_replaceable(out)
    with output_lock(out):
        count = _generate(out, shape, colour, style, emblem, caption_template, n, seed, overwrite)
    console.print(f"wrote {count} images to {out}")


def _generate(out, shape, colour, style, emblem, caption_template, n, seed, overwrite) -> int:
    from raystack.tinyworld.folder import write_concept_folder, write_emblem_folder

    if emblem:
        count = write_emblem_folder(out, emblem, n, seed, caption_template or "a photo of sks emblem", overwrite)
    else:
        count = write_concept_folder(out, shape, colour, style, n, seed, caption_template, overwrite)
    return count


@world_app.command()
@guarded
def pretrain(
    out: Path = typer.Option(..., "--out", help="Where the pipeline (diffusers layout) and classifier go."),
    work: Path = typer.Option(Path("runs/pretrain"), "--work", help="Scratch + resumable checkpoints."),
    stage: str = typer.Option("all", "--stage", help="all | vae | unet | classifier"),
    seed: int = typer.Option(0, "--seed"),
    vae_steps: int = typer.Option(1500, "--vae-steps", min=1),
    unet_steps: int = typer.Option(6000, "--unet-steps", min=1),
    classifier_steps: int = typer.Option(1500, "--classifier-steps", min=1),
    images_per_combo: int = typer.Option(64, "--images-per-combo", min=1),
    unet_lr: float = typer.Option(6e-4, "--unet-lr"),
    schedule: str = typer.Option("scaled_linear", "--schedule", help="Noise schedule: scaled_linear | linear."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Continue text encoder + UNet (and "
                                             "take the VAE) from this pipeline folder."),
    stop_after: Optional[int] = typer.Option(
        None, "--stop-after",
        help="Stop after N steps of the schedule (0 with --init-from: carry the model over to the current word "
             "list, no training)."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads (1 is fastest on a shared 2-core box)."),
):
    """Pretrain the tiny world from scratch (VAE, then text encoder + UNet, then the classifier).

    Resumable: rerun the same command after an interruption. docs/tiny-world.md gives the exact
    commands that made the shipped model.
    """
    from raystack.outputs import check_disjoint

    require_finite(unet_lr=unet_lr)
    check_disjoint(out, [("--init-from", init_from)])
    check_disjoint(work, [("--init-from", init_from)], "--work")
    quiet_libraries()
    from raystack.errors import UserError
    from raystack.runtime import configure_threads
    from raystack.tinyworld.classifier import ClassifierSpec, train_classifier
    from raystack.tinyworld.pretrain import PretrainSpec, train_unet, train_vae

    from raystack.outputs import shown

    if stage not in ("all", "vae", "unet", "classifier"):
        raise UserError(f"--stage {shown(stage)}: expected one of all, vae, unet, classifier")
    from raystack.tinyworld.architecture import SCHEDULES

    if schedule not in SCHEDULES:
        raise UserError(f"--schedule {shown(schedule)}: expected one of {', '.join(SCHEDULES)}")
    configure_threads(threads)
    spec = PretrainSpec(out=out / "tiny-sd", work=work, seed=seed, vae_steps=vae_steps, unet_steps=unet_steps,
                        images_per_combo=images_per_combo, unet_lr=unet_lr, schedule=schedule, init_from=init_from,
                        stop_after=stop_after)
    say = lambda m: console.print(m)  # noqa: E731
    if stage in ("all", "vae"):
        train_vae(spec, say)
    if stage in ("all", "classifier"):
        train_classifier(ClassifierSpec(out=out / "classifier", vae=work / "vae", seed=seed,
                                        steps=classifier_steps), say)
    if stage in ("all", "unet"):
        train_unet(spec, say)


@world_app.command()
@guarded
def clip(
    out: Path = typer.Option(..., "--out", help="Folder for the CLIP model (transformers layout) and its tokenizer."),
    steps: int = typer.Option(1500, "--steps", min=1, help="Contrastive training steps (1500: ~3 min on 2 cores)."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
):
    """Train a CLIP that knows the tiny world, for `evaluate --clip DIR --versus ...` on tiny-world models.

    The stand-in for a real CLIP (the judge for any model): bench/clip_agreement.py checks that it ranks
    attacked runs as the tiny world's classifier does."""
    from raystack.models.pipeline_io import default_model_path
    from raystack.outputs import check_disjoint, check_new_output

    check_disjoint(out, [("the tiny world", default_model_path().parent)])
    check_new_output(out, overwrite)
    _setup()
    from raystack.tinyworld.clip import TinyClipSpec, style_accuracy, train_tiny_clip

    meta = train_tiny_clip(TinyClipSpec(out=out, steps=steps, seed=seed), say=lambda m: console.print(m))
    acc = style_accuracy(out)
    console.print(f"tiny CLIP: {out} ({meta['train_seconds']:.0f}s); zero-shot style accuracy on fresh images: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))


@world_app.command()
@guarded
def sample(
    prompt: list[str] = typer.Option(..., "--prompt", help="Prompt (repeatable)."),
    out: Path = typer.Option(..., "--out", help="PNG grid to write (one row per prompt)."),
    model: Optional[str] = typer.Option(None, "--model", help="Pipeline folder (default: the tiny world)."),
    n: int = typer.Option(8, "--n", min=1, help="Samples per prompt."),
    steps: int = typer.Option(25, "--steps", min=1),
    guidance: float = typer.Option(4.0, "--guidance"),
    seed: int = typer.Option(0, "--seed"),
    scale: int = typer.Option(4, "--scale", min=1, help="Nearest-neighbour upscaling of the grid."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output file(s) if they exist."),
):
    """Generate images from prompts and save them as one grid."""
    from raystack.models.pipeline_io import resolve_model_path
    from raystack.outputs import check_disjoint

    from raystack.outputs import check_output_file

    check_disjoint(out, [("--model", resolve_model_path(model))])
    check_output_file(out, overwrite, "--out")
    require_finite(guidance=guidance)
    _setup()
    from raystack.imageio import save_png
    from raystack.models.pipeline_io import load_pipeline
    from raystack.sampling import generate, image_grid

    pipe = load_pipeline(model)
    imgs = generate(pipe, [p for p in prompt for _ in range(n)], steps=steps, guidance=guidance, seed=seed)
    grid = image_grid(imgs, cols=n)
    save_png(out, grid.repeat(scale, 0).repeat(scale, 1))
    console.print(f"wrote {out}")


@world_app.command()
@guarded
def score(
    images: Path = typer.Option(..., "--images", help="Folder of images (metadata.jsonl optional)."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="Classifier folder (default: shipped)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write predictions as JSON."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output file(s) if they exist."),
):
    """Classify every image of a folder with the tiny world's concept classifier."""
    from raystack.outputs import check_disjoint
    from raystack.tinyworld.classifier import default_classifier_path

    if json_out is not None:
        check_disjoint(json_out, [("--images", images), ("--classifier", classifier or default_classifier_path())],
                       "--json")
        from raystack.outputs import check_output_file

        check_output_file(json_out, overwrite, "--json")
    _setup()
    from rich.table import Table

    from raystack.atomic import atomic_write_text
    from raystack.imageio import read_image_folder
    from raystack.tinyworld.classifier import Judge

    folder = read_image_folder(images, flag="--images", require_captions=False)
    preds = Judge(classifier).predict_names(folder.images)
    table = Table(title=f"{images} ({len(preds)} images)")
    for col in ("file", "shape", "colour", "style", "emblem", "junk"):
        table.add_column(col)
    for name, p in zip(folder.files, preds):
        table.add_row(name, p["shape"], p["colour"], p["style"], p["emblem"], f"{p['junk']:.2f}")
    console.print(table)
    if json_out:
        atomic_write_text(json_out, json.dumps([{"file": f, **p} for f, p in zip(folder.files, preds)], indent=2))


@world_app.command()
@guarded
def quality(
    model: Optional[str] = typer.Option(None, "--model", help="Pipeline folder (default: the tiny world)."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="Classifier folder (default: shipped)."),
    samples: int = typer.Option(64, "--samples", min=1, help="Samples per concept family (at least)."),
    steps: int = typer.Option(25, "--steps", min=1),
    guidance: float = typer.Option(4.0, "--guidance"),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers as JSON."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also save a PNG grid of the samples."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output file(s) if they exist."),
):
    """Trained concepts must come out fully right >= 80%; held-out concepts <= 15%. Exit 1 if not."""
    from raystack.models.pipeline_io import resolve_model_path
    from raystack.outputs import check_disjoint
    from raystack.tinyworld.classifier import default_classifier_path

    for flag, path in (("--json", json_out), ("--grid", grid)):
        if path is not None:
            check_disjoint(path, [("--model", resolve_model_path(model)),
                                  ("--classifier", classifier or default_classifier_path())], flag)
            from raystack.outputs import check_output_file

            check_output_file(path, overwrite, flag)
    require_finite(guidance=guidance)
    _setup()
    from rich.progress import BarColumn, Progress, TimeRemainingColumn
    from rich.table import Table

    from raystack.atomic import atomic_write_text
    from raystack.models.pipeline_io import load_pipeline
    from raystack.tinyworld.classifier import Judge
    from raystack.tinyworld.quality import HELD_OUT_MAX, TRAINED_MIN, families, measure, verdict

    pipe = load_pipeline(model)
    judge = Judge(classifier)
    total = sum(len(c) for _, c in families(samples))
    with Progress("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total}",
                  TimeRemainingColumn(), console=console, transient=True) as prog:
        task = prog.add_task("sampling", total=total)
        fams = measure(pipe, judge, samples, steps, guidance, seed, on_batch=lambda k: prog.advance(task, k))
    ok, trained, held = verdict(fams)
    table = Table(title="tiny world quality")
    for col in ("family", "samples", "accuracy", "shape", "colour", "style", "junk"):
        table.add_column(col, justify="right" if col != "family" else "left")
    for f in fams:
        a = f.per_attribute
        table.add_row(f.name, str(a["samples"]), f"{f.accuracy:.1%}", f"{a['shape']:.1%}", f"{a['colour']:.1%}",
                      f"{a['style']:.1%}", f"{a['junk']:.1%}")
    console.print(table)
    console.print(f"trained concepts fully right: {trained:.1%} (need >= {TRAINED_MIN:.0%})")
    console.print(f"held-out concepts rendered:   {held:.1%} (need <= {HELD_OUT_MAX:.0%})")
    console.print("[bold green]PASS[/]" if ok else "[bold red]FAIL[/]")
    if json_out:
        atomic_write_text(json_out, json.dumps({
            "pass": ok, "trained_accuracy": trained, "held_out_accuracy": held,
            "families": [{"name": f.name, "accuracy": f.accuracy, **f.per_attribute} for f in fams],
            "settings": {"samples": samples, "steps": steps, "guidance": guidance, "seed": seed}}, indent=2))
    if grid:
        import numpy as np

        from raystack.imageio import save_png
        from raystack.sampling import image_grid

        imgs = [f.images[:: max(1, len(f.images) // 16)][:16] for f in fams]
        save_png(grid, image_grid(np.concatenate(imgs), cols=16).repeat(3, 0).repeat(3, 1))
    if not ok:
        raise typer.Exit(1)
