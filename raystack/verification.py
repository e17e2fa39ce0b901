"""What `verify` checks, shared by `verify` and `mask check` (which checks only a release that verifies).

A release verifies when all of these hold, else it is refused (exit 1, one line saying why):
- it is a folder holding no symbolic link and nothing but regular files and folders;
- `manifest.json` is a manifest this tool writes: the keys `harden` always writes (`REQUIRED_KEYS`), a method
  this tool has, and the files that method always releases (`required_files`: the pipeline's model_index.json,
  the UNet's config and safetensors weights; `freeze_mask.safetensors` for a mask method);
- with a public key: `manifest.sig` is the key's Ed25519 signature over the manifest's bytes;
- every file it lists has that SHA-256 (the manifest's `files`: what it covers). A file it does not cover fails
  when a loader could read it (anything in a pipeline component's folder, any weight or config file:
  `LOADED_SUFFIXES`); others (a model card, `.gitattributes`, a license a hub adds) are reported as NOT COVERED
  and fail only with `strict`;
- a hub cache snapshot (`.../snapshots/<rev>/`, each file a symbolic link into the repository's `blobs/`)
  verifies through its links; any other link is refused;
- no pickled weight file (.bin, .ckpt, .pt, ...) is there; every .safetensors file parses and every
  floating-point tensor in it is finite; a mask method's mask passes the strict mask reader against the
  UNet's tensor names.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RunFailed, UserError
from .outputs import shown
from .atomic import sha256_file
from .freeze_mask import MASK_FILE
from .hardening.freezeasguard import FreezeAsGuardRecipe, RandomFreezePhase
from .hardening.methods import method_names, method_phases
from .models.pipeline_io import resolve_model_path
from .outputs import OUTPUT_MARKER
from .signing import SIGNATURE_FILE, check_signature, load_public_key
from .storage import fetch, is_uri

MANIFEST = "manifest.json"
#: keys `harden` writes into every manifest, with the type of each (`frozen_ratio` may also be null)
REQUIRED_KEYS = {"method": str, "spec": dict, "changed_tensors": list, "frozen_ratio": (int, float, type(None)),
                 "versions": dict, "files": dict}
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: weight files that can only be read by unpickling them: never in a release of this tool, never read
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
UNET_WEIGHTS = re.compile(r"unet/diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors")
SHA256 = re.compile(r"[0-9a-f]{64}")
#: files a diffusers/transformers/peft loader may read wherever they are: never allowed uncovered
LOADED_SUFFIXES = (".safetensors", ".json", *PICKLED_SUFFIXES, ".msgpack", ".h5", ".onnx", ".yaml", ".yml", ".py")
#: what a release's manifest covers (written into it): every file in `files`; nothing else is part of it
COVERS = ("every file listed in `files`, by SHA-256: the weights, configs, tokenizer and mask; not manifest.json, "
          "manifest.sig, the model card (README.md, which publishers edit) or files a hub adds (.gitattributes)")


@dataclass
class Verification:
    """The outcome of `check_release`: `failure` is None when the release verifies, else one line saying why;
    `problems` are (label, file) lines to list (CHANGED, MISSING, EXTRA, NOT FINITE, ...)."""

    folder: Path
    failure: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    files: int = 0
    signer: str | None = None
    signed_unchecked: bool = False
    uncovered: list[tuple[str, str]] = field(default_factory=list)
    """Files the manifest does not cover and no loader reads (a model card, .gitattributes): listed, not failed
    (but with `strict`)."""

    @property
    def ok(self) -> bool:
        return self.failure is None


def mask_methods() -> set[str]:
    """The methods whose release is the weights plus a freeze mask (FreezeAsGuard, Random-rho, IMMA + freeze)."""

    return {m for m in method_names()
            if any(issubclass(p, (FreezeAsGuardRecipe, RandomFreezePhase)) for p in method_phases(m))}


def required_files(method: str) -> list[str]:
    """Files (a regex for the UNet's weights) every release of `method` holds."""

    need = ["model_index.json", "unet/config.json", UNET_WEIGHTS.pattern]
    return need + ([MASK_FILE] if method in mask_methods() else [])


def _hub_blob(folder: Path, p: Path) -> bool:
    """A link of a hub cache snapshot (`<repo>/snapshots/<rev>/...` -> a regular file in `<repo>/blobs/`, itself a
    real folder: a `blobs` that links elsewhere would let the snapshot's links reach any file)."""
    if folder.parent.name != "snapshots" or (folder.parent.parent / "blobs").is_symlink():
        return False
    blobs = (folder.parent.parent / "blobs").resolve()
    try:
        target = p.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return target.parent == blobs and stat.S_ISREG(os.stat(target).st_mode)


def _walk(folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(every regular file, relative; [(label, relative path)] for links and special files), links not followed
    (a hub cache snapshot's links into its blobs count as the files they point to)."""
    files, odd = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            try:
                mode = os.lstat(p).st_mode
            except OSError:
                odd.append(("UNREADABLE", rel))
                continue
            if stat.S_ISLNK(mode) and _hub_blob(folder, p):
                files.append(rel)
            elif stat.S_ISLNK(mode):
                odd.append(("LINK", f"{rel} -> {shown(os.readlink(p))}"))
            elif stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                odd.append(("NOT A FILE", rel))
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return sorted(files), odd


def _manifest_problem(manifest) -> str | None:
    """Why `manifest` is not a manifest this tool writes, or None."""
    from .hardening.methods import method_names

    if not isinstance(manifest, dict):
        return "not a JSON object"
    for key, kind in REQUIRED_KEYS.items():
        if key not in manifest:
            return f"no {key!r} key (every manifest of immunize-cli has one)"
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            return f"{key!r} is not {'a number or null' if key == 'frozen_ratio' else 'a ' + kind.__name__}"
    method = manifest["method"]
    if method not in method_names():
        return f"method {shown(method)!r} is not a method of immunize-cli ({', '.join(method_names())})"
    if manifest["spec"].get("method") != method:
        return f"its spec's method {shown(str(manifest['spec'].get('method')))!r} is not its method {method!r}"
    if "immunize-cli" not in manifest["versions"]:
        return "'versions' does not name immunize-cli's version"
    files = manifest["files"]
    bad = next((k for k, v in files.items() if not isinstance(v, str) or not SHA256.fullmatch(v)), None)
    if bad is not None:
        return f"\"files\" must map each file to its SHA-256 ({shown(bad)!r} does not)"
    outside = next((k for k in files if k.startswith("/") or "\\" in k or any(
        part in ("", ".", "..") for part in k.split("/"))), None)
    if outside is not None:
        return f"\"files\" names {shown(outside)!r}, which is no plain path inside the release"
    ratio = manifest["frozen_ratio"]
    if method in mask_methods() and (ratio is None or not 0 <= ratio <= 1):
        return f"a {method} release records its mask's frozen_ratio (0 to 1), not {ratio!r}"
    for need in required_files(method):
        if not any(re.fullmatch(need, k) if need == UNET_WEIGHTS.pattern else k == need for k in files):
            what = need if need != UNET_WEIGHTS.pattern else \
                "UNet safetensors weights (unet/diffusion_pytorch_model*.safetensors)"
            return f"it lists no {what}, which every {method} release holds"
    return None


def _weight_problems(root: Path, rel: str) -> list[tuple[str, str]]:
    """('NOT FINITE', 'file: tensor') for every floating-point tensor holding NaN or inf (one tensor in memory at
    a time), or [('UNREADABLE', 'file (why)')] for a file that is not readable safetensors."""
    import torch
    from safetensors import SafetensorError, safe_open

    out = []
    try:
        with safe_open(str(root / rel), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    out.append(("NOT FINITE", f"{rel}: {name}"))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, MemoryError) as e:
        return [("UNREADABLE", f"{rel} (not a readable safetensors file: {(str(e).splitlines() or [''])[0][:80]})")]
    return out


def loaded_by_a_loader(rel: str, components: set[str]) -> bool:
    """Could a diffusers/transformers/peft loader read this file of a pipeline folder? (component folders whole;
    weight, config and tokenizer files anywhere)"""
    return rel.split("/")[0] in components or rel.lower().endswith(LOADED_SUFFIXES)


#: the component folders of every Stable Diffusion pipeline, whatever its model_index.json says
KNOWN_COMPONENTS = {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
                    "safety_checker", "feature_extractor", "image_encoder"}


def _components(folder: Path) -> set[str]:
    """The component folders model_index.json names, and the known ones (`KNOWN_COMPONENTS`)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        named = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    except (OSError, ValueError, AttributeError):
        named = set()
    return named | KNOWN_COMPONENTS


def check_release(folder: Path, public_key: Path | None = None, flag: str = "", strict: bool = False) -> Verification:
    """Verify a release (see the module's docstring). A `folder` that is no folder, or a `public_key` that is no
    Ed25519 public key, is a UserError (exit 2); anything wrong with the release itself is its `failure`.
    `strict`: a file the manifest does not cover fails even when no loader reads it."""
    from .freeze_mask import MASK_FILE

    folder = Path(folder)
    where = f"{flag} {shown(str(folder))}".strip()
    if not folder.exists():
        raise UserError(f"{where}: no such folder")
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(f"{where}: not a folder" + (" (a symbolic link: name the folder itself)"
                                                     if folder.is_symlink() else ""))
    if public_key is not None:
        load_public_key(public_key)
    v = Verification(folder)

    def fail(why: str) -> Verification:
        v.failure = f"{where}: {why}"
        return v

    files, odd = _walk(folder)
    if odd:
        v.problems += odd
        label, what = odd[0]
        return fail(f"{'a symbolic link' if label == 'LINK' else 'not a regular file'} inside the release "
                    f"({what}); a release holds regular files only")
    mf = folder / MANIFEST
    if MANIFEST not in files:
        return fail(f"no {MANIFEST}: not a release of immunize-cli" if not mf.exists() else
                    f"{MANIFEST} is not a file")
    try:
        if mf.stat().st_size > MAX_MANIFEST_BYTES:
            return fail(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest of immunize-cli")
        manifest_bytes = mf.read_bytes()
    except OSError as e:
        return fail(f"{MANIFEST} cannot be read ({e.strerror or type(e).__name__})")
    if public_key is not None:
        try:
            v.signer = check_signature(folder, manifest_bytes, public_key)
        except RunFailed as e:
            v.failure = str(e)
            return v
    try:
        manifest = json.loads(manifest_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return fail(f"corrupt {MANIFEST} (not JSON)")
    why = _manifest_problem(manifest)
    if why is not None:
        return fail(f"corrupt {MANIFEST}: {why}")
    v.manifest = manifest
    expected: dict[str, str] = manifest["files"]
    v.files = len(expected)
    listed = [k for k in files if k not in (MANIFEST, SIGNATURE_FILE, OUTPUT_MARKER)]
    actual: dict[str, str] = {}
    for rel in listed:
        try:
            actual[rel] = sha256_file(folder / rel)
        except OSError as e:
            v.problems.append(("UNREADABLE", rel))
            return fail(f"{shown(rel)} cannot be read ({e.strerror or type(e).__name__})")
    for k in sorted(expected):
        if k not in actual:
            v.problems.append(("MISSING", k + (" (a folder, not a file)" if (folder / k).is_dir() else "")))
        elif actual[k] != expected[k]:
            v.problems.append(("CHANGED", k))
    components = _components(folder)
    for k in sorted(set(actual) - set(expected)):
        loaded = loaded_by_a_loader(k, components)
        (v.problems if loaded or strict else v.uncovered).append(("EXTRA" if loaded or strict else "NOT COVERED", k))
    if v.problems:
        label, what = v.problems[0]
        return fail(f"{len(v.problems)} file(s) do not match {MANIFEST}, e.g. {label} {shown(what)}")
    pickled = [k for k in expected if k.lower().endswith(PICKLED_SUFFIXES)]
    if pickled:
        v.problems += [("PICKLED", k) for k in pickled]
        return fail(f"{shown(pickled[0])} is a pickled weight file, which immunize-cli never releases and never "
                    "unpickles: it cannot be checked")
    for rel in sorted(k for k in expected if k.endswith(".safetensors")):
        problems = _weight_problems(folder, rel)
        v.problems += problems
        if problems and problems[0][0] == "UNREADABLE":
            return fail(shown(problems[0][1], 200))
    if v.problems:
        return fail(f"{len(v.problems)} weight tensors hold NaN or inf (e.g. {shown(v.problems[0][1])}); do not "
                    "release it")
    if manifest["method"] in mask_methods():
        from .freeze_mask import load_freeze_mask
        from .mask_tools import unet_tensor_names

        try:
            load_freeze_mask(folder / MASK_FILE, unet_tensor_names(folder / "unet"), flag="mask")
        except UserError as e:
            return fail(f"its mask does not pass: {e}")
    v.signed_unchecked = v.signer is None and SIGNATURE_FILE in files
    return v


def release_folder(value: Path | str, flag: str = "release") -> Path:
    """A release named as a folder, as an object-storage URI (s3://, gs://: downloaded anew into this machine's
    cache, so the verdict is on the bucket's bytes), or as a hub id in the local hub cache (`org/name[@REVISION]`: what a
    hub user downloaded, nothing is downloaded from a hub): its local folder."""
    text = str(value)
    if is_uri(text):
        return fetch(text, flag, fresh=True)  # a verdict on the bucket's bytes, never on an older cached copy
    p = Path(value)
    if p.exists() or "/" not in text or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return p

    return resolve_model_path(text, flag)


def verified_release(folder: Path, public_key: Path | None = None, flag: str = "--release",
                     strict: bool = False) -> Verification:
    """`check_release`, refusing (RunFailed, exit 1) a release that does not verify."""
    v = check_release(folder, public_key, flag, strict)
    if not v.ok:
        raise RunFailed(f"{v.failure} (the release does not pass `immunize-cli verify`; nothing was checked)")
    return v
