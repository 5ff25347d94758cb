"""Exporters: everything that turns a trained model into a bundle and checks it.

    builders     the artifact-builder registry (onnx, onnx_fp16, onnx_int8, tensorrt)
    bundle       build_bundle: every artifact, golden images, bundle.json, the parity gate, atomically
    parity       the one parity routine (compare_logits) and the gate over a bundle's artifacts
    thresholds   the one thresholds type and its resolution (config over architecture spec)
    config       the export / validate config sections (pydantic)
    specs        declarative export specs per architecture family
    onnx_export, fp16, quantize, tensorrt, calibration, golden, triton, bench: the steps

Layering: exporters import runtime, never pipeline; artifacts run through runtime.backends.
"""
