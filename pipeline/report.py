"""Run summaries printed at the end of `demo` / `run`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.adapt_stage import AdaptResult
from pipeline.export_stage import PipelineResult
from pipeline.rundir import RunDir
from runtime.files import atomic_write_text


def summary_rows(result: PipelineResult) -> list[tuple[str, ...]]:
    """One row per stage: teacher, student, the FP32 ONNX model with its parity figures."""
    rows = [(key, r.model, f"{r.test_accuracy:.4f}", f"{r.size_mb:.2f}", "—", "—")
            for key, r in (("teacher", result.adapt), ("student", result.distill)) if r is not None]
    o = result.export
    if o:
        rows.append(("ONNX", f"{o.role}, fp32, opset {o.opset}", f"{o.accuracy:.4f}", f"{o.size_mb:.2f}",
                     f"{o.agreement:.2%}", f"{o.max_abs_logit_diff:.2e}"))
    return rows


def summary_columns(result: PipelineResult) -> tuple[str, ...]:
    """The summary table's header. A multi-label run's models are scored by mAP and its ONNX model by
    exact match with per-label agreement (the parity gate's figures), so the header says so."""
    if result.adapt is not None and (result.adapt.extra or {}).get("task") == "multilabel":
        return ("", "model", "test mAP (models) / exact match (ONNX)", "size MB", "per-label agreement", "max |Δlogit|")
    return ("", "model", "test accuracy", "size MB", "top-1 agreement", "max |Δlogit|")


def print_summary(result: PipelineResult, run: RunDir, console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    run = RunDir(run)
    table = Table(title=f"edgekiln summary — {run.root}")
    for col in summary_columns(result):
        table.add_column(col, justify="left" if col in ("", "model") else "right", no_wrap=True)
    for row in summary_rows(result):
        table.add_row(*row)
    console.print(table)
    metrics = run.read_metrics()
    from pipeline.domain.explain import domain_lines

    for line in domain_lines(metrics.get("teacher") or {}):
        console.print(line, soft_wrap=True)
    if metrics.get("deploy"):
        print_deploy(metrics["deploy"], console)
        console.print(verdict(metrics), soft_wrap=True)
    if metrics.get("trust"):
        for line in trust_lines(metrics["trust"]):
            console.print(line, soft_wrap=True)
    console.print(f"bundle: {run.bundle}   metrics: {run.metrics}")


def trust_lines(trust: dict[str, Any]) -> list[str]:
    """One line per candidate model: temperature, ECE before/after (test split), the unknown answer and
    how it was measured against outliers (or that it was not)."""
    lines = []
    for role, t in trust.items():
        if not isinstance(t, dict):
            continue
        e = t["test"]
        how = "vector scaling" if t.get("vector") else f"temperature {t['temperature']:.3g}"
        line = (f"trust ({role}{', shipped' if trust.get('shipped') == role else ''}): {how}, test ECE {e['ece_before']:.4f} -> {e['ece_after']:.4f} "
                f"({-e['ece_reduction']:+.0%})")
        o = t.get("ood")
        if o:
            line += (f"; unknown below {o['score']} {o['threshold']:.3f} (val recall {o['val_known_rate']:.1%}"
                     + (f", data.target recall {o['target_known_rate']:.1%}" if "target_known_rate" in o else "")
                     + f"), test unknown rate {o['test_unknown_rate']:.1%}")
            line += (f"; vs {o['n_ood']} OOD images: AUROC {o['auroc']:.3f}, FPR@95TPR {o['fpr_at_95_tpr']:.1%}"
                     if o["validated"] else f"; {o['note']}")
            if not o["validated"] and o.get("proxy"):
                line += f"; {proxy_text(o['proxy'])}"
        lines.append(line)
    return lines


# The report warns when a model's unknown answer separates generated images of no class worse than this
# AUROC, or lets more than this share of them through at its threshold: the default students that let
# 45-90 % of real photos of other subjects through scored AUROC 0.21-0.78 and let 45-91 % of generated
# images through (bench/RESULTS.md, issue 17).
PROXY_MIN_AUROC, PROXY_MAX_KNOWN = 0.9, 0.5


def proxy_warning(role: str, p: dict[str, Any]) -> str | None:
    """A warning for the report when the check on generated images (exporters.trust's `proxy`) fails, else None."""
    if p["auroc"] >= PROXY_MIN_AUROC and p["known_rate"] <= PROXY_MAX_KNOWN:
        return None
    return (f"the {role}'s unknown answer lets {p['known_rate']:.0%} of {p['n']} generated images of no class "
            f"through (AUROC {p['auroc']:.2f}); it is unlikely to reject real outliers either: measure it with "
            "data.ood, or for a student raise distill.synthetic_outliers")


def proxy_text(p: dict[str, Any]) -> str:
    """exporters.trust's check on generated images of no class, in words."""
    return (f"vs {p['n']} generated images of no class (not real outliers): AUROC {p['auroc']:.3f}, "
            f"{p['known_rate']:.1%} answered with a class")


def print_deploy(record: dict[str, Any], console: Console | None = None, title: str = "") -> None:
    """Every candidate artifact (model, format, precision, runtime, accuracy, agreement, size, latency),
    the deployable marked ★ and the Pareto front ◆; then why it was chosen."""
    from exporters.deploy import TABLE_COLUMNS, Candidate, table_rows

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=title or f"every artifact, measured on this machine (★ shipped, ◆ Pareto front; "
                                 f"objective: {record['objective']})")
    for col in TABLE_COLUMNS:
        table.add_column(col.replace("b=N", f"b={record['batch']}"),
                         justify="right" if col in ("accuracy", "macro-F1", "n", "MB", "p50 ms b=1", "img/s b=N") else "left",
                         no_wrap=col != "status")
    for row in table_rows([Candidate(**c) for c in record["candidates"]]):
        table.add_row(*row)
    console.print(table)
    console.print(record["reason"], soft_wrap=True)


def verdict(metrics: dict[str, Any]) -> str:
    """One line: what was shipped, and what was refused and why (the student, artifacts, budgets)."""
    d = metrics["deploy"]
    chosen = d.get("chosen")
    parts = [f"verdict: shipped {chosen['label']} ({chosen['artifact']})" if chosen else "verdict: nothing shipped"]
    for role, why in (d.get("refused_models") or {}).items():
        s = metrics.get(role) or {}
        nums = [f"retention {s['retention']:.1%}"] if isinstance(s.get("retention"), (int, float)) else []
        if "agreement" in (s.get("target_gate") or {}):
            nums.append(f"data.target agreement {s['target_gate']['agreement']:.1%}")
        figs = f" ({', '.join(nums)})" if nums else ""
        parts.append(f"{role} refused{figs}: {why}")
    cands = d["candidates"]
    failed = [c for c in cands if not c["passed"]]
    over = [c for c in cands if c["passed"] and c["missed"]]
    if failed:
        parts.append("failed parity: " + ", ".join(f"{c['model']} {c['precision']} on {c['backend']}" for c in failed))
    if over:
        parts.append("over budget: " + ", ".join(f"{c['model']} {c['precision']} on {c['backend']} "
                                                f"({'; '.join(c['missed'])})" for c in over))
    others = len(cands) - len(failed) - len(over) - (1 if chosen else 0)
    if others > 0:
        parts.append(f"{others} other candidate(s) passed but ranked lower on {d['objective']}")
    slower = int8_slower(cands)
    if slower:
        parts.append("INT8 is slower than FP32 on this CPU for " + ", ".join(slower))
    return "; ".join(parts) + "."


def int8_slower(cands: list[dict[str, Any]]) -> list[str]:
    """Each model x backend whose INT8 artifact measured slower (latency p50, batch 1) than its FP32 one
    here: on a CPU without VNNI, or a small or attention-heavy model, the Q/DQ overhead can outweigh the
    integer matmuls, and the report says so rather than implying INT8 is the fast option."""
    by = {(c["model"], c["backend"], c["format"], c["precision"]): c for c in cands}
    out = []
    for (model, backend, fmt, precision), c in by.items():
        fp32 = by.get((model, backend, fmt, "fp32"))
        if precision == "int8" and fp32 and c["latency_p50_ms"] > fp32["latency_p50_ms"]:
            out.append(f"{model} {fmt} on {backend} ({c['latency_p50_ms']:.2f} vs {fp32['latency_p50_ms']:.2f} ms)")
    return out


def distill_rows(r) -> list[tuple[str, str]]:
    """The distill justification (a pipeline.distill_stage.DistillResult) as (what, value) rows."""
    rows = [
        ("student", r.model),
        ("teacher", r.teacher_model),
        ("test accuracy (student / teacher)", f"{r.test_accuracy:.4f} / {r.teacher_test_accuracy:.4f}"),
        ("accuracy retained", f"{r.accuracy_retained:.1%}"),
        ("parameters (student / teacher)", f"{r.params:,} / {r.teacher_params:,} ({r.params_ratio:.1%})"),
    ]
    if r.retention is not None:
        d = r.val_drop or {}
        rows.append(("validation retention (student / teacher)",
                     f"{r.retention:.1%} ({r.val_accuracy:.4f} / {r.teacher_val_accuracy:.4f}, n={d.get('n', '?')})"))
        tg = r.target_gate
        if tg and "agreement" in tg:
            rows.append(("agrees with the teacher on data.target",
                         f"{tg['agreement']:.1%} of {tg['n']} images (95% CI {tg['low']:.1%} to {tg['high']:.1%})"))
        elif tg:
            rows.append(("data.target_labeled retention", f"{tg['retention']:.1%} (teacher {tg['teacher_accuracy']:.4f}, "
                                                          f"n={tg['n']})"))
        rows.append(("student gate" if tg else "retention gate",
                     "adopted" if r.adopted else "REFUSED: the teacher is exported"))
    if r.budget:
        rows.append(("training budget", r.budget.split(" (")[0]))
    s, t = r.student_cost, r.teacher_cost
    if s is not None:
        rows += [
            ("ONNX size MB", f"{s.size_mb:.2f} / {t.size_mb:.2f} ({r.onnx_size_ratio:.1%})"),
            ("ORT CPU latency batch 1, ms", f"{s.latency_b1_ms:.2f} / {t.latency_b1_ms:.2f} ({r.latency_b1_ratio:.1%})"),
            ("ORT CPU latency batch 32, ms", f"{s.latency_b32_ms:.1f} / {t.latency_b32_ms:.1f} ({r.latency_b32_ratio:.1%})"),
        ]
    if r.without_kd is not None:
        rows.append(("same student without KD", f"{r.without_kd.test_accuracy:.4f} (KD gain {r.kd_gain:+.4f})"))
    if r.auto is not None:
        fits = [c["student"] for c in r.auto["candidates"] if c["fits"]]
        rows.append(("auto: fitting candidates", ", ".join(fits)))
        rows.append(("auto: trained", ", ".join(r.auto["trained"])))
    return rows


def print_distill_report(result, console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 110)
    table = Table(title="distillation: what the student keeps and costs")
    table.add_column("")
    table.add_column("student / teacher", no_wrap=True)
    for row in distill_rows(result):
        table.add_row(*row)
    console.print(table)


# --------------------------------------------------------------------------- runs/<name>/report.md

def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2%}" if pct else f"{v:.4f}"
    return str(v)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def efficiency_table_rows(eff: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    shots = [str(s) for s in eff["shots"]]
    rows = [[method] + [_fmt(accs.get(s)) for s in shots] for method, accs in eff["accuracy"].items()]
    return ["method \\ examples per class"] + shots, rows


def _adapt_section(run: RunDir, t: AdaptResult) -> list[str]:
    """The adapt result, its baselines side by side, per-class numbers and the plots."""
    lines = [f"## Adapt: {t.model} ({t.strategy})", ""]
    rows = [
        ["test accuracy", _fmt(t.test_accuracy)],
        ["test macro-F1", _fmt(t.macro_f1)],
        ["test AUC-ROC (one-vs-rest, macro)", _fmt(t.auc_roc_ovr)],
        ["val accuracy (best epoch)", f"{_fmt(t.val_accuracy)} ({_fmt(t.best_epoch)})"],
        ["trainable parameters", f"{t.trainable_params:,} of {t.params:,} ({_fmt(t.trainable_fraction, True)})"],
        ["train seconds", f"{t.train_seconds:.1f}"],
    ]
    shift = t.extra.get("prior_shift")
    if shift:  # data.balance weights/sampler (strategies.registry.shift_to_rare)
        rows.append(["head shifted towards rare classes (data.balance)",
                     f"-{shift['tau']:g} · log(class share); val accuracy {_fmt(shift['val_accuracy_before'])} "
                     f"before the shift"])
    lo = t.lora
    if lo:
        rows += [
            ["LoRA rank / alpha / targets", f"{lo['rank']} / {lo['alpha']} / {lo['target_modules']} modules"],
            ["LoRA adapter params / backbone", f"{lo['adapter_params']:,} / {lo['backbone_params']:,} ({lo['trainable_fraction_of_backbone']:.2%})"],
            ["merged vs adapters max abs Δlogit", f"{lo['merge_max_abs_logit_diff']:.2e}"],
        ]
    lines += _md_table(["", "value"], rows)
    if t.baselines:
        lines += ["### Compared with baselines (same architecture, test split)", ""]
        cols = [(t.strategy, t), ("scratch (random init, same budget)", t.baselines["scratch"]),
                ("linear probe", t.baselines["linear_probe"])]
        rows = [
            ["test accuracy"] + [_fmt(m.test_accuracy) for _, m in cols],
            ["macro-F1"] + [_fmt(m.macro_f1) for _, m in cols],
            ["AUC-ROC"] + [_fmt(m.auc_roc_ovr) for _, m in cols],
            ["val accuracy"] + [_fmt(m.val_accuracy) for _, m in cols],
            ["train seconds"] + [f"{m.train_seconds:.1f}" for _, m in cols],
        ]
        lines += _md_table([""] + [c for c, _ in cols], rows)
    from pipeline.domain.explain import domain_section

    lines += domain_section(t.to_metrics())
    if t.per_class:
        lines += ["### Per class (test split)", ""]
        lines += _md_table(
            ["class", "precision", "recall", "F1", "support"],
            [[name, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"])] for name, v in t.per_class.items()],
        )
    for key, title in (("confusion_matrix", "Confusion matrix"), ("training_curves", "Training curves")):
        f = (t.plots or {}).get(key)
        if f and (run.root / f).is_file():
            lines += [f"### {title}", "", f"![{title}]({f})", ""]
    return lines


def render_run_report(run: RunDir, metrics: dict[str, Any]) -> str:
    """Markdown: the adapt result, its baselines side by side, per-class numbers, the plots,
    the data-efficiency table when `edgekiln efficiency` has run, and the pipeline summary."""
    import json

    run = RunDir(run)
    lines = [f"# edgekiln run report — {run.name}", ""]
    if metrics.get("teacher"):
        lines += _adapt_section(run, AdaptResult.from_metrics(metrics["teacher"]))
    if run.efficiency_json.is_file():
        eff = json.loads(run.efficiency_json.read_text())
        header, rows = efficiency_table_rows(eff)
        lines += ["## Data efficiency (test accuracy)", ""] + _md_table(header, rows)
        if (run.root / eff.get("plot", "")).is_file():
            lines += [f"![data efficiency]({eff['plot']})", ""]
    result = PipelineResult.from_metrics(metrics)
    rows = summary_rows(result) if metrics.get("onnx") or metrics.get("student") else []
    if rows:
        lines += ["## Pipeline", ""]
        lines += _md_table([c.replace("|Δlogit|", "abs Δlogit") for c in summary_columns(result)], [list(r) for r in rows])
    cost = (metrics.get("onnx") or {}).get("cost")
    if cost:
        steps = ", ".join(f"{k} {s['seconds']:.0f} s / {s['peak_rss_mb']:.0f} MB" for k, s in cost["steps"].items())
        lines += ["## Export cost (shipped model, this machine)", "",
                  f"{cost['seconds']:.0f} s wall time; peak resident memory {cost['peak_rss_mb']:.0f} MB "
                  f"(in {cost['peak_step']}). Per step: {steps}.", ""]
    quant = (metrics.get("onnx") or {}).get("int8") or {}
    if quant.get("guard"):
        lines += ["## INT8 quantization (shipped model's INT8 artifact)", "", int8_weights_text(quant),
                  int8_guard_text(quant["guard"]), ""]
    if metrics.get("deploy"):
        lines += _deploy_section(run, metrics)
    if metrics.get("trust"):
        lines += _trust_section(run, metrics["trust"])
    if metrics.get("multilabel"):
        lines += _multilabel_section(metrics["multilabel"])
    return "\n".join(lines).rstrip() + "\n"


def int8_weights_text(q: dict[str, Any]) -> str:
    """The INT8 artifact's number format, and where 8-bit weights run as certified."""
    text = f"Weights {q.get('weights', 'int8')}, activations {q.get('activations', 'uint8')}."
    if q.get("weight_bits") == 8:
        text += (" 8-bit weights run as certified only on x86 CPUs with VNNI, on ARM and on OpenVINO: onnxruntime's "
                 "integer kernels on other x86 CPUs saturate them, and the runtime's cpu backend refuses the "
                 "artifact there.")
    return text


def int8_guard_text(g: dict[str, Any]) -> str:
    """What the INT8 guard (exporters.quantize) did: bias correction, nodes kept in float, its verdict."""
    def judged(a: dict[str, Any]) -> str:
        dec, err = a.get("decision_agreement"), a.get("logit_error")
        return (f"accuracy {a['accuracy']:.4f}" + (f", decisions agree {dec:.2%}" if dec is not None else "")
                + (f", mean |Δlogit| {err:.3f}" if err is not None else ""))

    n = g.get("guard_images")
    text = [f"Guard on {n} validation images (FP32 accuracy {g['fp32_accuracy']:.4f})."]
    bc = g.get("bias_correction") or {}
    if not bc:
        text.append("Bias correction: off.")
    elif bc.get("nodes") and "with" in bc:
        verdict = "kept" if bc["used"] else "not kept (logits further from FP32 on the validation images)"
        text.append(f"Bias correction of {bc['nodes']} node(s), {verdict}. The fully quantized model without it: "
                    f"{judged(bc['without'])}; with it: {judged(bc['with'])}.")
    rounding = g.get("rounding") or {}
    if not rounding:
        text.append("Adaptive rounding: off.")
    elif rounding.get("skipped"):
        text.append(f"Adaptive rounding: skipped ({rounding['skipped']}).")
    elif rounding.get("nodes") and "with" in rounding:
        verdict = "kept" if rounding["used"] else "not kept (logits further from FP32 on the validation images)"
        text.append(f"Adaptive rounding (AdaRound) of {rounding['nodes']} convolution(s) in {rounding['seconds']:.0f} s, "
                    f"{verdict}. Before it: {judged(rounding['before'])}; with it: {judged(rounding['with'])}.")
    kept = g.get("excluded_nodes") or []
    text.append(f"{len(kept)} node(s) kept in float" + (f" ({', '.join(kept)})" if kept else "")
                + f": {judged({'accuracy': g['int8_accuracy'], 'decision_agreement': g.get('decision_agreement')})}"
                + (f", floor {g['min_decision_agreement']:.0%}" if g.get("min_decision_agreement") else "")
                + (" (budget met)." if g.get("budget_met") else
                   " (budget not met whatever it kept in float: the fully quantized model is kept)."))
    return " ".join(text)


def _multilabel_section(ml: dict[str, Any]) -> list[str]:
    """Task multilabel: the per-label thresholds chosen on validation and the test figures they give."""
    roles = [r for r, t in ml.items() if isinstance(t, dict)]
    lines = ["## Multi-label: thresholds and test figures", "",
             "Adapt and distill report mAP where the other tables say accuracy; the parity gate's accuracy is the "
             "exact match of the label set and its agreement is per label. Each label's threshold (on its sigmoid "
             "probability) maximises that label's F1 on the validation split; bundle.json's `multilabel` section "
             "carries them to the runtime.", ""]
    header = ["", *[f"{r}{' (shipped)' if ml.get('shipped') == r else ''}" for r in roles]]
    rows = [["test mAP", *[f"{ml[r]['test']['map']:.4f}" for r in roles]]]
    for k, name in (("micro_f1", "micro-F1"), ("macro_f1", "macro-F1"), ("exact_match", "exact match")):
        rows.append([f"test {name} at 0.5 → at thresholds",
                     *[f"{ml[r]['test'][k + '_at_0.5']:.4f} → {ml[r]['test'][k]:.4f}" for r in roles]])
    rows.append(["thresholds", *[", ".join(f"{n} {t:.2f}" for n, t in ml[r]["thresholds"].items()) for r in roles]])
    return lines + _md_table(header, rows) + [""]


def _trust_section(run: RunDir, trust: dict[str, Any]) -> list[str]:
    """Calibration (ECE and NLL before/after temperature scaling, val and test) and the unknown answer
    (threshold, unknown rates, AUROC and FPR@95TPR against OOD images) per candidate model."""
    roles = [r for r, t in trust.items() if isinstance(t, dict)]
    intro = ("Temperature and OOD threshold are fitted on the validation split and written into bundle.json's "
             "`trust` section, which the runtime applies the same way on every backend and in the server. ECE: "
             f"expected calibration error over {trust[roles[0]]['bins']} confidence bins.")
    lines = ["## Trust: calibrated probabilities and the unknown answer", "", intro, ""]
    header = ["", *[f"{r}{' (shipped)' if trust.get('shipped') == r else ''}" for r in roles]]
    rows = [["temperature", *[f"{trust[r]['temperature']:.4g}" for r in roles]]]
    if any("vector" in trust[r] for r in roles):
        rows.append(["vector scaling: scale / bias per class", *[
            f"{min(v['scale']):.3g}–{max(v['scale']):.3g} / {min(v['bias']):+.3g}–{max(v['bias']):+.3g}"
            if (v := trust[r].get("vector")) else "—" for r in roles]])
        rows.append(["test accuracy before → after", *[f"{trust[r]['test'].get('accuracy_before', 0):.4f} → "
                                                        f"{trust[r]['test'].get('accuracy_after', 0):.4f}" for r in roles]])
    for part in ("val", "test"):
        rows += [[f"{part} ECE before → after", *[f"{trust[r][part]['ece_before']:.4f} → {trust[r][part]['ece_after']:.4f} "
                                                  f"({-trust[r][part]['ece_reduction']:+.0%})" for r in roles]],
                 [f"{part} NLL before → after", *[f"{trust[r][part]['nll_before']:.4f} → {trust[r][part]['nll_after']:.4f}"
                                                  for r in roles]]]
    if all("ece_floor" in trust[r]["test"] for r in roles):
        rows.append(["test ECE of a perfectly calibrated model (sampling floor)",
                     *[f"{trust[r]['test']['ece_floor']:.4f} (n={trust[r]['n_test']})" for r in roles]])
    if any(trust[r].get("ood") for r in roles):
        def o(r: str, fmt) -> str:
            x = trust[r].get("ood")
            return fmt(x) if x else "off"

        def rule(x: dict[str, Any]) -> str:  # how the threshold holds its recall
            if x.get("threshold_rule") in (None, "quantile"):
                return ""
            return f" ({x['target_recall']:.0%} known with confidence {x['confidence']:g}: {x['threshold_rule']})"

        rows += [["OOD score, threshold", *[o(r, lambda x: f"{x['score']} ≥ {x['threshold']:.4f}{rule(x)}") for r in roles]],
                 ["val known (target)", *[o(r, lambda x: f"{x['val_known_rate']:.1%} ({x['target_recall']:.0%})")
                                          for r in roles]],
                 ["test unknown rate", *[o(r, lambda x: f"{x['test_unknown_rate']:.1%}") for r in roles]],
                 ["OOD images: n, AUROC", *[o(r, lambda x: f"{x['n_ood']}, {x['auroc']:.4f}" if x["validated"] else "—")
                                            for r in roles]],
                 ["OOD: FPR at 95% TPR, unknown rate", *[o(r, lambda x: f"{x['fpr_at_95_tpr']:.1%}, "
                                                         f"{x['ood_unknown_rate']:.1%}" if x["validated"] else "—")
                                                         for r in roles]]]
        if any((trust[r].get("ood") or {}).get("proxy") for r in roles):
            rows.append(["generated images of no class: n, AUROC, answered with a class",
                         *[o(r, lambda x: f"{x['proxy']['n']}, {x['proxy']['auroc']:.4f}, {x['proxy']['known_rate']:.1%}"
                             if x.get("proxy") else "—") for r in roles]])
    lines += _md_table(header, rows)
    notes = {trust[r]["ood"]["note"] for r in roles if trust[r].get("ood") and not trust[r]["ood"]["validated"]}
    notes |= {w for r in roles if (trust[r].get("ood") or {}).get("proxy")
              and (w := proxy_warning(r, trust[r]["ood"]["proxy"]))}
    lines += [f"**{n[0].upper() + n[1:]}.**" for n in sorted(notes)] + ([""] if notes else [])
    for r in roles:
        if trust[r].get("plot") and (run.root / trust[r]["plot"]).is_file():
            lines += [f"![reliability diagram, {r}]({trust[r]['plot']})", ""]
    return lines


def _deploy_section(run: RunDir, metrics: dict[str, Any]) -> list[str]:
    """Every candidate with its figures (n, drop and its interval, agreement n), the Pareto front, the choice."""
    from exporters.deploy import TABLE_COLUMNS, Candidate, table_rows

    d = metrics["deploy"]
    lines = ["## Deployable: every candidate, measured on this machine", "",
             f"Objective: {d['objective']}; budgets: "
             + (", ".join(f"{k} {v:g}" for k, v in d["budgets"].items()) or "none") + f"; throughput batch {d['batch']}. "
             "★ shipped, ◆ Pareto front (no other candidate is at once faster, smaller and more accurate). "
             "The drop is the artifact's accuracy drop against its PyTorch model on the n test images, with its "
             "paired 95% interval; agreement counts the test split plus the agreement set.", ""]
    header = [h.replace("b=N", f"b={d['batch']}").replace("|", "/") for h in TABLE_COLUMNS]
    lines += _md_table(header, [[v.replace("|", "/") for v in r]
                                for r in table_rows([Candidate(**c) for c in d["candidates"]])])
    if d.get("plot") and (run.root / d["plot"]).is_file():
        lines += [f"![Pareto front]({d['plot']})", ""]
    lines += [d["reason"], "", verdict(metrics), ""]
    return lines


def write_run_report(run: RunDir, metrics: dict[str, Any]) -> Path:
    """runs/<name>/report.md (`run` a RunDir or the run directory's path)."""
    run = RunDir(run)
    atomic_write_text(run.report, render_run_report(run, metrics))
    return run.report
