"""Ed25519 signatures over a release's manifest (`harden --sign-key`, `verify --public-key`).

The manifest's SHA-256 list detects accidental corruption only: anyone who changes a weight can rewrite the
manifest too. A signature over the manifest's exact bytes, checked with a public key obtained apart from the
release, also detects a rewrite by anyone who does not hold the private key. Keys are PEM files, e.g.
`openssl genpkey -algorithm ed25519 -out key.pem` and `openssl pkey -in key.pem -pubout -out key.pub.pem`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from .errors import RunFailed, UserError
from .outputs import shown

SIGNATURE_FILE = "manifest.sig"
MAX_KEY_BYTES = 16 * 1024


def _read_key_file(path: Path, flag: str) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {shown(str(path))}: is a folder; give the key file (PEM)")
    if not path.is_file():
        raise UserError(f"{flag} {shown(str(path))}: no such file")
    if path.stat().st_size > MAX_KEY_BYTES:
        raise UserError(f"{flag} {shown(str(path))}: not a PEM key (too large)")
    return path.read_bytes()


def load_private_key(path: Path, flag: str = "--sign-key"):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path, flag)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UserError(f"{flag} {shown(str(path))}: the key is encrypted; give an unencrypted Ed25519 PEM key") from None
    except (ValueError, Exception):  # noqa: BLE001 - cryptography raises several kinds for a bad file
        raise UserError(f"{flag} {shown(str(path))}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{flag} {shown(str(path))}: not an Ed25519 key ({type(key).__name__.replace('_', '')})")
    return key


def load_public_key(path: Path, flag: str = "--public-key"):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key_file(path, flag)
    try:
        key = serialization.load_pem_public_key(data)
    except Exception:  # noqa: BLE001
        raise UserError(f"{flag} {shown(str(path))}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"{flag} {shown(str(path))}: not an Ed25519 public key")
    return key


def fingerprint(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign_manifest(manifest_bytes: bytes, private_key) -> bytes:
    """The signature file's bytes for `manifest_bytes`."""
    sig = private_key.sign(manifest_bytes)
    return json.dumps({"algorithm": "ed25519", "signed": "manifest.json",
                       "public_key_sha256": fingerprint(private_key.public_key()),
                       "signature": base64.b64encode(sig).decode()}, indent=2).encode()


def check_signature(folder: Path, manifest_bytes: bytes, public_key_path: Path) -> str:
    """The key's fingerprint if `folder`'s signature matches; RunFailed (exit 1) if not signed or not matching."""
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(public_key_path)
    f = Path(folder) / SIGNATURE_FILE
    if not f.is_file():
        raise RunFailed(f"{folder}: not signed (no {SIGNATURE_FILE})")
    try:
        doc = json.loads(f.read_text())
        sig = base64.b64decode(doc["signature"], validate=True)
        if doc.get("algorithm") != "ed25519":
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise RunFailed(f"{f}: corrupt signature file") from None
    try:
        key.verify(sig, manifest_bytes)
    except InvalidSignature:
        raise RunFailed(f"{f}: the signature does not match manifest.json under --public-key {public_key_path} "
                        "(the manifest was changed, or signed with another key)") from None
    return fingerprint(key)
