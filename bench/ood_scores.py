"""Which out-of-distribution score separates outliers best, per model of a finished run (issue 17)?

    python bench/ood_images.py /tmp/ood
    edgekiln demo --runs-dir /tmp/runs --ood /tmp/ood
    PYTHONPATH=. python bench/ood_scores.py /tmp/runs/demo --ood /tmp/ood [--json out.json]

For the teacher and the student checkpoint, from the PyTorch model on the evaluation transform: the
penultimate features (`model.backbone(x)`) and logits of the train, validation and test splits and of
the outlier folder. Every score is fitted on the train split (class means, covariances, subspaces) or
on nothing; every threshold on the validation split (95 % of its images known), never on test or OOD:

    energy          logsumexp(logits) (Liu et al. 2020)
    max_logit       the largest logit (Hendrycks et al. 2022)
    msp_T           the largest softmax probability of logits / T, T fitted on the val NLL (Hendrycks 2017)
    mahalanobis     -min_c (f - mu_c)' S^-1 (f - mu_c), class means and one shared covariance from train
                    features (Lee et al. 2018, https://arxiv.org/abs/1807.03888); S shrunk by Ledoit-Wolf
                    because the features outnumber the train images per class (no tuning on outliers)
    rel_mahalanobis the same minus the distance to one Gaussian of all train features (Ren et al. 2021,
                    https://arxiv.org/abs/2106.09022)
    vim             energy - alpha * |residual of f off the principal subspace| (Wang et al. 2022)
    react_energy    energy of the head on features clipped at their train 90th percentile (Sun et al. 2021)
    knn_k1/10/50    -distance to the k-th nearest L2-normalised train feature (Sun et al. 2022, k = 50 there
                    on 50,000 train images; 1167 here)
    mahalanobis_pinv, mahalanobis_l2norm: variants (empirical covariance and pseudo-inverse as in Lee et
                    al.; shrunk, on L2-normalised features), to see whether the covariance estimate matters
    feature_norm    -|f| and cosine: max cosine to the class means (for reference)

Printed per model and score: AUROC test-vs-OOD with a 95 % bootstrap interval, FPR at 95 % TPR (the
usual definition, from the test split), and at the validation threshold: test unknown rate and the share
of outliers still answered as a digit; AUROC on the faces and on the photo crops separately.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from exporters.agreement import list_images
from exporters.trust import auroc, fit_temperature, fpr_at_tpr, threshold_for_recall
from pipeline.checkpoint import load_checkpoint
from pipeline.data import Split, load_tensors
from runtime.trust import softmax


@torch.no_grad()
def features_logits(model, paths: list[Path], spec, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and logits of `paths`, eval transform, batch by batch."""
    model.eval()
    print(f"features of {len(paths)} images", flush=True)
    x, _ = load_tensors(paths, [0] * len(paths), spec, desc="loading")
    feats, logits = [], []
    for i in range(0, len(x), batch):
        f = model.forward_features(x[i : i + batch])
        feats.append(f.numpy())
        logits.append(model.head(f).numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(logits).astype(np.float64)


def lse(z: np.ndarray) -> np.ndarray:
    m = z.max(1)
    return m + np.log(np.exp(z - m[:, None]).sum(1))


def shrunk_precision(centered: np.ndarray) -> np.ndarray:
    from sklearn.covariance import LedoitWolf

    return LedoitWolf(assume_centered=True).fit(centered).precision_


def mahalanobis_fit(f: np.ndarray, y: np.ndarray, k: int) -> dict[str, np.ndarray]:
    means = np.stack([f[y == c].mean(0) for c in range(k)])
    mu0 = f.mean(0)
    return {"means": means, "prec": shrunk_precision(f - means[y]), "mu0": mu0, "prec0": shrunk_precision(f - mu0)}


def class_distances(f: np.ndarray, means: np.ndarray, prec: np.ndarray) -> np.ndarray:
    """(N, k) squared Mahalanobis distances to each class mean."""
    return np.stack([(((f - m) @ prec) * (f - m)).sum(1) for m in means], axis=1)


def vim_fit(f: np.ndarray, z: np.ndarray, w: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    origin = -np.linalg.pinv(w) @ b
    d = f.shape[1]
    dim = 512 if d >= 1500 else max(d // 2, 1)  # the paper's rule: D = 1000 / 512 / N/2 by feature size
    u = np.linalg.eigh(np.cov((f - origin).T))[1][:, ::-1]
    ns = u[:, dim:]
    res = np.linalg.norm((f - origin) @ ns, axis=1)
    return {"origin": origin, "ns": ns, "alpha": z.max(1).mean() / res.mean()}


def scores_for(f: np.ndarray, z: np.ndarray, fit: dict, temperature: float) -> dict[str, np.ndarray]:
    md = class_distances(f, fit["maha"]["means"], fit["maha"]["prec"])
    d0 = f - fit["maha"]["mu0"]
    md0 = ((d0 @ fit["maha"]["prec0"]) * d0).sum(1)
    v = fit["vim"]
    res = np.linalg.norm((f - v["origin"]) @ v["ns"], axis=1)
    clipped = np.minimum(f, fit["react_c"]) @ fit["w"].T + fit["b"]
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    dist = np.sqrt(np.maximum(2 - 2 * fn @ fit["train_norm"].T, 0))
    knn = {f"knn_k{k}": -np.sort(dist, axis=1)[:, k - 1] for k in (1, 10, 50)}
    mn = fit["maha"]["means"] / np.linalg.norm(fit["maha"]["means"], axis=1, keepdims=True)
    return {"energy": lse(z), "max_logit": z.max(1), "msp_T": softmax(z / temperature).max(1),
            "mahalanobis": -md.min(1), "rel_mahalanobis": -(md - md0[:, None]).min(1),
            "vim": lse(z) - v["alpha"] * res, "react_energy": lse(clipped), **knn,
            "feature_norm": -np.linalg.norm(f, axis=1), "cosine": (fn @ mn.T).max(1),
            **variants(f, fn, fit)}


def variants(f: np.ndarray, fn: np.ndarray, fit: dict) -> dict[str, np.ndarray]:
    """Mahalanobis as Lee et al. wrote it (empirical covariance, pseudo-inverse), and on L2-normalised
    features (shrunk); exploration only, no default is chosen from these on outliers."""
    pinv, norm = fit["maha_pinv"], fit["maha_norm"]
    return {"mahalanobis_pinv": -class_distances(f, pinv["means"], pinv["prec"]).min(1),
            "mahalanobis_l2norm": -class_distances(fn, norm["means"], norm["prec"]).min(1)}


def bootstrap_auroc(a: np.ndarray, b: np.ndarray, draws: int = 500, seed: int = 0) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    rng, vals = np.random.default_rng(seed), []
    lab = np.r_[np.ones(len(a)), np.zeros(len(b))]
    for _ in range(draws):
        ia, ib = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
        vals.append(roc_auc_score(lab, np.r_[a[ia], b[ib]]))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def measure_model(ckpt: Path, split: Split, ood: list[Path]) -> dict[str, dict]:
    model, meta = load_checkpoint(ckpt)
    spec = meta.preprocess
    parts = {p: features_logits(model, split.paths(p), spec) for p in ("train", "val", "test")}
    ys = {p: np.asarray(split.labels(p)) for p in parts}
    fo, zo = features_logits(model, ood, spec)
    ftr, ztr = parts["train"]
    w, b = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    k = w.shape[0]
    temperature = fit_temperature(parts["val"][1], ys["val"]) or 1.0
    ftn = ftr / np.linalg.norm(ftr, axis=1, keepdims=True)
    means = np.stack([ftr[ys["train"] == c].mean(0) for c in range(k)])
    fit = {"maha": mahalanobis_fit(ftr, ys["train"], k), "maha_norm": mahalanobis_fit(ftn, ys["train"], k),
           "maha_pinv": {"means": means, "prec": np.linalg.pinv(np.cov((ftr - means[ys["train"]]).T, bias=True),
                                                                  hermitian=True)}, "vim": vim_fit(ftr, ztr, w, b), "w": w, "b": b,
           "react_c": np.percentile(ftr, 90), "train_norm": ftr / np.linalg.norm(ftr, axis=1, keepdims=True)}
    s = {p: scores_for(*parts[p], fit, temperature) for p in ("val", "test")}
    so = scores_for(fo, zo, fit, temperature)
    faces = np.array([p.name.startswith("lfw-") for p in ood])
    out = {}
    for name in so:
        sv, st, sx = s["val"][name], s["test"][name], so[name]
        thr = threshold_for_recall(sv, 0.95)
        lo, hi = bootstrap_auroc(st, sx)
        out[name] = {"auroc": auroc(st, sx), "auroc_ci95": [lo, hi], "fpr_at_95_tpr": fpr_at_tpr(st, sx),
                     "test_unknown_at_val_thr": float((st < thr).mean()),
                     "ood_known_at_val_thr": float((sx >= thr).mean()),
                     "auroc_faces": auroc(st, sx[faces]), "auroc_photos": auroc(st, sx[~faces])}
    info = {"arch": meta.arch, "feature_dim": int(ftr.shape[1]), "n_train": len(ftr), "n_val": len(ys["val"]),
            "n_test": len(ys["test"]), "n_ood": len(fo), "temperature": temperature}
    return {"info": info, "scores": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--ood", type=Path, required=True)
    ap.add_argument("--roles", default="teacher,student")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    split = Split.load(args.run_dir / "split.json")
    ood = list_images(args.ood)
    results = {}
    for role in args.roles.split(","):
        r = results[role] = measure_model(args.run_dir / "checkpoints" / f"{role}.safetensors", split, ood)
        print(f"\n{role}: {r['info']}")
        print("| score | AUROC [95% bootstrap] | FPR@95TPR | test unknown @ val thr | OOD known @ val thr "
              "| AUROC faces / photos |\n|---|---|---|---|---|---|")
        for name, m in r["scores"].items():
            print(f"| {name} | {m['auroc']:.3f} [{m['auroc_ci95'][0]:.3f}, {m['auroc_ci95'][1]:.3f}] "
                  f"| {m['fpr_at_95_tpr']:.1%} | {m['test_unknown_at_val_thr']:.1%} | {m['ood_known_at_val_thr']:.1%} "
                  f"| {m['auroc_faces']:.3f} / {m['auroc_photos']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
