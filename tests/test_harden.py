"""harden end to end: every method as a 2-worker ZeRO Ray Train job on the tiny world."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from raystack.errors import UserError
from raystack.freeze_mask import load_freeze_mask
from raystack.hardening.driver import run_harden
from raystack.hardening.spec import HardenSpec
from raystack.tinyworld.folder import write_concept_folder, write_emblem_folder

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden")
    write_concept_folder(root / "target", ["circle", "square"], ["red", "blue"], ["sunset"], 2, 1, None, False)
    write_concept_folder(root / "legal", ["cross"], ["green", "yellow"], ["striped", "dotted"], 1, 2, None, False)
    write_emblem_folder(root / "emblem", "emblem1", 4, 3, "a photo of zxq emblem", False)
    return root


def _spec(tmp_path, data, **kw):
    base = dict(target=[data / "target"], legal=data / "legal", out=tmp_path / "out", workers=2, zero_stage=2,
                steps=2, checkpoint_every=1, batch_size=2, user_steps=1, finetune_steps=2)
    base.update(kw)
    return HardenSpec(**base)


def _check_release(out, tiny_model_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    img = pipe("a red circle in plain style", num_inference_steps=3, output_type="np").images
    assert np.isfinite(img).all()
    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib

    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    return pipe, manifest


@pytest.mark.parametrize("method, against, extra", [
    ("imma", "lora", {}),  # IMMA vs DreamBooth: test_imma_vs_dreambooth_..., which checks its release too
    ("freezeasguard", "lora", {"rho": 0.3}),
    ("random-freeze", "lora", {"rho": 0.3}),
])
def test_two_worker_zero2_release_loads(method, against, extra, data, tmp_path, tiny_model_path, tiny_pipe,
                                        ray_session):
    keep = method == "random-freeze"  # the run folder stays only when asked for
    spec = _spec(tmp_path, data, method=method, against=against, keep_run=keep, **extra)
    manifest = run_harden(spec)
    pipe, manifest = _check_release(spec.out, tiny_model_path)
    run_dir = spec.out.parent / f"{spec.out.name}.run"
    assert run_dir.exists() == keep and (not keep or any(run_dir.rglob("checkpoint_*")))
    assert manifest["world_size"] == spec.workers == 2  # every method, random-freeze too, runs on both workers
    names = [n for n, _ in tiny_pipe.unet.named_parameters()]
    if method in ("freezeasguard", "random-freeze"):
        mask = load_freeze_mask(spec.out / "freeze_mask.safetensors", names)
        assert set(mask) == set(names)
        assert abs(sum(mask.values()) / len(names) - spec.rho) <= 0.02
        with safe_open(str(spec.out / "freeze_mask.safetensors"), "pt") as f:
            assert abs(float(f.metadata()["frozen_ratio"]) - spec.rho) <= 0.02
        # FreezeAsGuard releases the original weights, unchanged: the source's own files, copied, never re-saved
        before, after = tiny_pipe.unet.state_dict(), pipe.unet.state_dict()
        assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)
        for c in ("unet", "vae", "text_encoder"):
            for f in (tiny_model_path / c).glob("*.safetensors"):
                assert (spec.out / c / f.name).read_bytes() == f.read_bytes()
    else:
        changed = manifest["changed_tensors"]
        assert changed and all(c in names for c in changed)
        if against == "lora":
            assert all(".attn2." in c for c in changed)
        before, after = tiny_pipe.unet.state_dict(), pipe.unet.state_dict()
        assert any(not np.array_equal(before[c].numpy(), after[c].numpy()) for c in changed)
        untouched = [k for k in before if k not in changed]
        assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in untouched)


def test_textual_inversion_against_emblem_with_defender_token(data, tmp_path, ray_session):
    spec = _spec(tmp_path, data, method="imma", against="textual-inversion", target=[data / "emblem"],
                 token="zxq", workers=1, zero_stage=1)
    run_harden(spec)
    pipe, _ = _check_release(spec.out, None)
    assert not (spec.out.parent / f"{spec.out.name}.run").exists()  # removed after success by default
    assert "<zxq>" not in pipe.tokenizer.get_vocab()  # the simulation's token is not released


def test_zero3_refused_for_imma_with_reason(data, tmp_path):
    with pytest.raises(UserError, match="ZeRO-3 partitions"):
        run_harden(_spec(tmp_path, data, method="imma", zero_stage=3))


@pytest.mark.parametrize("method, extra", [("imma", {"against": "lora"}), ("freezeasguard", {"rho": 0.3})])
def test_a_tune_trial_hardens_in_its_own_process_with_the_train_jobs_result(method, extra, data, tmp_path,
                                                                              ray_session):
    """Tune trials of one-worker jobs skip the Ray Train group (worker.run_in_this_process): the release must be
    the one a one-worker Ray Train job makes, tensor for tensor, mask for mask."""
    from raystack.models.pipeline_io import load_pipeline

    train = _spec(tmp_path, data, method=method, workers=1, out=tmp_path / "train", **extra)
    direct = _spec(tmp_path, data, method=method, workers=1, out=tmp_path / "direct", **extra)
    m_train, m_direct = run_harden(train), run_harden(direct, in_this_process=True)
    assert m_direct["changed_tensors"] == m_train["changed_tensors"]
    assert m_direct["world_size"] == m_train["world_size"] == 1
    assert not (tmp_path / "direct.run").exists()
    a, b = load_pipeline(train.out).unet.state_dict(), load_pipeline(direct.out).unet.state_dict()
    assert all(torch_equal(a[k], b[k]) for k in a), [k for k in a if not torch_equal(a[k], b[k])][:3]
    if method == "freezeasguard":
        names = list(a)
        assert load_freeze_mask(train.out / "freeze_mask.safetensors", names) == \
            load_freeze_mask(direct.out / "freeze_mask.safetensors", names)


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.allclose(x, y, rtol=0, atol=1e-6))


def test_freezeasguard_zero3_partitions_its_second_copy_and_resumes_to_zero0s_mask(data, tmp_path, ray_session):
    """Under ZeRO-3 each rank keeps half of θ_d (raystack/hardening/sharded.py): the step-2 checkpoint (θ_d
    gathered on rank 0) and the released mask must be ZeRO-0's, with a worker killed at step 3 on the way."""
    from raystack.checkpoint import load_tensors
    from raystack.hardening.driver import run_dir_for

    def ckpt(spec):
        states = [load_tensors(c / "state.safetensors") for c in (run_dir_for(spec) / "harden").glob("checkpoint_*")
                  if (c / "state.safetensors").exists()]
        [step2] = [t for t, meta in states if meta.get("step") == 2 and meta.get("phase_index") == 0]
        return step2

    kw = dict(method="freezeasguard", rho=0.3, steps=3, checkpoint_every=2, keep_run=True, seed=5)
    zero0 = _spec(tmp_path, data, zero_stage=0, out=tmp_path / "zero0", **kw)
    zero3 = _spec(tmp_path, data, zero_stage=3, out=tmp_path / "zero3", max_failures=1, **kw)
    run_harden(zero0)
    marker = tmp_path / "fault-fired"
    manifest = run_harden(zero3, fault_injection={"rank": 1, "step": 3, "delay": 3, "marker": str(marker)})
    assert marker.exists() and manifest["resumed_from"] == {"phase": "freezeasguard", "step": 2}
    a, b = ckpt(zero0), ckpt(zero3)
    assert any(k.startswith("state/theta_d/") for k in a) and a.keys() == b.keys()
    # to rounding (Eq. 8's inner products are summed in another order); DeepSpeed's ZeRO-3 replacement of
    # F.linear, which our engine config turns off, had moved θ_d by ~1e-4 through the preparation's Adam
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a if k.startswith(("state/theta_", "state/mask/"))}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-6, (worst, diffs[worst])
    names = [n for n in a if n.startswith("state/theta_m/")]
    names = [n[len("state/theta_m/"):] for n in names]
    assert load_freeze_mask(zero0.out / "freeze_mask.safetensors", names) == \
        load_freeze_mask(zero3.out / "freeze_mask.safetensors", names)


