"""What the domain section of metrics.json means, in words: the lines the CLI prints and the
run report's markdown section (pipeline.report), from the `teacher` section alone."""

from __future__ import annotations

from typing import Any

MEANING = {
    "small": "the backbone barely tells the two cameras apart; source-only training should transfer",
    "moderate": "the target looks different to the backbone; restyling the source images usually helps",
    "large": "the backbone separates the two cameras at a glance; expect a drop on the device without adaptation",
}


def domain_lines(teacher: dict[str, Any]) -> list[str]:
    """Plain-text lines for the CLI: the gap, the method run and why, every candidate, and warnings."""
    d = teacher.get("domain")
    lines: list[str] = []
    if d:
        gap = d["gap"]
        lines.append(f"domain gap: a domain classifier tells source from target with {gap['accuracy']:.1%} accuracy "
                     f"({gap['level']}): {MEANING[gap['level']]}")
        lines.append(f"domain method: {d['method']} (adapt.domain {d['requested']}; {d['reason']})")
        for name, c in d["candidates"].items():
            if c.get("target_accuracy") is not None:
                lines.append(f"  {name}: labeled target accuracy {c['target_accuracy']:.4f}, source val {c['val_accuracy']:.4f}")
    return lines + negative_transfer_notes(teacher)


def negative_transfer_notes(teacher: dict[str, Any]) -> list[str]:
    """The domain method's negative-transfer warnings, and scratch beating the pretrained model."""
    from pipeline.domain import scratch_beats_pretrained

    notes = list((teacher.get("domain") or {}).get("warnings") or [])
    scratch = (teacher.get("baselines") or {}).get("scratch")
    note = scratch_beats_pretrained(teacher.get("val_accuracy") or 0.0, scratch.get("val_accuracy") if scratch else None)
    return notes + ([note] if note else [])


def domain_section(teacher: dict[str, Any]) -> list[str]:
    """Markdown for report.md: the gap and what it means, each candidate's target accuracy, warnings."""
    d = teacher.get("domain")
    if not d:
        notes = negative_transfer_notes(teacher)
        return ["### Negative transfer", "", *[f"**{n}**" for n in notes], ""] if notes else []
    gap = d["gap"]
    lines = ["## Domain shift: the deployment camera", "",
             f"{d['target_images']} unlabeled target images (data.target). A logistic-regression domain classifier "
             f"on the frozen pretrained features tells source from target with **{gap['accuracy']:.1%}** accuracy "
             f"(3-fold cross-validated; proxy A-distance {gap['proxy_a_distance']:.2f}; 50% means indistinguishable): "
             f"a **{gap['level']}** gap — {MEANING[gap['level']]}.", "",
             f"Restyled source images are the nearest neighbour of {d['styled_closer']:.0%} of the target images "
             "(50%: restyling changed nothing).", "",
             f"Method: **{d['method']}** (adapt.domain `{d['requested']}`): {d['reason']}.", ""]
    rows = [[n, _pct(c.get("target_accuracy")), _pct(c.get("val_accuracy"))] for n, c in d["candidates"].items()]
    lines += ["| method | labeled target accuracy | source val accuracy |", "|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    for w in negative_transfer_notes(teacher):
        lines += [f"**{w}**", ""]
    return lines


def _pct(v) -> str:
    return "—" if v is None else f"{v:.1%}"
