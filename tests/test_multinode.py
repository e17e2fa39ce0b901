"""Two Ray nodes that share no disk (the second in its own mount namespace, see ray_nodes.py), a local S3, and
jobs whose inputs, checkpoints and outputs live in the bucket: the release equals the one-node local-disk run, a
killed worker on the second node and a SIGKILLed driver both finish from the S3 checkpoint (issue 38)."""

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_nodes import can_unshare, processes_in, start_head, start_private_node, stop

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -m (a private mount namespace)")]
ROOT = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).parent / "immunize-cli")]
STEPS, EVERY = 8, 2


def _env(base: dict, **extra) -> dict:
    env = {**os.environ, **base, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONWARNINGS": "ignore", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def world(s3_server, tmp_path_factory):
    """The bucket with the tiny model and a target folder in it; the same folder on this disk; a head (1 CPU)
    and a second node (1 CPU) that sees neither the head's files nor this test's, so a 2-worker job puts one
    worker on each. Yields a dict of what the tests need."""
    import uuid

    import boto3

    from raystack.models.pipeline_io import default_model_path
    from raystack.storage import upload_release
    from raystack.tinyworld.folder import write_concept_folder

    work = tmp_path_factory.mktemp("multinode")
    bucket = f"mn-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as mp:  # this process reaches the local S3 as the commands do
        for k, v in s3_server.items():
            mp.setenv(k, v)
        boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        upload_release(default_model_path(), f"s3://{bucket}/models/tiny")
        write_concept_folder(work / "target", ["circle", "square"], ["red", "blue"], ["sunset"], 2, 1, None, False)
        upload_release(work / "target", f"s3://{bucket}/data/target")
        write_concept_folder(work / "legal", ["square"], ["blue"], ["plain"], 2, 1, None, False)
        upload_release(work / "legal", f"s3://{bucket}/data/legal")
        write_concept_folder(work / "attacker", ["circle", "square"], None, ["sunset"], 1, 3, None, False)
        upload_release(work / "attacker", f"s3://{bucket}/data/attacker")
        yield from _nodes(s3_server, work, bucket, Path(tmp_path_factory.getbasetemp()))


def _nodes(s3_server, work: Path, bucket: str, basetemp: Path):
    token = secrets.token_hex(32)
    env = _env(s3_server, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, IMMUNIZE_CACHE=str(work / "cache"))
    rng = random.Random(os.getpid())
    head, gcs, _, head_temp = start_head(env, rng, num_cpus=1, dashboard=False)
    try:
        # the second node: its own cache, and a fresh tmpfs over the head's temp folder and this test's folders
        # its cache at another path than the driver's: nothing may name a node's own copy to another machine
        node, namespace = start_private_node({**env, "IMMUNIZE_CACHE": str(work / "node2-cache")}, gcs,
                                             [head_temp, basetemp], rng)
        try:
            yield {"env": env, "bucket": bucket, "address": f"127.0.0.1:{gcs}", "namespace": namespace,
                   "work": work, "s3": s3_server}
        finally:
            stop(node)
    finally:
        stop(head)


def _objects(world, prefix: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=world["s3"]["AWS_ENDPOINT_URL"])
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=world["bucket"], Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=world["bucket"], Key=o["Key"])["Body"].read()
    return out


def _registered(world, run_prefix: str) -> bool:
    """Ray Train's list of the run's checkpoints in the bucket names one: a restart or resume starts there."""
    snap = _objects(world, f"{run_prefix}/harden/checkpoint_manager_snapshot.json")
    return any(b"checkpoint_" in v for v in snap.values())


def _unet_from_bucket(world, prefix: str) -> dict:
    from safetensors.torch import load

    return load(_objects(world, f"{prefix}/unet/diffusion_pytorch_model.safetensors")
                [f"{prefix}/unet/diffusion_pytorch_model.safetensors"])


