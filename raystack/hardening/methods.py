"""The registry of hardening methods: `harden --method NAME` runs these phases in order (the phase interface is
in method.py). A new method registers itself here, and every name the CLI, plan and verify know comes from it."""

from __future__ import annotations

from .erase import AblationPhase, ESDxPhase, UCEPhase
from .freezeasguard import FreezeAsGuardRecipe, RandomFreezePhase
from .imma import IMMARecipe

_METHODS: dict[str, tuple] = {}


def register_method(name: str, *phases) -> None:
    """`harden --method NAME` runs these phase classes in order."""
    _METHODS[name] = tuple(phases)


def method_phases(name: str) -> tuple:
    return _METHODS[name]


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


register_method("imma", IMMARecipe)
register_method("freezeasguard", FreezeAsGuardRecipe)
register_method("random-freeze", RandomFreezePhase)
register_method("imma+freeze", IMMARecipe, FreezeAsGuardRecipe)  # immunize the weights, then learn the mask
# concept erasure alone (`immunize-cli erase`); `harden --erase METHOD` puts one before any method above
register_method("uce", UCEPhase)
register_method("esd-x", ESDxPhase)
register_method("ablation", AblationPhase)
