"""`immunize-cli plan`: the memory one rank of a `harden` run will hold, before it runs, so that a publisher picks
workers and the ZeRO stage knowingly.

Nothing is loaded: parameter counts come from the safetensors headers, and the activations a training step
keeps for its backward pass are *counted*, not guessed: the UNet is built from its config on PyTorch's meta
device (no memory) and run forward once at the run's batch size and resolution while a saved-tensors hook adds
up every activation autograd keeps (parameters excluded), with the same parameters requiring gradients as the
method trains, and attention counted as the fused kernels (flash, memory-efficient) keep it. What the count
cannot see: allocator fragmentation, the frameworks' own footprint (about `RUNTIME_BYTES`), transient buffers
inside a kernel, and on a GPU the CUDA context. With `--precision bf16`, autocast's bf16 copies of the weights
are added as one bf16 UNet (what bench/scale.py measured).

Accounting per rank, fp32 (bf16 is compute only: weights, gradients and optimizer state stay fp32):
- the pipeline's weights, on every rank;
- the defender's parameters in the DeepSpeed engine: gradients (stage 2-3: partitioned), an fp32 master copy
  (stages 1-3, partitioned), Adam's two moments (stage 0: whole; 1-3: partitioned);
- the method's own copies: IMMA's simulated attacker (LoRA: its adapter, gradient and AdamW moments; full or
  DreamBooth: gradient and moments over what it trains), the teacher (a UNet: `--retain-target original`,
  `--imma-objective hold-erasure`), the attacker pool's stored attackers; FreezeAsGuard's θ_d and UNet
  gradients, and its preparation fine-tune's Adam (the peak of that phase); erasure's teacher and its
  cross-attention Adam.
Phases run one after another: the peak is the largest phase on top of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from .attacks.spec import AttackSpec
from .hardening.attacker_pool import trained_tensors
from .models.folders import safetensors_header
from .models.pipeline_io import (check_component_shapes, check_pipeline_folder, config_resolution, resolve_model_path, weight_components)

F32 = 4
RUNTIME_BYTES = 460 * 2**20
"""Python, torch, diffusers and transformers loaded, before any model (measured on this CPU machine by
bench/scale.py); a GPU adds its CUDA context."""


#: What a GPU rank holds beyond the tensors counted here. ESTIMATES, named and sourced, not measured (no GPU has run
#: this tool yet; scripts/gpu_check.sh measures torch.cuda.max_memory_reserved plus the context beside `plan`):
CUDA_CONTEXT_BYTES = 512 * 2**20
"""The CUDA context and kernel images of torch, cuBLAS and cuDNN with lazy module loading (CUDA >= 11.7's
default): a few hundred MiB on H100-class GPUs in PyTorch's and NVIDIA's own reports; 512 MiB is its upper end."""
NCCL_BYTES = 256 * 2**20
"""NCCL's communication buffers with more than one worker: NCCL_BUFFSIZE (4 MiB) for send and receive on each of
up to 32 channels of a ring (NCCL's documentation), here the upper end for one node's ring."""
ALLOCATOR_SLACK = 0.10
"""PyTorch's caching allocator keeps freed blocks and splits them: reserved memory runs above allocated memory by a
share that depends on the allocation pattern (5-20% in PyTorch's memory-management notes); 10% of the counted peak."""


@dataclass
class Line:
    what: str
    bytes: int
    note: str = ""


def header_shapes(folder: Path) -> dict[str, list[int]]:
    out: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update({k: v["shape"] for k, v in safetensors_header(f, "--model").items() if k != "__metadata__"})
    return out


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def trained_shapes(unet_shapes: dict, attack) -> list:
    """Shapes of the UNet tensors `attack` trains (or, for a LoRA, adapts): `attacker_pool.trained_tensors`, the
    one definition the attacker pool trains by."""

    names = list(unet_shapes)
    return [unet_shapes[n] for n, on in zip(names, trained_tensors(attack, names)) if on]


def lora_params(unet_shapes: dict, attack) -> int:
    """A LoRA of `attack.rank` on the projections it adapts: r x (in + out) each."""
    return sum(attack.rank * (s[0] + s[1]) for s in trained_shapes(unet_shapes, attack) if len(s) == 2)


def activation_bytes(model: Path, batch: int, resolution: int, trains: str) -> int:
    """Bytes of activations one training forward keeps for backward, counted on the meta device. `trains`: all
    (every UNet parameter needs a gradient), attention (the attention projections: LoRA and IMMA's S) or
    attn2."""
    import json

    import torch
    from diffusers import UNet2DConditionModel

    cfg = UNet2DConditionModel.load_config(str(Path(model) / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    for n, p in unet.named_parameters():
        p.requires_grad_(trains == "all" or (trains == "attention" and ".attn" in n) or (trains == "attn2" and ".attn2." in n))
    params = {id(p) for p in unet.parameters()}
    tok = json.loads((Path(model) / "tokenizer" / "tokenizer_config.json").read_text())
    length = int(tok.get("model_max_length", 77))
    if length > 100_000:  # an unset max length
        length = 77
    seen: set = set()
    total = [0]

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params and id(t) not in seen:
            seen.add(id(t))
            total[0] += t.numel() * t.element_size()
        return t

    side = resolution // 8
    x = torch.zeros(batch, cfg["in_channels"], side, side, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    hidden = torch.zeros(batch, length, cfg["cross_attention_dim"], device="meta")
    kw = {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, device="meta"),
                                   "time_ids": torch.zeros(batch, 6, device="meta")}
    import torch.nn.functional as F

    plain_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention_keeps  # what a fused kernel keeps, not the math path's maps
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, t, hidden, **kw)
    finally:
        F.scaled_dot_product_attention = plain_sdpa
    return total[0]


def _fused_attention_keeps(q, k, v, *args, **kwargs):
    """scaled_dot_product_attention as the fused kernels PyTorch runs on CPU and GPU (flash, memory-efficient)
    keep it for backward: q, k, v, the output and one log-sum-exp per query, never the L x L attention map that
    the meta device's decomposition would save."""
    import torch

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            ctx.save_for_backward(q, k, v, out, q.new_empty(*q.shape[:-1]))
            return out

        @staticmethod
        def backward(ctx, grad):  # pragma: no cover - the count never runs backward
            q, k, v, _, _ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    return FusedAttention.apply(q, k, v)


def engine_lines(n: int, what: str, stage: int, world: int) -> list[Line]:
    """DeepSpeed's state for `n` defender parameters on one rank."""
    part = world if stage >= 1 else 1
    lines = [Line(f"{what}: gradients", F32 * n // (world if stage >= 2 else 1),
                  "partitioned (ZeRO-2/3)" if stage >= 2 else "whole on every rank")]
    if stage >= 1:
        lines.append(Line(f"{what}: fp32 master copy", F32 * n // part, f"1/{part} per rank"))
    lines.append(Line(f"{what}: Adam moments", 2 * F32 * n // part, f"1/{part} per rank" if part > 1 else "whole"))
    return lines


def plan_harden(spec) -> dict:
    """{"weights": [...], "phases": {name: [...]}, "activations": bytes, "peak": bytes} for one rank of `spec`."""

    model = resolve_model_path(spec.model)
    check_pipeline_folder(model, "--model")  # the same checks as harden's, before any config is read
    check_component_shapes(model, "--model")
    comps = {c: header_shapes(model / c) for c in weight_components(model)}
    unet = comps["unet"]
    P = sum(numel(s) for s in unet.values())
    weights = [Line(f"weights: {c}", F32 * sum(numel(s) for s in shapes.values()), "fp32, every rank")
               for c, shapes in comps.items()]
    world, stage = spec.workers, spec.zero_stage
    res = spec.resolution or config_resolution(model) or 512
    phases: dict = {}
    acts: dict = {}
    engine: dict = {}  # each phase's DeepSpeed engine size (elements): its buckets are sized to it
    b = spec.batch_size

    def act(batch: int, trains: str) -> tuple[int, str]:
        return activation_bytes(model, batch, res, trains), f"{batch} images, {trains} trainable"

    for phase in spec.phases():
        lines: list[Line] = []
        if phase.name == "imma":
            n_s = sum(numel(s) for n, s in unet.items() if any(pt in n for pt in spec.param_patterns))
            lines += engine_lines(n_s, "IMMA's S", stage, world)
            engine[phase.name] = n_s
            if spec.attacker_space is not None:
                from .hardening.attacker_pool import draw_pool

                attackers = draw_pool(spec)
                for i, a in enumerate(attackers):
                    lines.append(_attacker_line(a, unet, P, f"pool attacker {i}", stored=True))
                lines.append(Line("outer gradient at the adapted point", F32 * n_s))
            else:
                attackers = [AttackSpec(method=spec.against, data=".", rank=spec.rank)]
                adamw = spec.inner_optimizer == "adamw"  # --inner-optimizer sgd: Alg. 1's φ − β∇, no moments
                lines.append(_attacker_line(attackers[0], unet, P, f"simulated attacker ({spec.against})", stored=False,
                                            part=world if stage >= 1 and adamw else 1, moments=None if adamw else 0))
            if spec.retain_target == "original" and spec.retain_weight > 0 and spec.legal is not None:
                lines.append(Line("retain teacher (a UNet copy)", F32 * P))
            elif spec.imma_objective == "hold-erasure":
                lines.append(Line("hold-erasure teacher (a UNet copy)", F32 * P))
            # the attacker's step and the outer step are separate backward passes: the larger one counts
            inner = max(act(b, _inner_trains(a)) for a in attackers)
            retain = spec.retain_weight > 0 and spec.legal is not None
            outer = act(b * (3 if retain else 1), "attn2" if spec.param_patterns == ["attn2"] else "all")
            acts[phase.name] = max(inner, outer)
        elif phase.name == "freezeasguard":
            if spec.attacker_space is not None:
                from .hardening.attacker_pool import draw_pool

                lines += [Line("θ_pre and θ_ft (two UNet copies)", 2 * F32 * P), Line("UNet gradients", F32 * P)]
                for i, a in enumerate(draw_pool(spec)):
                    n_t = sum(numel(x) for x in trained_shapes(unet, a))
                    moments = 2 if a.optimizer == "adamw" else 1
                    lines.append(Line(f"pool user {i} ({a.method}): its θ_ft and moments", F32 * P + moments * F32 * n_t))
            else:
                part = world if stage == 3 else 1
                lines += [Line("θ_d (a UNet copy)", F32 * P // part, f"1/{part} per rank (ZeRO-3)" if part > 1 else
                               "whole on every rank"), Line("UNet gradients", F32 * P)]
            part = world if stage >= 1 else 1
            lines.append(Line("preparation fine-tune's Adam moments (during preparation only)", 2 * F32 * P // part,
                              f"freed before the mask steps; 1/{part} per rank" if part > 1 else
                              "freed before the mask steps; counted, as it sets the peak"))
            acts[phase.name] = act(b, "all")  # one mixed illegal + legal batch
            engine[phase.name] = len(unet)  # one mask logit per UNet tensor
        elif phase.name in ("esd-x", "ablation"):
            n2 = sum(numel(s) for n, s in unet.items() if ".attn2." in n)
            lines += [Line("erasure teacher (a UNet copy)", F32 * P), Line("attn2 gradients and Adam", 3 * F32 * n2)]
            engine[phase.name] = n2
            acts[phase.name] = act(b * (3 if spec.legal is not None else 1), "attn2")
        else:
            acts[phase.name] = (0, "nothing trained")
        phases[phase.name] = lines
    if spec.precision == "bf16":  # autocast keeps a bf16 cast of the weights it runs (measured: about the UNet's)
        weights.append(Line("autocast's bf16 weight copies", 2 * P, "--precision bf16: about one bf16 UNet"))
    if spec.use_gpu:  # what a GPU rank holds beyond the tensors: the buffers DeepSpeed and NCCL allocate
        from .hardening.engine import bucket_elements

        for name, n in engine.items():
            buffers = (2 if stage in (1, 2) else 1 if stage == 3 else 0) * F32 * bucket_elements(n)
            if buffers:
                phases[name].append(Line("DeepSpeed's reduce / all-gather buckets", buffers,
                                         f"sized to the engine ({bucket_elements(n):,} elements), not DeepSpeed's 5e8"))
    base = sum(x.bytes for x in weights) + RUNTIME_BYTES
    totals = {name: sum(x.bytes for x in lines) + acts[name][0] for name, lines in phases.items()}
    top = max(totals, key=totals.get) if totals else None
    peak = base + (totals[top] if top else 0)
    gpu: list[Line] = []
    if spec.use_gpu:
        gpu.append(Line("CUDA context", CUDA_CONTEXT_BYTES, "estimate (planning.CUDA_CONTEXT_BYTES)"))
        if world > 1:
            gpu.append(Line("NCCL buffers", NCCL_BYTES, "estimate (planning.NCCL_BYTES)"))
        gpu.append(Line("allocator slack", int(ALLOCATOR_SLACK * peak), "estimate: 10% of the counted peak"))
    return {"model": str(model), "resolution": res, "weights": weights, "phases": phases, "activations": acts,
            "runtime": RUNTIME_BYTES, "gpu": gpu, "peak_phase": top, "peak": peak + sum(x.bytes for x in gpu)}


def _inner_trains(a) -> str:
    """What a simulated attacker's backward needs gradients for (LoRA: the attention projections it adapts)."""
    if a.method == "lora":
        return "attention"
    if a.method == "dreambooth-lora" or getattr(a, "cross_attention_only", False):
        return "attn2"
    return "all" if a.method in ("full", "dreambooth") else "attention"


def _attacker_line(a, unet: dict, P: int, label: str, stored: bool, part: int = 1, moments: int | None = None) -> Line:
    """A simulated attacker's memory: LoRA's adapter (+ gradient, moments, warm copy), or a dense attacker's
    gradient and moments over what it trains (+ its displacement, kept apart, in the pool); `part`: the ranks
    its moments are partitioned over (ZeRO-1+); `moments`: tensors per parameter its optimizer keeps (default:
    its optimizer's)."""
    if moments is None:
        moments = 2 if a.optimizer == "adamw" else 1
    note = f"moments 1/{part} per rank" if part > 1 else ""
    if a.method in ("lora", "dreambooth-lora"):
        return Line(f"{label}: LoRA rank {a.rank}", F32 * lora_params(unet, a) * (3 * part + moments) // part, note)
    if a.method in ("full", "dreambooth"):
        n = sum(numel(x) for x in trained_shapes(unet, a))
        copies = (1 + 2 * int(stored)) * part + moments  # gradient (+ Δ and the snapshot, pool) + moments, in 1/part
        return Line(f"{label}: {a.method}{' attn2' if a.cross_attention_only else ''}", F32 * n * copies // part, note)
    return Line(f"{label}: {a.method}", 0, "a few token embeddings")