def _unet_local(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def _unet_mask(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "freeze_mask.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _flags(method_flags: list[str]) -> list[str]:
    return ["harden", *method_flags, "--workers", "2", "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
            "--batch-size", "2", "--seed", "7"]


def _reference(world, method_flags, name) -> Path:
    """The same job on one machine's local disk (an embedded Ray, local inputs)."""
    out = world["work"] / name
    env = {k: v for k, v in world["env"].items() if k not in ("RAY_AUTH_TOKEN",)}
    res = subprocess.run(CLI + _flags(method_flags) + ["--target", str(world["work"] / "target"), "--legal",
                                                       str(world["work"] / "legal"), "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def _on_cluster(world, method_flags, prefix, *extra) -> list[str]:
    b = world["bucket"]
    return CLI + _flags(method_flags) + ["--cluster", world["address"], "--model", f"s3://{b}/models/tiny",
                                         "--target", f"s3://{b}/data/target", "--legal", f"s3://{b}/data/legal",
                                         "--out", f"s3://{b}/{prefix}", *extra]


def _wait(world, proc, prefix: str, second_node_worker: list) -> None:
    """Until the run's first checkpoint is registered in the bucket, noting the second node's train workers."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        second_node_worker[:] = second_node_worker or processes_in(world["namespace"], "ray::RayTrainWorker")
        if second_node_worker and _registered(world, f"{prefix}.run"):
            return
        time.sleep(0.3)
    out = proc.stdout.read() if proc.stdout and proc.poll() is not None else ""
    pytest.fail(f"no registered checkpoint with a worker on the second node (rc {proc.poll()}): {out[-2000:]}")


def test_imma_zero2_on_two_nodes_equals_one_node_and_a_killed_worker_restarts_from_s3(world):
    method = ["--method", "imma", "--against", "lora", "--zero-stage", "2"]
    ref = _reference(world, method, "imma-ref")
    prefix = "rel/imma"
    proc = subprocess.Popen(_on_cluster(world, method, prefix, "--max-failures", "1"), cwd=ROOT, env=world["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        worker: list = []
        _wait(world, proc, prefix, worker)
        os.kill(worker[0], signal.SIGKILL)  # the second node's worker: lost mid-run
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    manifest = json.loads(_objects(world, f"{prefix}/manifest.json")[f"{prefix}/manifest.json"])
    assert manifest["resumed_from"] is not None and manifest["resumed_from"]["step"] >= EVERY, manifest["resumed_from"]
    assert _max_diff(_unet_local(ref), _unet_from_bucket(world, prefix)) <= 1e-6
    assert not _objects(world, f"{prefix}.run/"), "the finished run's checkpoints were left in the bucket"


def test_freezeasguard_zero3_on_two_nodes_resumes_a_killed_driver_from_s3_and_verify_reads_the_bucket(world):
    method = ["--method", "freezeasguard", "--rho", "0.3", "--zero-stage", "3"]
    ref = _reference(world, method, "fag-ref")
    prefix = "rel/fag"
    proc = subprocess.Popen(_on_cluster(world, method, prefix), cwd=ROOT, env=world["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait(world, proc, prefix, [])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its job: the workers on both nodes go with it
        proc.wait(timeout=60)
    assert not _objects(world, f"{prefix}/manifest.json"), "a killed run published a release"
    res = subprocess.run(_on_cluster(world, method, prefix, "--resume"), cwd=ROOT, env=world["env"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    manifest = json.loads(_objects(world, f"{prefix}/manifest.json")[f"{prefix}/manifest.json"])
    assert manifest["resumed_from"] is not None and manifest["resumed_from"]["step"] >= EVERY, manifest["resumed_from"]
    assert _max_diff(_unet_local(ref), _unet_from_bucket(world, prefix)) <= 1e-6
    mask_key = f"{prefix}/freeze_mask.safetensors"
    from safetensors.torch import load

    assert _max_diff(load(_objects(world, mask_key)[mask_key]), _unet_mask(ref)) == 0  # the same learned mask

    uri = f"s3://{world['bucket']}/{prefix}"
    ok = subprocess.run(CLI + ["verify", uri], cwd=ROOT, env=world["env"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    import boto3

    boto3.client("s3", endpoint_url=world["s3"]["AWS_ENDPOINT_URL"]).put_object(
        Bucket=world["bucket"], Key=mask_key, Body=_objects(world, mask_key)[mask_key] + b"\0")
    bad = subprocess.run(CLI + ["verify", uri], cwd=ROOT, env=world["env"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "freeze_mask.safetensors" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def _run_sweep_on_both_nodes(world, cmd: list[str]) -> None:
    """Run a sweep command to its end (rc 0), checking that a trial process ran on the second node."""
    proc = subprocess.Popen(cmd, cwd=world["work"], env=world["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen_there = False
    try:
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            seen_there = seen_there or bool(processes_in(world["namespace"], "ray::ImplicitFunc"))
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert seen_there, "no trial ran on the second node"


def test_redteam_trials_on_both_nodes_write_every_attack_and_the_report_to_s3(world):
    """Two trials at once, one per node: each writes its attack from its own node, the driver re-scores the
    winner from the bucket, and redteam.json goes up last; nothing is left on this machine's disk."""
    b = world["bucket"]
    cmd = CLI + ["redteam", "--space", str(ROOT / "attack_spaces" / "tiny_4.yaml"), "--set", "samples=2",
                 "--model", f"original=s3://{b}/models/tiny", "--data", f"s3://{b}/data/attacker",
                 "--target", "sunset", "--out", f"s3://{b}/rt", "--cluster", world["address"], "--max-concurrent", "2"]
    _run_sweep_on_both_nodes(world, cmd)
    objects = _objects(world, "rt/")
    report = json.loads(objects["rt/redteam.json"])
    trials = report["models"]["original"]["trials"]
    assert len(trials) == 2 and report["models"]["original"]["model"] == f"s3://{b}/models/tiny"
    for t in trials:  # every finished trial's attack is in the bucket, where the report says
        if t["status"] == "done":
            assert f"rt/{t['attack_dir']}/attack.json" in objects, (t["attack_dir"], sorted(objects)[:20])
    assert any(k.startswith("rt/reference/original/") and k.endswith("attack.json") for k in objects)
    assert any(k.startswith("rt/tune/") for k in objects), "Tune's state is not in the bucket"
    assert ".immunize-upload-incomplete" not in " ".join(objects)
    assert sorted(p.name for p in world["work"].iterdir() if p.name == "rt" or p.name.startswith("s3")) == []


def test_tune_trials_on_both_nodes_write_their_folders_and_the_results_to_s3(world):
    """A 2-trial sweep, one trial per node, the model from the bucket: the data the sweep generates go up first,
    each trial's folder (hardened model, attacks) goes up from its node, results.json last."""
    b = world["bucket"]
    cmd = CLI + ["tune", "--space", str(ROOT / "tune_spaces" / "tiny_rho_4.yaml"), "--set", "search.rho.grid=[0.3, 0.5]",
                 "--set", f"harden.model=s3://{b}/models/tiny", "--out", f"s3://{b}/tune", "--cluster",
                 world["address"], "--max-concurrent", "2"]
    _run_sweep_on_both_nodes(world, cmd)
    objects = _objects(world, "tune/")
    results = json.loads(objects["tune/results.json"])
    assert len(results["trials"]) == 2 and all(t["status"] == "done" for t in results["trials"])
    for role in ("target", "legal", "attacker"):
        assert f"tune/data/{role}/metadata.jsonl" in objects
    hardened = [k for k in objects if k.startswith("tune/trials/") and k.endswith("hardened/manifest.json")]
    assert len(hardened) == 2, sorted(objects)[:30]
    assert f"s3://{b}/tune/data/target" in objects["tune/best.yaml"].decode()  # best.yaml runs on any machine
    assert ".immunize-upload-incomplete" not in " ".join(objects)
