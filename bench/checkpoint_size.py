"""Checkpoint size per method: what one resumable checkpoint of each hardening method holds, and what an attack
writes per checkpoint, against the size of the UNet itself.

    .venv/bin/python bench/checkpoint_size.py [--attack DIR ...]

Hardening: each method runs 2 steps on the tiny world in this process (the method interface's `run_method`, one
rank, each phase's own torch optimizer instead of DeepSpeed's), and the tensors of its first checkpoint (the
phase's state, the optimizer's state and the carried tensors: what the Ray Train worker writes) are counted.
Attacks: the size on disk of one checkpoint folder and of the final output of the given attack outputs.
The ratio to the UNet's fp32 size carries over to real models where a checkpoint scales with the whole UNet
(FreezeAsGuard, full fine-tunes); a cross-attention-only set (IMMA vs LoRA, erasure) is a different share of
SD-1.5's UNet, so its SD-1.5 column uses that share measured on SD-1.5's real UNet configuration (built on
the meta device: no memory, no weights).
Writes bench/results/checkpoint_size.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: SD-1.5's UNet configuration (the published one's architecture keys)
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
METHODS = {  # label: HardenSpec fields
    "imma vs lora (S = attn2)": {"method": "imma", "against": "lora", "params": "attn2"},
    "imma vs full (S = attn2)": {"method": "imma", "against": "full"},
    "freezeasguard": {"method": "freezeasguard", "rho": 0.3, "finetune_steps": 1, "user_steps": 1},
    "random-freeze": {"method": "random-freeze", "rho": 0.3},
    "erase: ablation": {"method": "ablation", "concept": "dotted", "anchor": "plain", "erase_steps": 2},
    "erase: esd-x": {"method": "esd-x", "concept": "dotted", "anchor": "plain", "erase_steps": 2},
}


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sd15_shares() -> dict:
    """Share of SD-1.5's UNet parameters in the whole UNet and in the cross-attention (attn2)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    total = sum(p.numel() for p in unet.parameters())
    attn2 = sum(p.numel() for n, p in unet.named_parameters() if ".attn2." in n)
    return {"params": total, "attn2_share": attn2 / total}


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    from _results import write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", type=Path, nargs="*", default=[])
    ap.add_argument("--dest", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from raystack.hardening.spec import HardenSpec
    from raystack.hardening.worker import run_method
    from raystack.models.pipeline_io import load_pipeline
    from raystack.tinyworld.folder import write_concept_folder

    unet_bytes = nbytes(load_pipeline(None).unet.state_dict())
    attn2_tiny = sum(p.numel() for n, p in load_pipeline(None).unet.named_parameters() if ".attn2." in n) / \
        sum(p.numel() for p in load_pipeline(None).unet.parameters())
    sd15 = sd15_shares()
    sd15_unet_gb = sd15["params"] * 4 / 1e9
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_concept_folder(d / "t", ["circle"], ["red", "blue"], ["dotted"], 1, 1, None, True)
        write_concept_folder(d / "l", ["square"], ["red", "blue"], ["striped"], 1, 2, None, True)
        for label, fields in METHODS.items():
            spec = HardenSpec(target=[d / "t"], legal=d / "l", out=d / "o", steps=2, checkpoint_every=1,
                              batch_size=2, **fields)
            seen: list[dict] = []

            def keep(phase, engine, meta, carried, seen=seen):
                tensors = {}
                if phase is not None:
                    tensors.update({f"state/{k}": v for k, v in phase.state().items()})
                    tensors.update(engine.optimizer_state() if hasattr(engine, "optimizer_state") else {})
                tensors.update({f"carried/{k}": v for k, v in carried.items()})
                seen.append(tensors)

            run_method(spec, load_pipeline(None), local=True, on_checkpoint=keep)
            size = max(nbytes(t) for t in seen) if seen else 0
            ratio = size / unet_bytes
            # attn2 only: erasure, and IMMA vs LoRA (S and the adapter); IMMA vs full holds the attacker's whole UNet
            attn_only = fields["method"] in ("ablation", "esd-x") or fields.get("against") == "lora"
            sd = ratio * (sd15["attn2_share"] / attn2_tiny if attn_only else 1.0) * sd15_unet_gb
            rows.append({"kind": "harden", "what": label, "bytes": size, "unet_ratio": round(ratio, 3),
                         "sd15_gb": round(sd, 2)})
            print(rows[-1], flush=True)
    for a in args.attack:
        info = json.loads((a / "attack.json").read_text())
        ckpts = sorted((a / "checkpoints").iterdir()) if (a / "checkpoints").is_dir() else []
        one = dir_size(ckpts[0]) if ckpts else 0
        ratio = one / unet_bytes
        rows.append({"kind": "attack", "what": f"{info['method']} ({info['steps']} steps, {len(ckpts)} checkpoints)",
                     "bytes": one, "unet_ratio": round(ratio, 3), "sd15_gb": round(ratio * sd15_unet_gb, 2),
                     "output_bytes": dir_size(a) - sum(dir_size(c) for c in ckpts), "all_checkpoints_bytes":
                     sum(dir_size(c) for c in ckpts)})
        print(rows[-1], flush=True)
    res = {"command": "python bench/checkpoint_size.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "when": time.strftime("%Y-%m-%d %H:%M"),
           "tiny_unet_bytes": unet_bytes, "sd15": sd15, "rows": rows}
    lines = [f"Made by `{res['command']}` on {res['machine']} ({res['when']}). One checkpoint per method on the "
             f"tiny world (its UNet: {unet_bytes / 1e6:.1f} MB in fp32), its ratio to the UNet, and that ratio on "
             f"SD-1.5's UNet ({sd15['params'] / 1e6:.0f} M parameters, {sd15_unet_gb:.2f} GB in fp32; cross-"
             f"attention-only sets scaled by attn2's share: {sd15['attn2_share']:.1%} there, {attn2_tiny:.1%} "
             "in the tiny UNet). Hardening checkpoints counted from the tensors the worker writes (phase state, "
             "optimizer state, carried tensors; each phase's own torch optimizer here, DeepSpeed's in a job); "
             "attack checkpoints measured on disk.", "",
             "| kind | method | one checkpoint (tiny world) | ÷ UNet | one checkpoint, SD-1.5 (GB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['what']} | {r['bytes'] / 1e6:.2f} MB | {r['unet_ratio']} | {r['sd15_gb']} |"
              for r in rows]
    write_results(args.dest, "checkpoint_size", res, lines)


if __name__ == "__main__":
    main()
