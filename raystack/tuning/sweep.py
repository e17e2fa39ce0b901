"""The sweep: every trial hardens (a Ray Train run inside the Tune trial), attacks, scores; the driver
collects the trials, the Pareto front and a harden spec that reruns the best one."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..errors import RunFailed, UserError
from ..search import (discard_trial_output, make_scheduler, make_search_alg, passes_guard,  # noqa: F401
                      publish_trial_output, quiet_trial_errors, trial_counts, trial_dirname, trial_error,
                      trial_error_file, trial_output_dir)
from .space import TuneSpace, param_space
from ..atomic import atomic_write_bytes, atomic_write_text
from ..attacks.recipe import run_attack
from ..attacks.spec import AttackSpec
from ..hardening.driver import run_harden
from ..hardening.spec import HardenSpec
from ..judges import load_judge, spec_inputs
from ..models.pipeline_io import load_pipeline, resolve_model_path
from ..outputs import make_output_dir
from ..runtime import configure_threads
from ..storage import check_uri, fetch, is_uri, local_input, upload_release, uri_with
from ..specs import build_spec

RESULTS = "results.json"
_RUN_KEYS = ("space", "data", "drawn_attacks", "base_utility")  # config entries set by the sweep, not sampled
BEST = "best.yaml"
PARETO_PNG = "pareto.png"


# data ---------------------------------------------------------------------------------------------------
def prepare_data(space: TuneSpace, root: Path) -> dict[str, Path | str]:
    """Paths of the target, legal and attacker folders (a folder given as an object-storage URI stays a URI:
    each trial fetches it on its node); tiny-world generator specs are written once."""
    out = {}
    for role in ("target", "legal", "attacker"):
        v = getattr(space.data, role)
        if v is None:
            continue
        if isinstance(v, str) and is_uri(v):
            out[role] = check_uri(v, f"data.{role}")
            fetch(out[role], f"data.{role}")  # here too: a missing or unreadable folder fails before any trial
            continue
        if isinstance(v, str):
            p = Path(v).expanduser()
            if not p.is_dir():
                from ..outputs import shown

                raise UserError(f"data.{role} {shown(str(p))}: no such folder")
            out[role] = p.resolve()
            continue
        dest = root / "data" / role
        if not (dest / "metadata.jsonl").is_file():
            v.write(dest)
        out[role] = dest.resolve()
    out.setdefault("attacker", out["target"])
    return out


def sweep_inputs(space: TuneSpace) -> list[tuple[str, Path]]:
    """Every path the sweep reads (data folders given as paths, the model): `--out` must stay apart from them."""

    out = [(f"data.{role}", Path(v).expanduser()) for role, v in space.data.folders().items() if not is_uri(v)]
    out += [("harden.model", resolve_model_path(space.harden.get("model"), "harden.model"))]

    out += spec_inputs(space.judge_spec(), "judge", "concepts")
    return out + ([("attacker_space", Path(space.attacker_space))] if space.attacker_space else [])


# objectives ---------------------------------------------------------------------------------------------
def scalarise(space: TuneSpace, mitigation: float, utility: float) -> float:
    return space.utility_weight * utility - space.mitigation_weight * mitigation


def pareto_front(rows: list[dict]) -> list[int]:
    """Indices of trials no other trial beats on both (lower mitigation, higher utility)."""
    front = []
    for i, a in enumerate(rows):
        dominated = any(b["mitigation"] <= a["mitigation"] and b["utility"] >= a["utility"]
                        and (b["mitigation"] < a["mitigation"] or b["utility"] > a["utility"])
                        for j, b in enumerate(rows) if j != i)
        if not dominated:
            front.append(i)
    return front


# the trial ----------------------------------------------------------------------------------------------
def _score(pipe, judge, space: TuneSpace, seed: int) -> float:
    """Mitigation: the target's accuracy by the sweep's judge (`raystack.judges`, `TuneSpace.judge_spec`)."""
    return judge.sampled_target_accuracy(pipe, space.eval_samples, seed=seed, steps=space.eval_steps)


def _utility(pipe, judge, space: TuneSpace) -> float:
    """Utility: the other concepts' mean accuracy by the sweep's judge."""
    return judge.sampled_others_accuracy(pipe, space.eval_samples, seed=1, steps=space.eval_steps)


def _judge(space: TuneSpace):
    """The sweep's judge, loaded once per process (trial processes are reused)."""

    return load_judge(space.judge_spec(), flag="judge")


