"""DeepSpeed glue: the defender's parameters in a ZeRO engine, and exact save/restore of their state.

Weights and Adam moments are read and written through DeepSpeed's `safe_get/set_full_*` API, which
works for every ZeRO stage; checkpoints then hold plain tensors (safetensors), never pickles.
"""

from __future__ import annotations

import contextlib
from ..timing import mark


#: DeepSpeed's default reduce / all-gather bucket (elements): 5e8, a 1.86 GiB fp32 buffer at the first backward
#: (ZeRO-1/2) or at init (ZeRO-3), whatever the engine holds
DS_DEFAULT_BUCKET = 500_000_000


def bucket_elements(engine_params: int) -> int:
    """The reduce and all-gather buckets sized to what the engine holds (at most DeepSpeed's default): a
    FreezeAsGuard engine of ~700 mask logits then holds no 1.86 GiB buffer. `plan` counts the same size."""
    return int(min(DS_DEFAULT_BUCKET, max(engine_params, 1)))


def ds_config(spec, engine_params: int | None = None) -> dict:
    bucket = bucket_elements(engine_params) if engine_params is not None else DS_DEFAULT_BUCKET
    return {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": 1,
        # ZeRO-3 would otherwise replace torch.nn.functional.linear process-wide ("memory efficient linear"):
        # every Linear of the UNet and text encoder, which the engine does not own, computing differently
        "zero_optimization": {"stage": spec.zero_stage, "memory_efficient_linear": False,
                              "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                              **({"stage3_prefetch_bucket_size": bucket} if spec.zero_stage == 3 else {})},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Engine:
    """The recipe's view of DeepSpeed: forward, backward, step, gathering, state in and out."""

    def __init__(self, recipe, spec):
        mark("deepspeed_import")
        import deepspeed

        mark("deepspeed_initialize")
        self.stage = spec.zero_stage
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=recipe.engine_module(), optimizer=recipe.make_optimizer(),
            model_parameters=recipe.engine_params(),
            config=ds_config(spec, sum(p.numel() for p in recipe.engine_params())), dist_init_required=False)
        self.params = recipe.engine_params()
        mark("deepspeed_ready")

    # what the recipes call
    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def gather(self, param, modifier_rank=None):
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters([param], modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    def close(self) -> None:
        """Remove DeepSpeed's gradient hooks from the phase's parameters: a next phase (FreezeAsGuard after IMMA,
        IMMA after an eraser) backpropagates through them, and live hooks would reduce those gradients into this
        finished engine's bucket (with buckets sized to the engine, the bucket fills and reduces a None grad)."""
        self.engine.destroy()

    def refresh_master_weights(self) -> None:
        """Module tensors were written by hand (IMMA line 7 on S): make the optimizer's fp32 copy follow."""
        if self.stage in (1, 2):
            self.engine.optimizer.refresh_fp32_params()

    # exact state for resume
    def _adam_keys(self):
        """Tensor states the optimizer really keeps (Adam: exp_avg, exp_avg_sq; plain SGD: none)."""
        import torch

        base = self.engine.optimizer
        inner = base if self.stage == 0 else getattr(base, "optimizer", base)
        keys = {k for st in inner.state.values() for k, v in st.items()
                if k != "step" and isinstance(v, torch.Tensor)}
        return tuple(sorted(keys))

    def optimizer_state(self) -> dict:
        import torch
        from deepspeed.utils import safe_get_full_optimizer_state

        out: dict = {}
        base = self.engine.optimizer
        for i, p in enumerate(self.params):
            if self.stage == 0:
                st = base.state.get(p, {})
                for k in self._adam_keys():
                    if k in st:
                        out[f"opt/{i}/{k}"] = st[k].detach().cpu().clone()
                if "step" in st:
                    out["opt/step"] = torch.as_tensor(st["step"]).float().reshape(1)
            else:
                for k in self._adam_keys():
                    v = safe_get_full_optimizer_state(p, k)
                    if v is not None:
                        out[f"opt/{i}/{k}"] = v.detach().cpu().clone()
        if self.stage != 0:
            inner = getattr(base, "optimizer", base)
            steps = [s["step"] for s in inner.state.values() if "step" in s]
            if steps:
                out["opt/step"] = torch.as_tensor(steps[0]).float().reshape(1)
        return out

    def _create_optimizer_state(self, keys) -> None:
        """Torch Adam (and ZeRO-1/2 around it) create their state on the first step; a resumed run has taken
        none yet, so make it now (zeros, step 0) for the checkpoint's values to be written into."""
        import torch

        base = self.engine.optimizer
        if self.stage == 0:
            holders = [(base, p) for p in self.params]
        elif self.stage in (1, 2):
            holders = [(base.optimizer, flat) for flat in base.single_partition_of_fp32_groups]
        else:
            return  # ZeRO-3 creates its state when it is built
        for opt, p in holders:
            st = opt.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                for k in keys:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.stage in (1, 2):
            base._hp_optimizer_states_linked = False
            base._lazy_init_hp_params_optimizer_state()

    def load_state(self, tensors: dict) -> None:
        """Parameters from the module (already restored by the recipe) and Adam moments + step."""
        import torch
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        keys = sorted({k.split("/")[2] for k in tensors if k.startswith("opt/") and k.count("/") == 2})
        self._create_optimizer_state(keys)
        base = self.engine.optimizer
        if self.stage == 0:
            for i, p in enumerate(self.params):
                st = base.state.setdefault(p, {})
                for k in keys:
                    if f"opt/{i}/{k}" in tensors:
                        st[k] = tensors[f"opt/{i}/{k}"].to(p.device, p.dtype).clone()
                if "opt/step" in tensors:
                    st["step"] = tensors["opt/step"].reshape(()).clone()
            return
        for i, p in enumerate(self.params):
            if self.stage == 3:
                with self.gather(p):
                    value = p.detach().clone()
            else:
                value = p.detach().clone()
            safe_set_full_fp32_param(p, value)
            for k in keys:
                if f"opt/{i}/{k}" in tensors:
                    safe_set_full_optimizer_state(p, tensors[f"opt/{i}/{k}"].clone(), k)
        if "opt/step" in tensors:
            inner = getattr(base, "optimizer", base)
            for s in inner.state.values():
                if "step" in s:
                    s["step"] = tensors["opt/step"].reshape(()).to(torch.as_tensor(s["step"]).dtype).clone()
