import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.distill import KDSettings, build_student, choose_student, train_student
from pipeline.training import kd_loss


def test_kd_loss_is_hinton():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    T = 3.0
    kl = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean()
    assert torch.allclose(kd_loss(s, t, y, T, 1.0), T * T * kl, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, y, T, 0.0), F.cross_entropy(s, y), atol=1e-6)
    assert kd_loss(t, t, y, T, 1.0).abs() < 1e-6


def _tiny_tensors(n=24, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # a learnable rule
    return x, y


@pytest.mark.parametrize("hint", [0.0, 0.5])
def test_cached_teacher_trains_exactly_like_live_teacher(hint):
    x, y = _tiny_tensors()
    teacher = build_student("compact_cnn_w0.5", 2, "none").eval()
    runs = []
    for cache in (True, False):
        student = build_student("compact_cnn_w0.5", 2, "none")
        torch.manual_seed(1)
        student.load_state_dict(build_student("compact_cnn_w0.5", 2, "none").state_dict())
        r = train_student(student, x, y, x, y, kd=KDSettings(4.0, 0.7, hint), teacher=teacher, cache_teacher=cache,
                          epochs=2, lr=1e-2, weight_decay=0.0, batch_size=8, seed=0)
        runs.append((r, student.state_dict()))
    (r1, s1), (r2, s2) = runs
    assert [h["train_loss"] for h in r1.history] == pytest.approx([h["train_loss"] for h in r2.history], rel=1e-5)
    for k in s1:
        assert torch.allclose(s1[k].float(), s2[k].float(), atol=1e-5), k


def test_student_justification_in_metrics(tiny_run):
    _, run_dir, _ = tiny_run
    m = json.loads((run_dir / "metrics.json").read_text())["student"]
    assert m["teacher_model"] == "efficientnet_lite0"
    assert m["params"] < m["teacher_params"] and m["params_ratio"] == pytest.approx(m["params"] / m["teacher_params"])
    assert m["accuracy_retained"] == pytest.approx(m["test_accuracy"] / m["teacher_test_accuracy"])
    c = m["onnx_cost"]
    assert c["student"]["size_mb"] < c["teacher"]["size_mb"]
    assert m["onnx_size_ratio"] == pytest.approx(c["student"]["size_mb"] / c["teacher"]["size_mb"])
    assert c["student"]["latency_b1_ms"] > 0 and c["teacher"]["latency_b32_ms"] > 0


def test_choose_student_respects_size_budget():
    rows, fits = choose_student(["compact_cnn_w0.5", "compact_cnn_w1.0"], 3, 32, None, 0.2)
    sizes = {r["student"]: r["size_mb"] for r in rows}
    assert sizes["compact_cnn_w0.5"] < 0.2 < sizes["compact_cnn_w1.0"]
    assert fits == ["compact_cnn_w0.5"]


def test_distill_cli_auto_and_control(run_copy):
    cfg, run_dir = run_copy
    d = yaml.safe_load(cfg.read_text())
    d["distill"].update({"candidates": ["compact_cnn_w0.5", "compact_cnn_w1.0"], "epochs": 2, "steps": None,
                         "measure_cost": False})
    cfg.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(cli, ["distill", str(cfg), "--student", "auto", "--max-size-mb", "0.2", "--compare-without-kd"])
    assert r.exit_code == 0, r.output
    m = json.loads((run_dir / "metrics.json").read_text())["student"]
    assert m["model"] == "compact_cnn_w0.5" and m["auto"]["trained"] == ["compact_cnn_w0.5"]
    assert "without_kd" in m and m["kd_gain"] == pytest.approx(m["test_accuracy"] - m["without_kd"]["test_accuracy"])
    assert "same student without KD" in r.output
    r = CliRunner().invoke(cli, ["distill", str(cfg), "--student", "auto", "--max-size-mb", "0.001"])
    assert r.exit_code == 1 and "no candidate student fits" in r.output


def test_retention_gate_refuses_a_student_that_cannot_learn(run_copy, tmp_path):
    """A budget of a few steps: the student stays near chance, is refused with the numbers and
    what to try, and the export that follows ships the teacher."""
    cfg, run_dir = run_copy
    d = yaml.safe_load(cfg.read_text())
    d["distill"].update({"epochs": None, "steps": 1, "measure_cost": False, "min_retention": 0.98})
    cfg.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(cli, ["distill", str(cfg)])
    assert r.exit_code == 0, r.output
    m = json.loads((run_dir / "metrics.json").read_text())["student"]
    assert m["adopted"] is False and m["retention"] < 0.98
    assert m["refusal"].startswith("student refused: it keeps") and "the teacher will be exported" in m["refusal"]
    assert m["val_drop"]["n"] == len(json.loads((run_dir / "split.json").read_text())["val"])
    assert "REFUSED" in r.output
    from pipeline.config import load_config
    from pipeline.export_stage import default_export_role

    assert default_export_role(load_config(cfg)) == "teacher"


def test_unlabeled_images_feed_distillation(run_copy, tiny_data, tmp_path):
    cfg, run_dir = run_copy
    unl = tmp_path / "site"
    unl.mkdir()
    import shutil

    for i, p in enumerate(sorted(tiny_data.rglob("*.png"))[:10]):
        shutil.copy(p, unl / f"u{i}.png")  # flat folder, no labels
    d = yaml.safe_load(cfg.read_text())
    n_train = len(json.loads((run_dir / "split.json").read_text())["train"])
    d["distill"].update({"epochs": None, "steps": 4, "measure_cost": False, "unlabeled": str(unl), "mixup": 0.2})
    cfg.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(cli, ["distill", str(cfg)])
    assert r.exit_code == 0, r.output
    m = json.loads((run_dir / "metrics.json").read_text())["student"]
    assert f"{n_train + 10} images" in m["budget"]
    (unl / "u0.png").unlink()
    for p in unl.iterdir():
        p.unlink()
    r = CliRunner().invoke(cli, ["distill", str(cfg)])
    assert r.exit_code == 1 and "distill.unlabeled:" in r.output and "holds no images" in r.output


def test_synthetic_outliers_ride_along_without_growing_the_budget(run_copy):
    """distill.synthetic_outliers: that share of generated images joins the KD term as unlabeled rows;
    the budget stays sized to the real images and each batch grows by the share instead."""
    from pipeline.config import load_config
    from pipeline.distill_stage import _views
    from pipeline.rundir import load_split
    from runtime.preprocess import PreprocessSpec

    cfg_path, run_dir = run_copy
    split = load_split(load_config(cfg_path).run)
    n_train = len(split.paths("train"))
    spec = PreprocessSpec(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    views, n, extra = _views(load_config(cfg_path, ["distill.synthetic_outliers=0.5", "distill.augment=light"]),
                             split, spec)
    assert (n, extra) == (n_train, round(0.5 * n_train))
    labels = torch.cat([yb for _, yb in views(8)])
    assert len(labels) == n_train + extra and int((labels == -1).sum()) == extra  # generated rows are unlabeled
    assert _views(load_config(cfg_path, ["distill.synthetic_outliers=0"]), split, spec)[1:] == (n_train, 0)
    assert _views(load_config(cfg_path, ["trust.ood.enabled=false"]), split, spec)[1:] == (n_train, 0)  # nothing to teach

    # fixed inputs (augment none, the tiny run's): the teacher labels the generated rows once; the no-KD
    # control learns from the labeled rows only (cross-entropy on label -1 failed: "Target -1 is out of bounds")
    r = CliRunner().invoke(cli, ["distill", str(cfg_path), "--set", "distill.steps=4", "--set", "distill.epochs=null",
                                 "--set", "distill.measure_cost=false", "--set", "distill.synthetic_outliers=0.5",
                                 "--compare-without-kd"])
    assert r.exit_code == 0, r.output
    student = json.loads((run_dir / "metrics.json").read_text())["student"]
    assert 0 <= student["without_kd"]["test_accuracy"] <= 1
    budget = student["budget"]
    batch = int(re.search(r"\(batch (\d+),", budget).group(1))  # the real images' batch, as without them
    grown = math.ceil(batch * (n_train + extra) / n_train)  # so an epoch takes as many steps as without them
    assert f"{n_train} images" in budget and f"carries {grown - batch} of {extra} generated images of no class" in budget


def test_synthetic_images_are_seeded_and_varied():
    import numpy as np

    from pipeline.synthetic import synthetic_images

    a, b, c = synthetic_images(4, seed=0), synthetic_images(4, seed=0), synthetic_images(4, seed=1)
    arrays = [np.asarray(img) for img in a]
    assert all(img.mode == "RGB" and img.size == (160, 160) for img in a)
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(arrays, b))  # same seed, same pixels
    assert not any(np.array_equal(x, np.asarray(y)) for x, y in zip(arrays, c))  # another seed, other images
    other = synthetic_images(4, seed=0, stream=1)  # the export's check: not the images a student trained on
    assert not any(np.array_equal(x, np.asarray(y)) for x, y in zip(arrays, other))
    assert all(x.std() > 10 for x in arrays)  # not flat
    # dead leaves (even) are flat patches: few distinct colours; spectral noise (odd) is smooth: many
    distinct = [len(np.unique(x.reshape(-1, 3), axis=0)) for x in arrays]
    assert distinct[0] < 400 and distinct[2] < 400 and distinct[1] > 2000 and distinct[3] > 2000, distinct


def _fixed_model(weight: torch.Tensor) -> torch.nn.Module:
    """Logits = weight @ (channel means): a classifier whose decisions a test sets by hand."""

    class M(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3)) @ weight.T

    return M()