def attack_spec(values: dict, hardened: Path, data: Path, out: Path, source: str):
    """An attack of the space (`values`: AttackSpec fields) on a hardened model, under its freeze mask if it
    released one: how trials attack, and how a rerun of best.yaml is attacked to compare with them."""

    mask = Path(hardened) / "freeze_mask.safetensors"
    return build_spec(AttackSpec, {"data": str(data), **values, "model": str(hardened), "out": str(out),
                                   "overwrite": True, "freeze_mask": str(mask) if mask.exists() else None},
                      source=source)


def attacked_mitigation(space: TuneSpace, hardened: Path, attacker: Path, out: Path) -> float:
    """Mitigation of a hardened model under the space's first attack, attacked and scored as a trial is."""

    pipe = load_pipeline(hardened)
    run_attack(attack_spec(space.attacks[0], hardened, attacker, out, "attacks[0]"), pipe=pipe)
    return _score(pipe, _judge(space), space, 0)


def trial_mitigation(accuracies: list[float], how: str) -> float:
    """A trial's mitigation from its attacks' final target accuracies: their mean, or the worst case."""
    return float(max(accuracies) if how == "worst" else np.mean(accuracies))


def run_trial(config: dict) -> None:
    """Ray Tune function trainable: harden -> attacks (intermediate reports) -> utility -> final report."""
    import ray.tune

    from ..attacks.recipe import run_attack
    from ..models.pipeline_io import load_pipeline
    from ..specs import build_spec

    configure_threads(1)
    # the drawn attacks travel in the config: the attack space file is not read again (not on every node)
    space = TuneSpace(**{**config["space"], "attacker_space": None, "attacker_draws": 0})
    data = {k: local_input(v, f"data.{k}") for k, v in config["data"].items()}  # URIs: this node's copies
    sampled = {k: v for k, v in config.items() if k not in _RUN_KEYS}
    # Straight into --out/trials/<sweep>/<id>, not the trial's staging folder (which Ray copies to --out when
    # the trial ends: twice the disk, and a hardened model per trial under /tmp).
    trial_dir = trial_output_dir()
    try:
        values = {**harden_values(space, sampled, data), "out": str(trial_dir / "hardened"), "overwrite": True,
                  "cluster": None}
        spec = build_spec(HardenSpec, values, source="trial")
        t0 = time.time()
        # a one-worker hardening runs in this trial's own process (it holds the trial's CPU): no Ray Train group
        # to start per trial (bench/trial_overhead.py measures what that saves; IMMUNIZE_TRIAL_TRAIN_GROUP=1 starts
        # one anyway, for that comparison)
        in_process = spec.workers == 1 and os.environ.get("IMMUNIZE_TRIAL_TRAIN_GROUP") != "1"
        manifest = run_harden(spec, in_this_process=in_process)
        harden_s = time.time() - t0
        judge = _judge(space)
        mitigations, it = [], 0
        attacks = [*space.attacks, *config.get("drawn_attacks", [])]
        if space.utility_guard > 0:
            kept = _utility(load_pipeline(spec.out), judge, space)
            if not passes_guard(kept, config.get("base_utility"), space.utility_guard):
                attacks = []  # counted as fully broken: no attack needed
                mitigations = [1.0]
                ray.tune.report({"mitigation_running": 1.0, "attack": -1, "attack_step": 0,
                                 "objective_running": -space.mitigation_weight})
        for ai, a in enumerate(attacks):
            where = f"attacks[{ai}]" if ai < len(space.attacks) else f"attacker_space draw {ai - len(space.attacks)}"
            aspec = attack_spec(a, spec.out, data["attacker"], trial_dir / f"attack{ai}", where)
            pipe = load_pipeline(spec.out)
            every = max(1, aspec.checkpoint_every)
            last = {}

            def on_step(step, loss, pipe=pipe, aspec=aspec, last=last):
                nonlocal it
                if step % every == 0 or step == aspec.steps:
                    acc = _score(pipe, judge, space, 0)
                    last["acc"] = acc
                    it += 1
                    ray.tune.report({"mitigation_running": acc, "attack": ai, "attack_step": step,
                                     "objective_running": -space.mitigation_weight * acc})

            run_attack(aspec, on_step=on_step, pipe=pipe)
            mitigations.append(last["acc"])
        mitigation = trial_mitigation(mitigations, space.mitigation)
        if space.legal_finetune:
            lf = attack_spec(space.legal_finetune, spec.out, data.get("legal") or data["target"], trial_dir / "legal",
                             "legal_finetune")
            pipe = load_pipeline(spec.out)
            run_attack(lf, pipe=pipe)
        else:
            pipe = load_pipeline(spec.out)
        utility = _utility(pipe, judge, space)
        publish_trial_output(trial_dir)  # a sweep in object storage: the trial's models and attacks go up there
        ray.tune.report({"mitigation": mitigation, "utility": utility,
                         "objective": scalarise(space, mitigation, utility),
                         "objective_running": scalarise(space, mitigation, utility),
                         "frozen_ratio": manifest.get("frozen_ratio"), "trial_seconds": round(time.time() - t0, 1),
                         # the hardening's set-up and wrap-up around the method's own steps (Ray Train group or not)
                         "harden_seconds": round(harden_s, 2),
                         "harden_overhead_seconds": round(harden_s - (manifest.get("worker_seconds") or 0.0), 2),
                         "harden_in_process": in_process,
                         "attack_accuracies": mitigations, "ruined": not attacks and space.utility_guard > 0,
                         "done_all": True})
    except BaseException:  # stopped early or failed: in object storage, nothing of it stays on this node
        discard_trial_output(trial_dir)
        raise


