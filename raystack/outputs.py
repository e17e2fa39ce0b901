"""Where a command may write, and what it may remove.

A publisher runs this tool on folders that hold the only copy of a checkpoint, so the rules are checked,
not documented:

- `--out` never equals, contains or lies inside an input of the same command (paths resolved, symlinks
  followed), with `--overwrite` or without (`check_disjoint`);
- one run at a time per `--out` (and its `<out>.run` sibling): an exclusive lock (`output_lock`), a second
  run gets one line naming the holder's pid;
- a user-supplied name that becomes part of a path (sweep name, run name) is a plain name
  (`check_plain_name`);
- a folder is only ever removed from inside the folder the user handed over (`confined_rmtree`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from .errors import UserError

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SHOWN_CHARS = 80


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """A user value as it may appear in an error line: never more than `limit` characters; a longer one keeps its
    start and its end (a long path keeps its file name, the part that says which file)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxdict = r.maxtuple = r.maxset = 6
    r.maxlevel = 2
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    text = value if isinstance(value, str) else r.repr(value)
    if len(text) <= limit:
        return text
    head = limit // 4
    return text[:head] + "..." + text[-(limit - head - 3):]


def check_plain_name(name, what: str) -> str:
    """A name that becomes one path component: letters, digits, '.', '_', '-'; not '.', '..', not absolute."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or set(name) == {"."}:
        raise UserError(f"{what} {shown(name)}: must be a plain name (letters, digits, '.', '_', '-'; "
                        "no '/', no '..', at most 100 characters)")
    return name


def _real(p: Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_disjoint(out: Path, inputs: Iterable[tuple[str, Path | str | None]], flag: str = "--out",
                   with_run_dir: bool = False) -> None:
    """Refuse an output that equals, contains or is inside any input (the input would be replaced or removed).

    `with_run_dir`: the command also writes `<out>.run` (harden), which must be disjoint too."""
    outs = [_real(Path(out))]
    if with_run_dir:
        outs.append(_real(Path(out).parent / f"{Path(out).name}.run"))
    for iflag, ipath in inputs:
        if ipath is None or str(ipath) == "":
            continue
        rin = _real(Path(ipath))
        for o in outs:
            if _overlap(o, rin):
                how = "is" if o == rin else "contains" if o in rin.parents else "is inside"
                what = flag if o == outs[0] else f"{flag}'s run folder {o.name}"
                raise UserError(f"{what} {shown(str(out))}: {how} the input {iflag} {shown(str(ipath))}; "
                                "choose an output folder apart from every input")


#: This tool's own mark in every folder it writes (a release, an attack, a report, a data folder, a sweep):
#: a hidden JSON file naming the command that wrote it. `--overwrite` replaces only a folder that holds it, or
#: an empty one, never a folder of the user's that happens to hold a file of the same name as ours
#: (`metadata.jsonl`, `model_index.json` and `manifest.json` are files users have too).
OUTPUT_MARKER = ".immunize-cli-output.json"
#: Longest single path component accepted from the command line: our lock files, temporary siblings and
#: `<out>.run` folders add up to 16 bytes, and file systems allow 255.
MAX_NAME_BYTES = 200
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def output_marker(command: str | None = None) -> str:
    """The marker's text: the tool, the command that wrote the folder and when."""
    import json
    import time

    if command is None:
        command = current_command()
    return json.dumps({"tool": "immunize-cli", "command": command,
                       "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n"


#: The command line being run, set by the CLI before the command starts (None: a library call).
COMMAND_LINE: str | None = None


def current_command() -> str:
    import shlex
    import sys

    if COMMAND_LINE is not None:
        return COMMAND_LINE
    return shlex.join(["python", *sys.argv]) if sys.argv else "python"


def write_output_marker(folder: Path, command: str | None = None) -> None:
    """Mark `folder` as written by this tool (so that `--overwrite` may replace it later); never through a link."""
    path = Path(folder) / OUTPUT_MARKER
    if path.is_symlink():
        raise UserError(f"{shown(str(path))}: is a symbolic link; refusing to write through it")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(output_marker(command))


def make_output_dir(folder: Path) -> Path:
    """Make a folder this tool writes in place (a sweep, a red-team run, harden's run folder), marked as ours."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_tool_output(folder):
        write_output_marker(folder)
    return folder


def is_tool_output(folder: Path) -> bool:
    """The folder holds this tool's marker as a regular file (a link to one elsewhere does not count), or is an
    output of an earlier version (written before the marker), recognised by what only this tool writes."""
    import stat

    try:
        if stat.S_ISREG(os.lstat(Path(folder) / OUTPUT_MARKER).st_mode):
            return True
    except OSError:
        pass
    return _earlier_version_output(Path(folder))


def _earlier_version_output(folder: Path) -> bool:
    """Outputs of versions before the marker: a release (manifest.json naming immunize-cli's version), an attack
    (attack.json with the method, base model and spec this tool records), a red-team run (redteam_run.json with
    its space), a sweep (tune/ with its results.json), or harden's run folder (only Ray Train's `harden/`).
    Each file is read only if it is a regular file of at most 16 MiB."""
    import json
    import stat

    def doc(name):
        try:
            st = os.lstat(folder / name)
            if not stat.S_ISREG(st.st_mode) or st.st_size > 16 << 20:
                return None
            value = json.loads((folder / name).read_text())
            return value if isinstance(value, dict) else None
        except (OSError, ValueError):
            return None

    manifest = doc("manifest.json")
    if manifest and isinstance(manifest.get("versions"), dict) and "immunize-cli" in manifest["versions"] \
            and "files" in manifest:
        return True
    attack = doc("attack.json")
    if attack and {"method", "base_model", "spec"} <= attack.keys():
        return True
    run = doc("redteam_run.json")
    if run and {"space", "models", "data", "concept"} <= run.keys():
        return True
    results = doc("results.json")
    if results and {"trials", "objective"} <= results.keys() and (folder / "tune").is_dir():
        return True
    try:
        entries = [p.name for p in folder.iterdir()]
    except OSError:
        return False
    return folder.name.endswith(".run") and entries == ["harden"] and (folder / "harden").is_dir() \
        and not (folder / "harden").is_symlink()


def check_new_output(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """`out` is new, or `overwrite` replaces an earlier output of this tool (never an arbitrary folder)."""
    if Path(out).exists() and not overwrite:
        raise UserError(f"{flag} {shown(str(out))}: already exists (pass --overwrite to replace it)")
    check_replaceable(out, flag)


def check_replaceable(out: Path, flag: str = "--out") -> None:
    """`--overwrite` replaces what a previous run wrote, never an arbitrary folder (`--out ~ --overwrite`)
    nor a file that is not ours (`--out my_dataset.jsonl`)."""
    out = Path(out)
    if out.is_symlink():
        raise UserError(f"{flag} {shown(str(out))}: is a symbolic link; name the folder itself")
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {shown(str(out))}: is a file, not a folder this tool wrote; --overwrite replaces "
                        "only an earlier output: remove it yourself or choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not is_tool_output(out):
        raise UserError(f"{flag} {shown(str(out))}: holds files this tool did not write (no {OUTPUT_MARKER}); "
                        "--overwrite replaces only an earlier output of immunize-cli: remove it yourself or "
                        "choose a new folder")


def check_output_file(path: Path, overwrite: bool, flag: str) -> None:
    """A single-file output (`--json`, an export, a grid): in an existing folder, not a folder itself, and
    replaced only with `--overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {shown(str(path))}: is a folder; name a file")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {shown(str(path))}: the folder {shown(str(path.parent))} does not exist")
    if path.is_symlink():
        raise UserError(f"{flag} {shown(str(path))}: is a symbolic link; name the file itself")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {shown(str(path))}: already exists (pass --overwrite to replace it)")


def check_local_path(value, flag: str, uri: bool = True) -> None:
    """A path from the command line: a local path (a URI such as s3://bucket/x is refused where a flag takes a
    local path only: `Path('s3://b/x')` would silently become a local folder `s3:/b/x`), with no component
    longer than MAX_NAME_BYTES (the file system's limit is 255, and our lock and temporary names add to it)."""
    text = os.fspath(value)
    if uri and URI_SCHEME.match(text) and not Path(text.split(":", 1)[0] + ":").exists():  # not a local `x:`
        if "://" not in text:
            raise UserError(f"{flag} {shown(text)}: neither a local path nor a URI (a URI is scheme://bucket/path, "
                            "e.g. s3://bucket/release)")
        raise UserError(f"{flag} {shown(text)}: a URI; this flag takes a local path (object storage URIs are "
                        "taken by --model and by harden and erase's --out, verify and mask)")
    for part in Path(text).parts:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise UserError(f"{flag} {shown(text)}: a name in it is {len(os.fsencode(part))} bytes long; at most "
                            f"{MAX_NAME_BYTES} are accepted")
    if len(os.fsencode(text)) > 4000:
        raise UserError(f"{flag} {shown(text)}: longer than 4000 bytes")


def confined_rmtree(path: Path, root: Path) -> None:
    """Remove `path` only if it lies strictly inside `root` (both resolved) and is a real folder."""
    p, r = Path(path), _real(Path(root))
    if p.is_symlink() or not p.exists():
        if p.is_symlink():
            raise UserError(f"{p}: is a symbolic link; refusing to remove it")
        return
    rp = _real(p)
    if rp == r or r not in rp.parents:
        raise UserError(f"{p}: outside {root}; refusing to remove it")
    shutil.rmtree(rp)


def _lock_path(out: Path) -> Path:
    out = Path(out)
    return _real(out.parent if str(out.parent) else Path(".")) / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path, flag: str = "--out", with_run_dir: bool = False):
    """Hold an exclusive lock on `out` (and `<out>.run`) for the whole run.

    The lock is a hidden sibling `.<name>.lock` held with flock (released by the kernel if the process dies)
    and removed when the run ends; a second run on the same `out` fails at once naming the holder's pid."""
    import fcntl

    names = [Path(out)] + ([Path(out).parent / f"{Path(out).name}.run"] if with_run_dir else [])
    held: list[tuple[int, Path]] = []
    try:
        for target in names:
            lock = _lock_path(target)
            lock.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise UserError(f"{flag} {shown(str(out))}: in use by another immunize-cli run (pid {holder}); "
                                    "wait for it to end or choose another output") from None
                try:  # the holder may have removed the file between our open and our lock: retry on a new one
                    same = os.path.samestat(os.fstat(fd), os.stat(lock))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            held.append((fd, lock))
        yield
    finally:
        for fd, lock in reversed(held):
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)
