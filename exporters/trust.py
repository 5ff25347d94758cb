"""Fitting what bundle.json's `trust` section holds (runtime.bundle.Trust), on the validation split:
the calibration temperature and the out-of-distribution threshold; and measuring both.

    fit = fit_trust(TrustConfig(), val=(logits, labels), test=(logits, labels), ood=ood_logits_or_None)
    fit.trust            runtime.bundle.Trust, written into bundle.json by export
    fit.to_metrics()     ECE (15 bins) and NLL before/after on val and test, threshold, unknown rate,
                         AUROC and FPR at 95% TPR against the OOD images (when there are any)
    plot_reliability(fit, path)

Raw softmax probabilities of fine-tuned networks are over-confident (Guo et al., 2017,
https://arxiv.org/abs/1706.04599); one temperature, fitted by minimising the validation NLL, fixes
most of it without changing any prediction. The temperature is a 1-D convex problem in 1/T, solved
by a grid in log T and a golden-section refinement (no optimiser dependency). The threshold is the
validation split's (1 - target_recall) quantile of the OOD score, so that share of in-distribution
images stays known; it is chosen without outliers, so without an OOD folder its false-positive rate
is unmeasured, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binom, nct, norm

from exporters.config import TrustConfig
from runtime.bundle import OODSpec, Trust
from runtime.trust import ood_score, softmax


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    if not len(logits):
        return 0.0
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(z)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float | None:
    """The temperature in [lo, hi] minimising the NLL of `labels`; None when there is no minimum inside:
    an empty split, or one the model separates perfectly (every image right, so the NLL keeps falling as
    T -> 0 and the "fit" would make every answer certain)."""
    if not len(logits):
        return None
    grid = np.geomspace(lo, hi, 121)
    losses = [nll(logits, labels, t) for t in grid]
    i = int(np.argmin(losses))
    if i == 0:
        return None
    a, b = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    phi = (np.sqrt(5) - 1) / 2
    for _ in range(40):  # golden section on log T: the NLL is unimodal there
        c, d = b - phi * (b - a), a + phi * (b - a)
        if nll(logits, labels, np.exp(c)) < nll(logits, labels, np.exp(d)):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2))


def fit_vector(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, l2: float = 0.01,
               steps: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Vector scaling: per-class (scale, bias) minimising the NLL of softmax(logits * scale + bias) plus
    l2/2 * |(scale, bias) - (1/temperature, 0)|^2, which keeps a small or separable split from driving
    them apart. Convex: gradient descent with a backtracking (Armijo) line search."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    n, k = z.shape
    onehot = np.eye(k)[y]
    w0, theta = np.full(k, 1.0 / temperature), np.concatenate([np.full(k, 1.0 / temperature), np.zeros(k)])

    def loss_grad(th: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = th[:k], th[k:]
        a = z * w + b
        a = a - a.max(axis=1, keepdims=True)
        logp = a - np.log(np.exp(a).sum(axis=1, keepdims=True))
        d = np.exp(logp) - onehot
        reg = np.concatenate([w - w0, b])
        loss = float(-(logp * onehot).sum() / n + l2 / 2 * (reg @ reg))
        return loss, np.concatenate([(d * z).mean(axis=0), d.mean(axis=0)]) + l2 * reg

    loss, grad = loss_grad(theta)
    for _ in range(steps):
        step, gg = 1.0, float(grad @ grad)
        if gg < 1e-12:
            break
        while step > 1e-8:
            cand = theta - step * grad
            new_loss, new_grad = loss_grad(cand)
            if new_loss <= loss - 0.5 * step * gg:
                break
            step /= 2
        else:
            break
        theta, loss, grad = cand, new_loss, new_grad
    return theta[:k], theta[k:]


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Equal-width confidence bins: per bin its mean confidence, accuracy and count."""
    return _bins(probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels), bins)