# the driver ---------------------------------------------------------------------------------------------
def trial_resources(space: TuneSpace) -> dict:
    """What one trial holds: one CPU. Its hardening and attacks run in the trial's own process (a one-process
    gloo group), where Ray shows no GPU to a trial that holds none: a GPU setting would silently run on the CPU,
    so it is refused with one line instead."""
    asks = [("harden.use_gpu", space.harden.get("use_gpu")), ("search.use_gpu", "use_gpu" in space.search)]
    asks += [(f"attacks[{i}].device", (a or {}).get("device") == "cuda") for i, a in enumerate(space.attacks)]
    asks.append(("legal_finetune.device", (space.legal_finetune or {}).get("device") == "cuda"))
    for key, on in asks:
        if on:
            raise UserError(f"{key}: a sweep runs each trial on one CPU, where no GPU is visible; leave it out, "
                            "or rerun the best setting with `immunize-cli harden --config best.yaml --use-gpu`")
    return {"cpu": 1}


def run_sweep(space: TuneSpace, out: Path, samples: int | None = None, max_concurrent: int = 1,
              resume: bool = False, remote: str | None = None) -> dict:
    """`remote`: --out's object-storage URI (`out` is then this machine's staging folder): the generated data
    go up first (trials fetch them on their nodes), Tune keeps its state there, each trial uploads its own
    folder; the caller uploads `out` (results.json last)."""
    from ray import tune

    resources = trial_resources(space)  # before any folder is made
    out = make_output_dir(Path(out).resolve())
    data = prepare_data(space, out)
    if remote is not None:  # folders written here are read by trials on any node: from the bucket
        uploaded: dict[str, str] = {}
        for role, v in data.items():
            if not is_uri(v) and Path(v).is_relative_to(out):
                if str(v) not in uploaded:  # the attacker's data default to the target's: one copy
                    uploaded[str(v)] = uri_with(remote, f"/data/{role}")
                    upload_release(Path(v), uploaded[str(v)], "--out")
                data[role] = uploaded[str(v)]
    storage, name = out / "tune", space.name
    trainable = tune.with_resources(run_trial, resources)
    if resume:
        if not tune.Tuner.can_restore(str(storage / name)):
            raise UserError(f"--resume: no sweep to resume in {storage / name}")
        tuner = tune.Tuner.restore(str(storage / name), trainable=trainable, resume_errored=True)
    else:
        from ..outputs import check_plain_name, confined_rmtree

        confined_rmtree(storage / check_plain_name(name, "name"), out)  # a fresh sweep of that name
        confined_rmtree(out / "trials" / name, out)
        scheduler, search_alg = make_scheduler(space), make_search_alg(space, max_concurrent)
        space_dict = param_space(space)
        space_dict["space"] = {k: getattr(space, k) for k in space.__dataclass_fields__}
        space_dict["data"] = {k: str(v) for k, v in data.items()}
        from .space import drawn_attacks

        space_dict["drawn_attacks"] = drawn_attacks(space, local_input(data["attacker"], "data.attacker"))
        space_dict["base_utility"] = base_utility(space) if space.utility_guard > 0 else None
        tuner = tune.Tuner(
            trainable, param_space=space_dict,
            tune_config=tune.TuneConfig(metric="objective_running", mode="max", scheduler=scheduler,
                                        search_alg=search_alg, num_samples=samples or space.samples,
                                        max_concurrent_trials=max_concurrent,
                                        trial_dirname_creator=trial_dirname,
                                        reuse_actors=True),  # warm trial processes: imports, the process group
            run_config=tune.RunConfig(name=name, storage_path=uri_with(remote, "/tune") if remote else str(storage),
                                     verbose=0))
    with quiet_trial_errors():
        grid = tuner.fit()
    rows = []
    for r in grid:
        m = r.metrics or {}
        row = {"trial": Path(r.path).name if r.path else None,
               "setting": {k: v for k, v in (r.config or {}).items() if k not in _RUN_KEYS},
               "status": "error" if r.error else ("done" if m.get("done_all") else "stopped"),
               "error": trial_error(r.error), "error_file": trial_error_file(r, out),
               "mitigation": m.get("mitigation", m.get("mitigation_running")),
               "utility": m.get("utility"), "objective": m.get("objective"),
               "frozen_ratio": m.get("frozen_ratio"), "seconds": m.get("trial_seconds"), "harden_overhead_seconds": m.get("harden_overhead_seconds"),
               "attack_accuracies": m.get("attack_accuracies"), "ruined": m.get("ruined")}
        rows.append(row)
    rows.sort(key=lambda r: str(r["trial"]))  # a stable order: ties go to the same trial after --resume
    results, done = sweep_results(space, rows, out)
    _write_outputs(space, out, results, done, results["best"], data, remote)
    return results