def test_target_gate_judges_the_student_on_the_deployment_camera():
    """Without target labels: the share of target images where the student predicts the teacher's class;
    with them: the retention rule on the labeled target, so a student better than its teacher ships."""
    from pipeline.distill_stage import target_gate
    from pipeline.domain.target import TargetSet
    from runtime.preprocess import PreprocessSpec

    spec = PreprocessSpec(resize=8, crop=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    red = x8.float().mean((2, 3))[:, 0] > x8.float().mean((2, 3))[:, 1]  # teacher: red > green -> class 1
    teacher = _fixed_model(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    same = _fixed_model(torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 0.0]]))
    other = _fixed_model(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))  # red > blue: agrees on some images
    target = TargetSet(x8, spec=spec)
    ok = target_gate(teacher, same, target, 0.9, 0.98)
    assert ok["adopted"] and ok["agreement"] == 1.0 and ok["n"] == 40 and ok["judged_on"] == "data.target"
    bad = target_gate(teacher, other, target, 0.9, 0.98)
    blue = x8.float().mean((2, 3))[:, 0] > x8.float().mean((2, 3))[:, 2]
    assert bad["agreement"] == pytest.approx(float((red == blue).float().mean())) and bad["agreement"] < 0.9
    assert not bad["adopted"] and bad["low"] < bad["agreement"] < bad["high"]
    assert bad["refusal"].startswith(f"student refused: it predicts the teacher's class on {bad['agreement']:.1%} of "
                                     "the 40 data.target images") and "data.target_labeled" in bad["refusal"]
    # Labeled target images where the true rule is red > blue: the disagreeing student is the better one.
    labeled = TargetSet(x8, labeled_uint8=x8, labeled_y=blue.long(), spec=spec)
    better = target_gate(teacher, other, labeled, 0.9, 0.98)
    assert better["judged_on"] == "data.target_labeled" and better["adopted"] and better["retention"] > 1.0
    worse = target_gate(other, teacher, labeled, 0.9, 0.98)
    assert not worse["adopted"] and "of the teacher's data.target_labeled accuracy" in worse["refusal"]


