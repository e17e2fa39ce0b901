"""Object storage with credentials that cannot do the job (issue 38's last bad-input rows): no credentials at all,
an access key the store does not know, and read-only credentials are each one line and exit 2, with nothing
created on this machine (no `s3:` folder, no cache, no staging, no local --out) or in the bucket (the preflight's
probe write is refused, so no marker, no half-started upload).

These tests run their own moto server, one that checks every request's signature and the caller's IAM policy
(moto's INITIAL_NO_AUTH_ACTION_COUNT: the first N requests pass unchecked, which creates the users and their keys).
The shared `s3_server` fixture stays without authentication for the other tests."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from raystack import storage
from raystack.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.main"]
#: a read-only S3 policy. moto checks its HEAD and listing requests against the operation's name (s3:HeadBucket,
#: s3:HeadObject, s3:ListObjectsV2) where AWS checks s3:ListBucket and s3:GetObject, so those names are here too
READ_ONLY = ["s3:GetObject", "s3:ListBucket", "s3:HeadBucket", "s3:HeadObject", "s3:ListObjectsV2"]
USERS = {"writer": ["s3:*"], "reader": READ_ONLY}
#: requests moto lets through before it checks any: per user create_user, put_user_policy, create_access_key
SETUP_REQUESTS = 3 * len(USERS)
UNKNOWN_KEY = {"AWS_ACCESS_KEY_ID": "AKIAIMMUNIZENOTAKEY0", "AWS_SECRET_ACCESS_KEY": "n" * 40}

NO_CREDENTIALS = "no credentials found"
NOT_KNOWN = "the access key is not known to the store"
WRONG_SECRET = "the secret key does not match the access key"
READ_ONLY_SAID = "access denied: these credentials may read here but not write"


def _client(service, server, who="writer"):
    import boto3

    key, secret = server["keys"][who]
    return boto3.client(service, endpoint_url=server["endpoint"], region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret)


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """A second local S3 (moto's server) that enforces authentication and IAM policies, with a `writer` (s3:*) and
    a `reader` (READ_ONLY), each with an access key: {"endpoint", "keys": {user: (key id, secret)}, "log"}."""
    import boto3
    from botocore.exceptions import ClientError

    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        server = shutil.which("moto_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto-auth") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**env, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.3)
        # the first SETUP_REQUESTS requests are not checked: any key signs them
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        keys = {}
        for user, actions in USERS.items():
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=f"{user}-s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        info = {"endpoint": endpoint, "keys": keys, "log": log}
        _client("s3", info).list_buckets()  # the writer's key works ...
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):  # ... and from here on every request is checked
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id=UNKNOWN_KEY["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=UNKNOWN_KEY["AWS_SECRET_ACCESS_KEY"]).list_buckets()
        yield info
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def bucket(auth_s3):
    """A fresh bucket holding one object that is not ours (so that `reader` has something to list)."""
    name = f"cred-{uuid.uuid4().hex[:12]}"
    s3 = _client("s3", auth_s3)
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="keep/note.txt", Body=b"not ours")
    return name


def _state(server, bucket) -> tuple:
    """Every object (key -> bytes) and every multipart upload begun in the bucket, read as `writer`."""
    s3 = _client("s3", server)
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            objects[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    uploads = [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return objects, uploads


def _credentials(server, row: str) -> dict:
    """The credential variables of a row: none at all, an access key the store does not know, `writer`'s key with
    a wrong secret, or `reader`'s (read-only)."""
    if row == "none":
        return {}
    if row == "unknown key":
        return dict(UNKNOWN_KEY)
    if row == "wrong secret":
        return {"AWS_ACCESS_KEY_ID": server["keys"]["writer"][0], "AWS_SECRET_ACCESS_KEY": "w" * 40}
    key, secret = server["keys"]["reader"]
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}


