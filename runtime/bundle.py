"""The bundle: a self-describing deployment directory (bundle.json + model files).

Reading and verifying a bundle needs nothing from the training side; the
exporters write bundles through `write_bundle_json` so both sides agree on one
schema.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import BundleError
from runtime.preprocess import PreprocessSpec

SCHEMA_VERSION = 1
BUNDLE_FILE = "bundle.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temp file in the same directory, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Bundle:
    root: Path
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.meta["preprocess"])

    @property
    def input_name(self) -> str:
        return self.meta["input"]["name"]

    @property
    def output_name(self) -> str:
        return self.meta["output"]["name"]

    def path(self, key: str = "onnx") -> Path:
        """Path of an artifact, by its key in bundle.json's "artifacts" section."""
        arts = self.meta.get("artifacts", {})
        if key not in arts:
            raise BundleError(f"{self.root}: bundle has no '{key}' artifact (has: {', '.join(sorted(arts)) or 'none'})")
        return self.root / arts[key]["file"]

    def golden(self) -> tuple[list[str], list[Path], Any, float]:
        """bundle.json's "golden" section, checked: (file names, their paths inside the bundle,
        expected logits as a float64 array of shape (files, classes), atol). BundleError when the
        section is missing or malformed, or a file is missing or lies outside the bundle."""
        root, golden = self.root, self.meta.get("golden")
        if not golden:
            raise BundleError(
                f"{root}: bundle has no golden images (no 'golden' section in bundle.json) to self-test against; "
                "re-export it with an edgekiln version that stores golden images"
            )
        try:
            files = [str(f) for f in golden["files"]]
            expected = np.asarray(golden["logits"], dtype=np.float64)
            atol = float(golden.get("atol", 1e-4))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{root}: bad 'golden' section in bundle.json ({e.__class__.__name__}: {e})") from None
        n_classes = len(self.class_names)
        if not files or expected.shape != (len(files), n_classes):
            raise BundleError(
                f"{root}: bad 'golden' section in bundle.json: {len(files)} files but logits of shape "
                f"{tuple(expected.shape)} (expected ({len(files)}, {n_classes}))"
            )
        paths = []
        real_root = root.resolve()
        for name in files:
            path = (root / name).resolve()
            if real_root not in path.parents:
                raise BundleError(f"{root}: golden file '{name}' lies outside the bundle")
            if not path.is_file():
                raise BundleError(f"{root}: golden file '{name}' listed in bundle.json is missing")
            paths.append(path)
        return files, paths, expected, atol


def read_bundle(root: str | os.PathLike, verify: bool = True) -> Bundle:
    """Load bundle.json and (by default) check every listed file's sha256."""
    root = Path(root)
    meta_path = root / BUNDLE_FILE
    if not meta_path.is_file():
        raise BundleError(f"{root}: not a bundle (no {BUNDLE_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path}: not valid JSON ({e})") from None
    for key in ("schema_version", "class_names", "preprocess", "input", "output", "files", "artifacts"):
        if key not in meta:
            raise BundleError(f"{meta_path}: missing '{key}'")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise BundleError(
            f"{meta_path}: schema_version {meta['schema_version']} is not supported (this runtime reads {SCHEMA_VERSION})"
        )
    try:
        PreprocessSpec.from_dict(meta["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{meta_path}: bad 'preprocess' section ({e})") from None
    if verify:
        verify_files(root, meta)
    return Bundle(root=root, meta=meta)


def verify_files(root: Path, meta: dict[str, Any]) -> None:
    for name, info in meta["files"].items():
        p = root / name
        if not p.is_file():
            raise BundleError(f"{root}: file '{name}' listed in {BUNDLE_FILE} is missing")
        digest = sha256_file(p)
        if digest != info["sha256"]:
            raise BundleError(
                f"{p}: sha256 mismatch (expected {info['sha256'][:12]}…, got {digest[:12]}…); "
                "the file was modified after export — re-export the bundle"
            )


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_bundle_json(root: Path, meta: dict[str, Any]) -> None:
    """Fill in schema version and file hashes, then write bundle.json atomically."""
    meta = dict(meta)
    meta["schema_version"] = SCHEMA_VERSION
    meta["format"] = "edgekiln-bundle"
    meta["files"] = {
        p.name: file_entry(p) for p in sorted(root.iterdir()) if p.is_file() and p.name != BUNDLE_FILE and not p.name.startswith(".")
    }
    atomic_write_text(root / BUNDLE_FILE, json.dumps(meta, indent=2, sort_keys=False) + "\n")
