"""The runtime's backends, self-test and preprocessing robustness."""

import json
import logging
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

import runtime
from runtime.backends import AUTO_ORDER, backend_names
from runtime.bundle import Golden, read_bundle, write_manifest
from runtime.errors import BackendError, BundleError, ImageError, ImageTooLargeError, ParityError
from runtime.preprocess import open_image


def _providers():
    import onnxruntime as ort

    return ort.get_available_providers()


# ------------------------------------------------------------------ backends


def test_every_registered_backend_has_a_test():
    # Adding a backend to the registry without a test here fails this test.
    # openvino: tests/test_openvino.py
    assert set(backend_names()) == {"cpu", "cuda", "tensorrt", "tensorrt-engine", "openvino", "auto"}
    assert AUTO_ORDER == ("tensorrt", "cuda", "cpu")


def test_cpu_backend_and_intra_op_threads(tiny_run):
    _, run_dir, _ = tiny_run
    clf = runtime.load(run_dir / "bundle", backend="cpu", intra_op_threads=1)
    assert clf.backend == "cpu" and clf.provider == "CPUExecutionProvider"
    assert clf.session.ort_session.get_session_options().intra_op_num_threads == 1
    x = np.zeros((2, *clf.input_shape), dtype=np.float32)
    assert clf.run(x).shape == (2, len(clf.class_names))


def test_unknown_backend_lists_the_valid_ones(tiny_run):
    _, run_dir, _ = tiny_run
    with pytest.raises(BackendError,
                       match=r"unknown backend 'npu'; valid: cpu, cuda, tensorrt, tensorrt-engine, openvino, auto"):
        runtime.load(run_dir / "bundle", backend="npu")


