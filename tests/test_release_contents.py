"""What a publisher uploads (issue 39): the release carries a model card a hub parses, the source's license and
notices byte for byte, the source's safety checker, and it verifies after a hub round trip (a hub cache
snapshot with the hub's .gitattributes), failing when one weight byte changes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

LICENSE = "CreativeML Open RAIL-M\nCopyright (c) 2022 Robin Rombach and Patrick Esser\n...use restrictions...\n"


@pytest.fixture(scope="module")
def sd15_with_checker(tmp_path_factory) -> Path:
    """An SD-1.5-shaped pipeline (random weights, reduced width) as a hub download has it: a safety checker and
    feature extractor in safetensors, a LICENSE, a NOTICE and its own model card."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from raystack.models.shapes import build_pipeline_folder

    src = build_pipeline_folder("sd15", tmp_path_factory.mktemp("sd15") / "m")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "projection_dim": 16},
                     vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                                    "projection_dim": 16}, projection_dim=16)
    StableDiffusionSafetyChecker(cfg).save_pretrained(str(src / "safety_checker"), safe_serialization=True)
    CLIPImageProcessor(crop_size=32, size=32).save_pretrained(str(src / "feature_extractor"))
    index = json.loads((src / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (src / "model_index.json").write_text(json.dumps(index))
    (src / "LICENSE").write_text(LICENSE)
    (src / "NOTICE").write_text("notice of the source\n")
    (src / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [stable-diffusion]\n---\n# SD\n")
    return src


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from raystack.tinyworld.folder import write_concept_folder

    d = tmp_path_factory.mktemp("release-data")
    write_concept_folder(d / "t", ["circle", "square"], ["red"], ["sunset"], 1, 1, None, True)
    write_concept_folder(d / "l", ["cross"], ["blue"], ["striped"], 1, 2, None, True)
    return d


def _harden(method: str, model: str, out: Path, data: Path, **extra) -> dict:
    from raystack.hardening.driver import run_harden
    from raystack.hardening.spec import HardenSpec

    return run_harden(HardenSpec(method=method, model=model, target=[data / "t"], legal=data / "l", out=out,
                                 steps=1, checkpoint_every=1, batch_size=2, user_steps=1, finetune_steps=1,
                                 workers=1, **extra), in_this_process=True)


def _card(folder: Path) -> dict:
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    return {**card.data.to_dict(), "text": card.text}


@pytest.mark.e2e
@pytest.mark.parametrize("method,extra", [("random-freeze", {"rho": 0.3}), ("imma", {})])
def test_an_sd15_release_keeps_license_notices_card_and_safety_checker(method, extra, sd15_with_checker, data,
                                                                        tmp_path):
    """random-freeze copies the source's files; imma loads, changes and saves the pipeline (which leaves the
    safety checker out on loading): both keep what the source publishes with its weights."""
    out = tmp_path / "release"
    manifest = _harden(method, str(sd15_with_checker), out, data, **extra)
    assert (out / "LICENSE").read_bytes() == (sd15_with_checker / "LICENSE").read_bytes()
    assert (out / "NOTICE").read_bytes() == (sd15_with_checker / "NOTICE").read_bytes()
    assert (out / "README.source.md").read_bytes() == (sd15_with_checker / "README.md").read_bytes()
    for f in (sd15_with_checker / "safety_checker").iterdir():
        assert (out / "safety_checker" / f.name).read_bytes() == f.read_bytes()
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"][1] == "CLIPImageProcessor"
    card = _card(out)  # the hub's own parser reads the metadata
    assert card["license"] == "creativeml-openrail-m" and card["library_name"] == "diffusers"
    assert card["pipeline_tag"] == "text-to-image" and f"immunize-cli-{method}" in card["tags"]
    assert "What it stops, and what it does not" in card["text"] and manifest["files"]["unet/config.json"]
    unet_hash = manifest["files"]["unet/diffusion_pytorch_model.safetensors"]
    assert unet_hash in card["text"]
    assert ("Fine-tuning within the rules" in card["text"]) == (method == "random-freeze")
    assert manifest["source_model"] == "m" and "LICENSE" in manifest["copied_from_source"]
    assert not manifest["left_out_from_source"]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), use_safetensors=True)  # loads with its checker
    assert pipe.safety_checker is not None


def test_a_release_verifies_after_a_hub_round_trip_and_fails_on_one_changed_byte(data, tmp_path, monkeypatch):
    """The tiny world released, then laid out as a hub cache (snapshots/<rev>/ linking into blobs/) with the hub's
    .gitattributes added: verify passes (the card and .gitattributes listed as not covered), and one byte
    changed in the UNet's weights fails it."""
    out = tmp_path / "release"
    _harden("random-freeze", "tiny", out, data, rho=0.3)
    card = _card(out)
    assert card["license"] == "apache-2.0" and "Not evaluated in this card" in card["text"]
    repo = tmp_path / "cache" / "models--publisher--tiny-hardened"
    commit = "0123abcd" * 5
    snap = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(out, snap)
    (snap / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(p for p in snap.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"{i:064x}"
        f.rename(blob)
        f.symlink_to(os.path.relpath(blob, f.parent))
    res = CliRunner().invoke(app, ["verify", str(snap)])
    assert res.exit_code == 0, res.output + res.stderr
    assert "NOT COVERED .gitattributes" in res.stdout and "NOT COVERED README.md" in res.stdout
    assert CliRunner().invoke(app, ["verify", str(snap), "--strict"]).exit_code == 1
    elsewhere = tmp_path / "elsewhere"  # a blobs/ that is a link: its files could be anywhere
    (repo / "blobs").rename(elsewhere)
    (repo / "blobs").symlink_to(elsewhere)
    res = CliRunner().invoke(app, ["verify", str(snap)])
    assert res.exit_code == 1 and "a symbolic link inside the release" in res.stderr, res.output + res.stderr
    (repo / "blobs").unlink()
    elsewhere.rename(repo / "blobs")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    for name in ("publisher/tiny-hardened", f"publisher/tiny-hardened@{commit}", "publisher/tiny-hardened@main"):
        res = CliRunner().invoke(app, ["verify", name])  # a hub id, from the local cache
        assert res.exit_code == 0 and "OK" in res.stdout, res.output + res.stderr
    res = CliRunner().invoke(app, ["mask", "check", "--release", "publisher/tiny-hardened", "--derivative", str(snap)])
    assert res.exit_code == 0, res.output + res.stderr
    again = _harden("random-freeze", f"publisher/tiny-hardened@{commit}", tmp_path / "again", data, rho=0.3)
    assert again["source_model"] == f"publisher/tiny-hardened@{commit}"  # a hub download: its id and revision
    assert _card(tmp_path / "again")["base_model"] == "publisher/tiny-hardened"
    for bad, why in (("publisher/unknown", "and publisher/unknown is not in the local hub cache"),
                     ("publisher/tiny-hardened@v9", "revision v9 of publisher/tiny-hardened is not")):
        res = CliRunner().invoke(app, ["verify", bad])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and why in res.stderr, res.stderr
    weights = (snap / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    res = CliRunner().invoke(app, ["verify", str(snap)])
    assert res.exit_code == 1 and "CHANGED unet/diffusion_pytorch_model.safetensors" in res.stdout


def test_card_adds_the_red_team_and_report_and_the_release_still_verifies(data, tmp_path):
    out = tmp_path / "release"
    _harden("random-freeze", "tiny", out, data, rho=0.3)
    redteam = {"space": "default", "budget": 1600, "guard": 0.5, "seed": 1, "concept": "sunset",
               "judge": {"kind": "tiny"}, "samples": {"rescored_target": 48},
               "models": {"hardened.compliant": {
                   "unattacked": {"target": 0.0, "others": 0.6},
                   "reference_attacks": [{"attack": {"method": "full"}, "target": 0.04, "others": 0.8, "steps": 200}],
                   "worst_case": {"target": 0.271, "others": 0.41, "ci95": [0.16, 0.41],
                                  "attack": {"method": "full", "lr": 0.001, "steps": 800}, "attack_dir": "a"}}}}
    (tmp_path / "rt").mkdir()
    (tmp_path / "rt" / "redteam.json").write_text(json.dumps(redteam))
    (tmp_path / "report.json").write_text(json.dumps({"summary": "sunset after the attack: 37.5% -> 4.2%"}))
    res = CliRunner().invoke(app, ["card", str(out), "--redteam", str(tmp_path / "rt"), "--report",
                                   str(tmp_path / "report.json"), "--out", str(out / "README.md"), "--overwrite"])
    assert res.exit_code == 0, res.output + res.stderr
    card = _card(out)
    assert card["license"] == "apache-2.0"  # kept from the card harden wrote
    assert "27.1% [16.0%–41.0%]" in card["text"] and "budget 1600 steps" in card["text"]
    assert "full 4.0%" in card["text"] and "37.5% -> 4.2%" in card["text"]
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0
    before = (out / "README.md").read_bytes()
    (tmp_path / "not_rt").mkdir()
    (tmp_path / "not_rt" / "redteam.json").write_text(json.dumps({"models": 3}))
    for argv, why in (([str(out), "--redteam", str(tmp_path / "not_rt"), "--out", str(out / "README.md"),
                        "--overwrite"], "not a redteam.json"),
                      ([str(out), "--out", str(out / "README.md")], "already exists"),
                      ([str(out), "--out", str(out / "model_index.json"), "--overwrite"], "a model card")):
        res = CliRunner().invoke(app, ["card", *argv])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and why in res.stderr, res.stderr
    assert (out / "README.md").read_bytes() == before


def test_a_model_not_in_the_hub_cache_is_one_line_and_nothing_is_written(data, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for model, why in (("someone/model", "someone/model is not in the local hub cache"),
                       ("someone/model@v2", "revision v2 of someone/model is not in the local hub cache")):
        out = tmp_path / "out"
        res = CliRunner().invoke(app, ["harden", "--method", "random-freeze", "--model", model, "--target",
                                       str(data / "t"), "--legal", str(data / "l"), "--out", str(out)])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and why in res.stderr, res.stderr
        assert not out.exists() and not (tmp_path / "out.run").exists()
