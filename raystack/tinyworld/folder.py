"""Write tiny-world data to disk as a user-style image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..imageio import write_image_folder
from ..outputs import shown
from .concepts import COLOURS, SHAPES, STYLES, caption
from .render import emblem_by_name, render_concept, render_emblem


def _pick(values, allowed, flag):
    if not values:
        return list(allowed)
    for v in values:
        if v not in allowed:
            raise UserError(f"{flag} {shown(v)}: unknown; expected one of {', '.join(allowed)}")
    return list(values)


def check_caption_template(template: str | None, flag: str = "--caption") -> None:
    """Only the fields {shape}, {colour}, {style} (and literal braces as {{ }}) may appear in a caption template."""
    import string

    if template is None:
        return
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
        template.format(shape="s", colour="c", style="t")
    except (ValueError, KeyError, IndexError, AttributeError):
        fields = None
    if fields is None or any(f not in ("shape", "colour", "style") for f in fields):
        raise UserError(f"{flag} {shown(template)}: a caption template may use only {{shape}}, {{colour}} and "
                        "{style} (write {{ and }} for literal braces)")


def write_concept_folder(out: Path, shapes, colours, styles, n: int, seed: int, template: str | None,
                         overwrite: bool) -> int:
    check_caption_template(template)
    shapes = _pick(shapes, SHAPES, "--shape")
    colours = _pick(colours, COLOURS, "--colour")
    styles = _pick(styles, STYLES, "--style")
    rng = np.random.default_rng(seed)
    imgs, caps = [], []
    for sh in shapes:
        for co in colours:
            for st in styles:
                for _ in range(n):
                    imgs.append(render_concept(sh, co, st, rng))
                    caps.append(template.format(shape=sh, colour=co, style=st) if template else caption(sh, co, st))
    return write_image_folder(out, np.stack(imgs), caps, overwrite)


def write_emblem_folder(out: Path, emblem: str, n: int, seed: int, template: str, overwrite: bool) -> int:
    try:
        e = emblem_by_name(emblem)
    except ValueError as err:
        raise UserError(f"--emblem {err}") from None
    rng = np.random.default_rng(seed)
    imgs = np.stack([render_emblem(e, rng) for _ in range(n)])
    return write_image_folder(out, imgs, [template] * n, overwrite)
