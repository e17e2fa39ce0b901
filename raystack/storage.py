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


def _reason(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
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


def preflight_output(uri: str, flag: str, overwrite: bool) -> None:
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
        raise UserError(f"{flag} {shown(uri)}: cannot reach the bucket ({_reason(e)})") from None
    if found == pafs.FileType.NotFound:
        raise UserError(f"{flag} {shown(uri)}: the bucket {shown(bucket)} does not exist (or these credentials "
                        "cannot see it)")
    if [i for i in _listing(fs, path, flag, uri) if i.base_name != INCOMPLETE_MARKER] and not overwrite:
        raise UserError(f"{flag} {shown(uri)}: already holds objects; pass --overwrite to replace them")
    try:
        with fs.open_output_stream(f"{path}/{INCOMPLETE_MARKER}") as out:
            out.write(json.dumps({"by": "immunize-cli", "upload": "started"}).encode())
    except Exception as e:  # noqa: BLE001 - read-only credentials: AccessDenied
        raise UserError(f"{flag} {shown(uri)}: cannot write there ({_reason(e)})") from None


def _put(fs, local: Path, dest: str) -> None:
    import pyarrow.fs as pafs

    pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def upload_release(local: Path, uri: str, flag: str = "--out", replace: bool = False) -> list[str]:
    """Upload the folder `local` under `uri`, `manifest.json` last (the commit marker). With `replace`, the old
    marker goes first (no reader sees a release while objects change), then every old object under the prefix.
    Returns the uploaded names (relative, '/'-separated)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, flag)
    local = Path(local)
    try:
        if replace:
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(f"{path}/{COMMIT_MARKER}")
            for old in _listing(fs, path, flag, uri):
                if old.base_name != INCOMPLETE_MARKER:
                    fs.delete_file(old.path)
        names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        last = [n for n in names if n == COMMIT_MARKER]
        for name in [n for n in names if n != COMMIT_MARKER] + last:
            _put(fs, local / name, f"{path}/{name}")
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(f"{path}/{INCOMPLETE_MARKER}")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{flag} {shown(uri)}: the upload failed ({_reason(e)}); no manifest.json was written, "
                        "so no reader takes it for a release; rerun the command") from None
    if pafs.FileType.File != fs.get_file_info(f"{path}/{COMMIT_MARKER}").type and last:
        raise UserError(f"{flag} {shown(uri)}: manifest.json is not there after the upload; rerun the command")
    return names


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
        raise UserError(f"{flag} {shown(uri)}: cannot read it ({_reason(e)})") from None
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
            for rel, size, _ in entries:
                target = tmp / rel if single.type != pafs.FileType.File else tmp
                target.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(f"{root}/{rel}") as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 8 << 20)
                if target.stat().st_size != size:
                    raise UserError(f"{flag} {shown(uri)}: {rel} changed while it was read; rerun the command")
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.rename(tmp, dest)
            done.write_text(json.dumps({"uri": check_uri(uri, flag), "objects": len(entries)}))
        except UserError:
            raise
        except OSError as e:
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


def staging_dir(uri: str) -> Path:
    """Where a command writes a release bound for `uri` before uploading it: the same local folder for the same
    URI, so `--resume` after a stop finds the run's checkpoints next to it (`<staging>.run`)."""
    return cache_dir("staging") / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24] / "release"
