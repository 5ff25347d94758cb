import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import runtime
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import cli
from pipeline.data import eval_transform
from runtime.errors import BundleError
from runtime.preprocess import open_image


def _odd_images(tmp_path):
    """Images of many modes and sizes, saved as files."""
    rng = np.random.default_rng(0)
    paths = []
    rgb = Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8))
    for mode, ext in (("RGB", "png"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg"), ("RGB", "jpg")):
        p = tmp_path / f"img_{mode}.{ext}"
        rgb.convert(mode).save(p)
        paths.append(p)
    tall = Image.fromarray(rng.integers(0, 255, (90, 33, 3), dtype=np.uint8))
    tall.save(tmp_path / "tall.png")
    return paths + [tmp_path / "tall.png"]


def test_runtime_logits_match_pytorch_within_1e4(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    clf = runtime.load(run_dir / "bundle", artifact="onnx")  # the FP32 model (the default is the INT8 one)
    model, meta = load_checkpoint(run_dir / "checkpoints" / "student.safetensors")
    tf = eval_transform(meta.preprocess)
    paths = _odd_images(tmp_path) + sorted((run_dir.parent.parent.parent).rglob("digit2/*.png"))[:3]
    with torch.no_grad():
        ref = model(torch.stack([tf(open_image(p)) for p in paths])).numpy()
    got = clf.logits(paths)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4


def test_predict_accepts_paths_pil_arrays_and_batches(tiny_run, tiny_data):
    _, run_dir, _ = tiny_run
    clf = runtime.load(run_dir / "bundle")
    files = sorted(tiny_data.rglob("*.png"))[:5]
    by_path = clf.logits(files)
    pil = [Image.open(f) for f in files]
    assert np.allclose(clf.logits(pil), by_path, atol=1e-6)
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert np.allclose(clf.logits(arr), by_path, atol=1e-6)  # an NxHxWxC batch
    assert np.allclose(clf.logits(arr[0]), by_path[:1], atol=1e-6)  # one HxWxC image
    preds = clf.predict(files, top_k=3)
    assert len(preds) == 5
    for p, row in zip(preds, by_path):
        assert p.index == int(row.argmax()) and p.label == (clf.class_names[p.index] if p.known else "unknown")
        assert len(p.top_k) == 3 and p.top_k[0] == (clf.class_names[p.index], p.probability)
        assert 0 < p.probability <= 1
    clf.max_batch = 2  # chunked batches give the same answer
    assert np.allclose(clf.logits(files), by_path, atol=1e-6)


def test_runtime_never_imports_torch(tiny_run, tiny_data):
    _, run_dir, _ = tiny_run
    img = sorted(tiny_data.rglob("*.png"))[0]
    code = textwrap.dedent(
        f"""
        import sys
        import runtime
        clf = runtime.load({str(run_dir / 'bundle')!r})
        p = clf.predict([{str(img)!r}])[0]
        print(p.label)
        assert 'torch' not in sys.modules, 'torch was imported'
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("digit0", "digit1", "digit2")


def test_tampered_model_is_refused(run_copy, tiny_data):
    _, run_dir = run_copy
    onnx_path = run_dir / "bundle" / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[-100] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        runtime.load(run_dir / "bundle")
    img = str(sorted(tiny_data.rglob("*.png"))[0])
    r = CliRunner().invoke(cli, ["predict", str(run_dir / "bundle"), img])
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1 and "sha256 mismatch" in r.output


def test_not_a_bundle_and_bad_schema(tmp_path, run_copy):
    with pytest.raises(BundleError, match="not a bundle"):
        runtime.load(tmp_path)
    _, run_dir = run_copy
    meta_path = run_dir / "bundle" / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["schema_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"schema_version 99 .*is not supported"):
        runtime.load(run_dir / "bundle")


def test_unavailable_backend_is_an_error_not_a_fallback(tiny_run):
    import onnxruntime as ort

    _, run_dir, _ = tiny_run
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(runtime.EdgekilnError, match="backend 'cuda' needs onnxruntime's CUDAExecutionProvider"):
        runtime.load(run_dir / "bundle", backend="cuda")


def test_predict_cli(tiny_run, tiny_data):
    _, run_dir, _ = tiny_run
    imgs = sorted(tiny_data.rglob("*.png"))[:2]
    r = CliRunner().invoke(cli, ["predict", str(run_dir / "bundle"), *map(str, imgs), "--top-k", "2"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(imgs[0]) + "\t")
    r = CliRunner().invoke(cli, ["predict", str(run_dir / "bundle"), str(tiny_data / "missing.png")])
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].endswith("missing.png: no such file")
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_predict_answers_every_readable_image_and_names_each_bad_one(tiny_run, tiny_data, tmp_path):
    _, run_dir, _ = tiny_run
    good = sorted(tiny_data.rglob("*.png"))[:3]
    (tmp_path / "broken.png").write_bytes(b"not a png" * 10)
    args = [str(good[0]), str(tmp_path / "missing.png"), str(good[1]), str(tmp_path / "broken.png"), str(good[2])]
    r = CliRunner().invoke(cli, ["predict", str(run_dir / "bundle"), *args])
    assert r.exit_code == 1
    assert [line.split("\t")[0] for line in r.stdout.strip().splitlines()] == [str(p) for p in good]
    err = r.stderr.strip().splitlines()
    assert err[-3].endswith("missing.png: no such file") and "broken.png: " in err[-2]
    assert err[-1] == "error: 2 of 5 image(s) could not be read (each is named above)"
