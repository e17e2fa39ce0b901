"""Hardening methods. IMMA's bilevel step: `imma.py` (`imma_iteration`); FreezeAsGuard's: `freezeasguard.py`
(`mask_step`, `user_steps`). `spec.py` holds every knob; `job.py` runs them as Ray Train + DeepSpeed jobs."""
