"""What can be checked of Dockerfile.gpu without a Docker engine: its stages, that
what it copies exists, that the serving image's entrypoint is a valid `edgekiln
serve` command line, that its healthcheck hits a real route, and that the extras
it installs keep torch out of the serving image."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.gpu"


def _instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out, stage = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        if op.upper() == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.I)
            stage = m.group(1) if m else ""
        out.append((stage, op.upper(), args.strip()))
    return out


def _stage(name: str) -> list[tuple[str, str]]:
    return [(op, args) for st, op, args in _instructions() if st == name]


def test_stages_and_default_target():
    froms = [args for _, op, args in _instructions() if op == "FROM"]
    assert [re.search(r"AS\s+(\S+)", f, re.I).group(1) for f in froms] == ["base", "train", "serve-build", "serve"]
    # `docker build` without --target builds the last stage: the slim serving image.
    assert froms[-1].startswith("base AS serve")


def test_copied_sources_exist():
    for st, op, args in _instructions():
        if op == "COPY" and "--from=" not in args:
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"{st}: COPY {src} does not exist"


def test_serve_image_runs_as_non_root_with_a_healthcheck_on_a_real_route():
    ops = dict(_stage("serve"))
    assert ops["USER"] == "edgekiln"
    m = re.search(r"http://127\.0\.0\.1:8000(/[\w/]+)", ops["HEALTHCHECK"])
    assert m and m.group(1) == "/v2/health/ready"
    pytest.importorskip("fastapi")
    from runtime.serve import ServeSettings, create_app

    app = create_app(ServeSettings(bundle_dir="unused"), classifier=object())
    assert m.group(1) in {getattr(r, "path", None) for r in app.routes}
    assert ops["EXPOSE"] == "8000"


def test_serve_entrypoint_is_a_valid_command_line(tmp_path):
    ops = dict(_stage("serve"))
    entry, cmd = json.loads(ops["ENTRYPOINT"]), json.loads(ops["CMD"])
    assert entry[:2] == ["edgekiln", "serve"] and entry[2] == "/models/bundle"
    from pipeline.cli import cli

    # Parse (not run) the same arguments with a real directory for the bundle: every option
    # must exist and every value must pass its type check.
    args = entry[1:] + cmd
    args[1] = str(tmp_path)
    ctx = cli.make_context("edgekiln", list(args), resilient_parsing=False)
    sub = cli.get_command(ctx, args[0])
    sub_ctx = sub.make_context("serve", args[1:], parent=ctx)
    assert sub_ctx.params["host"] == "0.0.0.0" and sub_ctx.params["port"] == 8000
    assert sub_ctx.params["backend"] == "auto"


def test_serving_extras_keep_torch_out():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = meta["dependencies"] + meta["optional-dependencies"]["serve"]
    names = {re.match(r"[A-Za-z0-9_.\-]+", d).group(0).lower() for d in installed}
    assert not names & {"torch", "torchvision", "timm", "peft"}, names
    serve_build = " ".join(args for op, args in _stage("serve-build") if op == "RUN")
    assert 'pip install ".[serve,gpu]"' in serve_build
    assert '! python -c "import torch"' in serve_build  # the build itself fails if torch slipped in
    gpu = {re.match(r"[A-Za-z0-9_.\-]+", d).group(0).lower() for d in meta["optional-dependencies"]["gpu"]}
    assert not gpu & {"torch", "torchvision", "timm", "peft"}, gpu


def test_gpu_images_check_their_cuda_libraries_and_pin_them():
    # Both images run the library check after installing (get_available_providers() cannot fail),
    # and the gpu extra pins onnxruntime-gpu and the CUDA wheels together.
    for stage in ("train", "serve-build"):
        runs = " ".join(args for op, args in _stage(stage) if op == "RUN")
        assert "check_gpu_libs.py" in runs, stage
    tomllib = pytest.importorskip("tomllib")
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert all("==" in d for d in gpu), gpu


def test_tensorrt_is_opt_in_and_library_path_keeps_the_base_images():
    serve_build = _stage("serve-build")
    assert ("ARG", "WITH_TENSORRT=0") in serve_build
    env = " ".join(args for op, args in _stage("serve") if op == "ENV")
    assert "${LD_LIBRARY_PATH}" in env  # appends to the CUDA base image's path, never replaces it
