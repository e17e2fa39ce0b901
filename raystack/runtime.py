"""Process-wide settings every entry point applies before heavy work: one torch thread per process.

On small CPU machines two threads per process made a training step 20-35x slower as soon as a second
busy process shared the cores, so one thread is the default; `IMMUNIZE_THREADS` overrides it.
"""

from __future__ import annotations

import os


def configure_threads(n: int | None = None) -> int:
    n = int(n or os.environ.get("IMMUNIZE_THREADS", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return n


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


PRECISIONS = ("fp32", "bf16", "fp16")  # fp16 is refused by the specs until loss scaling is built


def compute_precision(precision: str, device: str):
    """The context a training step's forward passes run in: fp32 as stored, or torch autocast to bf16 / fp16
    (weights, gradients and optimizer state stay fp32; matmuls and convolutions run in the lower precision).
    fp16 autocast needs a GPU (CPU training in fp16 is not supported by DeepSpeed either)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device != "cuda":
        from .errors import UserError

        raise UserError("--precision fp16: needs a GPU (on CPU use bf16)")
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
