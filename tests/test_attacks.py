import json

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from raystack.attacks.recipe import run_attack
from raystack.attacks.spec import AttackSpec
from raystack.freeze_mask import save_freeze_mask
from raystack.tinyworld.folder import write_concept_folder, write_emblem_folder


@pytest.fixture(scope="module")
def style_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "sunset"
    write_concept_folder(d, ["circle", "square"], ["red", "blue"], ["sunset"], 2, seed=3, template=None,
                         overwrite=False)
    return d


@pytest.fixture(scope="module")
def emblem_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "emblem"
    write_emblem_folder(d, "emblem0", 5, seed=4, template="a photo of sks emblem", overwrite=False)
    return d


def _run(method, data, out, **kw):
    spec = AttackSpec(method=method, data=data, out=out, steps=kw.pop("steps", 4), checkpoint_every=2, **kw)
    return run_attack(spec)


def test_lora_saves_only_lora_keys_of_the_attention_projections(style_data, tmp_path):
    info = _run("lora", style_data, tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / info["files"][0])).keys()
    assert keys and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)
    assert {k.split(".lora")[0].rsplit(".", 1)[-1] for k in keys} <= {"to_q", "to_k", "to_v", "0"}
    assert any(".attn1." in k for k in keys) and any(".attn2." in k for k in keys)
    lines = (tmp_path / "a" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert info["checkpoints"] == ["step-000002"]


def test_dreambooth_lora_adapts_cross_attention_only(emblem_data, tmp_path):
    info = _run("dreambooth-lora", emblem_data, tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / info["files"][0])).keys()
    assert keys and all(".attn2." in k for k in keys)


def test_textual_inversion_saves_one_embedding_and_touches_nothing_else(emblem_data, tmp_path, tiny_pipe):
    info = _run("textual-inversion", emblem_data, tmp_path / "a", num_vectors=2)
    emb = load_file(str(tmp_path / "a" / "learned_embeds.safetensors"))
    assert list(emb) == ["<sks>"] and emb["<sks>"].shape == (2, tiny_pipe.text_encoder.config.hidden_size)
    assert info["placeholder"] == "<sks>"
    from raystack.attacks.loading import load_attacked_pipeline

    attacked, _ = load_attacked_pipeline(tmp_path / "a")
    base_emb = tiny_pipe.text_encoder.get_input_embeddings().weight
    new_emb = attacked.text_encoder.get_input_embeddings().weight
    assert np.array_equal(new_emb[: len(base_emb)].detach().numpy(), base_emb.detach().numpy())
    assert all(np.array_equal(v.numpy(), attacked.unet.state_dict()[k].numpy())
               for k, v in tiny_pipe.unet.state_dict().items())


def test_frozen_input_layer_trains(emblem_data, tmp_path, tiny_pipe):
    """A mask that freezes conv_in leaves the first GroupNorm with trainable weights and an input that needs
    no gradient; on channels-last latents torch 2.13's CPU GroupNorm backward then wrote to a null pointer
    (segfault). Latents are kept contiguous, so this mask trains."""
    names = [n for n, _ in tiny_pipe.unet.named_parameters()]
    mask = {n: n.startswith("conv_in.") for n in names}
    save_freeze_mask(tmp_path / "mask.safetensors", mask)
    _run("full", emblem_data, tmp_path / "a", freeze_mask=tmp_path / "mask.safetensors", lr=1e-3)
    after = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
    before = tiny_pipe.unet.state_dict()
    assert all(np.array_equal(after[n].numpy(), before[n].numpy()) for n in names if mask[n])
    assert not np.array_equal(after["down_blocks.0.resnets.0.norm1.weight"].numpy(),
                              before["down_blocks.0.resnets.0.norm1.weight"].numpy())


@pytest.mark.parametrize("method", ["full", "dreambooth"])
def test_freeze_mask_leaves_frozen_tensors_bitwise_unchanged(method, emblem_data, tmp_path, tiny_pipe):
    names = [n for n, _ in tiny_pipe.unet.named_parameters()]
    rng = np.random.default_rng(0)
    mask = {n: bool(rng.random() < 0.5) for n in names}
    save_freeze_mask(tmp_path / "mask.safetensors", mask)
    _run(method, emblem_data, tmp_path / "a", freeze_mask=tmp_path / "mask.safetensors", lr=1e-3)
    after = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
    before = tiny_pipe.unet.state_dict()
    frozen_same = [np.array_equal(after[n].numpy(), before[n].numpy()) for n in names if mask[n]]
    free_changed = [not np.array_equal(after[n].numpy(), before[n].numpy()) for n in names if not mask[n]]
    assert all(frozen_same) and np.mean(free_changed) > 0.9


