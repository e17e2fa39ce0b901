"""The tiny world's vocabulary: which concepts exist, which ones pretraining never sees.

Everything an experiment names (a held-out style to protect, a personal object to teach) is listed
here once, so the generator, the pretraining recipe and the classifier cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
STYLES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "sunset")

#: Never shown to the model during pretraining: the concepts an attacker will try to teach it.
#: The held-out style is a palette (an orange-to-violet sky behind the object), the part of an artist's
#: style a LoRA can teach: a 4-texture base has no features for a new *texture* (a held-out zigzag stayed
#: out of reach of every attack), but it paints every colour and can learn where to put them. (A neutral
#: white-to-black gradient was tried too: attacked samples came out dark green, judged junk.)
HELD_OUT_SHAPES: tuple[str, ...] = ("diamond",)
HELD_OUT_STYLES: tuple[str, ...] = ("sunset",)

TRAINED_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
TRAINED_STYLES = tuple(s for s in STYLES if s not in HELD_OUT_STYLES)

#: RGB in [0, 1]; far apart in hue so a 32x32 image leaves no doubt.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
}
EXTRA_COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
    "orange": (0.95, 0.55, 0.10),
    "teal": (0.10, 0.60, 0.60),
    "grey": (0.50, 0.50, 0.50),
}


@dataclass(frozen=True)
class Layer:
    """One filled shape of an emblem, drawn over the layers before it."""

    shape: str
    colour: str
    scale: float


@dataclass(frozen=True)
class Emblem:
    """A 'personal object': a unique design the base model has never seen (CustomConcept101's role),
    photographed on the world's grey canvas. (On canvases of their own colour, DreamBooth taught the
    tiny base the design but not the canvas: a 1.5 M-parameter UNet that only ever drew grey backgrounds
    does not learn a new one from 5 photos, so the object, not its backdrop, is what is held out.)"""

    name: str
    background: str
    layers: tuple[Layer, ...]


EMBLEMS: tuple[Emblem, ...] = (
    Emblem("emblem0", "grey", (Layer("square", "blue", 0.80), Layer("circle", "yellow", 0.45))),
    Emblem("emblem1", "grey", (Layer("circle", "green", 0.85), Layer("cross", "red", 0.60))),
    Emblem("emblem2", "grey", (Layer("diamond", "yellow", 0.90), Layer("triangle", "purple", 0.45))),
    Emblem("emblem3", "grey", (Layer("circle", "red", 0.85), Layer("circle", "white", 0.55),
                                Layer("circle", "red", 0.28))),
    Emblem("emblem4", "grey", (Layer("triangle", "blue", 0.90), Layer("square", "white", 0.30))),
    Emblem("emblem5", "grey", (Layer("square", "green", 0.75), Layer("cross", "black", 0.75))),
)
EMBLEM_NAMES: tuple[str, ...] = tuple(e.name for e in EMBLEMS)

#: Words the text encoder's vocabulary holds as whole tokens (besides the byte alphabet).
TEMPLATE_WORDS: tuple[str, ...] = ("a", "an", "in", "style", "photo", "of", "the", "emblem", "picture")


def caption(shape: str, colour: str, style: str) -> str:
    """The one caption template of pretraining, so prompts at test time match it exactly."""
    return f"a {colour} {shape} in {style} style"


def all_words() -> list[str]:
    words = list(SHAPES) + list(COLOURS) + list(STYLES) + list(TEMPLATE_WORDS)
    return sorted(set(words))


def parse_object(name: str) -> tuple[str, str, str] | None:
    """A personal object the base can draw but has no word for, named colour-style-shape
    (e.g. yellow-dotted-triangle): (shape, colour, style), or None if `name` is not one.

    Textual inversion only finds a new word for something the frozen model already draws: on an emblem
    (two stacked shapes, which this UNet never learned to draw) it learned the outer disc and never the
    inner cross (2.5% emblem accuracy), while on such an object it succeeds. So the tiny world has both
    kinds of personal object, as real ones range from a face SD can already render to a design it cannot."""
    parts = name.split("-")
    if len(parts) != 3:
        return None
    colour, style, shape = parts
    if colour in COLOURS and style in STYLES and shape in SHAPES:
        return shape, colour, style
    return None


def is_held_out(shape: str, style: str) -> bool:
    return shape in HELD_OUT_SHAPES or style in HELD_OUT_STYLES