class NoCompletedTrial(RunFailed):
    """A sweep none of whose trials completed: results.json records the failed trials, nothing else is written;
    `results` is that record (the terminal table shows it)."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


def sweep_results(space: TuneSpace, rows: list[dict], out: Path) -> tuple[dict, list[dict]]:
    """results.json's record from the trials' rows (and the completed ones): failed trials counted, the best and
    the Pareto front from the completed ones. No completed trial: the rows are written to results.json and
    `NoCompletedTrial` is raised (exit 1), never a best setting from nothing."""
    done = [r for r in rows if r["status"] == "done"]
    objective = f"{space.utility_weight} * utility - {space.mitigation_weight} * mitigation"
    if not done:
        from ..atomic import atomic_write_text

        results = {"space": space.name, "trials": rows, "best": None, "pareto": [], "objective": objective,
                   "trial_counts": trial_counts(rows)}
        atomic_write_text(Path(out) / RESULTS, json.dumps(results, indent=2, default=str))
        raise NoCompletedTrial(no_completed_trial_message(results, Path(out) / RESULTS), results)
    front = pareto_front(done)
    for i, r in enumerate(done):
        r["pareto"] = i in front
    best = max(done, key=lambda r: r["objective"])
    return {"space": space.name, "trials": rows, "best": best, "pareto": [done[i]["trial"] for i in front],
            "objective": objective, "trial_counts": trial_counts(rows)}, done


def no_completed_trial_message(results: dict, where: Path) -> str:
    """The one error line of a sweep none of whose trials completed (no best setting can be declared)."""
    c = results.get("trial_counts") or trial_counts(results["trials"])
    first = next((t for t in results["trials"] if t.get("error")), None)
    trace = f" (traceback under --out: {first['error_file']})" if first and first.get("error_file") else ""
    return (f"tune: no trial of sweep {results['space']} completed ({c['failed']} failed, {c['stopped']} stopped "
            f"early): no best setting; see {where}" + (f"; first error: {first['error']}{trace}" if first else ""))


def base_utility(space: TuneSpace) -> float:
    """The unhardened model's utility, scored as a trial scores its hardened model (for the utility guard)."""
    from ..models.pipeline_io import load_pipeline

    return _utility(load_pipeline(space.harden.get("model")), _judge(space), space)


