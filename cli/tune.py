"""`immunize-cli tune`: Ray Tune sweep of harden settings, each trial scored by a simulated attack."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded, quiet_libraries


@guarded
def tune(
    space: Path = typer.Option(..., "--space", help="Search space YAML (see tune_spaces/)."),
    out: str = typer.Option("runs/tune", "--out", help="Sweep folder: results.json, pareto.png, best.yaml. An "
                            "object-storage URI (s3://bucket/prefix): the sweep's state, the data it generates and "
                            "every trial's folder go there from the node that made them, results.json last."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Ray address (default: an embedded local Ray)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Trials (default: the space file's)."),
    max_concurrent: int = typer.Option(1, "--max-concurrent", help="Trials at once."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="Embedded Ray: logical CPUs."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep found in --out."),
    overrides: list[str] = typer.Option([], "--set", help="Override a space key, dotted: --set harden.seed=1 "
                                        "--set name=my-sweep (repeatable; give the same ones to --resume)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Who scores mitigation and utility (the space's "
                                        "judge key, default tiny): tiny (the tiny world's classifier) or clip:DIR "
                                        "(CLIP zero-shot from a local CLIP folder, any model; needs --concepts)."),
    concepts: Optional[Path] = typer.Option(None, "--concepts", help="Concept file for the CLIP judge (the space's "
                                            "concepts key; see concepts/)."),
):
    """Sweep rho / learning rates / lambda weights; every trial hardens, attacks and is scored."""
    from raystack.errors import UserError
    from raystack.tuning.space import load_space

    given = {"judge": judge, "concepts": None if concepts is None else str(concepts)}
    extra = {k: v for k, v in given.items() if v is not None}
    if concepts is not None:  # flags win over the space file: the target is the concept file's
        extra["target_concept"] = None
    from raystack.storage import preflight_output, run_staging_dir, sweep_output

    remote = sweep_output(out, resume, "a sweep")
    spec = load_space(space, overrides, extra=extra)
    from raystack.judges import check_judge_model
    from raystack.models.pipeline_io import resolve_model_path

    check_judge_model(spec.judge_spec(), resolve_model_path(spec.harden.get("model"), "harden.model"), "harden.model")
    from raystack.specs import MAX_COUNT

    if samples is not None and not 0 < samples <= MAX_COUNT:
        raise UserError(f"--samples {samples}: must be a positive integer, at most {MAX_COUNT}")
    if max_concurrent <= 0:
        raise UserError(f"--max-concurrent {max_concurrent}: must be a positive integer")
    from raystack.hardening.driver import check_writable
    from raystack.outputs import check_disjoint
    from raystack.raysession import check_local_capacity, local_cpus, will_embed
    from raystack.tuning.sweep import sweep_inputs, trial_resources

    trial_resources(spec)  # a GPU setting is refused before Ray starts (a trial runs on one CPU)
    if remote is not None:  # made here first (results, best.yaml, the generated data), then uploaded
        if spec.workers > 1:  # its Ray Train run would keep checkpoints on the trial's node, read by other nodes
            raise UserError(f"harden.workers {spec.workers}: a sweep in object storage hardens each trial in the "
                            "trial's own process (harden.workers 1); rerun the best setting with more workers")
        out = run_staging_dir(remote)  # this run's own (removed at the end)
    out = Path(out)
    check_disjoint(out, [("--space", space), *sweep_inputs(spec)])
    check_writable(out, "--out")
    from raystack.outputs import check_replaceable

    check_replaceable(out)  # a sweep folder of this tool's (earlier sweeps stay beside a new one), or new
    embedded = will_embed(cluster)
    need = max_concurrent * spec.workers  # each concurrent trial's harden run places spec.workers workers
    if embedded:
        fits = local_cpus() // spec.workers
        check_local_capacity(need, False, "--max-concurrent x harden.workers", f" ({max_concurrent} x {spec.workers})",
                             fix=f"use --max-concurrent {fits} or less" if fits else
                             f"use --set harden.workers={local_cpus()} or less")
    if remote is not None:  # the bucket, an empty prefix and write access, before Ray starts
        from cli.redteam import REMOTE_TAKEN

        preflight_output(remote, "--out", overwrite=False, taken_hint=REMOTE_TAKEN)
    try:
        results = _run_locked(spec, out, remote, samples, max_concurrent, resume, cluster, num_cpus, embedded, need)
    finally:
        if remote is not None:  # this run's staging folder: uploaded, or of no use after a failure
            import shutil

            shutil.rmtree(out.parent, ignore_errors=True)
    from raystack.tuning.sweep import BEST, PARETO_PNG, RESULTS

    where = (lambda name: f"{remote}/{name}") if remote else (lambda name: out / name)  # noqa: E731
    table = trials_table(results)
    console.print(table)
    failed = sum(r["status"] == "error" for r in results["trials"])
    if failed:
        console.print(f"[bold red]{failed} of {len(results['trials'])} trials FAILED[/] (their errors: "
                      f"{where(RESULTS)}); the best is taken from the completed trials only")
    console.print(f"best: {results['best']['setting']} -> {where(BEST)}; {where(RESULTS)}, {where(PARETO_PNG)}")


def _run_locked(spec, out: Path, remote, samples, max_concurrent, resume, cluster, num_cpus, embedded, need) -> dict:
    from raystack.errors import RunFailed
    from raystack.outputs import output_lock
    from raystack.raysession import check_cluster_capacity, init_ray

    with output_lock(out):
        quiet_libraries()
        from raystack.runtime import configure_threads
        from raystack.tuning.sweep import RESULTS, NoCompletedTrial, run_sweep

        configure_threads()
        console.print(f"ray: {init_ray(cluster, False, num_cpus or max(2, 2 * max_concurrent))}")
        if not embedded:
            check_cluster_capacity(need, False, None, "--max-concurrent x harden.workers",
                                   hint="use a smaller --max-concurrent or harden.workers, or a larger cluster")
        with console.status(f"sweep {spec.name}: trials running (harden, attack, score)") as status:
            try:
                results = run_sweep(spec, out, samples, max_concurrent, resume, remote)
            except NoCompletedTrial as e:  # the failed trials' table, then the one error line (exit 1)
                status.stop()
                console.print(trials_table(e.results))
                if remote is None:
                    raise
                _upload(out, remote, RESULTS)  # the failed trials' record, where the sweep was asked to be
                raise RunFailed(str(e).replace(str(out / RESULTS), f"{remote}/{RESULTS}")) from None
        if remote is not None:
            _upload(out, remote, RESULTS)
    return results


def _upload(staging: Path, remote: str, commit: str) -> None:
    """The sweep's folder made here, uploaded under --out's URI (`commit` last)."""
    from raystack.storage import upload_release

    names = upload_release(staging, remote, "--out", commit=commit)
    console.print(f"uploaded {len(names)} files to {remote} ({commit} last; each trial's folder was uploaded by "
                  "its node)")


def trials_table(results: dict):
    """The terminal table: one row per trial, short trial ids, settings folded to fit the terminal."""
    from rich.table import Table

    from raystack.tuning.sweep import setting_label

    table = Table(title=f"sweep {results['space']}: {results['objective']}",
                  caption="mitig.: target accuracy after the attack (lower is better); util.: other concepts' "
                          "accuracy (higher is better); obj.: the objective; front: on the Pareto front; "
                          "status FAILED: the trial crashed (see its error in results.json)")
    table.add_column("trial", no_wrap=True)
    table.add_column("setting", ratio=1, overflow="fold")
    for col in ("mitig.", "util.", "obj.", "status", "front"):
        table.add_column(col, no_wrap=True)
    for r in results["trials"]:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(short_trial_name(r["trial"]), setting_label(r["setting"]), fmt(r["mitigation"]),
                      fmt(r["utility"]), fmt(r["objective"]),
                      "[bold red]FAILED[/]" if r["status"] == "error" else r["status"], "yes" if r.get("pareto") else "")
    return table


def short_trial_name(name) -> str:
    """`trial_8af01_00003` (or Ray's default `run_trial_8af01_00003_3_rho=0.7_<date>`) -> `8af01_00003`."""
    parts = str(name).split("_")
    if len(parts) > 4 and parts[:2] == ["run", "trial"]:
        return "_".join(parts[2:4])
    return "_".join(parts[1:]) if len(parts) == 3 and parts[0] == "trial" else str(name)
