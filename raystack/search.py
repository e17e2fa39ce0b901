"""What both sweeps (`tune` and `redteam`) share on Ray Tune: the distributions a space may vary, the search
algorithm and scheduler, the guard, and each trial's folder, error and status."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from pathlib import Path

from .errors import UserError

ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")


def passes_guard(kept: float, reference: float | None, guard: float) -> bool:
    """The one guard both sweeps apply: a model keeps at least `guard` x the reference (TamperBench's capability
    guard on an attacked model's other concepts; tune's utility guard on a hardened model). No reference: passes."""
    return reference is None or kept >= guard * reference


def check_distribution(key: str, dist) -> None:
    """One varied setting of a space (tune or attack): {grid|choice: [values]} or {uniform|loguniform: [low, high]}
    with finite low < high (positive for loguniform). The values themselves are checked by the caller's spec."""
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise UserError(f"search.{key}: expected one of {', '.join(DISTRIBUTIONS)} with its values")
    kind, vals = next(iter(dist.items()))
    if not isinstance(vals, list) or not vals:
        raise UserError(f"search.{key}.{kind}: expected a non-empty list")
    if kind in ("uniform", "loguniform"):
        if len(vals) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise UserError(f"search.{key}.{kind}: expected [low, high], two numbers")
        if not all(math.isfinite(v) for v in vals) or not vals[0] < vals[1]:
            raise UserError(f"search.{key}.{kind}: expected finite [low, high] with low < high")
        if kind == "loguniform" and vals[0] <= 0:
            raise UserError(f"search.{key}.loguniform: bounds must be positive")


def param_space(space) -> dict:
    """Ray Tune's param_space for a space's `search` (grid becomes a choice under a search algorithm)."""
    from ray import tune

    out = {}
    for key, dist in space.search.items():
        kind, vals = next(iter(dist.items()))
        if kind == "grid":
            out[key] = tune.grid_search(vals) if space.algorithm in ("grid", "random") else tune.choice(vals)
        elif kind == "choice":
            out[key] = tune.choice(vals)
        elif kind == "uniform":
            out[key] = tune.uniform(*vals)
        else:
            out[key] = tune.loguniform(*vals)
    return out


def make_scheduler(space):
    """ASHA stops a trial early on the target accuracy reported at each attack checkpoint (a TuneSpace's
    trials, or an AttackSpace's attacks)."""
    if space.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", grace_period=2, reduction_factor=2, max_t=10_000)


def make_search_alg(space, max_concurrent: int, seed: int | None = None, points: list[dict] | None = None):
    """None: Tune's own random/grid generator; optuna: TPE through Ray's OptunaSearch; random with a `seed`:
    Tune's generator seeded. With a seed a sweep draws the same settings again. `points`: settings tried first,
    in order, before anything is drawn (the red team's strong corners)."""
    if space.algorithm == "random" and (seed is not None or points):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent, points_to_evaluate=points)
    if space.algorithm != "optuna":
        return None
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        import optuna  # noqa: F401 - OptunaSearch only fails later without it
    except ImportError:
        raise UserError("algorithm optuna: the optuna package is not installed (pip install optuna)") from None
    return ConcurrencyLimiter(OptunaSearch(seed=seed, points_to_evaluate=points or None),
                              max_concurrent=max_concurrent)


def trial_output_dir(kind: str = "trials") -> Path:
    """Where the running trial writes: <out>/<kind>/<sweep>/<trial id>, found from the sweep's storage
    (<out>/tune) at run time, so a moved sweep folder resumes into itself. A sweep stored in object storage
    (--out s3://…): a folder of this node's cache, which `publish_trial_output` uploads to the same place under
    the URI."""
    import ray.tune

    ctx = ray.tune.get_context()
    storage = ctx.get_storage()
    relative = _trial_relative(kind)
    if _remote_storage(storage):
        from .storage import cache_dir

        key = hashlib.sha256(str(storage.storage_fs_path).encode()).hexdigest()[:24]
        return cache_dir("trials") / key / relative
    return Path(storage.storage_fs_path).parent / relative


def publish_trial_output(folder: Path, kind: str = "trials") -> None:
    """A finished trial's folder (`trial_output_dir(kind)`) uploaded beside the sweep's storage when that is
    object storage (other nodes and the driver read it there); nothing to do on a local disk."""
    import pyarrow.fs as pafs
    import ray.tune

    ctx = ray.tune.get_context()
    storage = ctx.get_storage()
    if not _remote_storage(storage):
        return
    dest = f"{Path(storage.storage_fs_path).parent.as_posix()}/{_trial_relative(kind).as_posix()}"
    pafs.copy_files(str(folder), dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=storage.storage_filesystem)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)  # this node's copy: the driver reads the uploaded one


def _trial_relative(kind: str) -> Path:
    """<kind>/<sweep>/<trial id>: where the running trial's folder sits beside the sweep's storage."""
    import ray.tune

    ctx = ray.tune.get_context()
    return Path(kind) / ctx.get_storage().experiment_dir_name / ctx.get_trial_id()


def discard_trial_output(folder: Path) -> None:
    """A trial that ends without publishing (stopped early, failed) leaves nothing in its node's cache when the
    sweep is stored in object storage; on a local disk its folder stays where the sweep keeps it."""
    import shutil

    import ray.tune

    if _remote_storage(ray.tune.get_context().get_storage()):
        shutil.rmtree(folder, ignore_errors=True)


def _remote_storage(storage) -> bool:
    import pyarrow.fs as pafs

    return not isinstance(storage.storage_filesystem, pafs.LocalFileSystem)


@contextlib.contextmanager
def quiet_trial_errors():
    """Ray Tune logs every failed trial's traceback on the driver's stderr; the sweep records each error itself
    (its one line in the results, the traceback in the trial's error.txt) and the command reports them, so
    those logs are held back (IMMUNIZE_DEBUG=1 keeps them)."""
    import logging

    if os.environ.get("IMMUNIZE_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(n) for n in ("ray.tune.execution.tune_controller", "ray.tune.tune")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trial_error_file(result, root: Path) -> str | None:
    """A failed trial's traceback file (Tune's error.txt in the trial's folder), relative to `root`."""
    if result.error is None or not result.path:
        return None
    f = Path(result.path) / "error.txt"
    return os.path.relpath(f, root) if f.is_file() else None


def trial_error(error) -> str | None:
    """One line for a failed trial's error (Ray wraps the trial's exception: its cause is named), or None."""
    if error is None:
        return None
    cause = getattr(error, "cause", None) or error
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    text = f"{type(cause).__name__}: {lines[-1] if lines else ''}".strip()
    return text if len(text) <= 300 else text[:297] + "..."


def trial_counts(rows: list[dict]) -> dict[str, int]:
    """How many trials completed (done), were stopped early by the scheduler (stopped) or failed (status error)."""
    counts = {"done": 0, "stopped": 0, "failed": 0}
    for r in rows:
        counts[{"done": "done", "error": "failed"}.get(r.get("status"), "stopped")] += 1
    return counts


def trial_dirname(trial) -> str:
    """A trial's folder: its id only (Ray's default puts the sampled values, strings included, into the name)."""
    return f"trial_{trial.trial_id}"
