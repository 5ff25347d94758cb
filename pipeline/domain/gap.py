"""How far apart two image domains are, on frozen backbone features: the cross-validated accuracy
of a domain classifier (logistic regression, source vs target) and the proxy A-distance
2 (1 - 2 err) of Ben-David et al. (2010). 0.5 accuracy / 0 distance: indistinguishable; 1.0 / 2:
fully separable."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SMALL_GAP = 0.70  # domain classifier accuracy below this: the domains look alike to the backbone
LARGE_GAP = 0.90  # at or above: the backbone tells them apart at a glance


@dataclass
class DomainGap:
    accuracy: float  # cross-validated domain classifier accuracy (balanced classes)
    proxy_a_distance: float
    n_source: int
    n_target: int

    @property
    def level(self) -> str:
        return "small" if self.accuracy < SMALL_GAP else "large" if self.accuracy >= LARGE_GAP else "moderate"

    def describe(self) -> str:
        return (f"a domain classifier on the frozen features tells source from target with {self.accuracy:.1%} "
                f"accuracy (proxy A-distance {self.proxy_a_distance:.2f}; 50% = indistinguishable): a {self.level} gap")

    def to_dict(self) -> dict:
        return {**asdict(self), "level": self.level}


def domain_gap(source_f: torch.Tensor, target_f: torch.Tensor, seed: int = 0, folds: int = 3) -> DomainGap:
    """Balanced (the larger side subsampled), standardised features, `folds`-fold cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(seed)
    n = min(len(source_f), len(target_f))
    s = source_f[torch.randperm(len(source_f), generator=g)[:n]]
    t = target_f[torch.randperm(len(target_f), generator=g)[:n]]
    x = torch.cat([s, t]).double().numpy()
    y = [0] * n + [1] * n
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    acc = float(cross_val_score(clf, x, y, cv=min(folds, n)).mean())
    err = 1.0 - acc
    return DomainGap(acc, 2.0 * (1.0 - 2.0 * min(err, 0.5)), len(source_f), len(target_f))


def closer_fraction(target_f: torch.Tensor, original_f: torch.Tensor, styled_f: torch.Tensor) -> float:
    """The share of target images whose nearest source image (cosine, frozen features) is a restyled
    copy rather than an original: 0.5 when restyling made no difference, near 1 when the styled source
    images look like the target to the backbone."""
    def unit(f):
        return torch.nn.functional.normalize(f.float(), dim=1)

    t = unit(target_f)
    near_orig = (t @ unit(original_f).T).max(1).values
    near_styled = (t @ unit(styled_f).T).max(1).values
    return float((near_styled > near_orig).float().mean())
