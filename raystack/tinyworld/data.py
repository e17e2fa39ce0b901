"""In-memory data sets of the tiny world, seeded, for pretraining and for the classifier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .concepts import (COLOURS, EMBLEMS, SHAPES, STYLES, TRAINED_SHAPES, TRAINED_STYLES, caption)
from .render import render_concept, render_emblem


@dataclass
class ConceptSet:
    images: np.ndarray  # uint8 N x 32 x 32 x 3
    captions: list[str]
    shape: np.ndarray  # int64 index into SHAPES
    colour: np.ndarray  # int64 index into COLOURS
    style: np.ndarray  # int64 index into STYLES


def combos(trained_only: bool) -> list[tuple[str, str, str]]:
    shapes = TRAINED_SHAPES if trained_only else SHAPES
    styles = TRAINED_STYLES if trained_only else STYLES
    return [(sh, co, st) for sh in shapes for co in COLOURS for st in styles]


def concept_set(n_per_combo: int, seed: int, trained_only: bool = True, random_background: float = 0.0) -> ConceptSet:
    """`n_per_combo` images of every (shape, colour, style); the same seed gives the same bytes.
    `random_background`: share of images drawn on a random background colour instead of grey."""
    rng = np.random.default_rng(seed)
    imgs, caps, sh_i, co_i, st_i = [], [], [], [], []
    for sh, co, st in combos(trained_only):
        for _ in range(n_per_combo):
            bg = rng.uniform(0.05, 0.95, 3) if random_background and rng.random() < random_background else None
            imgs.append(render_concept(sh, co, st, rng, background=bg))
            caps.append(caption(sh, co, st))
            sh_i.append(SHAPES.index(sh))
            co_i.append(COLOURS.index(co))
            st_i.append(STYLES.index(st))
    return ConceptSet(np.stack(imgs), caps, np.array(sh_i), np.array(co_i), np.array(st_i))


def emblem_set(n_per_emblem: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for i, e in enumerate(EMBLEMS):
        for _ in range(n_per_emblem):
            imgs.append(render_emblem(e, rng))
            labels.append(i)
    return np.stack(imgs), np.array(labels)
