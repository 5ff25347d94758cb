"""Older bundle.json schemas, upgraded in memory to the current one when a bundle loads (runtime.bundle).

Each step takes one schema to the next, as the readers of that older schema understood the file; the
schema history itself is in runtime.bundle's docstring.
"""

from __future__ import annotations

from typing import Any


def _upgrade_v1(meta: dict[str, Any]) -> dict[str, Any]:
    """edgekiln 0.1.0's bundle.json -> schema 2: per-artifact parity moves onto each artifact,
    builder extras into `details`, and a missing precision means fp32 (as 0.1.0's readers assumed)."""
    meta = dict(meta)
    parity = dict(meta.pop("parity", None) or {})
    per_artifact = parity.pop("artifacts", {}) or {}
    artifacts = {}
    for key, art in (meta.get("artifacts") or {}).items():
        art = dict(art)
        entry = {k: art.pop(k) for k in ("file", "format", "fingerprint") if k in art}
        entry["precision"] = art.pop("precision", None) or "fp32"
        entry["parity"] = per_artifact.get(key)
        entry["details"] = art
        artifacts[key] = entry
    meta["artifacts"] = artifacts
    if parity:
        meta["parity"] = {"passed": bool(parity.get("passed", False)), "test": parity.get("test") or {},
                          "golden": parity.get("golden") or {}}
    meta["schema_version"] = 2
    meta.setdefault("edgekiln_version", "0.1.0")
    meta.setdefault("created", "")
    return meta


def _upgrade_v2(meta: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 -> 3: no measured choice was recorded, so the default artifact is the FP32 ONNX model
    (what schema-2 readers opened), or the first artifact when there is none."""
    meta = dict(meta)
    arts = meta.get("artifacts") or {}
    meta["default_artifact"] = "onnx" if "onnx" in arts or not arts else next(iter(arts))
    meta["schema_version"] = 3
    return meta


def _upgrade_v3(meta: dict[str, Any]) -> dict[str, Any]:
    """Schema 3 -> 4: no `trust` section (raw softmax probabilities, never "unknown"), as schema-3 readers did."""
    return {**meta, "schema_version": 4}


# schema version -> the step that takes it one version up; `upgrade` chains them to the current schema.
UPGRADES = {1: _upgrade_v1, 2: _upgrade_v2, 3: _upgrade_v3}


def upgrade(meta: dict[str, Any], version: int) -> dict[str, Any]:
    """A parsed bundle.json of an older `version` (a key of UPGRADES) -> the current schema."""
    for v in range(version, max(UPGRADES) + 1):
        meta = UPGRADES[v](meta)
    return meta
