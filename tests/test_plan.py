"""`immunize-cli plan`: per-rank memory counted from the headers and a meta-device forward, before a run."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.main import app


def _spec(**kw):
    from pathlib import Path

    from raystack.hardening.spec import HardenSpec

    return HardenSpec(**{"method": "imma", "target": [Path(".")], **kw})


def test_plan_counts_the_parameters_the_run_trains(tiny_model_path):
    from raystack.attacks.methods import make_adaptation
    from raystack.attacks.spec import AttackSpec
    from raystack.hardening.imma import select_outer_params
    from raystack.models.pipeline_io import load_pipeline
    from raystack.planning import header_shapes, lora_params, plan_harden

    p = plan_harden(_spec(zero_stage=0))
    lines = {x.what: x.bytes for x in p["phases"]["imma"]}
    pipe = load_pipeline(None)
    n_s = sum(t.numel() for t in select_outer_params(pipe.unet, ["attn2"]).values())
    assert lines["IMMA's S: gradients"] == 4 * n_s and lines["IMMA's S: Adam moments"] == 8 * n_s
    assert sum(x.bytes for x in p["weights"]) == 4 * sum(t.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                                                        for t in m.state_dict().values() if t.is_floating_point())
    ad = make_adaptation(AttackSpec(method="lora", data=".", rank=8), pipe)
    phi = sum(t.numel() for t in ad.parameters())
    assert lora_params(header_shapes(tiny_model_path / "unet"), AttackSpec(method="lora", data=".", rank=8)) == phi


def test_zero_stage_and_workers_partition_the_optimizer_state():
    from raystack.planning import plan_harden

    def moments(**kw):
        return next(x.bytes for x in plan_harden(_spec(**kw))["phases"]["imma"] if x.what == "IMMA's S: Adam moments")

    assert moments(zero_stage=2, workers=2) * 2 == moments(zero_stage=0, workers=2) == moments(zero_stage=2, workers=1)


def test_activations_are_counted_and_grow_with_batch_and_what_trains(tiny_model_path):
    from raystack.planning import activation_bytes

    one = activation_bytes(tiny_model_path, 1, 32, "attention")
    four = activation_bytes(tiny_model_path, 4, 32, "attention")
    assert one > 0 and four == pytest.approx(4 * one, rel=0.05)
    assert activation_bytes(tiny_model_path, 1, 32, "all") > one > activation_bytes(tiny_model_path, 1, 32, "attn2") > 0


def test_plan_command_prints_the_peak(tmp_path):
    from raystack.models.shapes import build_pipeline_folder

    res = CliRunner().invoke(app, ["plan", "--method", "freezeasguard", "--legal", str(tmp_path), "--workers", "2"])
    assert res.exit_code == 0 and "peak per rank" in res.stdout, res.stdout + res.stderr
    assert "activations" in res.stdout  # (rich wraps the label by the column widths)
    sdxl = build_pipeline_folder("sdxl", tmp_path / "sdxl")
    res = CliRunner().invoke(app, ["plan", "--method", "imma", "--model", str(sdxl), "--against", "full"])
    assert res.exit_code == 0 and "text_encoder_2" in res.stdout, res.stdout + res.stderr


def test_freezeasguard_second_copy_is_partitioned_only_under_zero3():
    from raystack.planning import plan_harden

    def line(what, **kw):
        spec = _spec(method="freezeasguard", legal=".", **kw)
        return next(x.bytes for x in plan_harden(spec)["phases"]["freezeasguard"] if x.what.startswith(what))

    whole = line("θ_d", zero_stage=0, workers=2)
    assert line("θ_d", zero_stage=2, workers=2) == whole == line("θ_d", zero_stage=3, workers=1)
    assert line("θ_d", zero_stage=3, workers=2) * 2 == whole
    adam = line("preparation", zero_stage=0, workers=2)
    assert line("preparation", zero_stage=1, workers=2) * 2 == adam == line("preparation", zero_stage=1, workers=1)


def test_imma_vs_full_attacker_moments_are_partitioned_from_zero1():
    from raystack.planning import plan_harden

    def attacker(**kw):
        lines = plan_harden(_spec(against="full", **kw))["phases"]["imma"]
        return next(x.bytes for x in lines if x.what.startswith("simulated attacker"))

    whole = attacker(zero_stage=0, workers=2)  # gradient + AdamW's two moments over the UNet
    assert attacker(zero_stage=1, workers=1) == whole
    assert attacker(zero_stage=2, workers=2) == whole * 2 // 3  # the gradient whole, the moments halved


def test_a_gpu_run_counts_the_context_buckets_nccl_and_allocator_slack():
    """Issue 41 item 4: on a GPU a rank also holds the CUDA context, DeepSpeed's reduce/all-gather buckets, NCCL's
    buffers and the allocator's slack; the buckets are sized to the engine (DeepSpeed's default 5e8 elements is a
    1.86 GiB fp32 buffer even for FreezeAsGuard's few hundred mask logits) and the engine gets the same size."""
    from raystack.hardening.engine import DS_DEFAULT_BUCKET, bucket_elements, ds_config
    from raystack.planning import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, NCCL_BYTES, plan_harden

    cpu = plan_harden(_spec(zero_stage=2, workers=2))
    gpu = plan_harden(_spec(zero_stage=2, workers=2, use_gpu=True))
    buckets = [x for x in gpu["phases"]["imma"] if "buckets" in x.what]
    assert not cpu["gpu"] and len(buckets) == 1 and buckets[0].bytes < DS_DEFAULT_BUCKET * 4
    extra = {x.what: x.bytes for x in gpu["gpu"]}
    assert extra["CUDA context"] == CUDA_CONTEXT_BYTES and extra["NCCL buffers"] == NCCL_BYTES
    counted = cpu["peak"] + buckets[0].bytes
    assert extra["allocator slack"] == int(ALLOCATOR_SLACK * counted)
    assert gpu["peak"] == counted + sum(extra.values())
    one = plan_harden(_spec(zero_stage=0, workers=1, use_gpu=True))
    assert "NCCL buffers" not in {x.what for x in one["gpu"]}  # one worker: no NCCL ring
    spec = _spec(zero_stage=2)
    cfg = ds_config(spec, 700)["zero_optimization"]
    assert cfg["reduce_bucket_size"] == cfg["allgather_bucket_size"] == bucket_elements(700) == 700
    assert bucket_elements(10**10) == DS_DEFAULT_BUCKET
