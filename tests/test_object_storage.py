"""Object storage (issue 38): releases written to and read from a local S3 (moto's server, reached as AWS is),
inputs fetched into a content-addressed cache, and every bad URI one line with nothing created anywhere."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from raystack import storage
from raystack.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.main"]


def _objects(env, bucket) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _put_object(env, bucket, key, body: bytes) -> None:
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).put_object(Bucket=bucket, Key=key, Body=body)


def test_only_known_schemes_are_uris():
    assert storage.is_uri("s3://b/x") and storage.is_uri("foo://x") and not storage.is_uri("s3:/x")
    assert storage.check_uri("s3://b/x/", "--out") == "s3://b/x"
    with pytest.raises(UserError, match=r"--out foo://x: unknown storage scheme foo://"):
        storage.check_uri("foo://x", "--out")


def test_preflight_refuses_what_it_cannot_write_and_leaves_nothing(s3):
    env, bucket = s3
    with pytest.raises(UserError, match="the bucket nope-missing does not exist"):
        storage.preflight_output("s3://nope-missing/rel", "--out", overwrite=False)
    with pytest.raises(UserError, match="a bucket's root"):
        storage.preflight_output(f"s3://{bucket}", "--out", overwrite=False)
    storage.preflight_output(f"s3://{bucket}/rel", "--out", overwrite=False)
    assert list(_objects(env, bucket)) == ["rel/.immunize-upload-incomplete"]  # the write check, until the upload
    storage.preflight_output(f"s3://{bucket}/rel", "--out", overwrite=False)  # an unfinished upload's marker only
    _put_object(env, bucket, "rel/old.txt", b"old")
    with pytest.raises(UserError, match="already holds objects; pass --overwrite"):
        storage.preflight_output(f"s3://{bucket}/rel", "--out", overwrite=False)
    storage.preflight_output(f"s3://{bucket}/rel", "--out", overwrite=True)
    assert sorted(_objects(env, bucket)) == ["rel/.immunize-upload-incomplete", "rel/old.txt"]


def test_upload_writes_the_manifest_last_and_replaces_the_old_release(s3, tmp_path, monkeypatch):
    env, bucket = s3
    _put_object(env, bucket, "rel/stale.txt", b"stale")
    _put_object(env, bucket, "rel/manifest.json", b"{}")
    storage.preflight_output(f"s3://{bucket}/rel", "--out", overwrite=True)
    local = tmp_path / "release"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "w.safetensors").write_bytes(b"w" * 1000)
    (local / "manifest.json").write_text(json.dumps({"files": 1}))
    (local / "z_last_by_name.txt").write_text("z")
    order = []
    real_put = storage._put
    monkeypatch.setattr(storage, "_put", lambda fs, src, dest: (order.append(dest.rsplit("/rel/", 1)[1]),
                                                                real_put(fs, src, dest)))
    names = storage.upload_release(local, f"s3://{bucket}/rel", replace=True)
    assert order[-1] == "manifest.json" and sorted(order) == sorted(names) == \
        ["manifest.json", "unet/w.safetensors", "z_last_by_name.txt"]
    got = _objects(env, bucket)
    # the stale object and the unfinished-upload marker are gone (pyarrow may keep an empty `rel/` folder object)
    assert set(got) - {"rel/"} == {"rel/manifest.json", "rel/unet/w.safetensors", "rel/z_last_by_name.txt"}
    assert got["rel/unet/w.safetensors"] == b"w" * 1000


def test_fetch_caches_by_content_and_fetches_a_changed_object_again(s3, tmp_path, monkeypatch):
    env, bucket = s3
    monkeypatch.setenv("IMMUNIZE_CACHE", str(tmp_path / "cache"))
    _put_object(env, bucket, "data/metadata.jsonl", b'{"file_name": "a.png", "text": "a"}\n')
    _put_object(env, bucket, "data/a.png", b"png-bytes")
    results = []
    threads = [threading.Thread(target=lambda: results.append(storage.fetch(f"s3://{bucket}/data", "--target")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1  # three callers at once: one copy
    first = results[0]
    assert (first / "a.png").read_bytes() == b"png-bytes" and first.name == "data"
    assert len([p for p in (tmp_path / "cache" / "objects").iterdir() if p.is_dir()]) == 1
    _put_object(env, bucket, "data/a.png", b"changed-png")
    again = storage.fetch(f"s3://{bucket}/data", "--target")
    assert again != first and (again / "a.png").read_bytes() == b"changed-png"
    (again / "a.png").write_bytes(b"tampered in the cache")  # a cached copy that no longer is the bucket's
    assert (storage.fetch(f"s3://{bucket}/data", "--target") / "a.png").read_bytes() == b"tampered in the cache"
    fresh = storage.fetch(f"s3://{bucket}/data", "release", fresh=True)  # what verify asks for
    assert (fresh / "a.png").read_bytes() == b"changed-png"
    one = storage.fetch(f"s3://{bucket}/data/a.png", "--model")
    assert one.is_file() and one.read_bytes() == b"changed-png"
    with pytest.raises(UserError, match="nothing is stored under it"):
        storage.fetch(f"s3://{bucket}/nothing-here", "--target")


def _env(extra: dict) -> dict:
    env = {**os.environ, **extra, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.e2e
def test_harden_to_s3_then_verify_from_s3_and_a_changed_object_fails(s3, tmp_path):
    """A release bound for S3 is made locally, uploaded (manifest last) and verified from the bucket; after one
    object is changed in the bucket `verify` fails. The model itself comes from the bucket too."""
    from raystack.models.pipeline_io import default_model_path
    from raystack.storage import upload_release
    from raystack.tinyworld.folder import write_concept_folder

    env, bucket = s3
    cache = {"IMMUNIZE_CACHE": str(tmp_path / "cache")}
    upload_release(default_model_path(), f"s3://{bucket}/models/tiny")
    write_concept_folder(tmp_path / "target", ["circle"], ["red"], ["sunset"], 2, 0, None, False)
    uri = f"s3://{bucket}/releases/rf"
    res = subprocess.run(CLI + ["harden", "--method", "random-freeze", "--rho", "0.25", "--model",
                                f"s3://{bucket}/models/tiny", "--target", str(tmp_path / "target"), "--out", uri],
                         cwd=ROOT, env=_env({**env, **cache}), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"to {uri} (manifest.json last)" in res.stdout
    objects = _objects(env, bucket)
    manifest = json.loads(objects["releases/rf/manifest.json"])
    assert manifest["method"] == "random-freeze" and "releases/rf/freeze_mask.safetensors" in objects
    assert manifest["source_model"] == f"s3://{bucket}/models/tiny", manifest.get("source_model")
    assert ".immunize-upload-incomplete" not in " ".join(objects)
    assert not (tmp_path / "cache" / "staging").exists() or not any((tmp_path / "cache" / "staging").rglob("manifest.json"))

    ok = subprocess.run(CLI + ["verify", uri], cwd=ROOT, env=_env({**env, **cache}), capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    _put_object(env, bucket, "releases/rf/vae/config.json", objects["releases/rf/vae/config.json"] + b" ")
    bad = subprocess.run(CLI + ["verify", uri], cwd=ROOT, env=_env({**env, **cache}), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "vae/config.json" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


@pytest.mark.e2e
def test_bad_storage_uris_are_one_line_and_create_nothing(s3, tmp_path):
    env, bucket = s3
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 1, 0, None, False)
    base = CLI + ["harden", "--method", "random-freeze", "--target", str(tmp_path / "t"), "--steps", "1"]
    rows = [
        (["--out", "s3:/x"], "neither a local path nor a URI"),
        (["--out", "foo://x/y"], "unknown storage scheme foo://"),
        (["--out", "s3://no-such-bucket-here/x"], "the bucket no-such-bucket-here does not exist"),
        (["--out", f"s3://{bucket}"], "a bucket's root"),
    ]
    for extra, expected in rows:
        res = subprocess.run(base + extra, cwd=tmp_path, env=_env({**env, "IMMUNIZE_CACHE": str(tmp_path / "c")}),
                             capture_output=True, text=True, timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], (extra, res.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t"], extra  # no `s3:` folder, no cache, no staging
    assert _objects(env, bucket) == {}


@pytest.mark.e2e
def test_inputs_from_s3_give_the_release_of_local_inputs(s3, tmp_path):
    """--target and --legal as URIs: the driver ships the URIs, each worker fetches them; the release equals the
    one made from the same folders on the local disk, and the manifest records the URIs."""
    import torch
    from safetensors.torch import load_file

    from raystack.storage import upload_release
    from raystack.tinyworld.folder import write_concept_folder

    env, bucket = s3
    write_concept_folder(tmp_path / "target", ["circle"], ["red"], ["sunset"], 2, 0, None, False)
    write_concept_folder(tmp_path / "legal", ["square"], ["blue"], ["plain"], 2, 1, None, False)
    for name in ("target", "legal"):
        upload_release(tmp_path / name, f"s3://{bucket}/data/{name}")
    common = ["harden", "--method", "imma", "--steps", "2", "--batch-size", "2", "--retain-weight", "1"]
    runs = {"local": ["--target", str(tmp_path / "target"), "--legal", str(tmp_path / "legal")],
            "s3": ["--target", f"s3://{bucket}/data/target", "--legal", f"s3://{bucket}/data/legal"]}
    for name, inputs in runs.items():
        res = subprocess.run(CLI + common + inputs + ["--out", str(tmp_path / name)], cwd=ROOT,
                             env=_env({**env, "IMMUNIZE_CACHE": str(tmp_path / "cache")}), capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = load_file(str(tmp_path / "local" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "s3" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    recorded = json.loads((tmp_path / "s3" / "manifest.json").read_text())["spec"]
    assert recorded["target"] == [f"s3://{bucket}/data/target"] and recorded["legal"] == f"s3://{bucket}/data/legal"


@pytest.mark.e2e
def test_checkpoints_in_s3_resume_a_killed_driver_to_the_same_weights(s3, tmp_path):
    """A release bound for S3 keeps its run's checkpoints in S3 (`<out>.run`, Ray Train's storage_path), not on
    the driver's disk: the driver is SIGKILLed after the first checkpoint, `--resume` continues from the S3
    checkpoint to the uninterrupted run's weights, and the run's objects are removed once the release is up."""
    import signal
    import time

    import boto3
    import torch
    from safetensors.torch import load_file

    from raystack.tinyworld.folder import write_concept_folder

    env, bucket = s3
    write_concept_folder(tmp_path / "target", ["circle"], ["red"], ["sunset"], 2, 0, None, False)
    flags = ["harden", "--method", "imma", "--steps", "16", "--checkpoint-every", "2", "--batch-size", "2",
             "--target", str(tmp_path / "target")]
    run_env = _env({**env, "IMMUNIZE_CACHE": str(tmp_path / "cache")})
    ref = subprocess.run(CLI + flags + ["--out", str(tmp_path / "ref")], cwd=ROOT, env=run_env, capture_output=True,
                         text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])

    def keys(prefix):
        return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]

    def registered():  # Ray Train's list of the run's checkpoints names one: a resume will start from it
        try:
            body = client.get_object(Bucket=bucket, Key="rel.run/harden/checkpoint_manager_snapshot.json")["Body"]
        except client.exceptions.NoSuchKey:
            return False
        return "checkpoint_" in body.read().decode()

    uri = f"s3://{bucket}/rel"
    proc = subprocess.Popen(CLI + flags + ["--out", uri], cwd=ROOT, env=run_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not registered():
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its embedded Ray and the workers: a lost machine
        proc.wait(timeout=60)
    assert not any(k.startswith("rel/manifest.json") for k in keys("rel/")), "a killed run published a release"
    assert not (tmp_path / "cache" / "staging").exists() or \
        not any(p.name.startswith("checkpoint_") for p in (tmp_path / "cache" / "staging").rglob("*")), \
        "checkpoints went to the driver's disk"

    res = subprocess.run(CLI + flags + ["--out", uri, "--resume"], cwd=ROOT, env=run_env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    manifest = json.loads(_objects(env, bucket)["rel/manifest.json"])
    assert manifest["resumed_from"] is not None and manifest["resumed_from"]["step"] >= 2, manifest["resumed_from"]
    got = _objects(env, bucket)
    unet = tmp_path / "resumed.safetensors"
    unet.write_bytes(got["rel/unet/diffusion_pytorch_model.safetensors"])
    a, b = load_file(str(tmp_path / "ref" / "unet" / "diffusion_pytorch_model.safetensors")), load_file(str(unet))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert not keys("rel.run/"), "the finished run's checkpoints were left in the bucket"


def test_suffixes_go_before_a_query_string_and_such_a_uri_reaches_the_store(s3):
    """`<out>.run`, `<out>/tune` of a URI that carries its endpoint (`?endpoint_override=…`): the suffix joins the
    path, not the query, and the store is reached through it."""
    env, bucket = s3
    assert storage.uri_with("s3://b/rel?endpoint_override=h:1&scheme=http", ".run") == \
        "s3://b/rel.run?endpoint_override=h:1&scheme=http"
    assert storage.uri_with("s3://b/rt/", "/tune") == "s3://b/rt/tune"
    host = env["AWS_ENDPOINT_URL"].split("://", 1)[1]
    uri = f"s3://{bucket}/rel?endpoint_override={host}&scheme=http"
    storage.preflight_output(uri, "--out", overwrite=False)
    assert not storage.has_objects(storage.uri_with(uri, ".run"), "--out")
    assert list(_objects(env, bucket)) == ["rel/.immunize-upload-incomplete"]


def test_a_model_uri_takes_only_its_own_mask_after_the_scheme():
    from raystack.redteam.sweep import split_model_spec

    assert split_model_spec("s3://b/sd15.safetensors") == ("s3://b/sd15.safetensors", "")
    assert split_model_spec("s3://b/rel:mask") == ("s3://b/rel", "mask")
    assert split_model_spec("s3://b/m:/x/mask.safetensors") == ("s3://b/m", "/x/mask.safetensors")
