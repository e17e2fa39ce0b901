"""`immunize-cli evaluate`: how much did the attacker get back, how much legal use was lost."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded, quiet_libraries, require_finite


def _parse_runs(values: list[str]) -> dict[str, Path]:
    from raystack.errors import UserError
    from raystack.outputs import check_plain_name, shown

    runs: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--run {shown(v)}: expected NAME=FOLDER (an attack output or a pipeline folder)")
        check_plain_name(name, "--run: the name")
        if name in runs:
            raise UserError(f"--run {shown(v)}: the name {name!r} is used twice")
        from raystack.outputs import check_local_path

        check_local_path(path, f"--run {name}")
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"--run {shown(v)}: no such folder")
        if not ((p / "attack.json").is_file() or (p / "model_index.json").is_file()):
            raise UserError(f"--run {shown(v)}: neither an attack output (attack.json) nor a pipeline (model_index.json)")
        runs[name] = p
    return runs


@guarded
def evaluate(
    run: list[str] = typer.Option([], "--run", help="NAME=FOLDER: an attack output or a pipeline (repeatable)."),
    target: list[str] = typer.Option(..., "--target", help="Target concept (tiny world: a style, shape, emblem or "
                                     "colour-style-shape object); repeat it for a multi-concept hardening: each "
                                     "concept is scored on its own, with the mean and the least protected."),
    out: Path = typer.Option(..., "--out", help="Report folder: report.json, report.html, images/."),
    baseline: Optional[str] = typer.Option(None, "--baseline",
                                           help="Run attacked WITHOUT hardening (x_A) for SGR/RSGR."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference images of the target "
                                             "(default: the tiny world's generator)."),
    token: str = typer.Option("sks", "--token", help="Identifier the attacker used in prompts (emblems, objects)."),
    samples: int = typer.Option(24, "--samples", min=1, max=100_000, help="Images per target concept and run."),
    other_samples: Optional[int] = typer.Option(None, "--other-samples", min=1, max=100_000,
                                                help="Images per other (legal) concept and run (default: --samples)."),
    curve_samples: int = typer.Option(12, "--curve-samples", min=1, max=100_000, help="Images per checkpoint on the curves."),
    steps: int = typer.Option(25, "--steps", min=1, help="Sampling steps."),
    guidance: float = typer.Option(4.0, "--guidance"),
    seed: int = typer.Option(0, "--seed"),
    curves: bool = typer.Option(True, "--curves/--no-curves", help="Evaluate every attack checkpoint."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="Local CLIP model folder: adds the CLIP-I similarity."),
    dino: Optional[Path] = typer.Option(None, "--dino", help="Local DINO model folder: adds the DINO similarity."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="Concept classifier folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    redteam: Optional[Path] = typer.Option(None, "--redteam", help="A finished `redteam --out`: the report gains "
                                           "its worst-case section (table, budget curves) and the winning attacks "
                                           "are evaluated as runs worst-<model>."),
    versus: list[str] = typer.Option([], "--versus", help="Any model: score by CLIP zero-shot (needs --clip). "
                                     "--target is then a prompt of the protected concept and each --versus a "
                                     "prompt of an alternative; an image counts for the concept whose prompt "
                                     "CLIP finds closest. The alternatives are the other concepts (legal use)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda: where the runs are sampled."),
    concepts: Optional[Path] = typer.Option(None, "--concepts", help="Any model: score by CLIP zero-shot (needs "
                                            "--clip) the concepts of a concept file (see concepts/): the target "
                                            "(--target is its name), its alternatives and the other concepts, as "
                                            "redteam and tune do with --judge clip:DIR."),
):
    """Generate from attacked models, score accuracy and similarity, compute SGR/RSGR, write a report."""
    from raystack.errors import UserError
    from raystack.outputs import check_disjoint, check_new_output, output_lock, shown
    from raystack.tinyworld.classifier import default_classifier_path

    from raystack.attacks.spec import check_device_flag
    from raystack.runtime import pick_device

    check_device_flag(device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no GPU is visible here (use --device cpu or auto)")
    device = pick_device(device)
    runs = _parse_runs(run)
    concepts_content = None
    if concepts is not None:
        from raystack.judges import load_concept_file

        if clip is None:
            raise UserError("--concepts: CLIP zero-shot scoring needs a local CLIP folder (--clip DIR)")
        if versus:
            raise UserError("--versus: the alternatives and the other concepts come from --concepts; give one of them")
        concepts_content = load_concept_file(concepts)
        if target != [concepts_content["name"]]:
            raise UserError(f"--target {shown(' '.join(target))}: with --concepts, the target is the concept file's "
                            f"name {concepts_content['name']!r}")
    if versus:
        if clip is None:
            raise UserError("--versus: CLIP zero-shot scoring needs a local CLIP folder (--clip DIR)")
        if redteam is not None:
            raise UserError("--versus: the red team scores tiny-world concepts; evaluate it without --versus")
        if set(versus) & set(target):
            raise UserError(f"--versus {shown(sorted(set(versus) & set(target))[0])}: is also a --target")
        if len(set(versus)) != len(versus):
            raise UserError("--versus: an alternative is given twice")
    if len(set(target)) != len(target):
        raise UserError(f"--target: {', '.join(sorted({t for t in target if target.count(t) > 1}))} given twice")
    if len(target) > 1 and reference is not None:
        raise UserError("--reference: one set of reference images fits one --target; with several targets the "
                        "tiny world's own references are used")
    redteam_report = None
    if redteam is not None:
        from raystack.redteam.results import load_redteam

        if len(target) > 1:
            raise UserError("--redteam: a red team attacks one concept; evaluate it with that one --target")
        redteam_report, winners = load_redteam(redteam, target[0])
        from raystack.report import redteam_sample_counts

        redteam_report["samples"] = redteam_sample_counts(redteam)  # the images behind its scores: intervals
        if set(winners) & set(runs):
            raise UserError(f"--run: the names {', '.join(sorted(set(winners) & set(runs)))} are taken by --redteam")
        runs.update(winners)
    if not runs and redteam_report is None:
        raise UserError("--run or --redteam: nothing to evaluate")
    if classifier is None and not versus and concepts is None:  # the tiny world's classifier: its models only
        import json

        from raystack.judges import check_tiny_world_judge

        for name, p in runs.items():
            model = p
            if (p / "attack.json").is_file():
                try:
                    model = Path(json.loads((p / "attack.json").read_text())["base_model"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # read_attack_info names what is wrong with it, in one line
            check_tiny_world_judge(model, f"--run {name}")
    require_finite(guidance=guidance)
    from raystack.metrics import check_embedder_folder

    for kind, folder in (("clip", clip), ("dino", dino)):
        if folder is not None:
            check_embedder_folder(kind, folder)  # before any sampling: a wrong folder is found in a second
    check_disjoint(out, [*((f"--run {n}", p) for n, p in runs.items()), ("--redteam", redteam),
                         ("--reference", reference), ("--clip", clip), ("--concepts", concepts),
                         ("--dino", dino), ("--classifier", classifier or default_classifier_path())])
    check_new_output(out, overwrite)
    if baseline is not None and baseline not in runs:
        raise UserError(f"--baseline {shown(baseline)}: not one of the --run names ({', '.join(runs)})")
    with output_lock(out):
        _evaluate_locked(runs, target, out, baseline, reference, token, samples, curve_samples, steps, guidance, seed,
                         curves, clip, dino, classifier, overwrite, redteam_report, other_samples, versus, device,
                         concepts_content)


def _evaluate_locked(runs, target, out, baseline, reference, token, samples, curve_samples, steps, guidance, seed,
                     curves, clip, dino, classifier, overwrite, redteam_report=None, other_samples=None, versus=(),
                     device="cpu", concept_file=None):
    quiet_libraries()
    from rich.table import Table

    from raystack.evaluation import EvalSettings, evaluate as run_eval, tiny_world_others, tiny_world_target
    from raystack.imageio import read_image_folder
    from raystack.metrics import ClassifierEmbedder, HFImageEmbedder
    from raystack.report import write_report
    from raystack.runtime import configure_threads
    from raystack.tinyworld.classifier import Judge

    import numpy as np

    configure_threads()
    if concept_file:  # any model: CLIP zero-shot over a concept file's labels (raystack.judges)
        from raystack.judges import ClipJudge

        judge = ClipJudge.from_concepts(clip, concept_file, flag=f"--clip {clip}")
        concept, others, ref = judge.target, judge.others, None
        embedders = [judge.embedder]
    elif versus:  # any model: CLIP zero-shot over the target prompt(s) and the alternatives
        from raystack.evaluation import prompt_concepts
        from raystack.metrics import ClipZeroShot

        concept, others = prompt_concepts(list(target), list(versus))
        ref = None
        judge = ClipZeroShot(clip, [*target, *versus])
        embedders = [judge.images]
    else:
        concepts = [tiny_world_target(t, token) for t in target]  # several: scored one by one, references pooled
        concept, ref = [c for c, _ in concepts], np.concatenate([r for _, r in concepts])
        others = tiny_world_others(exclude=target)
        judge = Judge(classifier)
        embedders = [ClassifierEmbedder(judge)]
        if clip:
            embedders.append(HFImageEmbedder("clip", clip))
    if reference is not None:
        ref = read_image_folder(reference, flag="--reference", require_captions=False).images
    if dino:
        embedders.append(HFImageEmbedder("dino", dino))
    settings = EvalSettings(samples=samples, other_samples=other_samples, curve_samples=curve_samples, steps=steps,
                            guidance=guidance, seed=seed, curves=curves, device=device)
    with console.status("evaluating") as status:
        report, images = run_eval(runs, concept, ref, others, judge, embedders, settings,
                                  baseline, on_progress=lambda s: status.update(s))
    if redteam_report is not None:
        report["redteam"] = redteam_report
    from raystack.report import with_intervals, with_release_hashes

    report = with_intervals(with_release_hashes(report))
    write_report(out, report, images, ref, overwrite=overwrite)
    several = len(target) > 1
    table = Table(title=f"target {report['target']}")
    sim = report["embedders"][0] if report["embedders"] else None  # the similarity shown: the classifier's, or CLIP's
    for col in ("run", "attack", *(f"{t} acc" for t in target if several), "target acc" + (" (mean)" if several else ""),
                *(["worst target"] if several else []), "others acc", f"M(ref) {sim or '–'}", "SGR", "RSGR"):
        table.add_column(col, justify="left" if col in ("run", "attack") else "right")
    for name, r in report["runs"].items():
        gap = (report.get("gaps") or {}).get(name, {}).get(sim, {})
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        per = [fmt(r["target_accuracy_by_concept"][t]) for t in target] if several else []
        table.add_row(name, r["attack"] or "none", *per, fmt(r["target_accuracy"]),
                      *([fmt(r["target_accuracy_max"])] if several else []), fmt(r["other_accuracy_mean"]),
                      fmt(r["similarity_to_reference"].get(sim)), fmt(gap.get("SGR")), fmt(gap.get("RSGR")))
    console.print(table)
    console.print(report["summary"], markup=False, highlight=False)
    console.print(f"report: {out / 'report.html'}")