def harden_values(space: TuneSpace, setting: dict, data: dict) -> dict:
    """The harden spec of one setting: what a trial runs and what best.yaml reruns."""
    values = {**space.harden, **setting, "target": [str(data["target"])]}
    if "legal" in data:
        values.setdefault("legal", str(data["legal"]))
    return values


def setting_label(setting: dict) -> str:
    """Short point label: values of strings (a method), name=value for numbers."""
    def one(k, v):
        if k == "attacker_space":  # a robust-hardening setting: the space's file name, or the one attacker
            return f"{k}={Path(v).stem}" if isinstance(v, str) else f"{k}=none"
        return v if isinstance(v, str) else f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"

    return ", ".join(one(k, v) for k, v in setting.items())


def _write_outputs(space: TuneSpace, out: Path, results: dict, done: list[dict], best: dict, data: dict,
                   remote: str | None = None) -> None:
    import yaml

    atomic_write_text(out / RESULTS, json.dumps(results, indent=2, default=str))
    header = (f"# best trial of sweep {space.name!r}: objective {best['objective']:.4f} "
              f"(mitigation {best['mitigation']:.4f}, utility {best['utility']:.4f})\n"
              f"# immunize-cli harden --config {BEST if remote else out / BEST} --out hardened-best\n")
    best_values = harden_values(space, best["setting"], data)
    atomic_write_text(out / BEST, header + yaml.safe_dump(best_values, sort_keys=True))
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    xs = [r["mitigation"] for r in done]
    ys = [r["utility"] for r in done]
    ax.scatter(xs, ys, c=["tab:red" if r["pareto"] else "tab:blue" for r in done])
    front = sorted((r["mitigation"], r["utility"]) for r in done if r["pareto"])
    ax.plot([f[0] for f in front], [f[1] for f in front], "r--", lw=1)
    for r in done:
        ax.annotate(setting_label(r["setting"]), (r["mitigation"], r["utility"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("mitigation: target accuracy after attack (lower is better)")
    ax.set_ylabel("utility: other concepts' accuracy (higher is better)")
    ax.set_title(f"sweep {space.name}: Pareto front in red")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out / PARETO_PNG, buf.getvalue())
