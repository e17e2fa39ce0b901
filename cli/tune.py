"""`immunize-cli tune`: Ray Tune sweep of harden settings, each trial scored by a simulated attack."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded, quiet_libraries


@guarded
def tune(
    space: Path = typer.Option(..., "--space", help="Search space YAML (see tune_spaces/)."),
    out: Path = typer.Option(Path("runs/tune"), "--out", help="Sweep folder: results.json, pareto.png, best.yaml."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Ray address (default: an embedded local Ray)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Trials (default: the space file's)."),
    max_concurrent: int = typer.Option(1, "--max-concurrent", help="Trials at once."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="Embedded Ray: logical CPUs."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep found in --out."),
    overrides: list[str] = typer.Option([], "--set", help="Override a space key, dotted: --set harden.seed=1 "
                                        "--set name=my-sweep (repeatable; give the same ones to --resume)."),
):
    """Sweep rho / learning rates / lambda weights; every trial hardens, attacks and is scored."""
    from raystack.errors import UserError
    from raystack.tuning.space import load_space

    spec = load_space(space, overrides)
    if samples is not None and samples <= 0:
        raise UserError(f"--samples {samples}: must be a positive integer")
    if max_concurrent <= 0:
        raise UserError(f"--max-concurrent {max_concurrent}: must be a positive integer")
    from raystack.hardening.launcher import check_writable, init_ray

    check_writable(out, "--out")
    quiet_libraries()
    from raystack.runtime import configure_threads
    from raystack.tuning.sweep import BEST, PARETO_PNG, RESULTS, run_sweep

    configure_threads()
    init_ray(cluster, False, num_cpus or max(2, 2 * max_concurrent))
    with console.status(f"sweep {spec.name}: trials running (harden, attack, score)"):
        results = run_sweep(spec, out, samples, max_concurrent, resume)
    from rich.table import Table

    table = Table(title=f"sweep {spec.name}: {results['objective']}")
    for col in ("trial", "setting", "mitigation", "utility", "objective", "status", "pareto"):
        table.add_column(col)
    for r in results["trials"]:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        setting = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["setting"].items())
        table.add_row(str(r["trial"]), setting, fmt(r["mitigation"]), fmt(r["utility"]), fmt(r["objective"]),
                      r["status"], "yes" if r.get("pareto") else "")
    console.print(table)
    console.print(f"best: {results['best']['setting']} -> {out / BEST}; {out / RESULTS}, {out / PARETO_PNG}")
