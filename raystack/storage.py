"""Object storage for releases and inputs: `s3://`, `gs://` and `abfs://` URIs through pyarrow's file systems.

Credentials and endpoints come from each store's standard settings (AWS_ACCESS_KEY_ID / AWS_PROFILE and
AWS_ENDPOINT_URL for S3 or an S3-compatible store such as MinIO; GOOGLE_APPLICATION_CREDENTIALS; AZURE_*); an S3
URI may also carry pyarrow's `?endpoint_override=HOST:PORT&scheme=http`.

Object stores have no rename, so a release is uploaded object by object with `manifest.json` last: its commit
marker. A reader that finds the manifest finds every file it lists (and `verify` checks each one against it); an
upload that stops half way leaves no manifest, so no reader mistakes it for a release. Inputs are fetched once per
machine into a content-addressed cache (`$IMMUNIZE_CACHE/objects`), keyed by the URI and every object's name, size
and modification time, so a changed object is fetched again and several workers of one machine share one copy."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from .errors import UserError
from .outputs import shown

#: the schemes pyarrow reaches without a JVM (hdfs:// needs one) and what they are
SCHEMES = {"s3": "Amazon S3 or an S3-compatible store", "gs": "Google Cloud Storage", "gcs": "Google Cloud Storage",
           "abfs": "Azure Data Lake Storage", "abfss": "Azure Data Lake Storage"}
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
COMMIT_MARKER = "manifest.json"
#: how long a Google Cloud Storage request is retried before it is an error (pyarrow's default is unbounded in
#: practice: a missing credential made `harden --out gs://...` wait for many minutes)
GCS_RETRY_S = 20
#: written by the preflight (it proves these credentials may write there) and removed once manifest.json is up:
#: a prefix that still holds it had an upload that did not finish. Removing a prefix's last object makes pyarrow
#: leave an empty `prefix/` folder object, so the marker stays until the release is there.
INCOMPLETE_MARKER = ".immunize-upload-incomplete"
#: files of one upload in flight at once (each is a request, or a multipart upload, of its own)
UPLOAD_THREADS = 8


def is_uri(value) -> bool:
    """`scheme://...` (any scheme: an unknown one is refused by `check_uri`, never taken for a local path)."""
    return isinstance(value, str) and _URI.match(value) is not None


def check_uri(uri: str, flag: str) -> str:
    """The URI without a trailing slash, after checking its scheme is one this tool writes and reads."""
    scheme = _URI.match(uri).group("scheme").lower()
    if scheme not in SCHEMES:
        raise UserError(f"{flag} {shown(uri)}: unknown storage scheme {scheme}://; object storage is "
                        f"{', '.join(s + '://' for s in SCHEMES)} (or give a local path)")
    return uri.rstrip("/")


#: pyarrow's S3 errors read "AWS Error <NAME> during <Operation> operation: <the store's message>": the names that
#: are about the credentials, and what the user is told for each (None: access denied, in the caller's words)
_AWS_CREDENTIAL_ERRORS = (
    (("INVALID_ACCESS_KEY_ID", "INVALID_CLIENT_TOKEN_ID", "UNRECOGNIZED_CLIENT"),
     "the access key is not known to the store: check AWS_ACCESS_KEY_ID or AWS_PROFILE, and that AWS_ENDPOINT_URL "
     "is the store the key belongs to"),
    (("SIGNATURE_DOES_NOT_MATCH", "INVALID_SIGNATURE", "INCOMPLETE_SIGNATURE"),
     "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY"),
    (("EXPIRED_TOKEN", "INVALID_TOKEN", "token has expired"),
     "the session credentials have expired or are not valid: renew them, e.g. aws sso login or a new "
     "AWS_SESSION_TOKEN"),
    (("ACCESS_DENIED", "HTTP status 403", "MISSING_AUTHENTICATION_TOKEN"), None),
)
NO_AWS_CREDENTIALS = ("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or "
                      "run where an instance role gives them")
#: the preflight's probe write refused after its listing passed: read-only credentials
WRITE_DENIED = "access denied: these credentials may read here but not write"


def _aws_credentials_set() -> bool:
    """Whether a source the AWS SDK reads may give credentials: the environment, a credentials or config file that
    names some, or (unless AWS_EC2_METADATA_DISABLED=true) a metadata service answering on this machine."""
    env = os.environ
    if any(env.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                                "AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return True
    for name, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config")):
        try:
            text = Path(env.get(name) or default).expanduser().read_text(errors="replace").lower()
        except OSError:
            continue
        if any(k in text for k in ("aws_access_key_id", "credential_process", "role_arn", "sso_", "web_identity")):
            return True
    if env.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() == "true":
        return False
    import socket

    try:  # an instance role is known only by asking; a machine without the service refuses or times out at once
        socket.create_connection(("169.254.169.254", 80), timeout=0.5).close()
    except OSError:
        return False
    return True


def _reason(e: BaseException, fs=None, path: str | None = None,
            denied: str = "access denied to these credentials") -> str:
    """One line for a store's error: the credential problems pyarrow's S3 reports in words (no credentials at all,
    an unknown key, a wrong secret, an expired session, access denied: `denied`), anything else its first line.
    A refused HEAD (HeadBucket, HeadObject) has no body, so HTTP 403 reads ACCESS_DENIED whatever the cause: with
    `fs` and `path`, a listing of `path` asks again and its error, which names the cause, is told instead."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    if "AWS Error " in text and "NETWORK_CONNECTION" not in text and not _aws_credentials_set():
        return NO_AWS_CREDENTIALS  # the SDK sent the request unsigned; the store refused it (403, or a 500 from some)
    if fs is not None and path and "ACCESS_DENIED" in text and "No response body" in text:
        import pyarrow.fs as pafs

        try:
            fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except Exception as again:  # noqa: BLE001
            return _reason(again, denied=denied)
    for names, said in _AWS_CREDENTIAL_ERRORS:
        if any(n in text for n in names):
            return said or denied
    return text if len(text) <= 200 else text[:197] + "..."


