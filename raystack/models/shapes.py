"""Random-weight pipelines shaped like published checkpoints — their architectures and configurations at reduced
width and image size — so that tests and benchmarks take every code path a real SD-1.5 or SD-2.1 folder takes
(v-prediction, linear attention projections, attention upcasting, the VAE's four levels) in seconds on a CPU.
No weights are downloaded: every tensor is randomly initialised from a seed.

    from raystack.models.shapes import build_pipeline_folder
    build_pipeline_folder("sd21", out)      # a diffusers folder `load_pipeline` and `from_pretrained` read
"""

from __future__ import annotations

from pathlib import Path
from .pipeline_io import assemble_pipeline, default_model_path, save_pipeline

#: per architecture: what distinguishes it in the published configurations (SD-1.5: runwayml/CompVis v1-5;
#: SD-2.1: stabilityai 768-v), widths given as multiples of `width` (SD's own: width 320)
ARCHITECTURES = {
    "sd15": {"unet": {"attention_head_dim": 8, "use_linear_projection": False, "upcast_attention": False},
             "text_act": "quick_gelu", "scheduler": "PNDMScheduler", "prediction_type": "epsilon"},
    "sd21": {"unet": {"attention_head_dim": [1, 2, 4, 4], "use_linear_projection": True, "upcast_attention": True},
             "text_act": "gelu", "scheduler": "DDIMScheduler", "prediction_type": "v_prediction"},
    # SDXL base 1.0: built by `build_sdxl_folder` (two text encoders, added conditioning, three UNet levels)
    "sdxl": {"unet": {"use_linear_projection": True}, "scheduler": "EulerDiscreteScheduler",
             "prediction_type": "epsilon", "pipeline": "StableDiffusionXLPipeline"},
}


def build_pipeline_folder(arch: str, out: Path, width: int = 32, image_size: int = 64, text_width: int = 64,
                          seed: int = 0) -> Path:
    """Write a random `arch`-shaped StableDiffusionPipeline folder (safetensors) to `out`; returns it. The
    tokenizer is the tiny world's (a CLIP BPE tokenizer; published ones cannot be downloaded here)."""
    if arch == "sdxl":
        return build_sdxl_folder(out, width, image_size, text_width // 2, seed)
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    a = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(default_model_path() / "tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, hidden_act=a["text_act"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=[width, width, 2 * width, 2 * width],
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        norm_num_groups=min(32, width), sample_size=image_size, scaling_factor=0.18215)
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[width, 2 * width, 4 * width, 4 * width], cross_attention_dim=text_width,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=min(32, width), **a["unet"])
    common = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
              "prediction_type": a["prediction_type"], "set_alpha_to_one": False, "steps_offset": 1}
    scheduler = (PNDMScheduler(skip_prk_steps=True, **common) if a["scheduler"] == "PNDMScheduler"
                 else DDIMScheduler(clip_sample=False, **common))
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    return save_pipeline(pipe, Path(out), overwrite=True, extra_info={"shape": {"architecture": arch, "width": width,
                                                                                "image_size": image_size}})


def build_sdxl_folder(out: Path, width: int = 32, image_size: int = 64, text_width: int = 32, seed: int = 0) -> Path:
    """A random StableDiffusionXLPipeline folder with SDXL base 1.0's structure at reduced width: three UNet
    levels (no attention at the first; more transformer layers deeper), linear projections, added conditioning
    ("text_time": the second encoder's pooled projection and 6 time ids), cross-attention over both text
    encoders' states concatenated, the second encoder with a projection, Euler scheduler, VAE scaling 0.13025."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .pipeline_io import default_model_path, save_pipeline

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(default_model_path() / "tokenizer"))

    def text_config(act: str) -> "CLIPTextConfig":
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=text_width,
                              max_position_embeddings=tokenizer.model_max_length, hidden_act=act,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    text_encoder = CLIPTextModel(text_config("quick_gelu"))  # SDXL's first: CLIP ViT-L
    text_encoder_2 = CLIPTextModelWithProjection(text_config("gelu"))  # its second: OpenCLIP bigG, projected
    time_dim = 8
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=[width, width, 2 * width, 2 * width],
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        norm_num_groups=min(32, width), sample_size=image_size, scaling_factor=0.13025,
                        force_upcast=True)
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[width, 2 * width, 4 * width],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 4], use_linear_projection=True,
        cross_attention_dim=2 * text_width, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=text_width + 6 * time_dim, norm_num_groups=min(32, width))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return save_pipeline(pipe, Path(out), overwrite=True, extra_info={"shape": {"architecture": "sdxl", "width": width,
                                                                                "image_size": image_size}})
