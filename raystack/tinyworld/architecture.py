"""Fresh, untrained components of the tiny Stable-Diffusion-shaped pipeline.

Real diffusers/transformers classes with SD-1.x wiring (VAE latents with 4 channels, CLIP text
encoder, cross-attention UNet, PNDM scheduler); only the sizes are small enough for 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from .render import SIZE
from .tokenizer import MAX_LENGTH

LATENT_SIZE = SIZE // 2
TEXT_DIM = 64


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def new_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def new_unet(block_out_channels=(32, 64, 64)):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=32,
    )


#: Noise schedules. SD-1.x's scaled_linear (the shipped world's) leaves sqrt(alphabar_T) = 0.068 of the
#: signal at t = T; on a 16x16 latent the random mean of the starting noise (std 1/16) is then partly read
#: as signal and tints backgrounds. The DDPM linear schedule leaves 0.0066; switching a half-trained model
#: to it (3000 steps) sampled worse than carrying on with scaled_linear, so it stays an option.
SCHEDULES = {
    "linear": {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
}


def new_train_scheduler(schedule: str = "scaled_linear"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1, **SCHEDULES[schedule])


def new_release_scheduler(schedule: str = "scaled_linear"):
    """The scheduler saved with the pipeline: SD-1.x's PNDM, with the betas used in training."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                         **SCHEDULES[schedule])


def tokenizer_dir(work: Path) -> Path:
    return work / "tokenizer_src"
