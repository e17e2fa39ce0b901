"""Reliability III (issue 35): `verify` passes only releases of this tool, `mask check` only judges a release that
verifies, and every mask is read by one strict reader.

Table-driven like test_bad_input_ii.py: each row gives the exit code and either the one stderr line (a refusal:
exactly one line, no traceback) or the stdout verdict; every tree is hashed before and after each row and must be
unchanged. Exit 1: a release that does not verify or a derivative that does not comply; exit 2: bad input (a
missing folder, a malformed mask). No Ray: the fast subset."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def tree_hash(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (links not followed), with the bytes of each file."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def write_manifest(folder: Path, method: str = "freezeasguard", frozen_ratio: float | None = 0.3, **extra) -> None:
    """A manifest as `harden` writes it (the keys `verify` requires, every file's SHA-256), without a run."""
    from raystack.hardening.driver import hash_tree

    manifest = {"method": method, "spec": {"method": method}, "seed": 0, "source_model": "tinyworld",
                "changed_tensors": [], "frozen_ratio": frozen_ratio, "versions": {"immunize-cli": "test"}, **extra}
    manifest["files"] = {k: v for k, v in hash_tree(folder).items() if k != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _mask_tensors(names: list[str]) -> dict[str, torch.Tensor]:
    return {n: torch.tensor([1 if i % 3 == 0 else 0], dtype=torch.uint8) for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_path):
    r = tmp_path_factory.mktemp("strict")
    good = r / "good"
    shutil.copytree(tiny_model_path, good)
    weights = load_file(str(good / UNET_FILE))
    names = sorted(weights)
    save_file(_mask_tensors(names), str(good / "freeze_mask.safetensors"))
    write_manifest(good)
    # the rows below edit a small release of the same form (a few tensors: the table hashes every tree per row)
    small = r / "small"
    (small / "unet").mkdir(parents=True)
    (small / "vae").mkdir()
    (small / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (small / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (small / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    small_names = ["conv_in.bias", "conv_in.weight", "conv_out.bias", "conv_out.weight"]
    save_file({n: torch.randn(4) for n in small_names}, str(small / UNET_FILE))
    save_file({"decoder.weight": torch.randn(4)}, str(small / "vae" / "diffusion_pytorch_model.safetensors"))
    save_file(_mask_tensors(small_names), str(small / "freeze_mask.safetensors"))
    write_manifest(small)

    def variant(name: str, edit, rehash: bool = True) -> Path:
        d = r / name
        shutil.copytree(small, d, symlinks=True)
        edit(d)
        if rehash:  # a manifest rewritten to match: the hashes alone no longer tell
            manifest = json.loads((d / "manifest.json").read_text())
            write_manifest(d, manifest["method"], manifest["frozen_ratio"])
        return d

    (r / "only_files").mkdir()
    (r / "only_files" / "manifest.json").write_text(json.dumps({"files": {}}))
    (r / "files_list").mkdir()
    (r / "files_list" / "manifest.json").write_text(json.dumps({"files": ["unet/x.safetensors"]}))
    (r / "no_manifest").mkdir()
    (r / "no_manifest" / "model_index.json").write_text("{}")
    (r / "outside.safetensors").write_bytes((small / UNET_FILE).read_bytes())
    variant("no_mask", lambda d: (d / "freeze_mask.safetensors").unlink())
    variant("imma_release", lambda d: (d / "freeze_mask.safetensors").unlink(), rehash=False)
    write_manifest(r / "imma_release", "imma", None)  # an IMMA release has no mask: it verifies without one

    def link_out(d):
        (d / UNET_FILE).unlink()
        (d / UNET_FILE).symlink_to(r / "outside.safetensors")

    variant("link_out", link_out)
    variant("link_in", lambda d: (d / "unet" / "copy.safetensors").symlink_to(d / UNET_FILE))
    variant("bad_json", lambda d: None, rehash=False)
    (r / "bad_json" / "manifest.json").write_text("{not json")
    variant("changed", lambda d: (d / "vae" / "config.json").write_text("{}"), rehash=False)
    variant("extra", lambda d: (d / "notes.json").write_text("{}"), rehash=False)
    variant("extra_in_unet", lambda d: (d / "unet" / "notes.md").write_text("mine"), rehash=False)

    def card_added(d):  # what a hub upload adds: a model card and .gitattributes
        (d / "README.md").write_text("---\nlicense: other\n---\n# card\n")
        (d / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")

    variant("card_added", card_added, rehash=False)
    hub = r / "hub" / "models--me--release"  # a hub cache: snapshots/<rev>/ links into blobs/
    shutil.copytree(r / "card_added", hub / "snapshots" / "abc123")
    (hub / "blobs").mkdir()
    for f in sorted(p for p in (hub / "snapshots" / "abc123").rglob("*") if p.is_file()):
        blob = hub / "blobs" / f"{len(list((hub / 'blobs').iterdir())):04d}"
        f.rename(blob)
        f.symlink_to(os.path.relpath(blob, f.parent))
    shutil.copytree(hub, r / "hub_changed" / "models--me--release", symlinks=True)
    changed_blob = (r / "hub_changed" / "models--me--release" / "snapshots" / "abc123" / UNET_FILE).resolve()
    w = load_file(str(changed_blob))
    w[small_names[0]].view(-1)[0] += 1.0
    save_file(w, str(changed_blob))

    def truncate(d):
        data = (d / UNET_FILE).read_bytes()
        (d / UNET_FILE).write_bytes(data[: len(data) // 2])

    variant("truncated", truncate)
    variant("pickle_named_safetensors", lambda d: torch.save({"w": torch.zeros(2)}, str(d / UNET_FILE)))

    def folder_for_file(d):
        (d / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        (d / "vae" / "diffusion_pytorch_model.safetensors").mkdir()

    variant("folder_for_file", folder_for_file, rehash=False)

    def nan(d):
        w = load_file(str(d / UNET_FILE))
        w[small_names[0]].view(-1)[0] = float("nan")
        save_file(w, str(d / UNET_FILE))

    variant("nan", nan)
    variant("pickled_bin", lambda d: (d / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle"))

    def bad_release_mask(d):
        raw = _mask_tensors(small_names)
        raw[small_names[3]] = torch.tensor([0, 1, 1], dtype=torch.uint8)
        save_file(raw, str(d / "freeze_mask.safetensors"))

    variant("bad_release_mask", bad_release_mask)
    variant("fifo", lambda d: os.mkfifo(d / "unet" / "pipe.safetensors"), rehash=False)

    def manifest_dir(d):
        (d / "manifest.json").unlink()
        (d / "manifest.json").mkdir()

    variant("manifest_dir", manifest_dir, rehash=False)
    variant("unknown_method", lambda d: None, rehash=False)
    write_manifest(r / "unknown_method", "sorcery")

    # masks for `mask check` / `mask export --mask`: one entry malformed each
    masks = r / "masks"
    masks.mkdir()
    target = names[0]
    for label, value in (("list", torch.tensor([0, 1, 1], dtype=torch.uint8)), ("fraction", torch.tensor([0.3])),
                         ("nan", torch.tensor([float("nan")])), ("minus_one", torch.tensor([-1], dtype=torch.int64)),
                         ("empty", torch.zeros(0, dtype=torch.uint8)), ("float_one", torch.tensor([1.0])),
                         ("two", torch.tensor([2], dtype=torch.int32)), ("bool_ok", None), ("int64_ok", None)):
        raw = _mask_tensors(names)
        if label == "bool_ok":
            raw = {k: v.bool() for k, v in raw.items()}
        elif label == "int64_ok":
            raw = {k: v.to(torch.int64).reshape(()) for k, v in raw.items()}
        else:
            raw[target] = value
        save_file(raw, str(masks / f"{label}.safetensors"))
    raw = _mask_tensors(names)
    del raw[names[-1]]
    save_file(raw, str(masks / "missing_key.safetensors"))
    save_file({**_mask_tensors(names), "not.a.tensor": torch.tensor([1], dtype=torch.uint8)},
              str(masks / "unknown_key.safetensors"))
    save_file({}, str(masks / "no_entries.safetensors"))

    # a derivative holding a LoRA in diffusers' old attention-processor naming, on a frozen layer
    frozen_k = next(n[: -len(".weight")] for i, n in enumerate(names) if n.endswith("attn1.to_k.weight") and i % 3 == 0)
    attn = frozen_k[: -len(".to_k")]
    out_f, in_f = load_file(str(good / UNET_FILE))[f"{frozen_k}.weight"].shape
    attn_lora = r / "attn_processor_lora.safetensors"
    save_file({f"{attn}.processor.to_k_lora.down.weight": torch.ones(2, in_f),
               f"{attn}.processor.to_k_lora.up.weight": torch.ones(out_f, 2)}, str(attn_lora))
    free_q = next(n[: -len(".weight")] for i, n in enumerate(names) if n.endswith("to_q.weight") and i % 3)
    free_lora = r / "attn_processor_free.safetensors"
    free_attn = free_q[: -len(".to_q")]
    out_f, in_f = load_file(str(good / UNET_FILE))[f"{free_q}.weight"].shape
    save_file({f"{free_attn}.processor.to_q_lora.down.weight": torch.ones(2, in_f),
               f"{free_attn}.processor.to_q_lora.up.weight": torch.ones(out_f, 2)}, str(free_lora))
    peft_lora = r / "peft_frozen.safetensors"
    save_file({f"base_model.model.{frozen_k}.lora_A.weight": torch.ones(2, in_f)}, str(peft_lora))
    (r / "deriv_bin").mkdir()
    (r / "deriv_bin" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04pickle")
    (r / "deriv_bin" / "ok.safetensors").write_bytes(free_lora.read_bytes())
    return {"root": r, "target": target, "frozen_k": frozen_k}


def cases(w) -> list[tuple[str, list[str], int, str, str]]:
    """(name, argv, exit code, 'stderr' | 'stdout', text): 'stderr': exactly one stderr line holding the text;
    'stdout': the verdict on stdout, nothing on stderr."""
    r = w["root"]
    good = str(r / "good")
    chk = ["mask", "check", "--release", good, "--derivative"]
    exp = ["mask", "export", good, "--format", "names", "--mask"]
    m = r / "masks"
    t = w["target"]
    return [
        # verify: what is no release of this tool
        ("verify: a release", ["verify", good], 0, "stdout", "OK"),
        ("verify: an IMMA release needs no mask", ["verify", str(r / "imma_release")], 0, "stdout", "imma release"),
        ("verify: manifest with only files", ["verify", str(r / "only_files")], 1, "stderr", "no 'method' key"),
        ("verify: files not a mapping", ["verify", str(r / "files_list")], 1, "stderr", "corrupt manifest.json"),
        ("verify: manifest not JSON", ["verify", str(r / "bad_json")], 1, "stderr", "corrupt manifest.json (not JSON)"),
        ("verify: manifest is a folder", ["verify", str(r / "manifest_dir")], 1, "stderr",
         "manifest.json is not a file"),
        ("verify: no manifest", ["verify", str(r / "no_manifest")], 1, "stderr", "no manifest.json"),
        ("verify: unknown method", ["verify", str(r / "unknown_method")], 1, "stderr", "'sorcery'"),
        ("verify: mask removed from folder and manifest", ["verify", str(r / "no_mask")], 1, "stderr",
         "lists no freeze_mask.safetensors"),
        ("verify: weight is a link out of the release", ["verify", str(r / "link_out")], 1, "stderr",
         "a symbolic link inside the release"),
        ("verify: any link inside", ["verify", str(r / "link_in")], 1, "stderr", "unet/copy.safetensors"),
        ("verify: a FIFO inside", ["verify", str(r / "fifo")], 1, "stderr", "not a regular file"),
        ("verify: changed file", ["verify", str(r / "changed")], 1, "stderr", "CHANGED vae/config.json"),
        ("verify: extra file a loader reads", ["verify", str(r / "extra")], 1, "stderr", "EXTRA notes.json"),
        ("verify: extra file in a component folder", ["verify", str(r / "extra_in_unet")], 1, "stderr",
         "EXTRA unet/notes.md"),
        ("verify: a model card and .gitattributes, not covered", ["verify", str(r / "card_added")], 0, "stdout",
         "NOT COVERED README.md"),
        ("verify --strict: files not covered fail", ["verify", str(r / "card_added"), "--strict"], 1, "stderr",
         "EXTRA .gitattributes"),
        ("verify: a hub cache snapshot", ["verify", str(r / "hub" / "models--me--release" / "snapshots" / "abc123")],
         0, "stdout", "OK"),
        ("verify: a hub cache snapshot, one weight changed",
         ["verify", str(r / "hub_changed" / "models--me--release" / "snapshots" / "abc123")], 1, "stderr",
         "CHANGED unet/diffusion_pytorch_model.safetensors"),
        ("verify: truncated weights, re-hashed", ["verify", str(r / "truncated")], 1, "stderr", UNET_FILE),
        ("verify: pickle named .safetensors, re-hashed", ["verify", str(r / "pickle_named_safetensors")], 1, "stderr",
         UNET_FILE),
        ("verify: a folder where a file is expected", ["verify", str(r / "folder_for_file")], 1, "stderr",
         "vae/diffusion_pytorch_model.safetensors"),
        ("verify: NaN weights, re-hashed", ["verify", str(r / "nan")], 1, "stderr", "NaN or inf"),
        ("verify: a pickled .bin, re-hashed", ["verify", str(r / "pickled_bin")], 1, "stderr", "pickled weight file"),
        ("verify: a malformed mask, re-hashed", ["verify", str(r / "bad_release_mask")], 1, "stderr",
         "its mask does not pass"),
        ("verify: no such folder", ["verify", str(r / "nope")], 2, "stderr", "no such folder"),
        ("verify: a file", ["verify", str(r / "outside.safetensors")], 2, "stderr", "not a folder"),
        # mask check: only a release that verifies
        ("check: release fails verify", chk + [good, "--release", str(r / "changed")], 1, "stderr",
         "does not pass `immunize-cli verify`"),
        ("check: release without its mask", chk + [good, "--release", str(r / "no_mask")], 1, "stderr",
         "does not pass `immunize-cli verify`"),
        ("check: attn-processor LoRA on a frozen layer", chk + [str(r / "attn_processor_lora.safetensors")], 1,
         "stdout", "NOT compliant"),
        ("check: attn-processor LoRA on a free layer", chk + [str(r / "attn_processor_free.safetensors")], 0,
         "stdout", "compliant"),
        ("check: peft-named LoRA on a frozen layer", chk + [str(r / "peft_frozen.safetensors")], 1, "stdout",
         "NOT compliant"),
        ("check: a pickled LoRA beside a good one", chk + [str(r / "deriv_bin")], 1, "stdout", "cannot be checked"),
        # one strict mask reader
        *[(f"check: mask entry {label}", chk + [good, "--mask", str(m / f"{label}.safetensors")], 2, "stderr", text)
          for label, text in (("list", f"entry {t!r} holds 3 values"), ("fraction", f"entry {t!r} has dtype f32"),
                              ("nan", f"entry {t!r} has dtype f32"), ("minus_one", f"entry {t!r} is -1"),
                              ("empty", f"entry {t!r} holds 0 values"), ("float_one", "has dtype f32"),
                              ("two", "is 2"), ("missing_key", "1 missing"), ("unknown_key", "1 unknown"),
                              ("no_entries", "holds no entries"))],
        *[(f"export: mask entry {label}", exp + [str(m / f"{label}.safetensors")], 2, "stderr", text)
          for label, text in (("list", "holds 3 values"), ("nan", "has dtype f32"), ("empty", "holds 0 values"),
                              ("minus_one", "is -1"))],
        ("check: bool mask is read", chk + [good, "--mask", str(m / "bool_ok.safetensors")], 0, "stdout", "compliant"),
        ("check: int64 scalar mask is read", chk + [good, "--mask", str(m / "int64_ok.safetensors")], 0, "stdout",
         "compliant"),
    ]


def test_verify_and_mask_check_table(world):
    table = cases(world)
    assert len(table) >= 18
    runner = CliRunner()
    failures = []
    for name, argv, code, stream, expect in table:
        before = tree_hash(world["root"])
        res = runner.invoke(app, argv)
        unchanged = tree_hash(world["root"]) == before
        lines = res.stderr.strip().splitlines()
        said = " ".join(res.stdout.split())
        ok = res.exit_code == code and "Traceback" not in res.output + res.stderr and unchanged
        if stream == "stderr":
            ok = ok and len(lines) == 1 and expect in lines[0] and len(lines[0]) <= 420
        else:
            ok = ok and not lines and expect in said
        if not ok:
            failures.append((name, res.exit_code, res.stderr[-300:] or said[-300:], unchanged))
    assert not failures, failures


def test_an_unreadable_file_is_one_line_naming_it(world, monkeypatch):
    """Tests run as root, where chmod 000 does not stop a read: the read itself is made to fail."""
    import raystack.atomic as atomic

    real = atomic.sha256_file

    def denied(path):
        if str(path).endswith("vae/config.json"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    import raystack.mask_tools as mask_tools
    import raystack.verification as verification

    for module in (verification, mask_tools):  # verify and mask check hash each file with it
        monkeypatch.setattr(module, "sha256_file", denied)
    for argv in (["verify", str(world["root"] / "good")],
                 ["mask", "check", "--release", str(world["root"] / "good"), "--derivative",
                  str(world["root"] / "good")]):
        res = CliRunner().invoke(app, argv)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 1 and len(lines) == 1, res.output + res.stderr
        assert "vae/config.json cannot be read (Permission denied)" in lines[0]


def test_verify_lists_each_problem_on_stdout(world):
    res = CliRunner().invoke(app, ["verify", str(world["root"] / "extra")])
    assert res.exit_code == 1 and "EXTRA notes.json" in res.stdout
    res = CliRunner().invoke(app, ["verify", str(world["root"] / "nan")])
    assert res.exit_code == 1 and "NOT FINITE unet/diffusion_pytorch_model.safetensors" in " ".join(res.stdout.split())


def test_a_release_harden_writes_verifies_and_checks(tmp_path):
    """The manifest `harden` really writes (a Random-rho release, run in this process: no Ray) passes `verify`,
    and `mask check` of the release against itself complies; its mask removed, it does not verify."""
    from raystack.hardening.driver import run_harden
    from raystack.hardening.spec import HardenSpec

    out = tmp_path / "release"
    run_harden(HardenSpec(method="random-freeze", rho=0.3, out=out), in_this_process=True)
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0 and "random-freeze release" in res.stdout, res.output + res.stderr
    res = CliRunner().invoke(app, ["mask", "check", "--release", str(out), "--derivative", str(out)])
    assert res.exit_code == 0 and "release verified" in " ".join(res.stdout.split()), res.output + res.stderr
    (out / "freeze_mask.safetensors").unlink()
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 1 and "MISSING freeze_mask.safetensors" in res.stdout
