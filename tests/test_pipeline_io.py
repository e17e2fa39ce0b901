import json
import shutil

import numpy as np
import pytest

from raystack.errors import UserError
from raystack.models.pipeline_io import load_pipeline, save_pipeline


def test_shipped_world_loads_with_plain_diffusers(tiny_model_path):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_path), safety_checker=None)
    out = pipe("a red circle in plain style", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_shipped_world_is_small_and_safetensors_only(tiny_model_path):
    files = [p for p in tiny_model_path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}


def test_save_load_round_trip(tiny_pipe, tmp_path):
    dest = save_pipeline(tiny_pipe, tmp_path / "copy")
    again = load_pipeline(dest)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert again.tokenizer.tokenize("sunset") == ["sunset</w>"]
    assert not list(tmp_path.glob(".copy.tmp-*"))


def test_save_refuses_existing_without_overwrite(tiny_pipe, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        save_pipeline(tiny_pipe, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_failed_save_leaves_nothing(tiny_pipe, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tiny_pipe), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_pipeline(tiny_pipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def model_copy(tiny_model_path, tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(tiny_model_path, dest)
    return dest


def _unet_file(m):
    return m / "unet" / "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("case, damage, message", [
    ("missing path", lambda m: shutil.rmtree(m), "no such file or folder"),
    ("not a pipeline", lambda m: (m / "model_index.json").unlink(), "no model_index.json"),
    ("missing component", lambda m: shutil.rmtree(m / "vae"), "missing the vae/"),
    ("truncated weights", lambda m: _unet_file(m).write_bytes(_unet_file(m).read_bytes()[:5000]), "truncated or corrupt"),
    ("garbage weights", lambda m: _unet_file(m).write_bytes(b"\x00" * 64), "truncated or corrupt"),
    ("pickle weights", lambda m: (_unet_file(m).unlink(), (m / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")),
     "pickle weights are refused"),
    ("corrupt index", lambda m: (m / "model_index.json").write_text("{nope"), "corrupt model_index.json"),
    ("bad config", lambda m: (m / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                                                   "block_out_channels": [1]})),
     "cannot load the pipeline"),
])
def test_loader_errors_are_one_clear_message(model_copy, case, damage, message):
    damage(model_copy)
    with pytest.raises(UserError, match=message) as e:
        load_pipeline(model_copy)
    msg = str(e.value)  # names the folder; a long path keeps its end (the file), cut in the middle
    assert "\n" not in msg and (str(model_copy) in msg or ("..." in msg and f"/{model_copy.name}/" in msg)), msg


def test_uncached_hub_id_is_refused_without_download():
    with pytest.raises(UserError, match="not in the local hub cache"):
        load_pipeline("someone/not-a-cached-model")


def test_a_folder_with_fp16_variant_weights_only_loads_in_fp32(model_copy, tiny_pipe):
    """Hub repos often ship `*.fp16.safetensors` only: read as the fp16 variant, held in fp32 for training."""
    import torch
    from safetensors.torch import load_file, save_file

    from raystack.models.pipeline_io import weights_variant

    assert weights_variant(model_copy) is None
    for comp in ("unet", "vae", "text_encoder"):
        for f in (model_copy / comp).glob("*.safetensors"):
            save_file({k: v.half() for k, v in load_file(str(f)).items()}, str(f.with_suffix(".fp16.safetensors")))
            f.unlink()
    assert weights_variant(model_copy) == "fp16"
    pipe = load_pipeline(model_copy)
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    a, b = tiny_pipe.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=2e-3, rtol=2e-3) for k in a)
