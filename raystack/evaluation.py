"""Red-team evaluation: what did the attacker get back, and what did legal use lose?

For every run (an attack output folder, or a plain pipeline folder) it generates the target concept
and a set of other concepts, scores them with the concept classifier (accuracy, the analog of IMMA
Tab. 3) and with each similarity embedder (M against reference images), and, against a baseline run
(attacked *without* hardening), computes SGR and RSGR. Checkpoints give curves against attack steps.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
from typing import Callable

import numpy as np

from .concepts import Concept, prompt_concepts, tiny_world_others, tiny_world_target  # noqa: F401
from .errors import UserError
from .metrics import rsgr, set_similarity, sgr
from .outputs import shown
from .attacks.loading import attack_checkpoints, attacked_prompt, load_attacked_pipeline
from .freeze_mask import read_mask_metadata
from .judges import as_concept_judge
from .models.pipeline_io import read_extra_info
from .sampling import generate
from .tinyworld.classifier import concept_accuracy


@dataclass
class EvalSettings:
    device: str = "cpu"
    """Where the runs are sampled (cpu or cuda)."""
    samples: int = 24
    """Images per target concept (prompts are cycled)."""
    other_samples: int | None = None
    """Images per other (legal) concept; None: as many as `samples`."""
    curve_samples: int = 12
    steps: int = 25
    guidance: float = 4.0
    seed: int = 0
    curves: bool = True


def cycled(prompts: list[str], n: int) -> list[str]:
    """n prompts, repeating the list: several samples per prompt."""
    return [prompts[i % len(prompts)] for i in range(n)]


def sampled_accuracy(pipe, prompts: list[str], criterion: dict, n: int, judge, seed: int = 0,
                     steps: int = 25) -> float:
    """Classifier accuracy of n images sampled from `prompts` (cycled): one concept's score."""

    return concept_accuracy(judge(generate(pipe, cycled(prompts, n), steps=steps, seed=seed)), **criterion)


def other_concepts_accuracy(pipe, target: str, n: int, judge, seed: int = 1, steps: int = 25) -> float:
    """Mean accuracy over the legal concepts other than `target`, n images each: what a hardening (a sweep's
    utility) or an attack (the red team's capability guard) must leave."""
    return float(np.mean([sampled_accuracy(pipe, c.prompts, c.criterion, n, judge, seed=seed, steps=steps)
                          for c in tiny_world_others(target)]))


def attacked_hardening(info: dict) -> dict | None:
    """The hardening an attack ran against: the attacked model's own (a hardened release), or, for an attack
    that respected a FreezeAsGuard mask, the mask's (read from the mask file's metadata and its release)."""

    own = read_extra_info(Path(info["base_model"])).get("hardening")
    mask = (info.get("spec") or {}).get("freeze_mask")
    if own or not mask:
        return own
    release = read_extra_info(Path(mask).parent).get("hardening")
    if release:
        return release

    meta = read_mask_metadata(Path(mask))
    if not meta:
        return None
    try:
        return {"method": json.loads(meta.get("method", '"freeze mask"')), "frozen_ratio": float(meta["frozen_ratio"])}
    except (ValueError, KeyError):
        return {"method": "freeze mask"}


def _load_run(path: Path, weights: Path | None = None, device: str = "cpu"):
    from .models.pipeline_io import load_pipeline, read_extra_info

    if (path / "attack.json").is_file():
        pipe, info = load_attacked_pipeline(path, weights)
        mask = (info.get("spec") or {}).get("freeze_mask")
        return pipe.to(device), (lambda p: attacked_prompt(info, p)), {
            "attack": info["method"], "steps": info["steps"], "hardening": attacked_hardening(info),
            "model": str(Path(info["base_model"]).resolve()), "mask": str(Path(mask).resolve()) if mask else None}
    pipe = load_pipeline(path, flag="--run", device=device)
    return pipe, (lambda p: p), {"attack": None, "steps": 0, "hardening": read_extra_info(path).get("hardening"),
                                 "model": str(Path(path).resolve())}


