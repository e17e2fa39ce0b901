"""`mask check` judges what a loader would load (issue 35): every derivative here is loaded with diffusers the way a
user would load it (`variant="fp16"`, the sharded index, `load_lora_weights`, `load_lora_adapter`), and `mask
check` must fail exactly when a frozen tensor of the loaded UNet differs from the release's. Each bypass has a
compliant counterpart that loads with every frozen tensor intact and passes. No Ray: the fast subset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from test_mask_tools import write_manifest

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_path):
    """A verified FreezeAsGuard-style release of the tiny world (every third UNet tensor frozen)."""
    from raystack.freeze_mask import save_freeze_mask

    root = tmp_path_factory.mktemp("loader")
    rel = root / "release"
    shutil.copytree(tiny_model_path, rel)
    weights = load_file(str(rel / UNET_FILE))
    names = sorted(weights)
    mask = {n: i % 3 == 0 for i, n in enumerate(names)}
    ratio = save_freeze_mask(rel / "freeze_mask.safetensors", mask)
    write_manifest(rel, frozen_ratio=ratio)
    return {"root": root, "release": rel, "weights": weights, "mask": mask}


def _frozen(world) -> list[str]:
    return [n for n, f in world["mask"].items() if f]


def _free(world) -> list[str]:
    return [n for n, f in world["mask"].items() if not f and world["weights"][n].is_floating_point()]


def _derivative(world, name: str) -> Path:
    """A copy of the release as a publisher would upload it (its manifest and mask included)."""
    d = world["root"] / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(world["release"], d)
    return d


def _check(world, derivative: Path) -> tuple[int, dict, str]:
    record = derivative.parent / f"{derivative.name}.check.json"
    res = CliRunner().invoke(app, ["mask", "check", "--release", str(world["release"]), "--derivative",
                                   str(derivative), "--json", str(record)])
    assert "Traceback" not in res.output, res.output
    assert res.exit_code in (0, 1), res.output + res.stderr
    found = json.loads(record.read_text())
    record.unlink()
    assert found["compliant"] == (res.exit_code == 0) and found["release_verified"] is True
    return res.exit_code, found, " ".join(res.stdout.split())


def _pipe(folder: Path, **kw):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True, **kw)


def _changed_frozen(world, unet) -> list[str]:
    """The frozen tensors of a loaded UNet that differ from the release's (dtype or any byte, or left
    uninitialised); a LoRA fused into a layer counts (peft keeps the layer's weight as `<layer>.base_layer.weight`)."""
    from raystack.mask_tools import _bitwise_equal

    params = {n.replace(".base_layer.", "."): p.detach() for n, p in unet.named_parameters() if "lora_" not in n}
    return [n for n in _frozen(world) if params[n].is_meta or not _bitwise_equal(params[n], world["weights"][n])]


def _edited(world, changes: dict[str, float], dtype=None) -> dict[str, torch.Tensor]:
    w = {k: v.clone() for k, v in world["weights"].items()}
    for k, delta in changes.items():
        w[k] = w[k] + delta
    if dtype is not None:
        w = {k: v.to(dtype) if v.is_floating_point() else v for k, v in w.items()}
    return w


# 1. a variant: the plain file is the release's, `variant="fp16"` loads the other -------------------------------

@pytest.mark.parametrize("case", ["fp16 cast", "frozen changed", "compliant"])
def test_a_weight_variant_is_judged_as_diffusers_loads_it(world, case):
    frozen, free = _frozen(world)[0], _free(world)[0]
    d = _derivative(world, f"variant_{case.replace(' ', '_')}")
    w = {"fp16 cast": lambda: _edited(world, {free: 0.5}, torch.float16),
         "frozen changed": lambda: _edited(world, {frozen: 1e-3, free: 0.5}),
         "compliant": lambda: _edited(world, {free: 0.5})}[case]()
    save_file(w, str(d / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    changed = _changed_frozen(world, _pipe(d, variant="fp16").unet)
    assert _changed_frozen(world, _pipe(d).unet) == []  # the plain file alone would have passed
    code, found, out = _check(world, d)
    assert (code == 1) == bool(changed), (case, changed, out)
    assert (code == 1) == (case != "compliant")
    files = {f["file"]: f for f in found["files"]}
    assert set(files) == {UNET_FILE, "unet/diffusion_pytorch_model.fp16.safetensors"}  # each file reported
    assert files[UNET_FILE]["compliant"]
    assert files["unet/diffusion_pytorch_model.fp16.safetensors"]["compliant"] == (case == "compliant")
    if case == "frozen changed":
        assert frozen in json.dumps(found["violations"]) and "diffusion_pytorch_model.fp16.safetensors" in out


# 2. an index: diffusers loads its shards in place of the plain file -------------------------------------------

@pytest.mark.parametrize("case", ["frozen changed", "frozen missing", "compliant"])
def test_an_index_is_judged_by_the_shards_it_names(world, case):
    frozen, free = _frozen(world)[1], _free(world)[1]
    d = _derivative(world, f"index_{case.replace(' ', '_')}")
    w = _edited(world, {frozen: 1e-3, free: 0.5} if case == "frozen changed" else {free: 0.5})
    names = sorted(w)
    half = len(names) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[half:]}
    if case == "frozen missing":  # a shard that lacks a frozen tensor: diffusers refuses or re-initialises it
        shards["diffusion_pytorch_model-00002-of-00002.safetensors"].remove(_frozen(world)[-1])
    for shard, keys in shards.items():
        save_file({k: w[k] for k in keys}, str(d / "unet" / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (d / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    changed = _changed_frozen(world, _pipe(d).unet)  # a missing tensor: loaded, left uninitialised
    code, found, out = _check(world, d)
    assert (code == 1) == bool(changed) == (case != "compliant"), (case, changed, out)
    kinds = {f["file"]: f["kind"] for f in found["files"]}
    assert kinds["unet/diffusion_pytorch_model.safetensors.index.json"] == "shards"
    assert sum(k == "shard" for k in kinds.values()) == 2
    if case != "compliant":
        bad = _frozen(world)[1] if case == "frozen changed" else _frozen(world)[-1]
        assert bad in json.dumps(found["violations"])


# 3. adapters a loader reads from the folder: the root LoRA, in each naming ---------------------------------------

def _lora_tensors(unet, layer: str, naming: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mod = unet.get_submodule(layer)
    down, up = torch.randn(2, mod.in_features, generator=g), torch.randn(mod.out_features, 2, generator=g)
    attn, proj = layer.rsplit(".", 1)
    if naming == "diffusers":
        return {f"unet.{layer}.lora_A.weight": down, f"unet.{layer}.lora_B.weight": up}
    if naming == "attn-processor":  # diffusers' old naming: <attention>.processor.to_k_lora.down.weight
        return {f"unet.{attn}.processor.{proj}_lora.down.weight": down,
                f"unet.{attn}.processor.{proj}_lora.up.weight": up}
    if naming == "attn-processor, no prefix":
        return {f"{attn}.processor.{proj}_lora.down.weight": down, f"{attn}.processor.{proj}_lora.up.weight": up}
    raise ValueError(naming)


@pytest.mark.parametrize("naming", ["diffusers", "attn-processor", "attn-processor, no prefix"])
@pytest.mark.parametrize("on", ["frozen", "free"])
def test_a_lora_at_the_root_is_judged_as_load_lora_weights_reads_it(world, naming, on):
    unet = _pipe(world["release"]).unet
    mask = world["mask"]
    layer = next(n for n, m in unet.named_modules() if n.endswith("attn1.to_k") and isinstance(m, torch.nn.Linear)
                 and mask[f"{n}.weight"] == (on == "frozen"))
    d = _derivative(world, f"lora_{on}_{naming.replace(' ', '_').replace(',', '')}")
    save_file(_lora_tensors(unet, layer, naming), str(d / "pytorch_lora_weights.safetensors"))
    pipe = _pipe(d)
    if naming.endswith("no prefix"):  # what pipe.load_lora_weights skips, the UNet's own loader takes
        pipe.unet.load_lora_adapter(str(d), weight_name="pytorch_lora_weights.safetensors", prefix=None)
    else:
        pipe.load_lora_weights(str(d))
    pipe.fuse_lora()
    changed = _changed_frozen(world, pipe.unet)
    assert bool(changed) == (on == "frozen")
    code, found, out = _check(world, d)
    assert (code == 1) == bool(changed), (naming, on, out)
    files = {f["file"]: f for f in found["files"]}
    assert files["pytorch_lora_weights.safetensors"]["kind"] == "lora"
    if on == "frozen":
        assert [v["name"] for v in files["pytorch_lora_weights.safetensors"]["violations"]] == [layer]
        assert "adapter on a frozen weight" in out


def test_a_lora_in_the_unet_folder_counts_too(world):
    unet = _pipe(world["release"]).unet
    layer = next(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and world["mask"][f"{n}.weight"])
    d = _derivative(world, "unet_lora")
    save_file({k[len("unet."):]: v for k, v in _lora_tensors(unet, layer, "diffusers").items()},
              str(d / "unet" / "pytorch_lora_weights.safetensors"))
    pipe = _pipe(d)
    pipe.unet.load_lora_adapter(str(d / "unet"), weight_name="pytorch_lora_weights.safetensors", prefix=None)
    pipe.fuse_lora()
    assert _changed_frozen(world, pipe.unet)
    code, found, _ = _check(world, d)
    assert code == 1 and layer in json.dumps(found["violations"])


def test_unet_weights_with_an_adapter_key_still_need_every_frozen_tensor(world):
    """A UNet weight file without its frozen tensors but with one adapter-looking key on a free layer: diffusers
    loads it with the frozen tensors initialised at random (a warning only); it must not pass as 'a LoRA'."""
    from diffusers import UNet2DConditionModel

    d = _derivative(world, "unet_minus_frozen")
    w = {k: v for k, v in world["weights"].items() if not world["mask"][k]}
    free = next(n for n in _free(world) if n.endswith(".weight") and world["weights"][n].dim() == 2)
    w[free[: -len(".weight")] + ".lora_A.weight"] = torch.zeros(4, world["weights"][free].shape[1])
    save_file(w, str(d / UNET_FILE))
    unet = UNet2DConditionModel.from_pretrained(str(d / "unet"), low_cpu_mem_usage=False, local_files_only=True)
    assert _changed_frozen(world, unet)
    code, found, _ = _check(world, d)
    assert code == 1 and "missing from the derivative" in json.dumps(found["violations"])


# 4. weight files nothing here may read: a violation, never a pass --------------------------------------------

@pytest.mark.parametrize("name", ["unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
                                  "model.ckpt", "unet/extra.pt"])
def test_a_pickled_weight_file_is_a_violation(world, name):
    d = _derivative(world, "pickled_" + name.replace("/", "_"))
    (d / name).write_bytes(b"\x80\x04 a pickle nobody unpickles")
    code, found, out = _check(world, d)
    assert code == 1 and "cannot be checked" in out
    assert {f["file"]: f["kind"] for f in found["files"]}[name] == "unverifiable"


def test_the_release_itself_complies_and_a_release_that_fails_verify_is_refused(world):
    code, found, _ = _check(world, _derivative(world, "as_released"))
    assert code == 0 and found["checked"] == len(_frozen(world))
    broken = _derivative(world, "broken_release")
    w = _edited(world, {_frozen(world)[0]: 1.0})
    save_file(w, str(broken / UNET_FILE))  # the release's own weights changed, its manifest not rewritten
    res = CliRunner().invoke(app, ["mask", "check", "--release", str(broken), "--derivative", str(broken)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "does not pass `immunize-cli verify`" in lines[0], res.stderr


# 5. malformed masks: the derivative changes the entry's tensor; the mask is refused, never read as a verdict ----

@pytest.mark.parametrize("value,why", [
    (torch.tensor([0, 1, 1], dtype=torch.uint8), "holds 3 values"),
    (torch.tensor([0.3]), "dtype f32"),
    (torch.tensor([float("nan")]), "dtype f32"),
    (torch.tensor([-1], dtype=torch.int64), "is -1"),
    (torch.tensor([2], dtype=torch.uint8), "is 2"),
    (torch.zeros(0, dtype=torch.uint8), "holds 0 values"),
])
def test_a_malformed_mask_is_refused_naming_the_entry(world, value, why):
    target = _frozen(world)[2]
    d = _derivative(world, "malformed_derivative")
    save_file(_edited(world, {target: 1.0}), str(d / UNET_FILE))
    assert target in _changed_frozen(world, _pipe(d).unet)  # the loaded derivative changed that tensor
    raw = {k: torch.tensor([1 if f else 0], dtype=torch.uint8) for k, f in world["mask"].items()}
    raw[target] = value
    bad = world["root"] / "malformed.safetensors"
    save_file(raw, str(bad))
    res = CliRunner().invoke(app, ["mask", "check", "--release", str(world["release"]), "--derivative", str(d),
                                   "--mask", str(bad)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output + res.stderr
    assert target in lines[0] and why in lines[0] and str(bad.name) in lines[0]
