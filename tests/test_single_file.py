"""`--model FILE.safetensors`: a single-file checkpoint in the original (LDM) layout converts offline into a cached
diffusers folder whose weights are the file's, and hardens; pickles and files of no known family are refused in one
line, exit 2, nothing written (raystack/models/single_file.py).

The checkpoints are written here from the random-weight SD-shaped folders of raystack/models/shapes.py by
`write_single_file`, the diffusers -> LDM key mapping of diffusers' scripts/convert_diffusers_to_original_*.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from raystack.models.shapes import build_pipeline_folder

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _block(kind: str, index: int) -> str:
    return f"input_blocks.{1 + index}" if kind == "down" else f"output_blocks.{index}"


def unet_to_ldm(sd: dict, per_level: int) -> dict:
    n = per_level + 1
    up_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        if head in UNET_FIXED:
            new = f"{UNET_FIXED[head]}.{leaf}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", k):
            kind, i, j, part, leaf = m.groups()
            new = f"{_block(kind, int(i) * n + int(j))}.0.{RESNET[part]}.{leaf}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
            kind, i, j, rest = m.groups()
            new = f"{_block(kind, int(i) * n + int(j))}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", k):
            new = f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", k):
            i = int(m[1])
            new = f"output_blocks.{i * n + per_level}.{2 if i in up_attn else 1}.conv.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", k):
            new = f"middle_block.{2 * int(m[1])}.{RESNET[m[2]]}.{m[3]}"
        elif k.startswith("mid_block.attentions.0."):
            new = "middle_block.1." + k[len("mid_block.attentions.0."):]
        else:
            raise KeyError(k)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd: dict, levels: int) -> dict:
    out = {}
    for k, v in sd.items():
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)", new):
            i, kind, j, rest = m.groups()
            new = f"encoder.down.{i}.block.{j}.{rest}" if kind == "resnets" else f"encoder.down.{i}.downsample.{rest}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", new):
            i, kind, j, rest = m.groups()
            lv = levels - 1 - int(i)
            new = f"decoder.up.{lv}.block.{j}.{rest}" if kind == "resnets" else f"decoder.up.{lv}.upsample.{rest}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(\w+)", new):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
            v = v[:, :, None, None] if v.ndim == 2 else v  # LDM's attention is 1x1 convolutions
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}


def openclip_to_ldm(sd: dict, prefix: str, extra_last_layer: bool) -> dict:
    """OpenCLIP's layout; SD-2.x's file holds one more layer than it conditions on (the copy is dropped again)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers + ([layers[-1] + 1] if extra_last_layer else []):
        src = min(i, layers[-1])
        for part, name in names.items():
            for leaf in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{name}.{leaf}"] = sd[f"encoder.layers.{src}.{part}.{leaf}"].clone()
        for leaf in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(
                [sd[f"encoder.layers.{src}.self_attn.{p}_proj.{leaf}"] for p in "qkv"])
    width = out["token_embedding.weight"].shape[1]
    out["text_projection"] = sd["text_projection.weight"].T.contiguous() if "text_projection.weight" in sd \
        else torch.eye(width)
    return {prefix + k: v for k, v in out.items()}


