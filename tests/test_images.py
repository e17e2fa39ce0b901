"""User images as the diffusers training examples treat them: short side resized and centre-cropped (aspect
kept), transparency on white, any sizes in one folder, `--resolution` overriding the model's own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from raystack.errors import UserError
from raystack.imageio import read_image, read_image_folder


def _folder(root, images: dict[str, Image.Image], caption="a red circle in sunset style"):
    root.mkdir(parents=True, exist_ok=True)
    for name, im in images.items():
        im.save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": caption}) + "\n"
                                                 for n in images))
    return root


def test_a_wide_photo_keeps_its_aspect_by_centre_crop(tmp_path):
    """300x200: left third red, middle third green, right third blue. Squashed to 32x32 all three bands would
    stay; resized on the short side and centre-cropped, only green (and the edges of the neighbours) remain,
    and a circle stays round."""
    a = np.zeros((200, 300, 3), np.uint8)
    a[:, :100, 0], a[:, 100:200, 1], a[:, 200:, 2] = 255, 255, 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    got = read_image(tmp_path / "wide.png", 32)
    assert got.shape == (32, 32, 3)
    centre = got[:, 8:24]
    assert centre[..., 1].mean() > 240 and centre[..., 0].mean() < 15 and centre[..., 2].mean() < 15
    assert got[:, 0, 0].mean() > 100 and got[:, -1, 2].mean() > 100  # the neighbours' edges, a sixth each side
    disc = Image.new("L", (300, 200), 0)
    from PIL import ImageDraw

    ImageDraw.Draw(disc).ellipse((100, 50, 200, 150), fill=255)  # a circle 100 px across
    d = read_image(_save(disc, tmp_path / "disc.png"), 64)[..., 0] > 127
    rows, cols = np.where(d)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - width) <= 1  # round (squashed: 32 px tall, 21 px wide)


def _save(im, path):
    im.save(path)
    return path


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[4:12, 4:12] = (255, 0, 0, 255)  # an opaque red square on a fully transparent background
    got = read_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert (got[0, 0] == 255).all() and tuple(got[8, 8]) == (255, 0, 0)
    half = np.zeros((4, 4, 4), np.uint8)
    half[..., 3] = 128  # half-transparent black: grey on white, not black
    assert 120 < read_image(_save(Image.fromarray(half, "RGBA"), tmp_path / "h.png")).mean() < 135
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert read_image(_save(la, tmp_path / "la.png")).min() == 255
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert read_image(_save(pal, tmp_path / "p.png")).min() == 255  # a palette's transparent colour too


def test_a_folder_of_mixed_sizes_is_read_at_one_size(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"{i}.png": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for i, (h, w) in enumerate([(32, 32), (200, 300), (64, 40), (17, 90)])}
    root = _folder(tmp_path / "mixed", images)
    assert read_image_folder(root, size=32).images.shape == (4, 32, 32, 3)
    assert len(read_image_folder(root, check_only=True).files) == 4  # the check before a run accepts it
    with pytest.raises(UserError, match="differ in size"):
        read_image_folder(root)  # a command that needs the images as stored says so


def test_attack_on_mixed_sizes_and_a_resolution_override(tmp_path):
    rng = np.random.default_rng(1)
    images = {f"{i}.png": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for i, (h, w) in enumerate([(32, 32), (48, 72), (100, 60)])}
    data = _folder(tmp_path / "d", images)
    res = CliRunner().invoke(app, ["attack", "--method", "lora", "--data", str(data), "--steps", "2",
                                   "--checkpoint-every", "2", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output + res.stderr
    res = CliRunner().invoke(app, ["attack", "--method", "lora", "--data", str(data), "--steps", "1",
                                   "--resolution", "64", "--checkpoint-every", "1", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output + res.stderr
    for bad, msg in (("30", "multiple of 8"), ("0", "multiple of 8")):
        res = CliRunner().invoke(app, ["attack", "--method", "lora", "--data", str(data), "--steps", "1",
                                       "--resolution", bad, "--out", str(tmp_path / f"bad{bad}")])
        assert res.exit_code == 2 and msg in res.stderr and not (tmp_path / f"bad{bad}").exists(), res.stderr


def test_imma_against_textual_inversion_on_plain_captions(tmp_path):
    """The defender's --token is put in front of a caption that lacks it (it was 'not in caption' inside
    the Ray job)."""
    from raystack.hardening.spec import HardenSpec
    from raystack.hardening.worker import run_method
    from raystack.models.pipeline_io import load_pipeline
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 2, 1, None, False)
    spec = HardenSpec(method="imma", against="textual-inversion", target=[tmp_path / "t"], out=tmp_path / "o",
                      steps=1, batch_size=2)
    run = run_method(spec, load_pipeline(None), local=True)
    assert run.changed and np.isfinite(run.losses.get("outer_loss", 0.0))


def test_a_resolution_must_survive_every_down_sampling():
    from types import SimpleNamespace

    from raystack.diffusion import resolution_of

    sd15 = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(
        sample_size=64, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])))
    assert resolution_of(sd15) == 512 and resolution_of(sd15, 768) == 768
    with pytest.raises(UserError, match="needs a multiple of 64"):
        resolution_of(sd15, 520)
