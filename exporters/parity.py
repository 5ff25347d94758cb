"""One parity routine for every artifact: compare PyTorch logits with an
artifact's logits on the same labeled images, collect every failed check.

`compare_logits` is the routine (accuracy of each, accuracy delta with its
paired interval and exact McNemar test (exporters.stats), top-1 agreement on the
test split plus an agreement set of unlabeled views (exporters.agreement), max
and mean |Δlogit|, KL divergence of the probabilities, per-class accuracy delta,
flipped images; with bundle.json's `trust` section, the answers the runtime gives from those logits
through its one postprocessing path (runtime.trust): calibrated probabilities and OOD scores (max
|Δ|) and the decision, label or "unknown", agreeing on the test split); `parity_gate` runs every artifact of
a bundle through the runtime's own backends (runtime.backends.session_for_artifact,
the code that serves) and the runtime's preprocessing; `GateResult` collects the
reports of every artifact of a bundle.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporters.agreement import AgreementSet
from exporters.decisions import SCORE_TIE, compare_decisions  # noqa: F401  (SCORE_TIE: importable from here as before)
from exporters.quiet import logger_at
from exporters.stats import DropStats, agreement_interval, paired_drop
from exporters.thresholds import Thresholds
from runtime.backends import EngineUnavailable, Int8KernelsSaturate, session_for_artifact
from runtime.bundle import Bundle, MultiLabel, Trust
from runtime.multilabel import decide
from runtime.trust import postprocess, softmax
from runtime.errors import BackendError, ParityError
from runtime.preprocess import preprocess

log = logging.getLogger("edgekiln")

__all__ = ["GateResult", "ParityReport", "Thresholds", "compare_logits", "kl_divergence", "open_runners",
           "parity_gate", "runner_label"]


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL(p_reference || p_candidate) over images, in nats."""
    if not len(reference):
        return 0.0
    p, q = softmax(reference), softmax(candidate)
    eps = 1e-12
    return float(np.mean(np.sum(p * (np.log(p + eps) - np.log(q + eps)), axis=1)))


