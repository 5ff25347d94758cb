"""Issue 17: signed bundles (Ed25519 over bundle.json), `edgekiln keygen` / `sign`, and the refusals."""

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

import runtime
from pipeline.cli import cli
from runtime.errors import BundleError
from runtime.signing import PUBLIC_KEY_ENV, SIGNATURE_FILE, SigningError


@pytest.fixture
def signed(run_copy, tmp_path):
    """A private copy of the tiny run's bundle, signed with a fresh key: (bundle, key prefix, a golden image)."""
    _, run_dir = run_copy
    bundle = run_dir / "bundle"
    prefix = tmp_path / "keys" / "edge"
    r = CliRunner().invoke(cli, ["keygen", str(prefix)])
    assert r.exit_code == 0, r.output
    assert r.output == f"private key: {prefix}.key\npublic key:  {prefix}.pub\n"
    r = CliRunner().invoke(cli, ["sign", str(bundle), "--key", f"{prefix}.key"])
    assert r.exit_code == 0 and r.output == f"signed: {bundle / SIGNATURE_FILE}\n", r.output
    return bundle, prefix, str(sorted(bundle.glob("golden-*.png"))[0])


def test_keygen_writes_a_private_key_only_its_owner_reads_and_refuses_to_overwrite(signed):
    _, prefix, _ = signed
    assert stat.S_IMODE(os.stat(f"{prefix}.key").st_mode) == 0o600
    assert Path(f"{prefix}.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    r = CliRunner().invoke(cli, ["keygen", str(prefix)])
    assert r.exit_code == 1 and "already exist" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_signed_bundle_loads_with_its_public_key(signed):
    bundle, prefix, img = signed
    clf = runtime.load(bundle, public_key=f"{prefix}.pub")
    assert clf.predict([img])[0].label
    r = CliRunner().invoke(cli, ["predict", str(bundle), img, "--public-key", f"{prefix}.pub"])
    assert r.exit_code == 0 and r.output.startswith(img + "\t"), r.output
    assert runtime.load(bundle).bundle.manifest.trust is not None  # no key asked for: the signature is not needed


def test_unsigned_tampered_and_foreign_bundles_are_refused_in_one_line(signed, tmp_path):
    bundle, prefix, img = signed
    other = tmp_path / "other"
    CliRunner().invoke(cli, ["keygen", str(other)])
    r = CliRunner().invoke(cli, ["predict", str(bundle), img, "--public-key", f"{other}.pub"])
    assert r.exit_code == 1 and r.output == (f"error: {bundle}: bad signature: bundle.json was modified after signing "
                                             f"or signed with another key than {other}.pub\n")
    # one changed byte of bundle.json (here: the OOD threshold, to let everything through)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["trust"]["ood"]["threshold"] = -1e9
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    with pytest.raises(BundleError, match="bad signature: bundle.json was modified after signing"):
        runtime.load(bundle, public_key=f"{prefix}.pub")
    (bundle / SIGNATURE_FILE).unlink()
    r = CliRunner().invoke(cli, ["predict", str(bundle), img], env={PUBLIC_KEY_ENV: f"{prefix}.pub"})
    assert r.exit_code == 1 and r.output == (f"error: {bundle}: the bundle is not signed (no {SIGNATURE_FILE}) and a "
                                             f"public key was given; sign it with `edgekiln sign {bundle} --key KEY`\n")


def test_serve_refuses_an_unsigned_bundle_before_starting(run_copy, tmp_path):
    _, run_dir = run_copy
    CliRunner().invoke(cli, ["keygen", str(tmp_path / "k")])
    r = CliRunner().invoke(cli, ["serve", str(run_dir / "bundle"), "--public-key", str(tmp_path / "k.pub")])
    assert r.exit_code == 1 and "the bundle is not signed" in r.output and len(r.output.strip().splitlines()) == 1


def test_signing_refuses_a_tampered_bundle_and_a_bad_key(run_copy, tmp_path):
    _, run_dir = run_copy
    bundle = run_dir / "bundle"
    CliRunner().invoke(cli, ["keygen", str(tmp_path / "k")])
    r = CliRunner().invoke(cli, ["sign", str(bundle), "--key", str(tmp_path / "k.pub")])  # the public key
    assert r.exit_code == 1 and "not an unencrypted PEM private key" in r.output
    with pytest.raises(SigningError, match="cannot read the public key"):
        runtime.load(bundle, public_key=tmp_path / "missing.pub")
    golden = sorted(bundle.glob("golden-*.png"))[0]
    golden.write_bytes(golden.read_bytes() + b"x")
    r = CliRunner().invoke(cli, ["sign", str(bundle), "--key", str(tmp_path / "k.key")])
    assert r.exit_code == 1 and "sha256 mismatch" in r.output and not (bundle / SIGNATURE_FILE).exists()
