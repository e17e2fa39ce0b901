"""The shipped hardening methods: `harden --method NAME` runs these phases in order (see method.py)."""

from __future__ import annotations

from .erase import AblationPhase, ESDxPhase, UCEPhase
from .freezeasguard import FreezeAsGuardRecipe, RandomFreezePhase
from .imma import IMMARecipe
from .method import register_method

register_method("imma", IMMARecipe)
register_method("freezeasguard", FreezeAsGuardRecipe)
register_method("random-freeze", RandomFreezePhase)
register_method("imma+freeze", IMMARecipe, FreezeAsGuardRecipe)  # immunize the weights, then learn the mask
# concept erasure alone (`immunize-cli erase`); `harden --erase METHOD` puts one before any method above
register_method("uce", UCEPhase)
register_method("esd-x", ESDxPhase)
register_method("ablation", AblationPhase)