@dataclass
class ParityReport:
    artifact: str
    n_images: int
    reference_accuracy: float
    artifact_accuracy: float
    agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    flipped: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    precision: str = "fp32"
    accuracy_delta: float = 0.0
    kl_divergence: float = 0.0
    per_class_accuracy_delta: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    # The accuracy drop judged on the n test images (exporters.stats.DropStats: n, b, c, drop, 95% CI, McNemar p).
    drop_stats: dict[str, Any] = field(default_factory=dict)
    agreement_n: int = 0  # images the agreement was measured on (test split + agreement set)
    agreement_sources: dict[str, int] = field(default_factory=dict)
    agreement_interval: tuple[float, float] = (0.0, 1.0)  # its 95% Wilson interval
    backend: str = "cpu"  # the runtime backend the artifact ran on (runtime.backends)
    # bundle.json's `trust` answers (None without one): the decision (label, or unknown) agreeing with
    # PyTorch's logits through the same postprocessing on the test split, its 95% interval, how many
    # images each side calls unknown, and max |Δ| of calibrated probabilities and OOD scores (all images)
    decision_agreement: float | None = None
    decision_interval: tuple[float, float] | None = None
    unknown_counts: dict[str, int] = field(default_factory=dict)
    max_abs_prob_diff: float | None = None
    max_abs_score_diff: float | None = None
    decision_flipped: list[dict] = field(default_factory=list)
    # Top-1 agreement on the agreement set's unlabeled images alone (validate.unlabeled; data.target when
    # unset: the deployment camera), held to the decision floor like test images: pooled with the test
    # split they hide a camera the artifact does not reproduce (textures -> dusk: INT8 100 % on 64 source
    # images, 69 % on 45 dusk images, 87 % pooled, over the 75 % agreement floor).
    unlabeled_agreement: float | None = None
    unlabeled_interval: tuple[float, float] | None = None
    unlabeled_n: int = 0
    # Macro-F1 of each on the test split (every class weighs the same: data.select_metric / deploy.metric).
    reference_macro_f1: float | None = None
    artifact_macro_f1: float | None = None
    # multilabel: agreement counts image x label decisions, accuracy is the exact match of the label set
    task: str = "multiclass"

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def macro_f1(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """scikit-learn's macro-averaged F1 over every class (a class with no image and no prediction counts 0)."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def compare_logits(
    artifact: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray,
    thresholds: Thresholds,
    names: list[str] | None = None,
    precision: str = "fp32",
    class_names: list[str] | None = None,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
    extra_sources: dict[str, int] | None = None,
    trust: Trust | None = None,
    multilabel: MultiLabel | None = None,
) -> ParityReport:
    """Accuracy of each and their delta (with its paired 95% interval), top-1 agreement, |Δlogit|,
    KL divergence, per-class accuracy delta, flipped images; every violated threshold becomes a
    failure line. `extra` = (reference, candidate) logits on unlabeled images (an agreement set):
    they count in the agreement and |Δlogit| figures, not in accuracy. With `trust` (bundle.json's),
    both sides also go through the runtime's postprocessing (runtime.trust.postprocess): decisions on
    the test split, probabilities and OOD scores on every image."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    labels = np.asarray(labels)
    if reference.shape != candidate.shape:
        raise ParityError(f"{artifact}: output shape {candidate.shape} differs from PyTorch's {reference.shape}")
    if multilabel is not None:
        return compare_multilabel(artifact, reference, candidate, labels, thresholds, multilabel, names, precision,
                                  class_names, extra, extra_sources)
    ref_top, cand_top = reference.argmax(1), candidate.argmax(1)
    diff = np.abs(reference - candidate)
    flipped_idx = np.nonzero(ref_top != cand_top)[0]
    agree, n_agree = int((ref_top == cand_top).sum()), len(labels)
    stats = paired_drop(ref_top == labels, cand_top == labels)
    unl = None
    if extra is not None and len(extra[0]):
        xr, xc = (np.asarray(a, dtype=np.float64) for a in extra)
        agree, n_agree = agree + int((xr.argmax(1) == xc.argmax(1)).sum()), n_agree + len(xr)
        diff = np.concatenate([diff.ravel(), np.abs(xr - xc).ravel()])
        k = (extra_sources or {}).get("unlabeled", 0)
        if k:  # the agreement set puts them last (exporters.agreement.agreement_set)
            same = xr[-k:].argmax(1) == xc[-k:].argmax(1)
            unl = (float(same.mean()), agreement_interval(int(same.sum()), k), k)
    report = ParityReport(
        artifact=artifact,
        n_images=len(labels),
        reference_accuracy=float((ref_top == labels).mean()) if len(labels) else 0.0,
        artifact_accuracy=float((cand_top == labels).mean()) if len(labels) else 0.0,
        agreement=agree / n_agree if n_agree else 1.0,
        agreement_n=n_agree,
        agreement_interval=agreement_interval(agree, n_agree),
        agreement_sources={"test": len(labels), **(extra_sources or {})},
        drop_stats=stats.to_dict(),
        max_abs_logit_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_logit_diff=float(diff.mean()) if diff.size else 0.0,
        precision=precision,
        kl_divergence=kl_divergence(reference, candidate),
        thresholds={k: v for k, v in asdict(thresholds).items() if v is not None},
        flipped=[
            {
                "image": names[i] if names else int(i),
                "label": int(labels[i]),
                "pytorch": int(ref_top[i]),
                "artifact": int(cand_top[i]),
            }
            for i in flipped_idx
        ],
    )
    if unl is not None:
        report.unlabeled_agreement, report.unlabeled_interval, report.unlabeled_n = unl
    report.accuracy_delta = report.artifact_accuracy - report.reference_accuracy
    if len(labels) and reference.ndim == 2:
        report.reference_macro_f1 = macro_f1(ref_top, labels, reference.shape[1])
        report.artifact_macro_f1 = macro_f1(cand_top, labels, reference.shape[1])
    if trust is not None:
        _compare_answers(report, trust, reference, candidate, labels, names, extra)
    n_classes = reference.shape[1] if reference.ndim == 2 else 0
    for c in range(n_classes):
        mask = labels == c
        if mask.any():
            key = class_names[c] if class_names else str(c)
            report.per_class_accuracy_delta[key] = float((cand_top[mask] == c).mean() - (ref_top[mask] == c).mean())
    report.failures = _failures(report, thresholds, stats)
    return report


def binary_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over images and labels of KL(Bernoulli(sigmoid(reference)) || Bernoulli(sigmoid(candidate))), nats."""
    from runtime.multilabel import sigmoid

    if not reference.size:
        return 0.0
    eps = 1e-12
    p, q = sigmoid(reference), sigmoid(candidate)
    return float(np.mean(p * (np.log(p + eps) - np.log(q + eps)) + (1 - p) * (np.log(1 - p + eps) - np.log(1 - q + eps))))


def compare_multilabel(artifact: str, reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray,
                       thresholds: Thresholds, multilabel: MultiLabel, names: list[str] | None = None,
                       precision: str = "fp32", class_names: list[str] | None = None,
                       extra: tuple[np.ndarray, np.ndarray] | None = None,
                       extra_sources: dict[str, int] | None = None) -> ParityReport:
    """compare_logits for a multilabel bundle (task multilabel): both sides' logits go through the
    runtime's decision (runtime.multilabel.decide with the bundle's thresholds). `agreement` is the
    per-label decision agreement over every image x label (test split and agreement set); `accuracy`
    is the exact match of the label set on each test image, so the accuracy drop keeps its paired
    interval; the macro-F1 fields hold the multilabel macro-F1; KL is the mean binary KL per label."""
    from exporters.multilabel import f1_scores

    t = multilabel.thresholds
    (_, rd), (_, cd) = decide(reference, t), decide(candidate, t)
    y = np.asarray(targets) > 0.5
    diff = np.abs(reference - candidate)
    agree, n_agree = int((rd == cd).sum()), rd.size
    ref_ok, cand_ok = (rd == y).all(axis=1), (cd == y).all(axis=1)
    stats = paired_drop(ref_ok, cand_ok)
    kl_parts = [binary_kl(reference, candidate)]
    if extra is not None and len(extra[0]):
        xr, xc = (np.asarray(a, dtype=np.float64) for a in extra)
        (_, xrd), (_, xcd) = decide(xr, t), decide(xc, t)
        agree, n_agree = agree + int((xrd == xcd).sum()), n_agree + xrd.size
        diff = np.concatenate([diff.ravel(), np.abs(xr - xc).ravel()])
    cn = class_names or [str(c) for c in range(reference.shape[1])]
    label_set = lambda row: [cn[j] for j in np.nonzero(row)[0]]  # noqa: E731
    flipped_idx = np.nonzero((rd != cd).any(axis=1))[0]
    report = ParityReport(
        artifact=artifact, n_images=len(y),
        reference_accuracy=float(ref_ok.mean()) if len(y) else 0.0,
        artifact_accuracy=float(cand_ok.mean()) if len(y) else 0.0,
        agreement=agree / n_agree if n_agree else 1.0, agreement_n=n_agree,
        agreement_interval=agreement_interval(agree, n_agree),
        agreement_sources={"test": rd.size, **{k: v * rd.shape[1] for k, v in (extra_sources or {}).items()}},
        drop_stats=stats.to_dict(),
        max_abs_logit_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_logit_diff=float(diff.mean()) if diff.size else 0.0,
        precision=precision, kl_divergence=float(np.mean(kl_parts)), task="multilabel",
        thresholds={k: v for k, v in asdict(thresholds).items() if v is not None},
        flipped=[{"image": names[i] if names else int(i), "label": label_set(y[i]), "pytorch": label_set(rd[i]),
                  "artifact": label_set(cd[i])} for i in flipped_idx],
    )
    report.accuracy_delta = report.artifact_accuracy - report.reference_accuracy
    if len(y):
        report.reference_macro_f1 = f1_scores(rd, y)["macro_f1"]
        report.artifact_macro_f1 = f1_scores(cd, y)["macro_f1"]
        for c, key in enumerate(cn):  # per label: the change in how often its decision is right
            report.per_class_accuracy_delta[key] = float((cd[:, c] == y[:, c]).mean() - (rd[:, c] == y[:, c]).mean())
    report.failures = _failures(report, thresholds, stats)
    return report


def _compare_answers(report: ParityReport, trust: Trust, reference: np.ndarray, candidate: np.ndarray,
                     labels: np.ndarray, names: list[str] | None, extra: tuple[np.ndarray, np.ndarray] | None) -> None:
    """The runtime's answers from both sides' logits: decisions on the test split (exporters.decisions:
    a score on the unknown threshold is a tie), |Δ| everywhere."""
    ref, cand = postprocess(reference, trust), postprocess(candidate, trust)
    rd, cd = ref.decisions, cand.decisions
    agree, tie = compare_decisions(ref, cand, trust)
    same = int(agree.sum())
    report.decision_agreement = same / len(rd) if len(rd) else 1.0
    report.decision_interval = agreement_interval(same, len(rd))
    report.unknown_counts = {"pytorch": int((~ref.known).sum()), "artifact": int((~cand.known).sum()), "n": len(rd),
                             "ties": int(tie.sum())}
    report.decision_flipped = [{"image": names[i] if names else int(i), "label": int(labels[i]),
                                "pytorch": int(rd[i]), "artifact": int(cd[i])}
                               for i in np.nonzero((rd != cd) & ~tie)[0]]
    probs, scores = [np.abs(ref.probs - cand.probs).ravel()], []
    if ref.score is not None:
        scores.append(np.abs(ref.score - cand.score))
    if extra is not None and len(extra[0]):
        xr, xc = postprocess(extra[0], trust), postprocess(extra[1], trust)
        probs.append(np.abs(xr.probs - xc.probs).ravel())
        if xr.score is not None:
            scores.append(np.abs(xr.score - xc.score))
    allp = np.concatenate(probs)
    report.max_abs_prob_diff = float(allp.max()) if allp.size else 0.0
    if scores:
        alls = np.concatenate(scores)
        report.max_abs_score_diff = float(alls.max()) if alls.size else 0.0


def _failures(report: ParityReport, t: Thresholds, stats: DropStats) -> list[str]:
    """One line per violated threshold."""
    out, n_agree = [], report.agreement_n
    # Fail when the data show agreement is below the floor (its interval's upper bound; 1.0 still allows no flip).
    if t.min_agreement is not None and report.agreement_interval[1] < t.min_agreement - 1e-12:
        shown = ", ".join(str(f["image"]) for f in report.flipped[:5])
        more = f" and {len(report.flipped) - 5} more" if len(report.flipped) > 5 else ""
        multi = report.task == "multilabel"
        out.append(
            f"{'per-label decision' if multi else 'top-1'} agreement {report.agreement:.2%} < {t.min_agreement:.2%} "
            f"on {n_agree} {'image x label decisions' if multi else 'images'} "
            f"({len(report.flipped)} test images flipped: {shown}{more})"
        )
    floor = t.min_decision_agreement
    if report.unlabeled_agreement is not None and floor is not None and report.unlabeled_interval[1] < floor - 1e-12:
        out.append(f"top-1 agreement {report.unlabeled_agreement:.2%} < {floor:.2%} on the {report.unlabeled_n} "
                   "unlabeled images (data.target / validate.unlabeled): on those images it is not the model")
    if t.max_abs_logit_diff is not None and report.max_abs_logit_diff > t.max_abs_logit_diff:
        out.append(f"max |Δlogit| {report.max_abs_logit_diff:.3g} > {t.max_abs_logit_diff:.3g}")
    if t.min_accuracy is not None and report.artifact_accuracy < t.min_accuracy:
        out.append(f"accuracy {report.artifact_accuracy:.4f} < {t.min_accuracy:.4f}")
    # Fail only when the data show the drop is over budget (the interval's lower bound above it; why: exporters.stats).
    if t.max_accuracy_drop is not None and stats.exceeds(t.max_accuracy_drop):
        out.append(
            f"accuracy drop {stats.drop * 100:.2f} points exceeds {t.max_accuracy_drop * 100:.2f} beyond doubt "
            f"({report.reference_accuracy:.4f} -> {report.artifact_accuracy:.4f}; 95% CI of the drop "
            f"[{stats.low * 100:.2f}, {stats.high * 100:.2f}] points; {stats.b} lost, {stats.c} gained of {stats.n}; "
            f"McNemar p={stats.mcnemar_p:.2g})"
        )
    if t.max_kl is not None and report.kl_divergence > t.max_kl:
        out.append(f"KL divergence {report.kl_divergence:.3g} > {t.max_kl:.3g}")
    if report.decision_agreement is None:
        return out
    # Like the agreement: fail when the data show the decisions agree less than the floor (upper bound).
    if t.min_decision_agreement is not None and report.decision_interval[1] < t.min_decision_agreement - 1e-12:
        shown = ", ".join(f"{f['image']} ({f['pytorch']} -> {f['artifact']})" for f in report.decision_flipped[:5])
        u = report.unknown_counts
        out.append(f"decision agreement (label or unknown) {report.decision_agreement:.2%} < "
                   f"{t.min_decision_agreement:.2%} on {u['n']} test images (unknown: PyTorch {u['pytorch']}, "
                   f"artifact {u['artifact']}; -1 = unknown: {shown})")
    if t.max_abs_prob_diff is not None and report.max_abs_prob_diff > t.max_abs_prob_diff:
        out.append(f"max |Δ calibrated probability| {report.max_abs_prob_diff:.3g} > {t.max_abs_prob_diff:.3g}")
    if (t.max_abs_score_diff is not None and report.max_abs_score_diff is not None
            and report.max_abs_score_diff > t.max_abs_score_diff):
        out.append(f"max |Δ OOD score| {report.max_abs_score_diff:.3g} > {t.max_abs_score_diff:.3g}")
    return out


@dataclass
class GateResult:
    """The parity gate over every artifact of a bundle (keyed like bundle.json's "artifacts")."""

    reports: dict[str, ParityReport]
    golden: dict[str, Any] = field(default_factory=dict)
    golden_outputs: dict[str, Any] = field(default_factory=dict)  # key -> runtime.bundle.GoldenOutputs, recorded

    @property
    def primary(self) -> ParityReport:
        return self.reports.get("onnx") or next(iter(self.reports.values()))

    @property
    def failures(self) -> list[str]:
        out = [f"{f} [{key}]" if len(self.reports) > 1 else f for key, r in self.reports.items() for f in r.failures]
        out += [f"golden self-test: {f}" for f in self.golden.get("failures", [])]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    # The primary report's figures, so callers written for one artifact keep working.
    def __getattr__(self, name: str):
        if name in ParityReport.__dataclass_fields__:
            return getattr(self.primary, name)
        raise AttributeError(name)

    def to_dict(self) -> dict:
        return {**self.primary.to_dict(), "passed": self.passed,
                "artifacts": {k: r.to_dict() for k, r in self.reports.items()}, "golden": self.golden}


Runner = Callable[[np.ndarray], np.ndarray]


def runner_label(key: str, backend: str, primary: str) -> str:
    """How the gate names an artifact run on a backend: its key on its first backend, key@backend on others."""
    return key if backend == primary else f"{key}@{backend}"


def open_runners(bundle: Bundle, keys: list[str] | None = None,
                 all_backends: bool = False) -> tuple[dict[str, Runner], dict[str, str]]:
    """Every artifact of `bundle` (or `keys`) opened on the runtime backend its format needs (with
    `all_backends`, also on every other backend of its `runtimes` that starts here, as key@backend),
    as float32 NCHW batch -> logits functions, and {label: why} for what cannot run on this machine."""
    runners, skipped = {}, {}
    with logger_at("edgekiln.runtime"):  # the gate's table says what ran where
        for key in keys if keys is not None else list(bundle.manifest.artifacts):
            runtimes = bundle.artifact(key).runtimes
            for i, backend in enumerate(runtimes if all_backends else runtimes[:1]):
                label = runner_label(key, backend, runtimes[0])
                try:
                    runners[label] = session_for_artifact(bundle, key, backend=backend).run
                # a TensorRT engine built for another GPU; 8-bit INT8 weights this CPU's kernels would saturate
                except (EngineUnavailable, Int8KernelsSaturate) as e:
                    log.warning("parity: %s not checked on this machine: %s", label, e)
                    skipped[label] = str(e)
                except BackendError as e:  # another backend of its runtimes (cuda, ...) that this machine lacks
                    if i == 0:
                        raise
                    log.debug("parity: %s: backend %s not available here: %s", key, backend, e)
                    skipped[label] = str(e)
    return runners, skipped


def _run_all(runners: dict[str, Runner], batches, reference: Runner | None = None) -> dict[str, np.ndarray]:
    """Logits of every runner (and of `reference` under key None) over the batches, concatenated."""
    outs: dict[Any, list[np.ndarray]] = {k: [] for k in runners}
    if reference is not None:
        outs[None] = []
    for x in batches:
        for key, run in runners.items():
            outs[key].append(np.asarray(run(x), dtype=np.float32))
        if reference is not None:
            outs[None].append(np.asarray(reference(x), dtype=np.float32))
    return {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in outs.items()}


def parity_gate(bundle: Bundle, reference: np.ndarray, labels: np.ndarray, paths: list[Path], names: list[str],
                thresholds_for: Callable[[str], Thresholds], batch: int = 64,
                agreement: tuple[AgreementSet, Runner] | None = None, all_backends: bool = False) -> GateResult:
    """Check every artifact of `bundle` against the PyTorch `reference` logits on the image files `paths`,
    and, given `agreement` = (an agreement set, the PyTorch model as a runner), on those images too.

    Each chunk of images is decoded and preprocessed once (bundle.json's preprocessing) and fed to
    every artifact, and the golden-image self-test reuses the same sessions (each loads once).
    With `all_backends`, each artifact is checked on every backend of its `runtimes` available here.
    """
    from exporters.golden import self_test

    m = bundle.manifest
    runners, _ = open_runners(bundle, all_backends=all_backends)
    test_out = _run_all(runners, (preprocess(paths[i : i + batch], bundle.preprocess)
                                  for i in range(0, len(paths), batch)))
    extra_out, sources = {}, None
    if agreement is not None and len(agreement[0]):
        extra_out = _run_all(runners, agreement[0].batches(batch), reference=agreement[1])
        sources = agreement[0].sources
    reports = {}
    for label, cand in test_out.items():
        key, _, backend = label.partition("@")
        art = m.artifacts[key]
        if not len(cand):
            cand = np.zeros((0, len(m.class_names)), np.float32)
        extra = (extra_out[None], extra_out[label]) if extra_out else None
        reports[label] = compare_logits(art.file, reference, cand, labels, thresholds_for(art.precision), names,
                                        precision=art.precision, class_names=list(m.class_names), extra=extra,
                                        extra_sources=sources, trust=m.trust, multilabel=m.multilabel)
        reports[label].backend = backend or art.runtimes[0]
    primary_runners = {k: r for k, r in runners.items() if "@" not in k}
    golden = self_test(bundle, runners=primary_runners) if m.golden else {}
    outputs = golden.pop("outputs", {})
    return GateResult(reports=reports, golden=golden, golden_outputs=outputs)