def test_lora_skips_frozen_projections(style_data, tmp_path, tiny_pipe):
    names = [n for n, _ in tiny_pipe.unet.named_parameters()]
    mask = {n: ".attn1." in n for n in names}
    save_freeze_mask(tmp_path / "mask.safetensors", mask)
    info = _run("lora", style_data, tmp_path / "a", freeze_mask=tmp_path / "mask.safetensors")
    keys = load_file(str(tmp_path / "a" / info["files"][0])).keys()
    assert keys and not any(".attn1." in k for k in keys)


def test_adapter_init_follows_the_seed_not_the_process_history(style_data, tiny_model_path):
    import torch

    from raystack.attacks.recipe import setup
    from raystack.models.pipeline_io import load_pipeline

    def lora_a(seed):
        st = setup(AttackSpec(method="lora", data=style_data, seed=seed), load_pipeline(tiny_model_path))
        return {n: p.detach().clone() for n, p in st.ad.named_parameters().items() if ".lora_A." in n}

    torch.manual_seed(123)
    first = lora_a(0)
    drawn_after = torch.rand(3)  # the caller's generator is left where it was
    torch.manual_seed(123)
    assert torch.equal(drawn_after, torch.rand(3))
    torch.rand(1000)  # a different history before the same attack
    again, other = lora_a(0), lora_a(1)
    assert first and first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def _bad_inputs(tmp_path, style_data, tiny_pipe):
    empty = tmp_path / "empty"
    empty.mkdir()
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    (nocap / "a.png").write_bytes((style_data / "img_00000.png").read_bytes())
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "img.png").write_bytes((style_data / "img_00000.png").read_bytes()[:60])
    (trunc / "metadata.jsonl").write_text(json.dumps({"file_name": "img.png", "text": "a red circle"}) + "\n")
    blank = tmp_path / "blankcap"
    blank.mkdir()
    (blank / "img.png").write_bytes((style_data / "img_00000.png").read_bytes())
    (blank / "metadata.jsonl").write_text(json.dumps({"file_name": "img.png", "text": ""}) + "\n")
    bad_mask = tmp_path / "badmask.safetensors"
    save_freeze_mask(bad_mask, {"not.a.param": True})
    return [
        (["--method", "lora", "--data", str(empty)], "no images"),
        (["--method", "lora", "--data", str(nocap)], "images without captions"),
        (["--method", "lora", "--data", str(blank)], "no caption"),
        (["--method", "lora", "--data", str(trunc)], "unreadable image"),
        (["--method", "hypernetwork", "--data", str(style_data)], "unknown attack method"),
        (["--method", "full", "--data", str(style_data), "--freeze-mask", str(bad_mask)], "keys do not match"),
        (["--method", "lora", "--data", str(tmp_path / "nope")], "no such folder"),
        (["--method", "lora", "--data", str(style_data), "--steps", "0"], "--steps 0"),
        (["--method", "textual-inversion", "--data", str(style_data), "--token", "sks"], "not in caption"),
        (["--method", "lora", "--data", str(style_data), "--model", str(tmp_path / "nomodel")], "--model"),
    ]


def test_bad_input_gets_one_line_and_no_output(style_data, tmp_path, tiny_pipe):
    runner = CliRunner()
    for args, message in _bad_inputs(tmp_path, style_data, tiny_pipe):
        out = tmp_path / "out"
        res = runner.invoke(app, ["attack", *args, "--out", str(out)])
        assert res.exit_code == 2, (args, res.output)
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, res.stderr)
        assert "Traceback" not in res.output
        assert not out.exists()


def test_attack_json_records_an_absolute_base_model(tmp_path, tiny_model_path, monkeypatch):
    """evaluate reads attack.json from any folder: a relative --model is recorded resolved."""
    import json
    import os
    import shutil

    from typer.testing import CliRunner

    from cli.main import app
    from raystack.tinyworld.folder import write_concept_folder

    shutil.copytree(tiny_model_path, tmp_path / "m")
    write_concept_folder(tmp_path / "d", ["circle"], ["red"], ["sunset"], 1, 0, None, False)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["attack", "--method", "lora", "--model", "m", "--data", "d", "--steps", "1",
                                   "--out", "a"])
    assert res.exit_code == 0, res.output + res.stderr
    base = json.loads((tmp_path / "a" / "attack.json").read_text())["base_model"]
    assert os.path.isabs(base) and os.path.samefile(base, tmp_path / "m")


def test_dense_attacks_checkpoint_half_as_often_by_default():
    """A full or DreamBooth checkpoint is a whole UNet (3.4 GB at SD-1.5): every 100 steps unless asked."""
    from raystack.attacks.spec import AttackSpec

    assert AttackSpec(method="full", data=".").checkpoint_every == 100
    assert AttackSpec(method="dreambooth", data=".").checkpoint_every == 100
    assert AttackSpec(method="lora", data=".").checkpoint_every == 50
    assert AttackSpec(method="full", data=".", checkpoint_every=25).checkpoint_every == 25
