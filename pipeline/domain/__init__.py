"""Domain adaptation to the deployment camera (`data.target`, `adapt.domain`).

    out, info = adapt_to_domain(model, data, cfg.adapt, ctx, target)

Methods (pipeline.domain.methods): `none` (source only), `style` (source images restyled to the
target's brightness, contrast, colour, blur and noise), `adabn` (BatchNorm statistics re-estimated
on target images), `dann` (domain classifier through a gradient-reversal layer while fine-tuning).
`auto`: with `data.target_labeled`, every candidate trains and the best target accuracy wins
(ties go to the cheaper method); without target labels, the unsupervised rule of `choose_unlabeled`.
Every method returns a plain model: nothing domain-specific reaches the exported graph.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.domain.gap import DomainGap, domain_gap
from pipeline.domain.methods import METHODS, run_method, styled_data, target_accuracy
from pipeline.domain.target import TargetSet, load_target

__all__ = ["TargetSet", "load_target", "adapt_to_domain", "measure_gap", "choose_unlabeled", "METHODS"]

log = logging.getLogger("edgekiln")
STYLE_CLOSES = 0.05  # auto without labels: style is chosen when it lowers the domain classifier's accuracy this much


def measure_gap(model, data, target: TargetSet, arch: str, seed: int) -> tuple[DomainGap, DomainGap]:
    """On the pretrained (frozen) backbone: the gap source -> target, and styled source -> target."""
    from pipeline.features import weights_digest
    from pipeline.training import predict_logits

    bb = model.backbone.eval()
    src = data.features("train", bb, arch, weights_digest(bb))
    tgt = predict_logits(bb, target.x())
    sdata, _ = styled_data(data, target, seed, copies=1)
    n = len(data.labels("train"))
    styled = predict_logits(bb, sdata.x("train")[n:])
    return domain_gap(src, tgt, seed), domain_gap(styled, tgt, seed)


def choose_unlabeled(gap: DomainGap, styled_gap: DomainGap) -> tuple[str, str]:
    """No target labels: `style` when restyling the source closes a measurable part of the domain gap
    (the domain classifier's accuracy drops by at least STYLE_CLOSES), else `none`. AdaBN and DANN are
    chosen only on labeled target images: in bench/domain_shift.py neither was reliably better than
    source-only, and a method that cannot be checked must not risk negative transfer."""
    drop = gap.accuracy - styled_gap.accuracy
    why = (f"restyled source images are {'' if drop >= STYLE_CLOSES else 'not '}closer to the target: the domain "
           f"classifier's accuracy goes {gap.accuracy:.1%} -> {styled_gap.accuracy:.1%}")
    return ("style" if drop >= STYLE_CLOSES else "none"), why


def adapt_to_domain(model, data, cfg, ctx, target: TargetSet) -> tuple[Any, dict]:
    """Run `cfg.domain` (resolving `auto`); returns the AdaptOutcome and metrics.json's `domain` section."""
    requested = cfg.domain
    gap, styled_gap = measure_gap(model, data, target, ctx.arch, ctx.seed)
    log.info("domain: %s", gap.describe())
    info: dict[str, Any] = {"requested": requested, "gap": gap.to_dict(), "styled_gap": styled_gap.to_dict(),
                            "target_images": len(target.x_uint8), "candidates": {}}
    labeled = target.labeled_y is not None
    if requested == "auto" and not labeled:
        method, why = choose_unlabeled(gap, styled_gap)
        names = [method]
    else:
        names = [n for n in METHODS if n != "dann" or cfg.strategy == "finetune"] if requested == "auto" else [requested]
        if labeled and "none" not in names:
            names = ["none", *names]  # source-only, to compare against
        why = ""
    outs = {}
    for name in names:
        outs[name] = run_method(name, model, data, cfg, ctx, target)
        acc = target_accuracy(outs[name].model, target)
        info["candidates"][name] = {"val_accuracy": outs[name].val_accuracy, "target_accuracy": acc}
        log.info("domain %s: source val %.3f%s", name, outs[name].val_accuracy,
                 "" if acc is None else f", labeled target {acc:.3f}")
    if requested == "auto" and labeled:
        accs = {n: c["target_accuracy"] for n, c in info["candidates"].items()}
        method = max(accs, key=lambda n: (accs[n], -names.index(n)))  # ties: the cheaper (earlier) method
        why = f"the best accuracy on data.target_labeled ({accs[method]:.1%})"
    elif requested != "auto":
        method, why = requested, "set in adapt.domain"
    info.update(method=method, reason=why, target_accuracy=info["candidates"][method]["target_accuracy"])
    info["warnings"] = negative_transfer(info)
    for w in info["warnings"]:
        log.warning("domain: %s", w)
    out = outs[method]
    out.extra = {**out.extra, "domain_method": method}
    return out, info


def negative_transfer(info: dict) -> list[str]:
    """Plain words when the domain method made labeled target accuracy worse than source-only."""
    c = info.get("candidates", {})
    method = info.get("method")
    if method in (None, "none") or "none" not in c or c[method]["target_accuracy"] is None:
        return []
    got, base = c[method]["target_accuracy"], c["none"]["target_accuracy"]
    if got >= base:
        return []
    return [f"negative transfer: adapt.domain '{method}' scores {got:.1%} on data.target_labeled, worse than "
            f"source-only training ({base:.1%}, {100 * (got - base):+.1f} points). To try: adapt.domain none or auto, "
            f"more target images, or a labeled target sample in the training data."]


def scratch_beats_pretrained(val_accuracy: float, scratch_val: float | None) -> str | None:
    """Plain words when training from scratch beat the pretrained model on validation (adapt.baselines)."""
    if scratch_val is None or scratch_val <= val_accuracy:
        return None
    return (f"negative transfer: training from scratch reaches {scratch_val:.1%} validation accuracy, more than the "
            f"pretrained model's {val_accuracy:.1%} ({100 * (scratch_val - val_accuracy):+.1f} points); the pretrained "
            f"features do not fit this data. To try: adapt.strategy finetune (all block groups), a model pretrained "
            f"nearer your images, or ship the scratch-trained architecture.")