@pytest.mark.parametrize("backend,provider", [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")])
def test_unavailable_gpu_backend_is_an_error_listing_providers(tiny_run, backend, provider):
    _, run_dir, _ = tiny_run
    if provider in _providers():
        pytest.skip(f"this install has {provider}")
    with pytest.raises(BackendError) as e:
        runtime.load(run_dir / "bundle", backend=backend)
    msg = str(e.value)
    assert f"backend '{backend}' needs onnxruntime's {provider}" in msg
    assert "available: " + ", ".join(_providers()) in msg


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_auto_picks_the_best_available_and_logs_it(tiny_run):
    _, run_dir, _ = tiny_run
    logger = logging.getLogger("edgekiln.runtime")
    handler, old_level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        clf = runtime.load(run_dir / "bundle", backend="auto")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = "\n".join(handler.lines)
    expected = next(b for b, p in (("tensorrt", "TensorrtExecutionProvider"), ("cuda", "CUDAExecutionProvider"),
                                   ("cpu", "CPUExecutionProvider")) if p in _providers())
    if expected != "cpu":
        pytest.skip("GPU providers present: which one starts depends on the machine's libraries")
    assert clf.backend == "cpu"
    assert "auto chose backend 'cpu' (CPUExecutionProvider)" in text
    assert "skipped tensorrt: no TensorrtExecutionProvider; cuda: no CUDAExecutionProvider" in text


def test_tensorrt_engine_backend_needs_an_engine_artifact(tiny_run):
    _, run_dir, _ = tiny_run
    with pytest.raises(BundleError, match=r"bundle has no 'tensorrt' artifact \(has: onnx"):
        runtime.load(run_dir / "bundle", backend="tensorrt-engine")


def test_io_binding_path_gives_the_same_logits(tiny_run):
    """The CUDA/TensorRT sessions' IO-binding code, run on the CPU device so it is exercised without a GPU."""
    from runtime.backends import IOBindingSession

    _, run_dir, _ = tiny_run
    clf = runtime.load(run_dir / "bundle", backend="cpu")
    bound = IOBindingSession(clf.session.ort_session, clf.bundle.input_name, clf.bundle.output_name, "cpu",
                             device_id=0, device="cpu")
    x = np.random.default_rng(0).normal(size=(5, *clf.input_shape)).astype(np.float32)
    assert np.array_equal(bound.run(x), clf.run(x))
    assert np.array_equal(bound.run(x.astype(np.float64)[:2]), clf.run(x[:2]))  # cast, any batch size


@pytest.mark.gpu
def test_cuda_backend_matches_cpu(tiny_run, tiny_data):
    if "CUDAExecutionProvider" not in _providers():
        pytest.skip("needs onnxruntime-gpu with the CUDA execution provider")
    _, run_dir, _ = tiny_run
    files = sorted(tiny_data.rglob("*.png"))[:6]
    cpu = runtime.load(run_dir / "bundle", backend="cpu").logits(files)
    gpu = runtime.load(run_dir / "bundle", backend="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    assert np.abs(gpu.logits(files) - cpu).max() <= 1e-4


@pytest.mark.tensorrt
def test_tensorrt_backend_matches_cpu(tiny_run, tiny_data, tmp_path, monkeypatch):
    if "TensorrtExecutionProvider" not in _providers():
        pytest.skip("needs onnxruntime-gpu with the TensorRT execution provider")
    pytest.importorskip("tensorrt", reason="needs TensorRT's libraries (pip install tensorrt-cu12)")
    monkeypatch.setenv("EDGEKILN_TRT_CACHE", str(tmp_path / "trt"))
    _, run_dir, _ = tiny_run
    files = sorted(tiny_data.rglob("*.png"))[:6]
    cpu = runtime.load(run_dir / "bundle", backend="cpu").logits(files)
    trt = runtime.load(run_dir / "bundle", backend="tensorrt")
    assert trt.provider == "TensorrtExecutionProvider"
    assert np.abs(trt.logits(files) - cpu).max() <= 1e-3
    assert any((tmp_path / "trt").iterdir())  # the engine was cached


# ------------------------------------------- artifacts and files outside a bundle


def test_session_for_artifact_runs_onnx_on_the_named_backend(tiny_run):
    from runtime.backends import session_for_artifact

    _, run_dir, _ = tiny_run
    clf = runtime.load(run_dir / "bundle", backend="cpu", artifact="onnx")
    x = np.random.default_rng(2).normal(size=(3, *clf.input_shape)).astype(np.float32)
    sess = session_for_artifact(clf.bundle, "onnx", intra_op_threads=1)
    assert (sess.backend, sess.provider, sess.model_file) == ("cpu", "CPUExecutionProvider", "model.onnx")
    assert sess.ort_session.get_session_options().intra_op_num_threads == 1
    assert np.array_equal(sess.run(x), clf.run(x))
    if _providers() == ["CPUExecutionProvider"]:
        assert session_for_artifact(clf.bundle, "onnx", backend="auto").backend == "cpu"
    with pytest.raises(BundleError, match=r"bundle has no 'onnx_fp16' artifact \(has: onnx"):
        session_for_artifact(clf.bundle, "onnx_fp16")
    # the backends an artifact runs on are the ones bundle.json lists for it ("runtimes")
    assert clf.bundle.artifact("onnx").runtimes == ["cpu", "cuda", "tensorrt", "openvino"]
    with pytest.raises(BackendError, match=r"artifact 'onnx' \(onnx\) runs on backend cpu, cuda, tensorrt, openvino, "
                                           r"not on 'tensorrt-engine'"):
        session_for_artifact(clf.bundle, "onnx", backend="tensorrt-engine")


def test_open_onnx_options_and_onnx_runner(tiny_run):
    from runtime.backends import onnx_runner, open_onnx

    _, run_dir, _ = tiny_run
    path = run_dir / "bundle" / "model.onnx"
    sess = open_onnx(path, intra_op_threads=1, inter_op_threads=1, optimization="basic")
    opts = sess.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert str(opts.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    with pytest.raises(ValueError, match="optimization 'max' is not one of disable, basic, extended, all"):
        open_onnx(path, optimization="max")
    if "CUDAExecutionProvider" not in _providers():
        with pytest.raises(BackendError, match="needs onnxruntime's CUDAExecutionProvider"):
            open_onnx(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BundleError, match="onnxruntime cannot load it"):
        open_onnx(run_dir / "bundle" / "bundle.json")
    runner = onnx_runner(path, intra_op_threads=1)  # names default to the model's first input and output
    assert (runner.input_name, runner.output_name, runner.backend) == ("input", "logits", "cpu")
    clf = runtime.load(run_dir / "bundle", backend="cpu", artifact="onnx")
    x = np.zeros((2, *clf.input_shape), dtype=np.float32)
    assert np.array_equal(runner.run(x), clf.run(x))


# ----------------------------------------------------------------- self-test


def _bundle_with_golden(run_copy, tiny_data, n=4, shift=0.0):
    """Copy golden images into the bundle and record the PyTorch checkpoint's logits for them."""
    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.data import eval_transform

    _, run_dir = run_copy
    bundle = run_dir / "bundle"
    names = []
    for i, src in enumerate(sorted(tiny_data.rglob("*.png"))[::10][:n]):
        name = f"golden_{i}.png"
        shutil.copy(src, bundle / name)
        names.append(name)
    model, meta = load_checkpoint(run_dir / "checkpoints" / "student.safetensors")
    tf = eval_transform(meta.preprocess)
    with torch.no_grad():
        logits = model(torch.stack([tf(open_image(bundle / f)) for f in names])).numpy()
    logits[0, 0] += shift
    m = read_bundle(bundle).manifest
    write_manifest(bundle, m.model_copy(update={"golden": Golden(files=names, logits=logits.tolist(), atol=1e-4)}))
    return bundle


def test_self_test_passes_on_golden_images(run_copy, tiny_data):
    bundle = _bundle_with_golden(run_copy, tiny_data)
    meta = json.loads((bundle / "bundle.json").read_text())
    assert "golden_0.png" in meta["files"]  # golden images are hash-verified like the model
    report = runtime.load(bundle, artifact="onnx").self_test()
    assert report.passed and report.n_images == 4 and report.backend == "cpu"
    assert report.max_abs_diff <= 1e-4 and report.atol == 1e-4


def test_self_test_fails_on_wrong_logits(run_copy, tiny_data):
    bundle = _bundle_with_golden(run_copy, tiny_data, shift=0.5)
    with pytest.raises(ParityError, match=r"self-test failed on backend 'cpu' \(onnx\): max \|Δlogit\| 5\.\d+e-01 "
                                          r".*worst image golden_0\.png"):
        runtime.load(bundle, artifact="onnx").self_test()


def test_self_test_without_golden_section_is_a_bundle_error(run_copy):
    _, run_dir = run_copy
    bundle = run_dir / "bundle"
    m = read_bundle(bundle).manifest  # export writes golden images; an older or hand-made bundle may lack them
    write_manifest(bundle, m.model_copy(update={"golden": None}))
    with pytest.raises(BundleError, match="bundle has no golden images"):
        runtime.load(bundle).self_test()


def test_self_test_missing_golden_file(run_copy, tiny_data):
    bundle = _bundle_with_golden(run_copy, tiny_data)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["golden"]["files"][1] = "../outside.png"
    # the typed contract refuses such a name whenever bundle.json is read, before any self-test
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="'../outside.png' must be a plain name of a file inside the bundle"):
        runtime.load(bundle)


# ------------------------------------------------------------- preprocessing


def _eval_reference(spec, img):
    """The training side's eval transform (torchvision) on the same decoded image."""
    from pipeline.data import eval_transform

    return eval_transform(spec)(img).numpy()


MODES = ["RGB", "L", "RGBA", "LA", "P", "CMYK", "I;16"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(1, 1), (7, 300), (301, 5), (45, 70)])
def test_any_mode_and_size_matches_the_training_transform(tiny_run, tmp_path, mode, size):
    _, run_dir, _ = tiny_run
    clf = runtime.load(run_dir / "bundle")
    rng = np.random.default_rng(sum(size))
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16))
        ext = "png"
    else:
        img = rgb.convert(mode)
        ext = "jpg" if mode == "CMYK" else ("tiff" if mode == "LA" else "png")
    path = tmp_path / f"x.{ext}"
    img.save(path)
    x = clf.preprocess(path)
    assert x.shape == (1, *clf.input_shape) and x.dtype == np.float32 and np.isfinite(x).all()
    decoded = open_image(path)
    assert decoded.mode == "RGB" and decoded.size == size
    assert np.abs(x[0] - _eval_reference(clf.spec, decoded)).max() <= 1e-6
    if mode == "I;16":  # 16-bit gray is scaled to 8 bits, not clipped at 255
        a16 = np.asarray(img, dtype=np.float64)
        assert np.abs(np.asarray(decoded)[..., 0] - np.round(a16 * 255 / 65535)).max() <= 1


