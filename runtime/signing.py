"""Signed bundles: a detached Ed25519 signature over bundle.json, which pins the sha256 of every other
file of the bundle, so one signature covers the whole bundle.

    write_key_pair(Path("keys/edgekiln"))               # keys/edgekiln.key (private, 0600) + keys/edgekiln.pub
    sign_bundle(Path("runs/demo/bundle"), Path("keys/edgekiln.key"))   # writes bundle.json.sig
    verify_signature(bundle_json_bytes, Path("runs/demo/bundle"), Path("keys/edgekiln.pub"))

runtime.read_bundle(..., public_key=...) verifies the bytes it then parses (no window between check
and use); `runtime.load`, `edgekiln predict` and `edgekiln serve` take the public key as an argument,
`--public-key` or $EDGEKILN_PUBLIC_KEY. Keys are PEM files (PKCS#8 private key without a passphrase,
SubjectPublicKeyInfo public key); the signature file holds the base64 signature on one line. Needs the
`cryptography` package (`pip install 'edgekiln[serve]'`), imported only when a key is used.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from runtime.errors import BundleError, EdgekilnError
from runtime.files import atomic_write_bytes, atomic_write_text

SIGNATURE_FILE = "bundle.json.sig"
PUBLIC_KEY_ENV = "EDGEKILN_PUBLIC_KEY"


class SigningError(EdgekilnError):
    """A key cannot be read or made, or cryptography is missing."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningError("signed bundles need the cryptography package: pip install 'edgekiln[serve]' "
                           "(or pip install cryptography)") from None
    return serialization, ed25519


def write_key_pair(prefix: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 key pair: PREFIX.key (private, mode 0600) and PREFIX.pub; refuses to overwrite."""
    serialization, ed25519 = _crypto()
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    existing = [str(p) for p in (private, public) if p.exists()]
    if existing and not overwrite:
        raise SigningError(f"{', '.join(existing)} already exist(s); choose another name or delete it first")
    key = ed25519.Ed25519PrivateKey.generate()
    atomic_write_bytes(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), mode=0o600)
    atomic_write_bytes(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _load_key(path: Path, private: bool) -> Any:
    serialization, ed25519 = _crypto()
    kind = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SigningError(f"{path}: cannot read the {kind} key ({e.strerror or e})") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError):
        raise SigningError(f"{path}: not an unencrypted PEM {kind} key (make one with `edgekiln keygen NAME`)") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise SigningError(f"{path}: not an Ed25519 {kind} key (make one with `edgekiln keygen NAME`)")
    return key


def sign_bundle(bundle_dir: Path, private_key: Path) -> Path:
    """Sign the bundle's bundle.json with `private_key`; writes bundle.json.sig next to it.
    The bundle's files are checked against bundle.json first, so a tampered bundle is not signed."""
    from runtime.bundle import BUNDLE_FILE, read_bundle

    key = _load_key(private_key, private=True)
    bundle_dir = Path(bundle_dir)
    data = (bundle_dir / BUNDLE_FILE).read_bytes() if (bundle_dir / BUNDLE_FILE).is_file() else None
    read_bundle(bundle_dir, verify=True)  # parses bundle.json and checks every file's sha256
    if data != (bundle_dir / BUNDLE_FILE).read_bytes():
        raise BundleError(f"{bundle_dir}: bundle.json changed while it was being signed; sign it again")
    out = bundle_dir / SIGNATURE_FILE
    atomic_write_text(out, base64.b64encode(key.sign(data)).decode("ascii") + "\n")
    return out


def verify_signature(data: bytes, bundle_dir: Path, public_key: str | Path) -> None:
    """BundleError unless `data` (the bundle's bundle.json bytes) carries a valid signature by `public_key`."""
    key = _load_key(Path(public_key), private=False)  # SigningError when cryptography is missing
    from cryptography.exceptions import InvalidSignature

    sig_path = Path(bundle_dir) / SIGNATURE_FILE
    if not sig_path.is_file():
        raise BundleError(f"{bundle_dir}: the bundle is not signed (no {SIGNATURE_FILE}) and a public key was given; "
                          f"sign it with `edgekiln sign {bundle_dir} --key KEY`")
    try:
        signature = base64.b64decode(sig_path.read_text().strip(), validate=True)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BundleError(f"{sig_path}: not a signature (base64 text expected); sign the bundle again") from None
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise BundleError(f"{bundle_dir}: bad signature: bundle.json was modified after signing or signed with "
                          f"another key than {public_key}") from None