def _aws_env(server, nowhere: Path) -> dict:
    """The store's endpoint and no credential source at all: no AWS_* variable, no ~/.aws files (their paths point
    at nothing), no instance metadata service."""
    return {"AWS_ENDPOINT_URL": server["endpoint"], "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(nowhere / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(nowhere / "credentials")}


def test_reason_words_pyarrows_credential_errors(monkeypatch, tmp_path):
    """The error strings pyarrow's S3 file system gives (as seen against moto) mapped to one line each; a store
    that cannot be reached stays a network error even without credentials."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in _aws_env({"endpoint": "http://127.0.0.1:9"}, tmp_path / "no-aws").items():
        monkeypatch.setenv(k, v)
    unreachable = OSError("When getting information for bucket 'b': AWS Error NETWORK_CONNECTION during HeadBucket "
                          "operation: curlCode: 7, Could not connect to server")
    unsigned = OSError("When getting information for bucket 'b': AWS Error UNKNOWN (HTTP status 500) during "
                       "HeadBucket operation: No response body.")
    assert storage._reason(unreachable).startswith("When getting information for bucket 'b': AWS Error NETWORK")
    assert storage._reason(unsigned).startswith(NO_CREDENTIALS)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIMMUNIZENOTAKEY0")
    assert storage._reason(unsigned) == unsigned.args[0]  # credentials were set: the store's own words
    said = {
        "INVALID_ACCESS_KEY_ID": NOT_KNOWN, "SIGNATURE_DOES_NOT_MATCH": WRONG_SECRET,
        "ACCESS_DENIED": "access denied to these credentials",
    }
    for name, expected in said.items():
        e = OSError(f"When listing objects under key 'x/' in bucket 'b': AWS Error {name} during ListObjectsV2 "
                    "operation: the store's message (Request ID: 1)")
        assert storage._reason(e).startswith(expected), name
    write = OSError("When initiating multiple part upload for key 'x/.immunize-upload-incomplete' in bucket 'b': AWS "
                    "Error ACCESS_DENIED during CreateMultipartUpload operation: Access Denied (Request ID: 1)")
    assert storage._reason(write, denied=storage.WRITE_DENIED) == READ_ONLY_SAID


def test_preflight_and_fetch_name_the_credential_problem_and_leave_nothing(auth_s3, bucket, tmp_path, monkeypatch):
    """storage.preflight_output (for --out) and storage.fetch (for inputs), each row against the same bucket: the
    reason in words, the bucket as it was, no cache folder; `writer` passes (the refusals are the credentials')."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in _aws_env(auth_s3, tmp_path / "no-aws").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("IMMUNIZE_CACHE", str(tmp_path / "cache"))
    before = _state(auth_s3, bucket)
    uri = f"s3://{bucket}/rel"
    for row, expected in [("none", NO_CREDENTIALS), ("unknown key", NOT_KNOWN), ("wrong secret", WRONG_SECRET),
                          ("read-only", READ_ONLY_SAID)]:
        with monkeypatch.context() as m:
            for k, v in _credentials(auth_s3, row).items():
                m.setenv(k, v)
            with pytest.raises(UserError) as err:
                storage.preflight_output(uri, "--out", overwrite=False)
            message = str(err.value)
            assert message.startswith(f"--out {uri}: ") and expected in message and "\n" not in message, (row, message)
            if row != "read-only":  # reader may read; the others may not
                with pytest.raises(UserError) as err:
                    storage.fetch(f"s3://{bucket}/keep", "--target")
                assert f"--target s3://{bucket}/keep: cannot read it ({expected}" in str(err.value), (row, err.value)
        assert _state(auth_s3, bucket) == before, row  # no probe marker, no multipart upload left behind
        assert not (tmp_path / "cache").exists(), row
    key, secret = auth_s3["keys"]["writer"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage.preflight_output(uri, "--out", overwrite=False)
    assert sorted(_state(auth_s3, bucket)[0]) == ["keep/note.txt", "rel/.immunize-upload-incomplete"]


@pytest.mark.e2e
def test_harden_with_credentials_that_cannot_do_it_is_one_line_and_creates_nothing(auth_s3, bucket, tmp_path):
    """`harden --out s3://…` with no credentials, an unknown access key and read-only credentials; `--model
    s3://…` and `--target s3://…` that cannot be read: exit 2, one stderr line naming the flag and the problem,
    the CLI's folder and IMMUNIZE_CACHE untouched, the bucket as it was."""
    from raystack.tinyworld.folder import write_concept_folder

    work = tmp_path / "work"  # the CLI's cwd: holds the local target folder and nothing else, before and after
    write_concept_folder(work / "t", ["circle"], ["red"], ["sunset"], 1, 0, None, False)
    s3 = _client("s3", auth_s3)
    for p in sorted((work / "t").rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=bucket, Key=f"data/t/{p.relative_to(work / 't').as_posix()}", Body=p.read_bytes())
    s3.put_object(Bucket=bucket, Key="models/tiny/model_index.json", Body=b"{}")
    before = _state(auth_s3, bucket)
    cache = tmp_path / "cache"
    harden = CLI + ["harden", "--method", "random-freeze", "--steps", "1"]
    out = ["--out", f"s3://{bucket}/rel"]
    local_target = ["--target", "t"]
    rows = [
        ("none", local_target + out, "--out", NO_CREDENTIALS),
        ("unknown key", local_target + out, "--out", NOT_KNOWN),
        ("read-only", local_target + out, "--out", READ_ONLY_SAID),
        ("none", local_target + ["--model", f"s3://{bucket}/models/tiny", "--out", "rel"], "--model", NO_CREDENTIALS),
        ("unknown key", local_target + ["--model", f"s3://{bucket}/models/tiny", "--out", "rel"], "--model",
         NOT_KNOWN),
        ("none", ["--target", f"s3://{bucket}/data/t", "--out", "rel"], "--target", NO_CREDENTIALS),
    ]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    base_env.update(_aws_env(auth_s3, tmp_path / "no-aws"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                    IMMUNIZE_CACHE=str(cache))
    for row, args, flag, expected in rows:
        res = subprocess.run(harden + args, cwd=work, env={**base_env, **_credentials(auth_s3, row)},
                             capture_output=True, text=True, timeout=300)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (row, args, res.returncode, res.stdout[-2000:], res.stderr)
        assert flag in lines[0] and expected in lines[0], (row, args, lines[0])
        assert sorted(p.name for p in work.iterdir()) == ["t"], (row, args)  # no `s3:`, no local --out
        assert not cache.exists(), (row, args)  # no fetched copy, no staging folder
        assert _state(auth_s3, bucket) == before, (row, args)  # no probe marker, no upload begun
