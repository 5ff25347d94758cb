"""bundle.json as a typed contract: what loads, what is refused, and with which message."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.bundle import SCHEMA_VERSION, BundleManifest, read_bundle, write_manifest
from runtime.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    dest = tmp_path / "bundle"
    shutil.copytree(run_dir / "bundle", dest)
    return dest


def _edit(bundle, fn):
    meta = json.loads((bundle / "bundle.json").read_text())
    fn(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta))


def _as_v2(meta: dict) -> None:
    """Rewrite a schema-4 bundle.json the way edgekiln wrote schema 2 (no measured default artifact, no trust)."""
    meta["schema_version"] = 2
    for key in ("default_artifact", "default_backend", "deploy", "trust"):
        meta.pop(key)


def _as_v1(meta: dict) -> None:
    """Rewrite a schema-4 bundle.json the way edgekiln 0.1.0 wrote it."""
    _as_v2(meta)
    meta["schema_version"] = 1
    meta["edgekiln_version"] = "0.1.0"
    per_artifact = {}
    for key, art in meta["artifacts"].items():
        per_artifact[key] = art.pop("parity")
        details = art.pop("details")
        art.pop("runtimes")
        if art.get("fingerprint") is None:
            art.pop("fingerprint")
        if key == "onnx":
            art.pop("precision")  # 0.1.0's fp32 model had no precision: readers took it as fp32
        art.update(details)
    meta["parity"]["artifacts"] = per_artifact


def test_a_0_1_0_bundle_loads_and_serves(bundle_copy):
    import runtime

    before = read_bundle(bundle_copy).manifest
    _edit(bundle_copy, _as_v1)
    bundle = read_bundle(bundle_copy)
    m = bundle.manifest
    assert m.schema_version == SCHEMA_VERSION and m.edgekiln_version == "0.1.0"
    assert m.artifacts["onnx"].precision == "fp32" and m.artifacts["onnx"].runtimes == ["cpu", "cuda", "tensorrt", "openvino"]
    assert m.artifacts["onnx"].parity == before.artifacts["onnx"].parity
    assert m.artifacts["onnx"].details == before.artifacts["onnx"].details
    assert m.parity.passed == before.parity.passed
    clf = runtime.load(bundle_copy)
    assert clf.self_test().passed


def test_a_schema_2_bundle_loads_with_the_fp32_model_as_default(bundle_copy):
    import runtime

    _edit(bundle_copy, lambda m: (m.update(default_artifact="onnx_int8"), _as_v2(m)))
    raw = json.loads((bundle_copy / "bundle.json").read_text())
    assert raw["schema_version"] == 2 and "default_artifact" not in raw
    m = read_bundle(bundle_copy).manifest
    assert m.schema_version == SCHEMA_VERSION == 4 and m.default_artifact == "onnx" and m.deploy is None
    clf = runtime.load(bundle_copy, backend="auto")
    assert clf.artifact == "onnx" and clf.session.model_file.endswith("model.onnx") and clf.self_test().passed


def test_a_newer_schema_is_refused_in_one_line(bundle_copy):
    _edit(bundle_copy, lambda m: m.update(schema_version=9, edgekiln_version="9.0.0"))
    with pytest.raises(BundleError) as e:
        read_bundle(bundle_copy)
    msg = str(e.value)
    assert "\n" not in msg
    assert "schema_version 9 (written by edgekiln 9.0.0) is not supported" in msg
    assert "re-export it with this edgekiln (edgekiln export CONFIG)" in msg


@pytest.mark.parametrize("where", ["files", "artifact", "golden"])
@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx", ".."])
def test_every_file_name_must_stay_inside_the_bundle(bundle_copy, where, name):
    def edit(m):
        if where == "files":
            m["files"][name] = m["files"].pop("model.onnx")
        elif where == "artifact":
            m["artifacts"]["onnx"]["file"] = name
        else:
            m["golden"]["files"][0] = name

    _edit(bundle_copy, edit)
    with pytest.raises(BundleError, match="must be a plain name of a file inside the bundle directory"):
        read_bundle(bundle_copy, verify=False)


def test_a_symlink_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle_copy / "model.onnx", outside)
    (bundle_copy / "model.onnx").unlink()
    (bundle_copy / "model.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="'model.onnx' lies outside the bundle"):
        read_bundle(bundle_copy)


def test_bad_fields_are_named(bundle_copy):
    def edit(m):
        m["artifacts"]["onnx"]["precision"] = "fp64"
        del m["class_names"]

    _edit(bundle_copy, edit)
    with pytest.raises(BundleError) as e:
        read_bundle(bundle_copy, verify=False)
    assert "artifacts.onnx.precision" in str(e.value) and "class_names: Field required" in str(e.value)


def test_write_manifest_hashes_files_and_refuses_missing_ones(bundle_copy):
    m = read_bundle(bundle_copy).manifest
    (bundle_copy / "extra.txt").write_text("x")
    written = write_manifest(bundle_copy, m)
    assert "extra.txt" in written.files and read_bundle(bundle_copy).manifest == written
    arts = {**m.artifacts, "onnx_fp16": m.artifacts["onnx"].model_copy(update={"file": "model.fp16.onnx"})}
    with pytest.raises(BundleError, match="names files that are not in the bundle: model.fp16.onnx"):
        write_manifest(bundle_copy, m.model_copy(update={"artifacts": arts}))
    assert isinstance(read_bundle(bundle_copy).manifest, BundleManifest)  # the failed write left bundle.json as it was
