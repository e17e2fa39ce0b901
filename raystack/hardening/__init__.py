"""Hardening methods behind one interface (`method.py`: `HardeningPhase`, the registry in `methods.py`).

IMMA's bilevel step: `imma.py` (`imma_iteration`; the phase `IMMARecipe`). FreezeAsGuard's mask update:
`freezeasguard.py` (`MaskLogits.forward` is Eq. 8; the phase `FreezeAsGuardRecipe.step`). `spec.py` holds every
knob; `worker.py` runs a method's phases on each Ray Train worker with DeepSpeed, `driver.py` submits the job
and assembles the release.
"""