def write_single_file(folder, dest, metadata=None):
    """The pipeline folder as one LDM-layout .safetensors (SD-1.x, 2.x or XL by its text encoders)."""
    index = json.loads((folder / "model_index.json").read_text())
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    sd = {**unet_to_ldm(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
                        unet_cfg["layers_per_block"]),
          **vae_to_ldm(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
                       len(vae_cfg["block_out_channels"]))}
    te = load_file(folder / "text_encoder" / "model.safetensors")
    te_act = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_act"]
    if index["_class_name"] == "StableDiffusionXLPipeline":
        sd.update(clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_ldm(load_file(folder / "text_encoder_2" / "model.safetensors"),
                                  "conditioner.embedders.1.model.", extra_last_layer=False))
    elif te_act == "gelu":  # SD-2.x: OpenCLIP ViT-H
        sd.update(openclip_to_ldm(te, "cond_stage_model.model.", extra_last_layer=True))
    else:
        sd.update(clip_to_ldm(te, "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dest), metadata=metadata)
    return dest


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("IMMUNIZE_CACHE", str(tmp_path_factory.getbasetemp() / "immunize-cache"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for arch, meta in (("sd15", {"modelspec.resolution": "64x64"}),
                       ("sd21", {"modelspec.resolution": "64x64", "modelspec.prediction_type": "v"}),
                       ("sdxl", {"modelspec.resolution": "64x64"})):
        folder = build_pipeline_folder(arch, root / arch)
        out[arch] = (folder, write_single_file(folder, root / f"{arch}.safetensors", meta))
    return out


def _weights(folder, comp):
    return {k: v for f in sorted((folder / comp).glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_a_single_file_converts_to_the_same_weights(arch, checkpoints):
    from raystack.models.pipeline_io import is_sdxl_folder, load_pipeline, resolve_model_path
    from raystack.models.single_file import PROVENANCE_FILE

    folder, file = checkpoints[arch]
    converted = resolve_model_path(str(file))
    assert converted != file and (converted / PROVENANCE_FILE).is_file()
    assert resolve_model_path(str(file)) == converted  # cached: the same folder, not converted again
    comps = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    for comp in comps:
        a, b = _weights(folder, comp), _weights(converted, comp)
        assert a.keys() == b.keys(), comp
        assert all(torch.equal(a[k], b[k]) for k in a), comp
    ours, theirs = (json.loads((f / "unet" / "config.json").read_text()) for f in (converted, folder))
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
                "use_linear_projection", "sample_size", "transformer_layers_per_block",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        assert ours.get(key) == theirs.get(key), key
    if arch == "sd15":  # SD-1.x's 8 heads: the family's own, so the reduced model's too
        assert ours["attention_head_dim"] == theirs["attention_head_dim"] == 8
    sched = json.loads((converted / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == ("v_prediction" if arch == "sd21" else "epsilon")
    assert is_sdxl_folder(converted) == (arch == "sdxl")
    pipe = load_pipeline(str(file))  # every command's loader takes the file as it is
    assert pipe.tokenizer("a red circle").input_ids == load_pipeline(folder).tokenizer("a red circle").input_ids


def test_a_single_file_hardens(checkpoints, tmp_path):
    from raystack.hardening.driver import run_harden
    from raystack.hardening.spec import HardenSpec
    from raystack.tinyworld.folder import write_concept_folder

    _, file = checkpoints["sd15"]
    d = tmp_path / "data"
    write_concept_folder(d / "t", ["circle", "square"], ["red"], ["sunset"], 1, 1, None, True)
    write_concept_folder(d / "l", ["cross"], ["blue"], ["striped", "dotted"], 1, 2, None, True)
    common = dict(model=str(file), target=[d / "t"], legal=d / "l", steps=1, checkpoint_every=1, batch_size=2,
                  user_steps=1, finetune_steps=1, workers=1)
    m = run_harden(HardenSpec(method="random-freeze", rho=0.3, out=tmp_path / "rf", **common), in_this_process=True)
    assert m["method"] == "random-freeze" and (tmp_path / "rf" / "model_index.json").is_file()
    assert m["source_model"].startswith(f"{file.name} (single file, sha256 ")  # the file, never the cache path
    m = run_harden(HardenSpec(method="imma", against="lora", out=tmp_path / "imma", **common), in_this_process=True)
    assert m["method"] == "imma" and (tmp_path / "imma" / "unet").is_dir()


def _harden_cli(model, out, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 1, 1, None, True)
    return CliRunner().invoke(app, ["harden", "--method", "random-freeze", "--rho", "0.3", "--model", str(model),
                                    "--target", str(tmp_path / "t"), "--out", str(out)])


def test_a_pickled_checkpoint_is_refused_in_one_line(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
    res = _harden_cli(ckpt, tmp_path / "out", tmp_path)
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert "pickled checkpoints are refused" in res.stderr and ".safetensors" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_no_known_family_is_refused_and_nothing_is_written(tmp_path):
    import os

    from raystack.models.single_file import cache_root

    bad = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, str(bad))
    before = sorted(cache_root().rglob("*")) if cache_root().exists() else []
    res = _harden_cli(bad, tmp_path / "out", tmp_path)
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert "not a Stable Diffusion 1.x, 2.x or XL checkpoint" in res.stderr and "other.safetensors" in res.stderr
    assert not (tmp_path / "out").exists()
    assert (sorted(cache_root().rglob("*")) if cache_root().exists() else []) == before
    assert os.environ["IMMUNIZE_CACHE"] in str(cache_root())


def test_clip_bpe_tokenizer_gives_clips_ids():
    """The shipped merges rebuild CLIP's own tokenizer (ids as openai/clip-vit-large-patch14 gives them)."""
    from raystack.models.single_file import clip_tokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("Hello, world!").input_ids == [49406, 3306, 267, 1002, 256, 49407]
    assert clip_tokenizer(pad_token="!").pad_token_id == 0  # SD-2.x's and SDXL's second tokenizer pad with "!"


def test_family_defaults_without_metadata():
    from raystack.models.single_file import image_settings

    assert image_settings({}, "sd1") == (512, "epsilon")
    assert image_settings({}, "sd2") == (768, "v_prediction")
    assert image_settings({"__metadata__": {"modelspec.architecture": "stable-diffusion-v2-512"}}, "sd2") == \
        (512, "epsilon")
    assert image_settings({}, "sdxl") == (1024, "epsilon")


PUBLISHED = {  # the published diffusers configs (shape-relevant fields), built on the meta device: no memory
    "sd15": {"unet": dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                          attention_head_dim=8),
             "text": [("clip", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, hidden_act="quick_gelu"))]},
    "sd21": {"unet": dict(sample_size=96, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
                          attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True),
             "text": [("openclip", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                        num_attention_heads=16, hidden_act="gelu"))]},
    "sdxl": {"unet": dict(sample_size=128, block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                          attention_head_dim=[5, 10, 20], use_linear_projection=True,
                          down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                          transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                          addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
             "text": [("clip", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, hidden_act="quick_gelu")),
                      ("openclip", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                        num_attention_heads=20, hidden_act="gelu", projection_dim=1280))]},
}


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_published_shapes_infer_the_published_configs(arch):
    """At full width the shapes alone give the published configurations (heads included)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from raystack.models.single_file import detect_family, image_settings, text_configs, unet_config

    want = PUBLISHED[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**want["unet"])
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
        sd = {**unet_to_ldm(unet.state_dict(), 2), **vae_to_ldm(vae.state_dict(), 4)}
        for i, (layout, cfg) in enumerate(want["text"]):
            cls = CLIPTextModelWithProjection if "projection_dim" in cfg else CLIPTextModel
            te = cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **cfg)).state_dict()
            if arch == "sdxl":
                prefix = "conditioner.embedders.0.transformer." if i == 0 else "conditioner.embedders.1.model."
            else:
                prefix = "cond_stage_model.transformer." if layout == "clip" else "cond_stage_model.model."
            sd.update(clip_to_ldm(te, prefix) if layout == "clip" else openclip_to_ldm(te, prefix, arch == "sd21"))
    header = {k: {"shape": list(v.shape), "dtype": "F16"} for k, v in sd.items()}
    family = detect_family(header, "published.safetensors")
    assert family == {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[arch]
    size, _ = image_settings(header, family)
    got = unet_config({k: tuple(v["shape"]) for k, v in header.items()}, family, size, "p", "--model")
    for key, value in want["unet"].items():
        assert got[key] == value, key
    texts = text_configs({k: tuple(v["shape"]) for k, v in header.items()}, family)
    for t, (_, cfg) in zip(texts, want["text"]):
        assert {k: t["config"][k] for k in cfg} == cfg


def test_an_fp16_file_stays_fp16_and_trains_in_fp32(checkpoints, tmp_path):
    from raystack.models.pipeline_io import load_pipeline, resolve_model_path

    folder, file = checkpoints["sd15"]
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(file).items()}, str(half), metadata={"modelspec.resolution": "64x64"})
    converted = resolve_model_path(half)
    assert sorted(p.name for p in (converted / "unet").glob("*.safetensors")) == \
        ["diffusion_pytorch_model.fp16.safetensors"]
    pipe = load_pipeline(half)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    a = _weights(folder, "unet")
    assert all(torch.equal(a[k].half().float(), v) for k, v in pipe.unet.state_dict().items())


def test_two_conversions_racing_end_with_one_folder(checkpoints, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from raystack.models.single_file import PROVENANCE_FILE, _convert_into, _header, detect_family

    _, file = checkpoints["sd15"]
    header = _header(file, "--model")
    family = detect_family(header, file)
    dest = tmp_path / "cache" / ("0" * 64)
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: _convert_into(file, dest, header, family, "--model"), range(2)))
    assert done == [dest, dest] and (dest / PROVENANCE_FILE).is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temporary folder left behind
