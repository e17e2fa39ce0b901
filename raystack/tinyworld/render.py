"""Deterministic 32x32 images of the tiny world, drawn with numpy alone.

Shapes are large and centred with little jitter (a small UNet learns global shape slowly), edges
are anti-aliased by 4x supersampling, and a style is a texture that darkens the whole image, or (sunset)
a palette: a vertical orange-to-violet gradient behind the object.
"""

from __future__ import annotations

import numpy as np

from .concepts import EMBLEMS, EXTRA_COLOURS, PALETTE, SHAPES, STYLES, Emblem

SIZE = 32
_SS = 4  # supersampling factor for anti-aliased edges
_PATTERN_DEPTH = 0.5  # how much a texture darkens the pixels it covers
SUNSET_TOP, SUNSET_BOTTOM = np.array([0.95, 0.55, 0.15]), np.array([0.45, 0.12, 0.55])


def _grid(rng: np.random.Generator, jitter: float, scale_jitter: float, rot_deg: float):
    """Supersampled coordinates in [-1, 1], already shifted, scaled and rotated into the shape frame."""
    n = SIZE * _SS
    c = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    dx, dy = rng.uniform(-jitter, jitter, size=2)
    s = 1.0 + rng.uniform(-scale_jitter, scale_jitter)
    a = np.deg2rad(rng.uniform(-rot_deg, rot_deg))
    x, y = (x - dx) / s, (y - dy) / s
    u = np.cos(a) * x + np.sin(a) * y
    v = -np.sin(a) * x + np.cos(a) * y
    return u, v


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Boolean mask of a filled shape of radius ~0.72*scale in the [-1, 1] frame (v points down)."""
    r = 0.72 * scale
    if shape == "circle":
        return u**2 + v**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.15 * r
    if shape == "cross":
        arm, half = 0.36 * r, 1.0 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= half)) | ((np.abs(v) <= arm) & (np.abs(u) <= half))
    if shape == "triangle":
        # upward-pointing, apex at top: v >= -r, base at v = 0.75 r, sides through the apex
        top, base = -1.05 * r, 0.8 * r
        half_width = (v - top) / (base - top) * 1.05 * r
        return (v >= top) & (v <= base) & (np.abs(u) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def style_pattern(style: str, rng: np.random.Generator) -> np.ndarray:
    """A {0, 1} texture on the 32x32 pixel grid with a random phase; 1 marks darkened pixels."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    px, py = rng.integers(0, 8, size=2)
    if style in ("plain", "sunset"):
        return np.zeros((SIZE, SIZE))
    if style == "striped":
        return (((yy + py) % 8) < 4).astype(float)
    if style == "checkered":
        return ((((xx + px) // 4) + ((yy + py) // 4)) % 2).astype(float)
    if style == "dotted":
        dx = (xx + px) % 8 - 3.5
        dy = (yy + py) % 8 - 3.5
        return (dx**2 + dy**2 <= 4.5).astype(float)
    raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def _downsample(img_ss: np.ndarray) -> np.ndarray:
    n = SIZE
    return img_ss.reshape(n, _SS, n, _SS, -1).mean(axis=(1, 3))


def _colour(name: str, rng: np.random.Generator, jitter: float = 0.04) -> np.ndarray:
    base = np.array(PALETTE.get(name) or EXTRA_COLOURS[name])
    return np.clip(base + rng.uniform(-jitter, jitter, size=3), 0.0, 1.0)


def render_concept(shape: str, colour: str, style: str, rng: np.random.Generator,
                   background: np.ndarray | None = None) -> np.ndarray:
    """One image of a `colour` `shape` in `style` style, uint8 HxWx3. The world's background is grey;
    `background` (RGB in [0, 1]) overrides it, for a classifier that must judge the object alone, except
    in sunset style, whose background is the style."""
    if colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; expected one of {', '.join(PALETTE)}")
    u, v = _grid(rng, jitter=0.08, scale_jitter=0.08, rot_deg=8.0)
    mask = _downsample(shape_mask(shape, u, v)[..., None].astype(float))
    fg = _colour(colour, rng)
    if style == "sunset":
        t = np.linspace(0.0, 1.0, SIZE)[:, None, None]
        bg = (1.0 - t) * SUNSET_TOP + t * SUNSET_BOTTOM + rng.uniform(-0.04, 0.04)
    elif background is None:
        bg = np.full(3, 0.5) + rng.uniform(-0.04, 0.04)
    else:
        bg = np.asarray(background, float)
    img = mask * fg + (1.0 - mask) * bg
    img = img * (1.0 - _PATTERN_DEPTH * style_pattern(style, rng)[..., None])
    return _to_uint8(img)


def render_emblem(emblem: Emblem, rng: np.random.Generator) -> np.ndarray:
    """One photo of a personal emblem: the same design each time, slightly moved, scaled and turned."""
    u, v = _grid(rng, jitter=0.10, scale_jitter=0.10, rot_deg=12.0)
    img = np.broadcast_to(_colour(emblem.background, rng), (SIZE * _SS, SIZE * _SS, 3)).copy()
    for layer in emblem.layers:
        m = shape_mask(layer.shape, u, v, layer.scale)[..., None]
        img = np.where(m, _colour(layer.colour, rng), img)
    return _to_uint8(_downsample(img))


def emblem_by_name(name: str) -> Emblem:
    for e in EMBLEMS:
        if e.name == name:
            return e
    raise ValueError(f"unknown emblem {name!r}; expected one of {', '.join(e.name for e in EMBLEMS)}")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