def test_imma_vs_dreambooth_with_partitioned_attacker_moments_releases_zero0s_weights(data, tmp_path, tiny_model_path,
                                                                                    tiny_pipe, ray_session):
    """From ZeRO-1 on, the simulated dense attacker's AdamW moments (two UNets) are split across the ranks
    (torch's ZeroRedundancyOptimizer); each rank steps its share and broadcasts it, so the release is ZeRO-0's.
    DreamBooth's φ is the UNet itself: Alg. 1's line 7 writes the attacker's steps into θ, so the release names
    every tensor it changed, S among them, and leaves the rest bit for bit."""
    kw = dict(method="imma", against="dreambooth", params="attn2.to_k,attn2.to_v", steps=2, inner_steps=2, seed=2)
    zero0 = run_harden(_spec(tmp_path, data, zero_stage=0, out=tmp_path / "zero0", **kw))
    zero2 = run_harden(_spec(tmp_path, data, zero_stage=2, out=tmp_path / "zero2", **kw))
    assert zero0["changed_tensors"] == zero2["changed_tensors"] and zero2["world_size"] == 2
    pipe, _ = _check_release(tmp_path / "zero2", tiny_model_path)
    from raystack.models.pipeline_io import load_pipeline

    a, b = load_pipeline(tmp_path / "zero0").unet.state_dict(), pipe.unet.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    changed, before = zero2["changed_tensors"], tiny_pipe.unet.state_dict()
    s_names = [k for k in before if ".attn2.to_k." in k or ".attn2.to_v." in k]
    assert set(s_names) <= set(changed) <= set(before)
    assert any(not np.array_equal(before[c].numpy(), b[c].numpy()) for c in s_names)
    assert all(np.array_equal(before[k].numpy(), b[k].numpy()) for k in before if k not in changed)


def test_a_mask_only_release_is_copied_only_from_a_plain_safetensors_folder(tmp_path, tiny_model_path, tiny_pipe):
    import shutil

    from raystack.hardening.driver import copyable_release

    names = [n for n, _ in tiny_pipe.unet.named_parameters()]
    mask = {n: i % 3 == 0 for i, n in enumerate(names)}
    assert sorted(copyable_release(tiny_model_path, {}, mask)) == sorted(names)
    assert copyable_release(tiny_model_path, {names[0]: None}, mask) is None  # a changed tensor: loaded, saved
    assert copyable_release(tiny_model_path, {}, dict(list(mask.items())[1:])) is None
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_path, pickled)
    (pickled / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not copied")
    assert copyable_release(pickled, {}, mask) is None
    variant = tmp_path / "variant"  # a second, variant weights file save_pretrained would not write
    shutil.copytree(tiny_model_path, variant)
    shutil.copy(variant / "vae" / "diffusion_pytorch_model.safetensors", variant / "vae" / "x.fp16.safetensors")
    assert copyable_release(variant, {}, mask) is None