def filesystem(uri: str, flag: str):
    """(pyarrow file system, path inside it) for a checked URI; one line when the store cannot be reached."""
    import pyarrow.fs as pafs

    uri = check_uri(uri, flag)
    try:
        if _URI.match(uri).group("scheme").lower() in ("gs", "gcs"):
            # its client retries an unreachable store (no credentials, no network) for many minutes by default
            from datetime import timedelta

            fs = pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=GCS_RETRY_S))
            path = uri.split("://", 1)[1].split("?", 1)[0]
        else:
            fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError with the store's message
        raise UserError(f"{flag} {shown(uri)}: {_reason(e)}") from None
    return fs, path.rstrip("/")


def _listing(fs, path: str, flag: str, uri: str) -> list:
    import pyarrow.fs as pafs

    try:
        return [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
                if i.type == pafs.FileType.File]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{flag} {shown(uri)}: cannot list it ({_reason(e)})") from None


def uri_with(uri: str, suffix: str) -> str:
    """`uri` with `suffix` added to its path ('/tune', '.run'), before any query string (`?endpoint_override=…`)."""
    base, sep, query = uri.partition("?")
    return f"{base.rstrip('/')}{suffix}{sep}{query}"


def preflight_output(uri: str, flag: str, overwrite: bool,
                     taken_hint: str = "pass --overwrite to replace them") -> None:
    """Before the job runs (after the local checks): the bucket exists, the prefix holds nothing (unless
    --overwrite), and these credentials may write there: INCOMPLETE_MARKER is written, and `upload_release` removes
    it once the release is complete. Nothing else is created."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, flag)
    bucket, _, prefix = path.partition("/")
    if not prefix:
        raise UserError(f"{flag} {shown(uri)}: a bucket's root; give a folder inside it (e.g. {uri.rstrip('/')}/release)")
    try:
        found = fs.get_file_info(bucket).type
    except Exception as e:  # noqa: BLE001 - no credentials, an unreachable endpoint
        raise UserError(f"{flag} {shown(uri)}: cannot reach the bucket ({_reason(e, fs, path)})") from None
    if found == pafs.FileType.NotFound:
        raise UserError(f"{flag} {shown(uri)}: the bucket {shown(bucket)} does not exist (or these credentials "
                        "cannot see it)")
    if [i for i in _listing(fs, path, flag, uri) if i.base_name != INCOMPLETE_MARKER] and not overwrite:
        raise UserError(f"{flag} {shown(uri)}: already holds objects; {taken_hint}")
    try:
        with fs.open_output_stream(f"{path}/{INCOMPLETE_MARKER}") as out:
            out.write(json.dumps({"by": "immunize-cli", "upload": "started"}).encode())
    except Exception as e:  # noqa: BLE001 - read-only credentials: AccessDenied
        raise UserError(f"{flag} {shown(uri)}: cannot write there ({_reason(e, denied=WRITE_DENIED)})") from None


def _put(fs, local: Path, dest: str) -> None:
    import pyarrow.fs as pafs

    pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def upload_release(local: Path, uri: str, flag: str = "--out", replace: bool = False,
                   commit: str = COMMIT_MARKER) -> list[str]:
    """Upload the folder `local` under `uri`, `commit` last (the commit marker: `manifest.json` for a release,
    `redteam.json` for a red team). With `replace`, the old marker goes first (no reader sees a release while
    objects change), then every old object under the prefix. Returns the uploaded names (relative, '/'-separated)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, flag)
    local = Path(local)
    try:
        if replace:
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(f"{path}/{commit}")
            for old in _listing(fs, path, flag, uri):
                if old.base_name != INCOMPLETE_MARKER:
                    fs.delete_file(old.path)
        names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        last = [n for n in names if n == commit]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:  # a store far away: many requests in flight
            futures = [pool.submit(_put, fs, local / n, f"{path}/{n}") for n in names if n != commit]
            try:
                for done in futures:
                    done.result()  # the first failure is raised here, before the commit marker goes up
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # the queued ones are not sent
                raise
        for name in last:
            _put(fs, local / name, f"{path}/{name}")
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(f"{path}/{INCOMPLETE_MARKER}")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{flag} {shown(uri)}: the upload failed ({_reason(e)}); no {commit} was written, "
                        "so no reader takes it for a finished output; rerun the command") from None
    if pafs.FileType.File != fs.get_file_info(f"{path}/{commit}").type and last:
        raise UserError(f"{flag} {shown(uri)}: {commit} is not there after the upload; rerun the command")
    return names