def test_a_style_teachers_student_trains_on_the_restyled_copies_and_faces_the_target_gate(run_copy, tiny_data, tmp_path):
    """When adapt restyled the source images (metrics.json: teacher.domain.method 'style'), distillation draws
    from the originals, 2 restyled copies of each and the 'train' half of the target images, and the student
    is judged on the other half; with distill.domain_views false, from the originals and that half only."""
    import shutil

    cfg, run_dir = run_copy
    site = tmp_path / "site"
    site.mkdir()
    for i, p in enumerate(sorted(tiny_data.rglob("*.png"))[:12]):
        shutil.copy(p, site / f"t{i}.png")
    d = yaml.safe_load(cfg.read_text())
    d["data"]["target"] = str(site)
    d["adapt"]["domain"] = "style"
    d["distill"].update({"epochs": None, "steps": 4, "measure_cost": False})
    cfg.write_text(yaml.safe_dump(d))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["teacher"]["domain"] = {"method": "style"}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    n_train = len(json.loads((run_dir / "split.json").read_text())["train"])
    for views, n in ((True, 3 * n_train + 6), (False, n_train + 6)):
        r = CliRunner().invoke(cli, ["distill", str(cfg), "--set", f"distill.domain_views={str(views).lower()}"])
        assert r.exit_code == 0, r.output
        m = json.loads((run_dir / "metrics.json").read_text())["student"]
        assert f"{n} images" in m["budget"]
        tg = m["target_gate"]
        assert tg["judged_on"] == "data.target" and tg["n"] == 6 and 0 <= tg["agreement"] <= 1
        assert "agrees with the teacher on data.target" in r.output
        assert m["adopted"] is (m["retention"] >= 0.98 and tg["agreement"] >= 0.9)


def test_mixup_on_fixed_inputs_uses_teacher_outputs_of_exactly_the_mixed_images():
    """The pool: the teacher runs once over MIXUP_POOL mixed partners per image; every batch carries the
    teacher's logits of exactly the images it yields, and an epoch is still len(x) images."""
    from pipeline.distill import MIXUP_POOL, mixup_pool_loader, teacher_outputs

    x, y = _tiny_tensors(n=40)
    teacher = build_student("compact_cnn_w0.5", 2, "none").eval()
    loader = mixup_pool_loader(teacher, x, y, 0.4, 8, seed=0, hint=False)
    assert len(loader.dataset) == MIXUP_POOL * 40 and len(loader) == 5
    seen = 0
    for xb, yb, t_logits, y2, lam in loader:
        assert torch.allclose(teacher_outputs(teacher, xb)[0], t_logits, atol=1e-5)
        assert ((lam > 0) & (lam < 1)).all() and not torch.allclose(xb, x[: len(xb)])
        seen += len(xb)
    assert seen == 40
    # and it trains: the student's loss falls over a few epochs
    student = build_student("compact_cnn_w0.5", 2, "none")
    r = train_student(student, x, y, x, y, kd=KDSettings(4.0, 0.7, 0.0), teacher=teacher, mixup=0.4,
                      epochs=6, lr=1e-2, weight_decay=0.0, batch_size=8, seed=0)
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]
