"""The freeze mask in users' hands: export formats read by their trainers' own mechanisms, `apply` in a
diffusers-style fine-tune, and `mask check` on compliant and non-compliant derivatives."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(folder: Path, method: str = "freezeasguard", frozen_ratio: float | None = None) -> None:
    """A manifest as `harden` writes it (the keys `verify` requires, every file's SHA-256), without a run."""
    from raystack.hardening.driver import hash_tree

    manifest = {"method": method, "spec": {"method": method}, "seed": 0, "source_model": "tinyworld",
                "changed_tensors": [], "frozen_ratio": frozen_ratio, "versions": {"immunize-cli": "test"}}
    manifest["files"] = {k: v for k, v in hash_tree(folder).items() if k != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_model_path):
    """The tiny world released with a mask freezing every third UNet tensor (a release that verifies)."""
    from raystack.freeze_mask import save_freeze_mask

    rel = tmp_path_factory.mktemp("mask") / "release"
    shutil.copytree(tiny_model_path, rel)
    with safe_open(str(rel / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        names = sorted(f.keys())
    ratio = save_freeze_mask(rel / "freeze_mask.safetensors", {n: i % 3 == 0 for i, n in enumerate(names)})
    write_manifest(rel, frozen_ratio=ratio)
    return rel


def _mask(rel: Path) -> dict[str, bool]:
    from raystack.freeze_mask import load_freeze_mask

    return load_freeze_mask(rel / "freeze_mask.safetensors")


def _unet(rel: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(rel / "unet")


def _layers(unet) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _export(rel: Path, fmt: str) -> str:
    res = CliRunner().invoke(app, ["mask", "export", str(rel), "--format", fmt])
    assert res.exit_code == 0, res.output + res.stderr
    return res.stdout


def _check(rel: Path, derivative: Path) -> tuple[int, str]:
    """Exit code, and the output with the --json record's violations (the table folds long names)."""
    record = derivative.parent / f"{derivative.name}.check.json"
    res = CliRunner().invoke(app, ["mask", "check", "--release", str(rel), "--derivative", str(derivative),
                                   "--json", str(record)])
    assert "Traceback" not in res.output
    found = json.loads(record.read_text())
    assert found["compliant"] == (res.exit_code == 0)
    return res.exit_code, " ".join(res.output.split()) + json.dumps(found["violations"])


def test_every_export_carries_the_ratio_and_the_release_hash(release):
    sha = hashlib.sha256((release / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    frozen = sum(_mask(release).values())
    for fmt in ("names", "regex", "peft", "kohya", "onetrainer"):
        text = _export(release, fmt)
        assert sha in text and f"frozen: {frozen} of {len(_mask(release))} UNet tensors" in text, fmt


def test_names_and_regex_select_exactly_the_frozen_tensors(release):
    mask = _mask(release)
    names = [ln for ln in _export(release, "names").splitlines() if not ln.startswith("#")]
    assert sorted(names) == sorted(n for n, f in mask.items() if f)
    (pattern,) = [ln for ln in _export(release, "regex").splitlines() if not ln.startswith("#")]
    assert {n for n in mask if re.fullmatch(pattern, n)} == {n for n, f in mask.items() if f}


def test_peft_export_loads_in_lora_config_and_adapts_no_frozen_layer(release):
    from peft import LoraConfig

    mask = _mask(release)
    cfg = json.loads(_export(release, "peft"))["lora_config"]
    for targets in (cfg["target_modules"], ["to_k", "to_q", "to_v", "to_out.0"]):  # as given; narrowed as users do
        unet = _unet(release)
        free = {n for n in _layers(unet) if not mask[f"{n}.weight"]}
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets,
                                    exclude_modules=cfg["exclude_modules"]))
        adapted = {n.split(".lora_A")[0] for n, _ in unet.named_parameters() if ".lora_A" in n}
        assert adapted and adapted <= free
        if targets is cfg["target_modules"]:
            assert adapted == free  # every layer a compliant LoRA may adapt, no fewer


def test_kohya_and_onetrainer_exports_follow_their_documented_schemas(release):
    """Neither tool installs here: the exports are checked against the rules their sources document. kohya
    sd-scripts (networks/lora.py) names a UNet layer `lora_unet_` + its path with '_' for '.', and has no
    module filter for SD; OneTrainer (modules/util/ModuleFilter.py) splits `layer_filter` on ',' and, with
    `layer_filter_regex`, keeps a Linear/Conv2d layer when re.search(pattern, its module path) matches."""
    mask = _mask(release)
    layers = _layers(_unet(release))
    kohya = [ln for ln in _export(release, "kohya").splitlines() if not ln.startswith("#")]
    assert set(kohya) == {"lora_unet_" + n.replace(".", "_") for n in layers if mask[f"{n}.weight"]}
    ot = json.loads(_export(release, "onetrainer"))
    assert ot["layer_filter_regex"] is True and isinstance(ot["layer_filter"], str)
    filters = [re.compile(p.strip()) for p in ot["layer_filter"].split(",")]
    chosen = {n for n in layers if any(f.search(n) for f in filters)}
    assert chosen == {n for n in layers if not mask[f"{n}.weight"]}


def test_apply_freezes_and_stops_a_trainer_that_unfreezes(release):
    from raystack.freeze_mask import FrozenTensorChanged, apply

    unet = _unet(release)
    guard = apply(unet, release)
    params = dict(unet.named_parameters())
    assert guard.names and all(not params[n].requires_grad for n in guard.names)
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, unet.config.cross_attention_dim)
    unet(x, t, h)
    unet.requires_grad_(True)  # a trainer that switches everything back on is stopped before its first step
    with pytest.raises(FrozenTensorChanged, match="made trainable again"):
        unet(x, t, h)
    with torch.no_grad():
        params[guard.names[0]].add_(1.0)
    with pytest.raises(FrozenTensorChanged, match=re.escape(guard.names[0])):
        guard.check()


def test_example_fine_tune_keeps_the_mask_and_check_tells_compliant_from_not(release, tmp_path):
    import sys

    from raystack.tinyworld.folder import write_concept_folder

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import finetune_with_mask
    finally:
        sys.path.pop(0)
    data = tmp_path / "data"
    write_concept_folder(data, ["circle"], None, ["sunset"], 2, 0, None, False)
    full, lora = tmp_path / "full", tmp_path / "lora"
    finetune_with_mask.main(["--release", str(release), "--data", str(data), "--out", str(full), "--steps", "2",
                             "--lr", "1e-2"])
    finetune_with_mask.main(["--release", str(release), "--data", str(data), "--out", str(lora), "--steps", "2",
                             "--lora"])
    mask = _mask(release)
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(str(release / unet_file)), load_file(str(full / unet_file))
    for n, frozen in mask.items():  # frozen: bitwise the release's; the rest were trained
        assert torch.equal(before[n], after[n]) or not frozen
    assert sum(not torch.equal(before[n], after[n]) for n, f in mask.items() if not f) > 0
    assert _check(release, full)[0] == 0
    assert _check(release, lora)[0] == 0

    changed = tmp_path / "changed"  # one frozen tensor changed in one number
    shutil.copytree(full, changed)
    w = load_file(str(changed / unet_file))
    name = sorted(n for n, f in mask.items() if f)[0]
    w[name] = w[name].clone()
    w[name].view(-1)[0] += 1e-3
    save_file(w, str(changed / unet_file))
    code, out = _check(release, changed)
    assert code == 1 and name in out and "changed" in out and "NOT compliant" in out

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _unet(release)
    layers = list(_layers(unet))
    frozen_layer = next(n for n in layers if mask[f"{n}.weight"] and n.endswith("to_q"))
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=[frozen_layer]))
    bad_lora = tmp_path / "bad_lora"
    StableDiffusionPipeline.save_lora_weights(
        str(bad_lora), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True)
    code, out = _check(release, bad_lora)
    assert code == 1 and frozen_layer in out and "adapter on a frozen weight" in out

    free_layer = next(n for n in layers if not mask[f"{n}.weight"] and n.endswith("to_k"))
    for layer, expect in ((frozen_layer, 1), (free_layer, 0)):  # kohya's file layout, as sd-scripts saves it
        key = "lora_unet_" + layer.replace(".", "_")
        f = tmp_path / f"kohya_{expect}.safetensors"
        save_file({f"{key}.lora_down.weight": torch.zeros(2, 8), f"{key}.lora_up.weight": torch.zeros(8, 2),
                   f"{key}.alpha": torch.tensor(2.0), "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha":
                   torch.tensor(2.0)}, str(f))
        code, out = _check(release, f)
        assert code == expect, out
        assert "text encoder" in out


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_for_mask_export_and_check(release, tmp_path):
    (tmp_path / "exists.txt").write_text("mine")
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04not a pickle you will load")
    (tmp_path / "garbage.safetensors").write_bytes(b"nonsense")
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(other))
    nomask = tmp_path / "nomask"
    shutil.copytree(release, nomask, ignore=shutil.ignore_patterns("freeze_mask.safetensors"))
    r = str(release)
    rows = [
        (["mask", "export", r, "--format", "xml"], "--format xml"),
        (["mask", "export", str(tmp_path / "nope"), "--format", "names"], "not a pipeline folder"),
        (["mask", "export", str(nomask), "--format", "names"], "no freeze_mask.safetensors"),
        (["mask", "export", r, "--format", "names", "--mask", str(tmp_path / "garbage.safetensors")], "corrupt"),
        (["mask", "export", r, "--format", "names", "--out", str(tmp_path / "exists.txt")], "already exists"),
        (["mask", "export", r, "--format", "names", "--out", str(release / "mask.txt")], "inside the input"),
        (["mask", "export", r, "--format", "names", "--out", str(tmp_path / "no" / "x.txt")], "does not exist"),
        (["mask", "check", "--release", r, "--derivative", str(tmp_path / "weights.bin")], "nothing is unpickled"),
        (["mask", "check", "--release", r, "--derivative", str(tmp_path / "nope")], "no such file or folder"),
        (["mask", "check", "--release", r, "--derivative", str(tmp_path / "garbage.safetensors")],
         "not a readable safetensors"),
        (["mask", "check", "--release", r, "--derivative", str(other)], "none of its tensors"),
        (["mask", "check", "--release", r, "--derivative", r, "--json", str(release / "x.json")], "inside the input"),
    ]
    failures = []
    before = (_tree(release), _tree(tmp_path))
    for argv, expect in rows:
        res = CliRunner().invoke(app, argv)
        lines = res.stderr.strip().splitlines()
        if not (res.exit_code == 2 and len(lines) == 1 and expect in lines[0] and "Traceback" not in res.output):
            failures.append((argv[1:3], expect, res.exit_code, res.stderr[-200:]))
    assert not failures, failures
    assert (_tree(release), _tree(tmp_path)) == before  # nothing written, nothing changed


def test_the_example_runs_where_ray_and_deepspeed_cannot_be_imported(release, tmp_path):
    """A user who only respects the mask needs torch, safetensors, diffusers and peft: the example fine-tunes 2
    steps in a Python that has every installed package but ray and deepspeed (site-packages shadowed without
    them, so `find_spec` says they are absent, as on a machine without them)."""
    import os
    import subprocess
    import sys

    from raystack.tinyworld.folder import write_concept_folder

    data = tmp_path / "data"
    write_concept_folder(data, ["circle"], None, ["sunset"], 1, 0, None, False)
    site = Path(torch.__file__).resolve().parents[1]
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    for entry in site.iterdir():
        if entry.name.split("-")[0].split(".")[0].lower() not in ("ray", "deepspeed"):
            (shadow / entry.name).symlink_to(entry)
    script = (
        "import sys, runpy\n"
        f"sys.argv = ['finetune_with_mask.py', '--release', {str(release)!r}, '--data', {str(data)!r}, "
        f"'--out', {str(tmp_path / 'out')!r}, '--steps', '2']\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'finetune_with_mask.py')!r}, run_name='__main__')\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('ray') is None and importlib.util.find_spec('deepspeed') is None\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed')]\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}
    res = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