def test_palette_with_transparency_and_arrays(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    clf = runtime.load(run_dir / "bundle")
    p = Image.new("P", (20, 30))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 10, 30))
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "palette images with transparency" warning must not fire
        a = np.asarray(open_image(tmp_path / "pt.png"))
    assert a.shape == (30, 20, 3) and tuple(a[0, 0]) == (255, 0, 0) and tuple(a[0, 15]) == (0, 0, 0)
    gray = np.full((9, 9), 200, np.uint8)
    assert np.allclose(clf.preprocess(gray), clf.preprocess(np.stack([gray] * 3, axis=-1)))


def test_exif_orientation_is_applied(tiny_run, tmp_path):
    """A real JPEG stored sideways with EXIF Orientation=6 ("rotate 90° clockwise to display")."""
    _, run_dir, _ = tiny_run
    clf = runtime.load(run_dir / "bundle")
    stored = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 high: left half black, right half white
    stored[:, 30:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    assert Image.open(path).getexif()[0x0112] == 6 and Image.open(path).size == (60, 40)
    shown = np.asarray(open_image(path))
    assert shown.shape == (60, 40, 3)  # rotated upright: 40 wide, 60 high
    assert shown[:25].mean() < 20 and shown[-25:].mean() > 235  # the black half is now on top
    # The runtime sees the upright image: same logits as an upright copy without EXIF.
    upright = tmp_path / "upright.png"
    Image.fromarray(shown).save(upright)
    assert np.abs(clf.logits(path) - clf.logits(upright)).max() <= 1e-5
    assert np.abs(clf.logits(path) - clf.logits(Image.fromarray(stored))).max() > 1e-3


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path)  # 100 megapixels, a few kB on disk
    assert path.stat().st_size < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match=r"10000x10000 = 100\.0 megapixels, over the limit of 50\.0"):
            open_image(path)
        with pytest.raises(ImageTooLargeError, match="over the limit of 0.0 megapixels"):
            open_image(tmp_path / "bomb.png", max_pixels=10)
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    assert open_image(small, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageTooLargeError, match=r"100x100 = 0.0 megapixels"):
        open_image(small, max_pixels=9_999)


def test_truncated_and_non_images_are_image_errors(tmp_path):
    rng = np.random.default_rng(0)
    buf = tmp_path / "a.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, quality=90)
    data = buf.read_bytes()
    with pytest.raises(ImageError, match="cannot decode image .*truncated"):
        open_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"hello, world")
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"")
