"""The concepts a judge scores: the target's prompts and criterion, and the other concepts whose quality must
survive (the tiny world's trained styles and shapes, or any model's prompts for a CLIP judge)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .outputs import shown
from .tinyworld.concepts import (COLOURS, EMBLEM_NAMES, SHAPES, STYLES, TRAINED_SHAPES, TRAINED_STYLES, caption, parse_object)
from .tinyworld.data import concept_set
from .tinyworld.render import emblem_by_name, render_concept, render_emblem


@dataclass
class Concept:
    name: str
    prompts: list[str]
    criterion: dict = field(default_factory=dict)
    """Classifier heads that must match, e.g. {"style": "sunset"} (empty: no classifier accuracy)."""


def tiny_world_target(concept: str, token: str = "sks") -> tuple[Concept, np.ndarray]:
    """The target concept's prompts, classifier criterion and reference images in the tiny world."""

    rng = np.random.default_rng(2024)
    if concept in STYLES:
        prompts = [caption(sh, co, concept) for sh in TRAINED_SHAPES for co in COLOURS]
        cs = concept_set(2, seed=2024, trained_only=False)
        ref = cs.images[cs.style == STYLES.index(concept)]
        return Concept(concept, prompts, {"style": concept}), ref
    if concept in SHAPES:
        prompts = [caption(concept, co, st) for co in COLOURS for st in TRAINED_STYLES]
        cs = concept_set(2, seed=2024, trained_only=False)
        ref = cs.images[cs.shape == SHAPES.index(concept)]
        return Concept(concept, prompts, {"shape": concept}), ref
    if concept in EMBLEM_NAMES:
        e = emblem_by_name(concept)
        ref = np.stack([render_emblem(e, rng) for _ in range(16)])
        return Concept(concept, [f"a photo of {token} emblem"], {"emblem": concept}), ref
    if obj := parse_object(concept):
        shape, colour, style = obj
        ref = np.stack([render_concept(shape, colour, style, rng) for _ in range(16)])
        return Concept(concept, [f"a {token}"], {"shape": shape, "colour": colour, "style": style}), ref
    raise UserError(f"--target {shown(concept)}: not a tiny-world concept (a style, shape, emblem name or a "
                    "colour-style-shape object such as yellow-dotted-triangle)")


def prompt_concepts(targets: list[str], versus: list[str]) -> tuple[list[Concept], list[Concept]]:
    """Any model, scored by CLIP zero-shot: each target and each alternative is a concept of one prompt whose
    label is that prompt (the alternatives are the other concepts whose quality must survive)."""
    return ([Concept(t, [t], {"label": t}) for t in targets], [Concept(v, [v], {"label": v}) for v in versus])


def tiny_world_others(exclude: str | list[str] | None = None) -> list[Concept]:
    """Legal concepts whose quality must survive: every trained style and trained shape (but the target(s))."""
    from .tinyworld.concepts import COLOURS, TRAINED_SHAPES, TRAINED_STYLES, caption

    exclude = {exclude} if isinstance(exclude, str) else set(exclude or ())
    out = []
    for st in TRAINED_STYLES:
        if st not in exclude:
            out.append(Concept(f"style:{st}", [caption(sh, co, st) for sh, co in zip(TRAINED_SHAPES * 2, COLOURS)],
                               {"style": st}))
    for sh in TRAINED_SHAPES:
        if sh not in exclude:
            out.append(Concept(f"shape:{sh}", [caption(sh, co, st) for co, st in zip(COLOURS, TRAINED_STYLES * 2)],
                               {"shape": sh}))
    return out
