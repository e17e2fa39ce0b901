"""`immunize-cli redteam`: the strongest attack a release lets through, at a stated budget."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded, quiet_libraries


@guarded
def redteam(
    space: Path = typer.Option(..., "--space", help="Attacker space YAML (see attack_spaces/)."),
    model: list[str] = typer.Option(..., "--model", help="NAME=DIR or NAME=DIR:MASK (MASK 'mask': DIR's own "
                                    "freeze_mask.safetensors, else a .safetensors mask file, checked against DIR's "
                                    "UNet before any trial; attacked compliant and non-compliant). DIR may contain "
                                    "':': the text after the last ':' is MASK only if it is 'mask', ends in "
                                    ".safetensors (or another weights suffix), is an existing file, or the text "
                                    "before it is an existing folder. Repeatable."),
    data: str = typer.Option(..., "--data", help="The attacker's images of the target concept (a folder or an "
                             "object-storage URI such as s3://bucket/data, which each trial fetches on its node)."),
    target: Optional[str] = typer.Option(None, "--target", help="Tiny-world concept the attacker wants (e.g. "
                                         "sunset); with --concepts, the concept file's name (the default)."),
    out: str = typer.Option("runs/redteam", "--out", help="Run folder: redteam.json and the trials. An "
                            "object-storage URI (s3://bucket/prefix): the sweep's state and every trial's attack "
                            "go there from the node that ran it, redteam.json last."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Ray address (default: an embedded local Ray)."),
    max_concurrent: int = typer.Option(1, "--max-concurrent", help="Trials at once."),
    overrides: list[str] = typer.Option([], "--set", help="Override a space key, dotted: --set samples=24."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out (same space, models "
                                "and data): finished sweeps are read back, an unfinished one goes on."),
    judge: str = typer.Option("tiny", "--judge", help="Who scores the attacks: tiny (the tiny world's classifier, "
                              "tiny-world models only) or clip:DIR (CLIP zero-shot from a local CLIP folder, any "
                              "model; needs --concepts)."),
    concepts: Optional[Path] = typer.Option(None, "--concepts", help="Concept file for the CLIP judge (see "
                                            "concepts/): the target's name, prompts and labels, its alternatives, "
                                            "and the other concepts the capability guard keeps."),
    use_gpu: bool = typer.Option(False, "--use-gpu/--no-use-gpu", help="Each trial holds one GPU and attacks and "
                                 "scores on it (--max-concurrent trials at once need as many GPUs); re-scoring and "
                                 "the reference attacks run on this machine's GPU when it has one. Without it every "
                                 "trial runs on one CPU core."),
    noncompliant: bool = typer.Option(True, "--noncompliant/--compliant-only", help="A masked model is attacked "
                                      "twice: respecting its mask and ignoring it. --compliant-only skips the "
                                      "second (its attacker faces the source's weights, e.g. when the original "
                                      "was red-teamed in another run)."),
):
    """Sweep the attacker space against every model (same space, same budget); report the worst case that
    passes the capability guard, re-scored with fresh seeds, and the budget curves."""
    from raystack.errors import UserError
    from raystack.imageio import read_image_folder
    from raystack.judges import judge_spec, parse_judge, spec_inputs, spec_target
    from raystack.outputs import check_disjoint
    from raystack.redteam.space import load_attack_space
    from raystack.redteam.sweep import check_resumable, parse_models

    from raystack.outputs import check_local_path
    from raystack.storage import check_uri, fetch, is_uri, preflight_output, run_staging_dir, sweep_output

    spec = load_attack_space(space, overrides)
    if max_concurrent <= 0:
        raise UserError(f"--max-concurrent {max_concurrent}: must be a positive integer")
    remote = sweep_output(out, resume, "a red team")
    data_source = check_uri(data, "--data") if is_uri(data) else None
    if data_source is None:
        check_local_path(data, "--data")
    targets = parse_models(model, judge=parse_judge(judge)[0], noncompliant=noncompliant)
    data = fetch(data_source, "--data") if data_source else Path(data)  # this machine's copy, for the checks
    read_image_folder(data, flag="--data", check_only=True)
    judged = judge_spec(judge, concepts, target)  # the tiny-world concept, or the CLIP folder and concept file
    target = spec_target(judged)
    if remote is not None:  # written here first (the re-scored winners, the reference attacks), then uploaded
        out = run_staging_dir(remote)  # this run's own (made under the lock below, removed at the end)
    out = Path(out)
    check_disjoint(out, [("--space", space), ("--data", data),
                         *((f"--model {t.name}", t.model) for t in targets),
                         *((f"--model {t.name} mask", t.mask) for t in targets if t.mask), *spec_inputs(judged)])
    from raystack.raysession import check_local_capacity, will_embed

    if will_embed(cluster):
        check_local_capacity(max_concurrent, use_gpu, "--max-concurrent")
    from raystack.redteam.space import check_budget_for_model

    for t in targets:
        check_budget_for_model(spec, t.model, f"--model {t.name}")
    from raystack.redteam.space import concept_word

    if judged["kind"] == "clip":
        target_prompts = list(judged["concepts"]["prompts"])
    else:
        from raystack.evaluation import tiny_world_target

        target_prompts = tiny_world_target(target)[0].prompts
    # TI and DreamBooth's class prompt need the concept's word in the captions (and TI in the target's prompts)
    concept_word(spec, target, data, prompts=target_prompts)
    check_resumable(out, spec, targets, data, target, resume, judged)  # before the lock makes any folder
    if judged["kind"] == "clip":  # loaded now (once per process): a folder it cannot load fails before --out is made
        from raystack.judges import load_judge

        load_judge(judged)
    if remote is not None:  # the bucket, an empty prefix and write access, before Ray starts
        preflight_output(remote, "--out", overwrite=False, taken_hint=REMOTE_TAKEN)
    try:
        report = _run_locked(out, spec, targets, data, target, resume, judged, use_gpu, cluster, max_concurrent,
                             remote, data_source)
    finally:
        if remote is not None:  # this run's staging folder: uploaded, or of no use after a failure
            import shutil

            shutil.rmtree(out.parent, ignore_errors=True)
    _finish(report, out, remote)


#: a red team's or sweep's --out prefix that holds objects (they have no --overwrite, and cannot be resumed there)
REMOTE_TAKEN = "choose a new prefix, or delete its objects first (a run in object storage cannot be resumed yet)"


def _run_locked(out, spec, targets, data, target, resume, judged, use_gpu, cluster, max_concurrent, remote,
                data_source) -> dict:
    from raystack.outputs import output_lock
    from raystack.raysession import init_ray
    from raystack.redteam.sweep import check_resumable

    with output_lock(out):
        check_resumable(out, spec, targets, data, target, resume, judged)  # again: another run may have written
        quiet_libraries(use_gpu)
        from raystack.redteam.sweep import run_redteam
        from raystack.runtime import configure_threads

        configure_threads()
        console.print(f"ray: {init_ray(cluster, use_gpu, max(2, 2 * max_concurrent))}")
        with console.status("red team") as status:
            report = run_redteam(spec, targets, data, target, out, max_concurrent,
                                 on_model=lambda n: status.update(f"red team: sweeping the attacks on {n}"),
                                 resume=resume, judge_spec=judged if judged["kind"] == "clip" else None,
                                 use_gpu=use_gpu, remote=remote, data_source=data_source)
        if remote is not None:
            from raystack.storage import upload_release

            names = upload_release(out, remote, "--out", commit="redteam.json")
            console.print(f"uploaded {len(names)} files to {remote} (redteam.json last; each trial's attack was "
                          "uploaded by its node)")
    return report


def _finish(report: dict, out: Path, remote: str | None) -> None:
    from raystack.errors import RunFailed
    from raystack.redteam.sweep import failure_message, model_trial_counts

    console.print(worst_case_table(report))
    for name, m in report["models"].items():
        c = model_trial_counts(m)
        if c["failed"]:
            console.print(f"[bold red]{name}: {c['failed']} of {sum(c.values())} trials FAILED[/]"
                          + ("" if c["done"] else ": no trial completed, no worst case was measured"))
    console.print(f"{remote}/redteam.json" if remote else f"{out / 'redteam.json'}")
    message = failure_message(report)
    if message:
        raise RunFailed(message)


def worst_case_table(report: dict):
    from rich.table import Table

    from raystack.redteam.sweep import model_trial_counts

    table = Table(title=f"red team {report['space']}: target {report['concept']}, budget {report['budget']} steps, "
                        f"guard {report['guard']}",
                  caption="worst case: the strongest attack that keeps >= guard x the other concepts, re-scored with "
                          "fresh seeds (95% interval), from the completed trials only; unguarded: the strongest "
                          "attack of all; trials: done / stopped early / FAILED")
    for col in ("model", "trials", "no attack", "reference attacks", "worst case", "95% interval", "others",
                "winning attack", "unguarded", "rejected"):
        table.add_column(col, overflow="fold")
    for name, m in report["models"].items():
        w, u = m["worst_case"], m["worst_case_unguarded"]
        fmt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        refs = ", ".join(f"{r['attack']['method']} {fmt(r['target'])}" for r in m.get("reference_attacks", [])) or "-"
        c = model_trial_counts(m)
        trials = f"{c['done']} / {c['stopped']} / " + (f"[bold red]{c['failed']} FAILED[/]" if c["failed"] else "0")
        worst = fmt(w and w["target"]) if c["done"] else "[bold red]no completed trial[/]" + (
            f" (reference attack: {fmt(w['target'])})" if w else "")
        table.add_row(name if "same_as" not in m else f"{name} (= {m['same_as']}: same weights and mask)", trials,
                      fmt(m["unattacked"]["target"]), refs, worst,
                      "-" if not w else f"{w['ci95'][0]:.0%}-{w['ci95'][1]:.0%}", fmt(w and w["others"]),
                      "-" if not w else ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in w["attack"].items()),
                      fmt(u and u["target"]), str(len(m["rejected_by_guard"])))
    return table