def download_folder(uri: str, dest: Path, flag: str) -> Path:
    """The objects under `uri` copied into the local folder `dest` (made; its files replaced): a red team's
    trial written on another node, read back where it is re-scored."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, flag)
    dest = Path(dest)
    try:
        if not _listing(fs, path, flag, uri):
            raise UserError(f"{flag} {shown(uri)}: nothing is stored under it")
        dest.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                        chunk_size=8 << 20)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{flag} {shown(uri)}: cannot download it ({_reason(e, fs, path)})") from None
    return dest


def has_objects(uri: str, flag: str) -> bool:
    fs, path = filesystem(uri, flag)
    return bool(_listing(fs, path, flag, uri))


def remove_prefix(uri: str, flag: str) -> None:
    """Every object under `uri` (a run's checkpoints: Ray Train writes nothing else there)."""
    fs, path = filesystem(uri, flag)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{flag} {shown(uri)}: cannot remove it ({_reason(e)})") from None


def cache_dir(kind: str) -> Path:
    """`$IMMUNIZE_CACHE/<kind>`, else `$XDG_CACHE_HOME/immunize-cli/<kind>`, else `~/.cache/immunize-cli/<kind>`."""
    base = os.environ.get("IMMUNIZE_CACHE")
    if not base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "immunize-cli")
    return Path(base).expanduser() / kind


