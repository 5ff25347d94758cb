"""Domain adaptation to the deployment camera (`data.target`, `adapt.domain`).

    out, info = adapt_to_domain(model, data, cfg.adapt, ctx, target)

Methods (pipeline.domain.methods): `none` (source only), `style` (source images restyled to the
target's brightness, contrast, colour, blur and noise), `adabn` (BatchNorm statistics re-estimated
on target images), `dann` (domain classifier through a gradient-reversal layer while fine-tuning),
`ssl` (a SimCLR warm-up of the backbone on target and source images, then the adapt strategy).
`auto`: with `data.target_labeled`, every candidate of `AUTO_LABELED` trains and the best target accuracy
wins (ties go to the cheaper method); without target labels, the unsupervised rule of `choose_unlabeled`.
Every method returns a plain model: nothing domain-specific reaches the exported graph.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.domain.gap import DomainGap, closer_fraction, domain_gap
from pipeline.domain.methods import METHODS, run_method, styled_data, target_accuracy
from pipeline.domain.target import TargetSet, load_target

__all__ = ["METHODS", "TargetSet", "adapt_to_domain", "choose_unlabeled", "load_target", "measure_gap"]

log = logging.getLogger("edgekiln")
STYLE_CLOSER = 0.80  # auto without labels: style when at least this share of target images is nearest a styled copy
# auto with target labels tries these (dann only with adapt.strategy finetune). Not ssl: in bench/domain_shift.py
# it beat source-only on 1 benchmark of 4 (textures +2.2 points; lfw -3.3, scenes -10.7, digits -0.9, 3 seeds
# each) and costs a warm-up per run; a few dozen labeled target images would pick it on noise as often as not.
AUTO_LABELED = ("none", "style", "adabn", "dann")


def measure_gap(model, data, target: TargetSet, arch: str, seed: int) -> tuple[DomainGap, float]:
    """On the pretrained (frozen) backbone: the gap source -> target, and the share of target images
    nearer a restyled source image than an original (gap.closer_fraction)."""
    from pipeline.features import weights_digest
    from pipeline.training import predict_logits

    bb = model.backbone.eval()
    src = data.features("train", bb, arch, weights_digest(bb))
    tgt = predict_logits(bb, target.x())
    sdata, _ = styled_data(data, target, seed, copies=1)
    n = len(data.labels("train"))
    styled = predict_logits(bb, sdata.x("train")[n:])
    return domain_gap(src, tgt, seed), closer_fraction(tgt, src, styled)


def choose_unlabeled(gap: DomainGap, closer: float) -> tuple[str, str]:
    """No target labels: `style` when the restyled source images are what the target images look
    like to the backbone (at least STYLE_CLOSER of the target images have a styled copy as their nearest
    source image; 0.5 = restyling changed nothing), else `none`. A domain classifier's accuracy is no
    use here: on a few hundred images it separates styled source from target as easily as the
    originals (0.99 vs 0.96 on textures -> dusk, where style gains 22 points). The threshold comes from
    bench/domain_shift.py: 0.82-0.89 where style gained 7-22 points (textures), 0.74-0.78 where it did not
    help (digits -> digits-m, -5..+3 points); a thin margin from two benchmarks. AdaBN and DANN are chosen
    only on labeled target images: in bench/domain_shift.py neither was reliably better than
    source-only, and a method nobody can check must not risk negative transfer."""
    ok = closer >= STYLE_CLOSER
    why = (f"{closer:.0%} of the target images are nearer a restyled source image than an original "
           f"({'at least' if ok else 'under'} {STYLE_CLOSER:.0%}): restyling {'matches' if ok else 'does not match'} "
           f"the target camera")
    return ("style" if ok else "none"), why


def adapt_to_domain(model, data, cfg, ctx, target: TargetSet) -> tuple[Any, dict]:
    """Run `cfg.domain` (resolving `auto`); returns the AdaptOutcome and metrics.json's `domain` section."""
    requested = cfg.domain
    gap, closer = measure_gap(model, data, target, ctx.arch, ctx.seed)
    log.info("domain: %s", gap.describe())
    info: dict[str, Any] = {"requested": requested, "gap": gap.to_dict(), "styled_closer": closer,
                            "target_images": len(target.x_uint8), "candidates": {}}
    labeled = target.labeled_y is not None
    if requested == "auto" and not labeled:
        method, why = choose_unlabeled(gap, closer)
        names = [method]
    else:
        names = ([n for n in AUTO_LABELED if n != "dann" or cfg.strategy == "finetune"] if requested == "auto"
                 else [requested])
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