def _bins(conf: np.ndarray, correct: np.ndarray, bins: int) -> dict[str, list[float]]:
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        m = idx == b
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else float((edges[b] + edges[b + 1]) / 2))
        out["accuracy"].append(float(correct[m].mean()) if m.any() else 0.0)
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    if not len(probs):
        return 0.0
    return _ece(reliability(probs, labels, bins))


def _ece(r: dict[str, list[float]]) -> float:
    n = sum(r["count"])
    return float(sum(c * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"])) / n)


def ece_floor(probs: np.ndarray, bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these confidences shows on this many images, from sampling
    alone (the mean over `draws` simulations where each answer is right with probability its confidence):
    an ECE near it cannot be told from perfect calibration on this split."""
    if not len(probs):
        return 0.0
    conf, rng = probs.max(axis=1), np.random.default_rng(seed)
    return float(np.mean([_ece(_bins(conf, rng.random(len(conf)) < conf, bins)) for _ in range(draws)]))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(score of an in-distribution image > that of an outlier), ties counted half (Mann-Whitney U)."""
    x, y = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    if not len(x) or not len(y):
        return float("nan")
    ranks = _ranks(np.concatenate([x, y]))
    return float((ranks[: len(x)].sum() - len(x) * (len(x) + 1) / 2) / (len(x) * len(y)))


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # average rank of a tie
        i = j + 1
    return ranks


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The share of outliers still taken as known when the threshold keeps `tpr` of in-distribution images."""
    if not len(in_scores) or not len(out_scores):
        return float("nan")
    threshold = threshold_for_recall(np.asarray(in_scores), tpr)
    return float((np.asarray(out_scores) >= threshold).mean())


def threshold_for_recall(scores: np.ndarray, recall: float) -> float:
    """A threshold that keeps at least `recall` of `scores` at or above it: halfway between the highest
    score it may reject and the lowest it keeps, so that no validation image sits on the boundary (where
    an artifact's last-digit difference from PyTorch would flip it)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = min(int(np.floor((1.0 - recall) * len(s) + 1e-9)), len(s) - 1)  # this many may fall below
    if k > 0:
        return float((s[k - 1] + s[k]) / 2)
    return float(s[0] - (s[1] - s[0]) / 2) if len(s) > 1 else float(s[0])


def fit_threshold(scores: np.ndarray, recall: float, confidence: float | None = 0.8) -> tuple[float, str]:
    """The OOD threshold that keeps at least `recall` of in-distribution images known with probability
    `confidence` (a one-sided lower tolerance bound), from the validation `scores`, and the rule used.

    Why not the empirical quantile (`threshold_for_recall`, kept for confidence None): it rests on the one or
    two validation scores next to it, and below 20 images it cannot place a 5 % quantile at all (it goes half
    a gap under the lowest score). Over 300 random validation sets of 10-25 images drawn from three photo
    sets it called more than 10 % of the other in-distribution images unknown in 10-33 % of the draws; the
    bound at confidence 0.8 did so in 3-14 %, and let as few or fewer outliers through in 11 of 12 cases
    (bench/RESULTS.md, tenth session). A textures set of 30 photos a class called 6 of its 18 test images
    unknown with the quantile, 1 with the bound.
    - With enough scores, distribution-free: the r-th lowest score, r the largest with
      P(Binomial(n, 1 - recall) >= r) >= confidence, lies at or below the true (1 - recall) quantile with
      that probability (the digits demo's 270 give r = 10 at 95 %/80 %). The threshold sits halfway under
      it, as in threshold_for_recall, so no validation image is on the boundary. Used from r = 5 on: a
      lower order statistic rests on as few scores as the quantile does (r = 1 from 32 scores at 95 %/80 %).
    - Fewer scores: the normal tolerance bound mean - k * sd, k from the noncentral t (Owen 1968; 14
      scores at 95 %/80 % give k = 2.098 where the normal quantile alone is 1.645).
    Written here: scipy has the distributions, no library the bound."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if confidence is None or n < 3:
        return threshold_for_recall(s, recall), "quantile"
    r = int(np.sum(binom.sf(np.arange(n), n, 1.0 - recall) >= confidence))  # sf(r - 1) falls as r grows
    if r >= 5:
        return float((s[r - 2] + s[r - 1]) / 2), "order statistic"
    k = float(nct.ppf(confidence, n - 1, norm.ppf(recall) * np.sqrt(n)) / np.sqrt(n))
    return float(s.mean() - k * s.std(ddof=1)), "normal tolerance bound"


@dataclass
class TrustFit:
    """What `fit_trust` chose (`trust`, for bundle.json) and measured (`to_metrics()`)."""

    trust: Trust | None
    metrics: dict[str, Any] = field(default_factory=dict)
    diagram: dict[str, Any] = field(default_factory=dict)  # reliability bins before/after, for plot_reliability

    def to_metrics(self) -> dict[str, Any]:
        return dict(self.metrics)


def fit_trust(cfg: TrustConfig, val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
              ood: np.ndarray | None = None, ood_source: str | None = None,
              target: np.ndarray | None = None, proxy: np.ndarray | None = None) -> TrustFit:
    """Fit the temperature (cfg.calibration) and the OOD threshold (cfg.ood) on the validation logits
    and labels `val`; measure ECE, NLL, the unknown rate and (given outlier logits `ood`) AUROC and FPR
    at 95% TPR on the test split. Everything is computed from PyTorch logits (the parity gate then
    holds every artifact to the same decisions). `target`: logits of the unlabeled deployment images
    (data.target); they are in-distribution for the device, so the threshold also keeps
    target_recall of them known (a threshold fitted on the source camera alone called 89 % of
    dusk-camera images unknown). `proxy`: logits of generated images of no class, measured in place of
    `ood` when there is none (a floor, not a validation: see the note it writes)."""
    (vz, vy), (tz, ty) = val, test
    fitted = fit_temperature(vz, vy) if cfg.calibration != "none" else None
    t = round(fitted, 6) if fitted is not None else 1.0
    scale = bias = None
    if cfg.calibration == "vector" and len(vy):
        w, b = fit_vector(vz, vy, t, cfg.vector_l2)
        scale, bias = [round(float(v), 6) for v in w], [round(float(v), 6) for v in b]
    m: dict[str, Any] = {"calibration": cfg.calibration, "temperature": t, "bins": cfg.bins,
                         "fitted_on": "val", "n_val": len(vy), "n_test": len(ty)}
    if scale is not None:
        m["vector"] = {"scale": scale, "bias": bias, "l2": cfg.vector_l2}
    if cfg.calibration == "temperature" and fitted is None:
        m["calibration_note"] = ("no temperature fitted: the validation split has no NLL minimum (empty, or every "
                                 "image classified right with growing confidence as T -> 0); kept T = 1")
    diagram = {}
    for part, (z, y) in (("val", (vz, vy)), ("test", (tz, ty))):
        z64 = np.asarray(z, np.float64)
        scaled = z64 * np.asarray(scale) + np.asarray(bias) if scale is not None else z64 / t
        before, after = softmax(z64), softmax(scaled)
        m[part] = {"ece_before": expected_calibration_error(before, y, cfg.bins),
                   "ece_after": expected_calibration_error(after, y, cfg.bins),
                   "nll_before": nll(z, y), "nll_after": nll(scaled, y),
                   "accuracy_before": float((before.argmax(1) == y).mean()) if len(y) else 0.0,
                   "accuracy_after": float((after.argmax(1) == y).mean()) if len(y) else 0.0}
        e = m[part]
        e["ece_floor"] = ece_floor(after, cfg.bins)
        e["ece_reduction"] = 1 - e["ece_after"] / e["ece_before"] if e["ece_before"] > 0 else 0.0
        diagram[part] = {"before": reliability(before, y, cfg.bins), "after": reliability(after, y, cfg.bins)}
    spec = None
    if cfg.ood.enabled and not len(vy):
        m["ood_note"] = "no validation images to choose the OOD threshold on: the bundle never answers unknown"
    elif cfg.ood.enabled:
        kind = cfg.ood.score
        v_scores, t_scores = ood_score(vz, kind), ood_score(tz, kind)
        threshold, rule = fit_threshold(v_scores, cfg.ood.target_recall, cfg.ood.confidence)
        g_scores = ood_score(target, kind) if target is not None and len(target) else None
        if g_scores is not None:
            threshold = min(threshold, fit_threshold(g_scores, cfg.ood.target_recall, cfg.ood.confidence)[0])
        spec = OODSpec(score=kind, threshold=threshold, target_recall=cfg.ood.target_recall,
                       unknown_label=cfg.ood.unknown_label)
        o: dict[str, Any] = {
            "score": kind, "threshold": spec.threshold, "target_recall": cfg.ood.target_recall,
            "confidence": cfg.ood.confidence, "threshold_rule": rule,
            "val_known_rate": float((v_scores >= spec.threshold).mean()),
            "test_unknown_rate": float((t_scores < spec.threshold).mean()) if len(t_scores) else 0.0,
            "validated": ood is not None and len(ood) > 0,
            "fitted_on": "val" if g_scores is None else "val+target",
        }
        if g_scores is not None:
            o.update(n_target=len(g_scores), target_known_rate=float((g_scores >= spec.threshold).mean()))
        if o["validated"]:
            o_scores = ood_score(ood, kind)
            o.update(source=ood_source, n_ood=len(o_scores), auroc=auroc(t_scores, o_scores),
                     fpr_at_95_tpr=fpr_at_tpr(t_scores, o_scores, 0.95),
                     ood_unknown_rate=float((o_scores < spec.threshold).mean()))
        else:
            o["note"] = ("no out-of-distribution images (data.ood): the threshold is set to keep "
                         f"{cfg.ood.target_recall:.0%} of in-distribution images known but is unvalidated against "
                         "real outliers")
            if proxy is not None and len(proxy) and len(t_scores):
                p_scores = ood_score(proxy, kind)
                o["proxy"] = {"source": "generated images of no class", "n": len(p_scores),
                              "auroc": auroc(t_scores, p_scores),
                              "known_rate": float((p_scores >= spec.threshold).mean())}
        m["ood"] = o
    fit_record = {"split": "val", "n": len(vy), "ece_before": m["val"]["ece_before"],
                  "ece_after": m["val"]["ece_after"]}
    if spec is not None:
        fit_record["ood"] = {k: v for k, v in m["ood"].items() if k in ("validated", "auroc", "fpr_at_95_tpr", "n_ood")}
    trust = Trust(temperature=t, scale=scale, bias=bias, ood=spec, fit=fit_record)
    return TrustFit(trust=trust, metrics=m, diagram=diagram)


def plot_reliability(fit: TrustFit, path: Path, title: str = "") -> Path | None:
    """Reliability diagrams (test split) before and after temperature scaling, side by side, as a PNG;
    None without matplotlib or without a diagram."""
    d = fit.diagram.get("test")
    if not d:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from runtime.files import atomic_path

    bins = fit.metrics["bins"]
    width = 1.0 / bins
    centers = (np.arange(bins) + 0.5) * width
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, when in zip(axes, ("before", "after")):
        r = d[when]
        ece = fit.metrics["test"][f"ece_{when}"]
        has = np.asarray(r["count"]) > 0
        ax.bar(centers[has], np.asarray(r["accuracy"])[has], width=width * 0.95, color="#4c72b0", label="accuracy")
        ax.bar(centers[has], (np.asarray(r["confidence"]) - np.asarray(r["accuracy"]))[has],
               bottom=np.asarray(r["accuracy"])[has], width=width * 0.95, color="#dd8452", alpha=0.5, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        label = ("raw softmax" if when == "before" else "vector scaling" if "vector" in fit.metrics
                 else f"temperature {fit.metrics['temperature']:.3g}")
        ax.set_title(f"{label}: ECE {ece:.3f}")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy (test split)")
    axes[0].legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
