"""Gate statistics on synthetic logits: one flip in 40 is noise, a true 2-point drop over 2,000
images is not; the interval matches a published worked example; agreement counts unlabeled views."""

import numpy as np
import pytest

from exporters.parity import Thresholds, compare_logits
from exporters.stats import paired_drop


def _pair(both: int, lost: int, gained: int, neither: int, classes: int = 3, seed: int = 0):
    """Reference and artifact logits with exactly these paired outcomes (lost = reference right, artifact wrong)."""
    rng = np.random.default_rng(seed)
    n = both + lost + gained + neither
    labels = rng.integers(0, classes, n)
    wrong = (labels + 1) % classes
    ref_right = np.r_[np.ones(both + lost, bool), np.zeros(gained + neither, bool)]
    art_right = np.r_[np.ones(both, bool), np.zeros(lost, bool), np.ones(gained, bool), np.zeros(neither, bool)]
    onehot = lambda idx: np.eye(classes)[idx] * 5 + rng.normal(0, 0.1, (n, classes))  # noqa: E731
    ref = onehot(np.where(ref_right, labels, wrong))
    art = onehot(np.where(art_right, labels, wrong))
    return ref, art, labels


INT8 = Thresholds.only(max_accuracy_drop=0.01)


def test_one_flip_in_40_passes():
    ref, art, labels = _pair(both=39, lost=1, gained=0, neither=0)
    r = compare_logits("m.int8.onnx", ref, art, labels, INT8, precision="int8")
    assert r.accuracy_delta == pytest.approx(-0.025)  # a 2.5-point drop by the point estimate...
    assert r.passed, r.failures  # ...that the data cannot tell from noise
    s = r.drop_stats
    assert (s["n"], s["b"], s["c"]) == (40, 1, 0) and s["low"] < 0 and s["high"] > 0.1 and s["mcnemar_p"] == 1.0


def test_true_two_point_drop_over_2000_images_fails():
    ref, art, labels = _pair(both=1750, lost=50, gained=10, neither=190)
    r = compare_logits("m.int8.onnx", ref, art, labels, INT8, precision="int8")
    assert r.accuracy_delta == pytest.approx(-0.02)
    assert len(r.failures) == 1 and r.failures[0].startswith("accuracy drop 2.00 points exceeds 1.00 beyond doubt")
    assert "50 lost, 10 gained of 2000" in r.failures[0]
    assert 0.01 < r.drop_stats["low"] < 0.02 < r.drop_stats["high"] < 0.03 and r.drop_stats["mcnemar_p"] < 1e-5


def test_small_drop_on_many_images_within_budget_passes():
    # McNemar alone would reject "no drop" here (p < 0.05); the 1-point budget allows 0.55 points.
    ref, art, labels = _pair(both=1780, lost=14, gained=3, neither=203)
    r = compare_logits("m.int8.onnx", ref, art, labels, INT8, precision="int8")
    assert r.passed and r.drop_stats["mcnemar_p"] < 0.05 and 0 < r.drop_stats["low"] < 0.01


def test_newcombe_interval_matches_altman_worked_example():
    # Altman et al., Statistics with Confidence (2000), table 6.2: 14 / 5 / 0 / 22 -> 0.122 (0.011 to 0.226).
    r = np.r_[np.ones(19, bool), np.zeros(22, bool)]
    a = np.r_[np.ones(14, bool), np.zeros(5, bool), np.zeros(22, bool)]
    s = paired_drop(r, a)
    assert s.drop == pytest.approx(5 / 41) and s.low == pytest.approx(0.0115, abs=5e-4)
    assert s.high == pytest.approx(0.2265, abs=5e-4) and s.mcnemar_p == pytest.approx(0.0625)


def test_agreement_counts_extra_images_and_reports_n():
    ref, art, labels = _pair(both=40, lost=0, gained=0, neither=0)
    xr, xa, _ = _pair(both=199, lost=1, gained=0, neither=0, seed=1)  # one flip among 200 unlabeled views
    r = compare_logits("m.fp16.onnx", ref, art, labels, Thresholds.only(min_agreement=0.995), precision="fp16",
                       extra=(xr, xa), extra_sources={"augmented_views": 200})
    assert r.agreement_n == 240 and r.agreement == pytest.approx(239 / 240) and r.passed
    assert r.agreement_sources == {"test": 40, "augmented_views": 200}


def test_unlabeled_images_are_held_to_the_decision_floor_on_their_own():
    """The deployment camera's images (the agreement set's unlabeled part, last in it): 31 of 45 agreeing
    passes the pooled 75 % agreement floor with 64 perfect source images, and fails the 99 % decision
    floor on its own; 45 of 45 passes."""
    ref, art, labels = _pair(both=64, lost=0, gained=0, neither=0)
    t = Thresholds.only(min_agreement=0.75, min_decision_agreement=0.99)
    for agree, passed in ((31, False), (45, True)):
        xr, xa, _ = _pair(both=agree, lost=45 - agree, gained=0, neither=0, seed=2)
        r = compare_logits("m.int8.onnx", ref, art, labels, t, precision="int8", extra=(xr, xa),
                           extra_sources={"unlabeled": 45})
        assert r.agreement == pytest.approx((64 + agree) / 109) and r.unlabeled_n == 45
        assert r.unlabeled_agreement == pytest.approx(agree / 45) and r.passed is passed
        if not passed:
            assert r.failures == ["top-1 agreement 68.89% < 99.00% on the 45 unlabeled images (data.target / "
                                  "validate.unlabeled): on those images it is not the model"]