@contextlib.contextmanager
def _locked(lock: Path):
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # the other workers of this machine wait for the one that downloads
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(uri: str, flag: str, fresh: bool = False) -> Path:
    """A local copy of the folder (or the one object) at `uri`, downloaded once per machine into the cache; its
    key hashes the URI and each object's name, size and modification time, and every size is checked after the
    download. Safe when several processes of one machine ask at once. `fresh`: download it again even when the
    cache has it (`verify`: an object rewritten with the same size within the same second keeps its key)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, flag)
    try:
        single = fs.get_file_info(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{flag} {shown(uri)}: cannot read it ({_reason(e, fs, path)})") from None
    if single.type == pafs.FileType.File:
        objects = [single]
        root = path.rsplit("/", 1)[0]
    else:
        objects = [i for i in _listing(fs, path, flag, uri) if i.base_name != INCOMPLETE_MARKER]
        root = path
        if not objects:
            raise UserError(f"{flag} {shown(uri)}: no such object or folder (nothing is stored under it)")
    entries = sorted((i.path[len(root) + 1:], i.size, i.mtime_ns or 0) for i in objects)
    key = hashlib.sha256(json.dumps([check_uri(uri, flag), entries]).encode()).hexdigest()[:32]
    base = cache_dir("objects") / key
    name = path.rsplit("/", 1)[-1] or "object"
    dest, done = base / name, base / ".complete"
    with _locked(base.with_suffix(".lock")):
        if done.is_file() and not fresh:
            return dest
        tmp = base / f".partial-{uuid.uuid4().hex}"
        try:
            if single.type == pafs.FileType.File:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 8 << 20)
            else:  # the whole folder at once: pyarrow fetches the objects on threads, in 8 MiB requests
                tmp.mkdir(parents=True)
                pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                                chunk_size=8 << 20)
                for marker in tmp.rglob(INCOMPLETE_MARKER):  # left out of the listing above as well
                    marker.unlink()
                got = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
                if got != {rel for rel, _, _ in entries}:
                    raise UserError(f"{flag} {shown(uri)}: its objects changed while they were read; rerun the command")
            for rel, size, _ in entries:
                target = tmp / rel if single.type != pafs.FileType.File else tmp
                if target.stat().st_size != size:
                    raise UserError(f"{flag} {shown(uri)}: {rel} changed while it was read; rerun the command")
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.rename(tmp, dest)
            done.write_text(json.dumps({"uri": check_uri(uri, flag), "objects": len(entries)}))
        except UserError:
            raise
        except OSError as e:
            if "AWS Error" in str(e) or "GCS" in str(e) or "Azure" in str(e):  # pyarrow's store errors are OSErrors
                raise UserError(f"{flag} {shown(uri)}: cannot read it ({_reason(e)})") from None
            raise UserError(f"{flag} {shown(uri)}: cannot fetch it into {cache_dir('objects')} ({_reason(e)}); "
                            "set IMMUNIZE_CACHE to a writable folder with room for it") from None
        except Exception as e:  # noqa: BLE001 - the store's errors
            raise UserError(f"{flag} {shown(uri)}: cannot read it ({_reason(e)})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetched_from(path) -> str | None:
    """The URI a folder of the cache was fetched from (what a manifest records as the source), else None."""
    done = Path(path).parent / ".complete"
    try:
        return str(json.loads(done.read_text())["uri"]) if done.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_input(value, flag: str) -> Path:
    """An input given as a local path or a URI: the path itself, or the URI's cached local copy."""
    return fetch(value, flag) if is_uri(value) else Path(value)


def sweep_output(out: str, resume: bool, what: str) -> str | None:
    """A red team's or sweep's --out: its checked URI (None for a local path, checked as one); `what` names the run
    in the refusal of --resume, which a run in object storage cannot do yet."""
    from .outputs import check_local_path

    if not is_uri(out):
        check_local_path(out, "--out")
        return None
    remote = check_uri(out, "--out")
    if resume:
        raise UserError(f"--resume: {what} in object storage ({remote}) cannot be resumed yet; run it again to a new "
                        "--out")
    return remote


def run_staging_dir(uri: str) -> Path:
    """A fresh local folder of this run's own for an output bound for `uri` (a red team's, a sweep's: they are not
    resumed from it, so two runs never share one)."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    return cache_dir("staging") / f"{key}-{uuid.uuid4().hex[:12]}" / "run"


def staging_dir(uri: str) -> Path:
    """Where a command writes a release bound for `uri` before uploading it: the same local folder for the same
    URI, so `--resume` after a stop finds the run's checkpoints next to it (`<staging>.run`)."""
    return cache_dir("staging") / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24] / "release"
