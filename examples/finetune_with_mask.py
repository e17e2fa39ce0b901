"""Fine-tune a released pipeline the way the diffusers text-to-image training examples do, respecting the
release's FreezeAsGuard mask. The mask takes two lines (marked `# mask:`); everything else is a plain
diffusers training loop.

    python examples/finetune_with_mask.py --release RELEASE --data IMAGES --out OUT            # full fine-tune
    python examples/finetune_with_mask.py --release RELEASE --data IMAGES --out OUT --lora     # LoRA (peft)

IMAGES is a folder with metadata.jsonl (file_name, text), as `immunize-cli world generate` writes. Check the
result with `immunize-cli mask check --release RELEASE --derivative OUT`.

Needs torch, safetensors, diffusers and peft only: the mask helper (`raystack.freeze_mask`) imports neither Ray
nor DeepSpeed, so `pip install --no-deps immunize-cli` beside those four is enough to respect a mask
(tests/test_mask_tools.py runs this script where importing ray or deepspeed fails).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from raystack.freeze_mask import apply
from raystack.imageio import read_image


def load_images(folder: Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """Short side resized to `size`, centre-cropped (the diffusers examples' preprocessing), in [-1, 1]."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    pixels = []
    for r in rows:
        img = read_image(folder / r["file_name"], size)
        pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(pixels), [r["text"] for r in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", type=Path, required=True, help="released pipeline folder (with freeze_mask.safetensors)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lora", action="store_true", help="train a LoRA (peft) instead of the whole UNet")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists() or args.release.resolve() in [args.out.resolve(), *args.out.resolve().parents]:
        ap.error(f"--out {args.out}: exists or lies inside the release; give a new folder")
    torch.manual_seed(args.seed)

    pipe = StableDiffusionPipeline.from_pretrained(args.release, safety_checker=None)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    guard = apply(unet, args.release / "freeze_mask.safetensors")  # mask: frozen tensors get no gradient
    if args.lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                                    exclude_modules=guard.frozen_layers))  # no adapter on a frozen layer
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)

    size = unet.config.sample_size * pipe.vae_scale_factor
    pixels, captions = load_images(args.data, size)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    unet.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(pixels), (args.batch_size,))
        with torch.no_grad():
            latents = vae.encode(pixels[idx]).latent_dist.sample() * vae.config.scaling_factor
            encoder_hidden_states = text_encoder(ids[idx])[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states).sample.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}/{args.steps} loss {loss.item():.4f}")
    guard.check()  # mask: every frozen tensor still has its released bytes

    args.out.mkdir(parents=True, exist_ok=True)
    if args.lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        StableDiffusionPipeline.save_lora_weights(
            str(args.out), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            safe_serialization=True)
    else:
        pipe.save_pretrained(str(args.out), safe_serialization=True)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