def evaluate(runs: dict[str, Path], target: Concept | list[Concept], reference: np.ndarray, others: list[Concept],
             judge, embedders: list, settings: EvalSettings, baseline: str | None = None,
             on_progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """Returns (report dict, images per run).

    Several targets (a multi-concept hardening) are sampled and scored one by one: `target_accuracy` is then
    their mean, `target_accuracy_by_concept` each one and `target_accuracy_max` the least protected — a
    concept protected "on average" can still be fully re-learnt. Similarities pool the targets' images
    against `reference` (all targets' reference images)."""
    from .sampling import generate

    targets = [target] if isinstance(target, Concept) else list(target)
    several = len(targets) > 1
    say = on_progress or (lambda s: None)
    ref_feats = {e.name: e(reference) for e in embedders} if reference is not None else {}
    embedders = embedders if reference is not None else []  # similarity needs reference images
    report: dict = {"target": " + ".join(t.name for t in targets), "criterion": targets[0].criterion,
                    "settings": settings.__dict__, "embedders": [e.name for e in embedders], "baseline": baseline,
                    "runs": {}}
    if several:
        report["targets"] = {t.name: t.criterion for t in targets}
    # image k of a concept, in every run: prompt k (cycled) and the same starting noise (the report pairs them)
    report["prompts"] = {c.name: c.prompts for c in [*targets, *others]}
    images: dict[str, dict[str, np.ndarray]] = {}
    feats: dict[str, dict] = {}

    def verdicts(imgs, concept):
        """The judge's verdict on each image (None: the concept is not scored)."""
        if not concept.criterion or not judge:
            return None
        return as_concept_judge(judge).hits(imgs, concept)  # the classifier's heads, or CLIP's closest label

    def score(hits):
        return None if hits is None else (float(np.mean(hits)) if len(hits) else 0.0)

    def listed(hits):
        return None if hits is None else [bool(h) for h in hits]

    def sample_targets(pipe, to_prompt, n):
        """Each target's n images, and the judge's verdicts: (pooled images, {name: verdict per image})."""
        per = {t.name: generate(pipe, [to_prompt(p) for p in cycled(t.prompts, n)], settings.steps,
                                settings.guidance, settings.seed) for t in targets}
        return np.concatenate(list(per.values())), {t.name: verdicts(per[t.name], t) for t in targets}

    def summary(accs: dict) -> dict:
        """target_accuracy (the mean over the targets), and with several targets each one and the worst."""
        vals = [v for v in accs.values() if v is not None]
        out = {"target_accuracy": (float(np.mean(vals)) if vals else None)}
        if several:
            out["target_accuracy_by_concept"] = accs
            out["target_accuracy_max"] = max(vals) if vals else None
        return out

    for name, path in runs.items():
        say(f"{name}: sampling")
        pipe, to_prompt, meta = _load_run(Path(path), device=settings.device)
        t_imgs, t_hits = sample_targets(pipe, to_prompt, settings.samples)
        n_other = settings.other_samples or settings.samples
        o_imgs = {c.name: generate(pipe, [to_prompt(p) for p in cycled(c.prompts, n_other)], settings.steps,
                                   settings.guidance, settings.seed) for c in others}
        images[name] = {"target": t_imgs, **o_imgs}
        feats[name] = {e.name: {"target": e(t_imgs), **{k: e(v) for k, v in o_imgs.items()}} for e in embedders}
        o_hits = {c.name: verdicts(o_imgs[c.name], c) for c in others}
        run = {"path": str(path), **meta, **summary({k: score(v) for k, v in t_hits.items()}),
               "other_accuracy": {k: score(v) for k, v in o_hits.items()},
               "verdicts": {"targets": {k: listed(v) for k, v in t_hits.items()},
                            "others": {k: listed(v) for k, v in o_hits.items()}},
               "similarity_to_reference": {e.name: set_similarity(feats[name][e.name]["target"], ref_feats[e.name])
                                           for e in embedders}}
        accs = [v for v in run["other_accuracy"].values() if v is not None]
        run["other_accuracy_mean"] = float(np.mean(accs)) if accs else None
        if settings.curves and meta["attack"]:
            curve = []
            for step, w in attack_checkpoints(Path(path)):
                say(f"{name}: curve at step {step}")
                cp, cprompt, _ = _load_run(Path(path), w, device=settings.device)
                imgs, hits_at = sample_targets(cp, cprompt, settings.curve_samples)
                curve.append({"step": step, **summary({k: score(v) for k, v in hits_at.items()}),
                              **{f"similarity_{e.name}": set_similarity(e(imgs), ref_feats[e.name])
                                 for e in embedders}})
            run["curve"] = curve
        report["runs"][name] = run

    if baseline is not None:
        if baseline not in runs:
            raise UserError(f"--baseline {shown(baseline)}: not one of the --run names ({', '.join(runs)})")
        report["gaps"] = {}
        for name in runs:
            if name == baseline:
                continue
            g = {}
            for e in embedders:
                fb, fh = feats[baseline][e.name], feats[name][e.name]
                m_ref_base = report["runs"][baseline]["similarity_to_reference"][e.name]
                m_ref_hard = report["runs"][name]["similarity_to_reference"][e.name]
                m_t = set_similarity(fb["target"], fh["target"])
                per_other = {c.name: set_similarity(fb[c.name], fh[c.name]) for c in others}
                m_o = float(np.mean(list(per_other.values()))) if per_other else float("nan")

                g[e.name] = {"SGR": sgr(m_ref_base, m_ref_hard), "RSGR": rsgr(m_o, m_t),
                             "M_target_base_vs_run": m_t, "M_other_base_vs_run": m_o,
                             "RSGR_per_other": {k: rsgr(v, m_t) for k, v in per_other.items()}}
            report["gaps"][name] = g
    report["crossed"] = crossed_matrix(report["runs"])
    return report, images


def against_label(against) -> str:
    """What a release was hardened against, as a row name: the simulated attack method, 'none', or, for robust
    hardening (`--attacker-space`, recorded as the drawn pool), the space's file name and the pool's size."""
    if isinstance(against, dict):
        space = Path(str(against.get("attacker_space") or "attacker space")).name
        return f"pool of {len(against.get('pool') or [])} from {space}"
    return against or "none"


def hardening_label(hardening: dict | None) -> str:
    """A row of the crossed matrix: 'none' for an unhardened model, what an attacker-simulating release was
    hardened against (IMMA), or the method of one that simulates none (FreezeAsGuard, an erasure)."""
    if not hardening:
        return "none"
    if hardening.get("against") is not None:
        return against_label(hardening["against"])
    return str(hardening.get("method") or "hardened")


def crossed_matrix(runs: dict) -> dict:
    """Target accuracy by (attacked model, attacked with). A row is one attacked model (and mask, if the attack
    kept one), named by its hardening (`hardening_label`, the model's folder added where two models would share
    a name); a column is the attack method (the run's name added where one model has two runs of one method).
    No run's number ever takes another's cell."""
    cells: dict[str, dict[str, float | None]] = {}
    row_of: dict[tuple, str] = {}
    for name, r in runs.items():
        if not r.get("attack"):
            continue
        model = (str(r.get("model", name)), r.get("mask"))
        if model not in row_of:
            label = hardening_label(r.get("hardening")) + (" (mask kept)" if r.get("mask") else "")
            for candidate in (label, f"{label} ({Path(model[0]).name})", f"{label} [{name}]"):
                if candidate not in cells:
                    break
            row_of[model] = candidate
            cells[candidate] = {}
        row = cells[row_of[model]]
        row[r["attack"] if r["attack"] not in row else f"{r['attack']} ({name})"] = r["target_accuracy"]
    return cells

