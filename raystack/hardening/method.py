"""The one interface every hardening method implements, and the registry the worker builds them from.

A method is a sequence of phases (`imma+freeze` = IMMA, then FreezeAsGuard on the immunized weights). A phase
is one class (torchtune's recipe protocol is the model):

    phase = Phase(spec, pipe, rank, world)        data, simulated attacker, defender parameters
    engine = Engine(phase, spec) or LocalEngine(phase)   built from what the phase declares
    phase.bind(engine)
    phase.prepare()          once, on a fresh run (FreezeAsGuard: the fine-tune that gives θ_ft)
    phase.load_state(t)      instead, on a resumed run (everything `state()` returned)
    for _ in range(phase.total_steps()): losses = phase.step()
    phase.state()            at each checkpoint: every tensor needed to resume, mask logits included
    phase.result()           at the end: changed UNet tensors (by released name) and/or a freeze mask
    phase.finish()

Adding a method: one module with a `HardeningPhase` subclass, then `register_method("name", Phase)` (or a
composition of existing phases) at the bottom of `methods.py`; `harden --method name` then runs it as a Ray
Train job with DeepSpeed, checkpoints and resumes it, and releases its result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


@dataclass
class PhaseResult:
    """What a phase releases: UNet tensors it changed (by released name) and/or a freeze mask."""

    changed: dict = field(default_factory=dict)
    mask: dict | None = None


class HardeningPhase:
    """One phase of a hardening method, run on every Ray Train worker (one DeepSpeed rank each).

    The engine holds the defender's parameters (`engine_params()` of `engine_module()`, optimised by
    `make_optimizer()`); a phase without trainable defender parameters returns None from `engine_module()`.
    `bind(engine)` hands the phase its engine: `engine.backward/step` update the defender, `engine.gather(p)`
    reads a ZeRO-3 partitioned parameter, `engine.refresh_master_weights()` follows weights written by hand."""

    name = "phase"
    needs_target = True
    """The phase reads --target (the concept to protect)."""
    needs_legal = False
    """The phase cannot run without --legal."""
    simulates_attacker = False
    """The phase simulates the --against attack inside (the manifest records it)."""
    draws_attackers = False
    """The phase can simulate attackers drawn from --attacker-space instead (robust hardening)."""
    supports_zero3 = True
    zero3_reason = "updates parameters by hand inside the UNet (the simulated attacker's adapter)"
    """Why a phase with supports_zero3 = False cannot run under ZeRO-3 (said in the refusal)."""
    """False when the phase writes engine-held parameters by hand inside a module ZeRO-3 would partition."""

    def __init__(self, spec, pipe, rank: int = 0, world: int = 1):
        self.spec, self.pipe, self.rank, self.world = spec, pipe, rank, world
        self.engine = None

    # what the engine holds ------------------------------------------------------------------------------
    def engine_module(self):
        return None

    def engine_params(self) -> list:
        return []

    def make_optimizer(self):
        return None

    def bind(self, engine) -> None:
        self.engine = engine

    # the run -------------------------------------------------------------------------------------------
    def total_steps(self) -> int:
        """Outer steps of this phase (`--steps`)."""
        return self.spec.steps

    def prepare(self) -> dict:
        """Work before the first step of a fresh run; returns losses to report."""
        return {}

    def step(self) -> dict:
        """One outer step; returns its losses."""
        raise NotImplementedError

    def state(self) -> dict:
        """Every tensor a checkpoint needs to resume this phase exactly (the engine's optimizer state aside)."""
        return {}

    def load_state(self, tensors: dict) -> None:
        """Restore what `state()` returned (before the engine's optimizer state is restored)."""

    def result(self) -> PhaseResult:
        raise NotImplementedError

    def finish(self) -> None:
        """Undo what the phase attached to the pipeline (e.g. the simulated attacker's adapter)."""


class LocalEngine:
    """The engine's interface without DeepSpeed (one process; tests and research probes): the phase's own
    torch optimizer over its defender parameters."""

    def __init__(self, phase: HardeningPhase):
        self.module = phase.engine_module()
        unet = getattr(phase.pipe, "unet", None)
        if self.module is not None and unet is not None:  # as DeepSpeed puts it on the rank's device
            self.module.to(next(unet.parameters()).device)
        self.optimizer = phase.make_optimizer()
        self.params = phase.engine_params()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()

    def gather(self, param, modifier_rank=None):
        return contextlib.nullcontext()

    def refresh_master_weights(self) -> None:
        pass

    def optimizer_state(self) -> dict:
        """The optimizer's tensors in the DeepSpeed engine's checkpoint layout (`opt/<i>/<key>`, `opt/step`)."""
        import torch

        out: dict = {}
        for i, p in enumerate(self.params if self.optimizer is not None else []):
            for k, v in self.optimizer.state.get(p, {}).items():
                if k == "step":
                    out["opt/step"] = torch.as_tensor(v).detach().float().reshape(1).clone()  # Adam bumps it in place
                elif isinstance(v, torch.Tensor):
                    out[f"opt/{i}/{k}"] = v.detach().cpu().clone()
        return out

    def load_state(self, tensors: dict) -> None:
        """Put back what `optimizer_state` returned (a resumed run continues with the same moments)."""
        for i, p in enumerate(self.params if self.optimizer is not None else []):
            keys = [k.split("/")[2] for k in tensors if k.startswith(f"opt/{i}/")]
            if not keys:
                continue
            st = self.optimizer.state.setdefault(p, {})
            for k in keys:
                st[k] = tensors[f"opt/{i}/{k}"].to(p.device, p.dtype).clone()
            if "opt/step" in tensors:
                st["step"] = tensors["opt/step"].reshape(()).clone()


def load_into_unet(unet, tensors: dict, released_names: bool = False) -> None:
    """Copy a {name: tensor} dict into a UNet's parameters in place (the one place this loop lives).
    `released_names`: keys are the release's names (peft's `.base_layer.` wrapper left out)."""
    import torch

    params = dict(unet.named_parameters())
    if released_names:
        params = {n.replace(".base_layer.", "."): p for n, p in params.items()}
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise KeyError(f"tensors do not match the UNet's parameters: {unknown[0]}")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
