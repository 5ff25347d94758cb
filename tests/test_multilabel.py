"""Multi-label classification (data.task: multilabel): label sets from manifests, the per-label
thresholds chosen on validation, KD on sigmoid outputs, per-label parity, and one tiny run end to end
through the runtime, `edgekiln predict` and the server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from exporters.multilabel import choose_thresholds
from exporters.parity import compare_multilabel
from exporters.thresholds import Thresholds
from pipeline.config import build_config
from pipeline.data import Split, make_split
from pipeline.errors import ConfigError, DataError
from pipeline.training import kd_loss
from runtime.bundle import MultiLabel
from tests.conftest import tiny_config_dict
from tests.multilabel_data import write_digit_mosaics

# --------------------------------------------------------------------------- manifest and split


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_manifest_of_label_sets_parses_and_splits_with_its_label_sets(tmp_path, fmt):
    manifest = write_digit_mosaics(tmp_path / "d", n=40, fmt=fmt)
    split = make_split(manifest.parent, 0.2, 0.2, 0, manifest=manifest, task="multilabel")
    assert split.class_names == ["digit0", "digit1", "digit2", "digit3"]
    assert sorted(p for part in ("train", "val", "test") for p, _ in getattr(split, part)) == \
        [f"img/{i:03d}.png" for i in range(40)]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()] if fmt == "jsonl" else [
        {"path": p, "labels": ls.split("|")} for p, ls in (r.split(",") for r in manifest.read_text().splitlines()[1:])]
    want = {r["path"]: sorted(split.class_names.index(n) for n in r["labels"]) for r in rows}
    assert all(ys == want[p] for part in ("train", "val", "test") for p, ys in getattr(split, part))
    assert split.labels("val")[0] == [1.0 if i in split.val[0][1] else 0.0 for i in range(4)]  # multi-hot
    split.save(tmp_path / "split.json")
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["task"] == "multilabel" and saved["test"][0][1] == split.test[0][1]
    assert Split.load(tmp_path / "split.json") == split
    again = make_split(manifest.parent, 0.2, 0.2, 0, manifest=manifest, task="multilabel")
    assert again == split  # seeded


def test_a_csv_manifest_without_a_labels_column_is_refused_in_one_line(tmp_path):
    write_digit_mosaics(tmp_path, n=4)
    (tmp_path / "m.csv").write_text("path,label\nimg/000.png,digit1\n")
    with pytest.raises(DataError, match=r"the header needs the columns path,labels \(missing: labels"):
        make_split(tmp_path, 0.2, 0.2, 0, manifest=tmp_path / "m.csv", task="multilabel")


def test_label_separator_is_configurable(tmp_path):
    manifest = write_digit_mosaics(tmp_path, n=30, separator=";")
    split = make_split(tmp_path, 0.2, 0.2, 0, manifest=manifest, task="multilabel", separator=";")
    assert split.class_names == ["digit0", "digit1", "digit2", "digit3"]


def _raw(tmp_path, **data):
    raw = tiny_config_dict(tmp_path, tmp_path / "runs")
    raw["data"] = {"manifest": str(tmp_path / "labels.csv"), "task": "multilabel", **data}
    return raw


@pytest.mark.parametrize("change, message", [
    ({"data": {"root": "x", "task": "multilabel"}},
     "config: data: Value error, task multilabel needs `manifest`"),
    ({"export": {"precisions": ["fp32", "int8"]}},
     "config: <root>: export.precisions: int8 is not supported with data.task multilabel"),
    ({"export": {"openvino": {"precisions": ["int8"]}}},
     "config: <root>: export.openvino.precisions: int8 is not supported with data.task multilabel"),
    ({"adapt": {"feature_extraction": {"head": "logistic_regression"}}},
     "config: <root>: adapt.feature_extraction.head 'logistic_regression' is one softmax model"),
    ({"data": {"manifest": "m.csv", "task": "multilabel", "balance": "weights"}},
     "config: data: balance must be 'none' with task multilabel"),
])
def test_what_multilabel_does_not_support_is_refused_in_one_line_naming_the_field(tmp_path, change, message):
    raw = _raw(tmp_path)
    raw.update(change)
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    lines = str(e.value).splitlines()
    assert len(lines) == 1 and lines[0].replace("Value error, ", "").startswith(message.replace("Value error, ", ""))


# --------------------------------------------------------------------------- thresholds, KD loss


def test_thresholds_chosen_on_validation_maximise_each_labels_f1():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y = rng.random((80, 4)) < np.array([0.1, 0.3, 0.5, 0.7])
    probs = np.clip(0.35 * y + 0.65 * rng.random((80, 4)), 0, 1)
    thresholds = choose_thresholds(probs, y)
    for c, t in enumerate(thresholds):
        best = max(f1_score(y[:, c], probs[:, c] >= g) for g in np.unique(probs[:, c]))
        assert f1_score(y[:, c], probs[:, c] >= t) == pytest.approx(best)
        assert not np.isclose(probs[:, c], t).any()  # between two probabilities, not on one
    assert choose_thresholds(probs[:, :1], np.zeros((80, 1))) == [0.5]  # no positive image: 0.5


def test_kd_on_sigmoid_outputs_mixes_soft_and_label_bce():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    y = (torch.rand(6, 3, generator=g) > 0.5).float()
    label_bce = F.binary_cross_entropy_with_logits(s, y)
    soft = F.binary_cross_entropy_with_logits(s / 2, torch.sigmoid(t / 2))
    assert kd_loss(s, t, y, temperature=2.0, alpha=0.0) == pytest.approx(float(label_bce))
    assert kd_loss(s, t, y, temperature=2.0, alpha=1.0) == pytest.approx(4 * float(soft))
    assert kd_loss(s, t, y, temperature=2.0, alpha=0.3) == pytest.approx(0.3 * 4 * float(soft) + 0.7 * float(label_bce))
    # The soft term is smallest where the student matches the teacher (BCE to its own sigmoid = entropy).
    assert kd_loss(t, t, y, 1.0, 1.0) < kd_loss(s, t, y, 1.0, 1.0)
    unlabeled = torch.cat([y[:3], torch.full((3, 3), -1.0)])  # rows of -1: the soft term only
    want = 0.5 * 4 * float(soft) + 0.5 * float(F.binary_cross_entropy_with_logits(s[:3], y[:3]))
    assert kd_loss(s, t, unlabeled, 2.0, 0.5) == pytest.approx(want)


# --------------------------------------------------------------------------- parity


def test_parity_counts_per_label_decision_agreement():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(10, 3)) * 3
    y = (ref > 0).astype(float)
    ml = MultiLabel(thresholds=[0.5, 0.5, 0.5])
    names = [f"{i}.png" for i in range(10)]
    same = compare_multilabel("onnx", ref, ref.copy(), y, Thresholds(min_agreement=0.9), ml, names,
                              class_names=["a", "b", "c"])
    assert (same.agreement, same.agreement_n, same.flipped, same.failures) == (1.0, 30, [], [])
    assert same.reference_accuracy == same.artifact_accuracy == 1.0 and same.task == "multilabel"
    cand = ref.copy()
    cand[4, 1] = -ref[4, 1]  # one label of one image crosses its threshold
    one = compare_multilabel("onnx", ref, cand, y, Thresholds(min_agreement=0.999), ml, names,
                             class_names=["a", "b", "c"])
    assert one.agreement == pytest.approx(29 / 30) and one.agreement_n == 30
    assert [f["image"] for f in one.flipped] == ["4.png"] and one.artifact_accuracy == pytest.approx(0.9)
    assert one.max_abs_logit_diff == pytest.approx(2 * abs(ref[4, 1]))
    assert any(f.startswith("per-label decision agreement 96.67% < 99.90% on 30 image x label decisions")
               for f in one.failures), one.failures


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    """`edgekiln run` on 60 tiny mosaics (teacher, distilled compact CNN, export, parity gate)."""
    from pipeline.cli import cli

    base = tmp_path_factory.mktemp("mlrun")
    manifest = write_digit_mosaics(base / "data", n=60)
    raw = tiny_config_dict(base / "data", base / "runs", name="ml")
    raw["data"] = {"manifest": str(manifest), "task": "multilabel", "batch_size": 16}
    raw["validate"] = {}
    (base / "p.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["run", str(base / "p.yaml")])
    assert result.exit_code == 0, result.output
    return base / "runs" / "ml", manifest


def test_a_multilabel_run_passes_the_parity_gate_and_bundles_its_thresholds(ml_run):
    run, _ = ml_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["onnx"]["passed"] and metrics["validate"]["passed"]
    assert metrics["validate"]["task"] == "multilabel"
    assert "onnx_int8" not in metrics["onnx"]["artifacts"]  # fp32 (+ fp16 with a GPU) for multilabel
    assert metrics["teacher"]["task"] == "multilabel" and 0 < metrics["teacher"]["map"] <= 1
    manifest = json.loads((run / "bundle" / "bundle.json").read_text())
    assert manifest["task"] == "multilabel" and manifest["trust"] is None
    assert len(manifest["multilabel"]["thresholds"]) == 4
    report = (run / "report.md").read_text()
    assert "## Multi-label: thresholds and test figures" in report
    # the pipeline table names what its figures are: mAP for the models, exact match for the ONNX model
    assert "| test mAP (models) / exact match (ONNX) | size MB | per-label agreement |" in report
    assert "top-1 agreement" not in report


def test_the_runtime_predict_and_the_server_return_the_same_label_sets(ml_run):
    from fastapi.testclient import TestClient

    import runtime
    from pipeline.cli import cli
    from runtime.multilabel import decide
    from runtime.serve import ServeSettings, create_app

    run, manifest = ml_run
    paths = [manifest.parent / f"img/{i:03d}.png" for i in range(3)]
    clf = runtime.load(run / "bundle")
    preds = clf.predict(paths)
    probs, chosen = decide(clf.logits(paths), clf.multilabel.thresholds)
    for p, pr, ch in zip(preds, probs, chosen):
        assert isinstance(p, runtime.MultiLabelPrediction)
        assert list(p.probabilities) == clf.class_names
        assert np.allclose(list(p.probabilities.values()), pr)
        assert sorted(p.labels) == [n for n, c in zip(clf.class_names, ch) if c]

    out = CliRunner().invoke(cli, ["predict", str(run / "bundle"), *map(str, paths)])
    assert out.exit_code == 0, out.output
    first = out.output.splitlines()[0].split("\t")
    assert first[:2] == [str(paths[0]), ",".join(preds[0].labels) or "-"]
    assert first[2].startswith(f"digit0:{preds[0].probabilities['digit0']:.3f}")

    settings = ServeSettings(bundle_dir=str(run / "bundle"), backend="cpu", max_batch=8, max_delay_ms=2)
    with TestClient(create_app(settings, classifier=clf)) as c:
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
        body = c.post("/v1/classify", files=files).json()
        assert body["task"] == "multilabel"
        for got, want in zip(body["predictions"], preds):
            assert got["labels"] == want.labels
            assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
        x = clf.preprocess(paths[:2])
        req = {"inputs": [{"name": clf.bundle.input_name, "shape": list(x.shape), "datatype": "FP32",
                           "data": x.ravel().tolist()}]}
        outs = {o["name"]: o for o in c.post("/v2/models/edgekiln/infer", json=req).json()["outputs"]}
        assert outs["probabilities"]["shape"] == [2, 4]
        assert np.allclose(outs["probabilities"]["data"], probs[:2].ravel(), atol=1e-6)
        assert outs["label_set"]["data"] == chosen[:2].astype(float).ravel().tolist()


def test_finetune_and_distill_with_augmented_views_and_mixup_train_on_label_sets(tmp_path):
    """The strategies that train through the common loop, and distill's live-teacher path (augmented
    views, mixup), take multi-hot targets as they are (a short budget: the plumbing, not accuracy)."""
    from pipeline.adapt_stage import run_adapt
    from pipeline.distill_stage import run_distill

    manifest = write_digit_mosaics(tmp_path / "d", n=30)
    raw = tiny_config_dict(tmp_path / "d", tmp_path / "runs", name="ft")
    raw["data"] = {"manifest": str(manifest), "task": "multilabel", "batch_size": 16, "check": False}
    raw["model"] = {"name": "compact_cnn_w0.5", "weights": "none", "input_size": 32}
    raw["adapt"] = {"strategy": "finetune", "epochs": 2, "augment": "light"}
    raw["distill"] = {"student": "compact_cnn_w0.5", "steps": 4, "augment": "light", "mixup": 0.2}
    cfg = build_config(raw)
    adapted = run_adapt(cfg)
    assert adapted.extra["task"] == "multilabel" and adapted.history[-1]["val_loss"] > 0
    distilled = run_distill(cfg)
    assert 0 < distilled.test_accuracy <= 1 and distilled.retention is not None
