"""PyTorch -> ONNX with a dynamic batch axis, checked with onnx.checker, then
simplified with onnxslim when (and only when) the simplified graph gives the
same outputs."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from exporters.errors import ExportError  # noqa: F401  (raised here; importable from here as before)
from exporters.quiet import quiet
from exporters.specs import ExportSpec
from runtime.backends.ort import onnx_runner
from runtime.preprocess import size_hw

INPUT_NAME = ExportSpec.input_names[0]
# protobuf cannot serialize a message over 2 GiB: larger models keep their
# weights in an external-data file beside the .onnx (onnx's external data format).
PROTOBUF_LIMIT = 2**31 - 1
# The exporter logs progress and warnings of its own; the CLI output stays ours.
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "torch.fx")


def needs_external_data(model: nn.Module, margin: float = 0.9) -> bool:
    """True when the weights alone come close to protobuf's 2 GiB message limit."""
    n = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return n > PROTOBUF_LIMIT * margin


@contextmanager
def out_of_place(model: nn.Module):
    """Switch every module's `inplace` flag (ReLU, Hardswish, Dropout, ...) off for the duration.

    The same arithmetic, but the exporter's decomposition pass re-traces each in-place op
    (functionalization): on MobileNetV3-Small this alone is a third of the export time.
    Flags are restored afterwards, so the caller's model is unchanged."""
    flipped = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for m in flipped:
        m.inplace = False
    try:
        yield model
    finally:
        for m in flipped:
            m.inplace = True


def export_onnx(
    model: nn.Module,
    input_size: int | tuple[int, int],
    path: Path,
    opset: int | None = None,
    dynamic_batch: bool = True,
    spec: type[ExportSpec] = ExportSpec,
) -> int:
    """Export `model` (eval mode, NCHW float32 input of side `input_size`, or (H, W)) to `path`; return
    the opset actually written.

    Names, dynamic axes and the default opset come from the architecture's spec.
    Uses the torch.export-based exporter (`dynamo=True`), the default since torch 2.9.
    """
    model = model.eval()
    opset = opset or spec.opset
    if opset < spec.min_opset:
        raise ExportError(f"export.opset: {opset} is below the minimum {spec.min_opset} for {spec.family} models")
    example = torch.randn(2, 3, *size_hw(input_size))
    batch_axis = spec.dynamic_axes.get(spec.input_name(), {}).get(0, "batch")
    dynamic_shapes = ({0: torch.export.Dim(batch_axis, min=1, max=4096)},) if dynamic_batch else None
    external = needs_external_data(model)
    try:
        with quiet(*_EXPORTER_LOGGERS), out_of_place(model):
            program = torch.onnx.export(
                model,
                (example,),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                verbose=False,
            )
            program.save(str(path), external_data=external)
    except Exception as e:  # the exporter raises a zoo of internal error types
        raise ExportError(f"ONNX export failed: {e.__class__.__name__}: {str(e).splitlines()[0][:300]}") from None
    proto = onnx.load(str(path), load_external_data=False)
    try:
        # The checker takes a path for models with external data (it cannot hold them in one message).
        onnx.checker.check_model(str(path) if external else proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported model: {str(e).splitlines()[0]}") from None
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    """Save, switching to the external-data format when the message would pass 2 GiB."""
    big = proto.ByteSize() > PROTOBUF_LIMIT * 0.9
    onnx.save(proto, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
              location=f"{Path(path).name}.data" if big else None)


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return onnx_runner(path).run(x)


def simplify_onnx(path: Path, check_input: np.ndarray, atol: float = 1e-5) -> dict:
    """Simplify `path` in place with onnxslim, kept only when outputs on `check_input` stay within `atol`
    (and the top-1 labels are identical). Returns what happened, for bundle.json."""
    try:
        import onnxslim
    except ImportError:
        return {"tool": "onnxslim", "applied": False, "reason": "onnxslim is not installed (pip install onnxslim)"}
    before_nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    try:
        with quiet():
            slim = onnxslim.slim(str(path))
    except Exception as e:  # a simplifier bug must never break an export: keep the original graph
        return {"tool": "onnxslim", "applied": False, "reason": f"onnxslim failed: {e.__class__.__name__}"}
    candidate = Path(path).with_name(f".slim.{Path(path).name}")
    try:
        save_onnx(slim, candidate)
        ref, out = ort_outputs(path, check_input), ort_outputs(candidate, check_input)
        diff = float(np.abs(ref - out).max()) if ref.size else 0.0
        same_top1 = bool((ref.argmax(1) == out.argmax(1)).all())
        if diff > atol or not same_top1:
            return {"tool": "onnxslim", "applied": False, "reason": f"parity broke (max |Δ| {diff:.3g})"}
        os.replace(candidate, path)
        data = candidate.with_name(candidate.name + ".data")
        if data.exists():
            os.replace(data, Path(path).with_name(Path(path).name + ".data"))
        return {"tool": "onnxslim", "applied": True, "nodes_before": before_nodes,
                "nodes_after": len(slim.graph.node), "max_abs_diff": diff}
    finally:
        candidate.unlink(missing_ok=True)
        candidate.with_name(candidate.name + ".data").unlink(missing_ok=True)
