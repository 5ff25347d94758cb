"""Choosing the deployable by measurement.

Every artifact of every candidate model's bundle, on every runtime backend its parity gate ran it
on here, is a candidate. Each is measured on this machine through the runtime's own sessions
(runtime.backends.session_for_artifact): accuracy and agreement come from its parity report (with
n and the drop's interval), size from its file, latency p50 at batch 1 and throughput at
`deploy.batch` from timing runs made side by side (exporters.bench.alternating_latency), so a
noisy neighbour slows every candidate alike. Those that passed their gates and meet every budget
of the `deploy` section are ranked by its objective; the best is the deployable.

    cands = gate_candidates("teacher", bundle, gate)      # or bundle_candidates(bundle), from bundle.json
    measure(cands, {str(bundle.root): bundle}, deploy)     # latency and throughput, side by side
    choice = choose(cands, deploy)                         # .chosen (a Candidate or None), .reason
    ship(bundle_dir, out, choice)                 # the chosen model's passing artifacts, default set
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporters.bench import alternating_latency, artifact_bytes, timing_inputs
from exporters.config import DeployConfig
from exporters.parity import GateResult
from exporters.quiet import logger_at
from runtime.backends import session_for_artifact
from runtime.bundle import Bundle, read_bundle, write_manifest
from runtime.errors import EdgekilnError
from runtime.files import atomic_dir

OBJECTIVE_WORDS = {"latency": "fastest (latency p50 at batch 1)", "size": "smallest", "accuracy": "most accurate"}
METRIC_WORDS = {"accuracy": "accuracy", "macro_f1": "macro-F1"}


class DeployError(EdgekilnError):
    """No candidate passed its gates and met the budgets; `table` lists every candidate's figures."""

    exit_code = 1

    def __init__(self, message: str, table: str):
        super().__init__(message)
        self.table = table


@dataclass
class Candidate:
    """One artifact of one model on one backend, as measured here."""

    model: str  # the role: teacher | student
    arch: str
    artifact: str  # its key in bundle.json
    file: str
    format: str
    precision: str
    backend: str
    bundle: str  # its bundle directory
    size_mb: float
    accuracy: float
    accuracy_drop: float  # vs its PyTorch model, on the test split
    drop_low: float  # 95% interval of the drop
    drop_high: float
    n: int  # labeled test images
    agreement: float
    agreement_n: int
    latency_p50_ms: float = float("nan")
    throughput_ips: float = float("nan")
    passed: bool = True  # its parity gate
    failures: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)  # the budgets (or the gate) it missed
    pareto: bool = False
    chosen: bool = False
    ood_auroc: float | None = None  # its model's OOD score AUROC on data.ood (exporters.trust), None: unmeasured
    macro_f1: float | None = None  # on the test split (None: not measured, e.g. a record from before 0.5)

    @property
    def label(self) -> str:
        return f"{self.model} {self.format} {self.precision} on {self.backend}"

    @property
    def eligible(self) -> bool:
        return not self.missed

    def quality(self, metric: str = "accuracy") -> float:
        """The figure the choice maximises: accuracy, or macro-F1 (accuracy where it was not measured)."""
        return self.macro_f1 if metric == "macro_f1" and self.macro_f1 is not None else self.accuracy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Choice:
    candidates: list[Candidate]
    chosen: Candidate | None
    reason: str
    deploy: DeployConfig

    def to_dict(self) -> dict[str, Any]:
        c = self.chosen
        return {"objective": self.deploy.objective, "metric": self.deploy.metric or "accuracy", "budgets": budgets(self.deploy), "batch": self.deploy.batch,
                "chosen": None if c is None else {"model": c.model, "artifact": c.artifact, "backend": c.backend,
                                                  "label": c.label},
                "reason": self.reason, "candidates": [x.to_dict() for x in self.candidates]}


def budgets(d: DeployConfig) -> dict[str, float]:
    return {k: v for k, v in (("max_latency_ms", d.max_latency_ms), ("max_size_mb", d.max_size_mb),
                              ("min_accuracy", d.min_accuracy), ("min_ood_auroc", d.min_ood_auroc)) if v is not None}


def candidate_of(role: str, bundle: Bundle, key: str, backend: str, r: dict[str, Any]) -> Candidate:
    """A candidate from an artifact's parity record (exporters.parity.ParityReport.to_dict())."""
    art, s = bundle.manifest.artifacts[key], r.get("drop_stats") or {}
    return Candidate(
        model=role, arch=bundle.manifest.model.arch, artifact=key, file=art.file, format=art.format,
        precision=art.precision, backend=backend, bundle=str(bundle.root), size_mb=artifact_bytes(bundle, key) / 1e6,
        accuracy=r["artifact_accuracy"], accuracy_drop=-r["accuracy_delta"], drop_low=s.get("low", float("nan")),
        drop_high=s.get("high", float("nan")), n=r["n_images"], agreement=r["agreement"],
        agreement_n=r.get("agreement_n", r["n_images"]), passed=bool(r.get("passed")), failures=list(r["failures"]),
        macro_f1=r.get("artifact_macro_f1"))


def gate_candidates(role: str, bundle: Bundle, gate: GateResult) -> list[Candidate]:
    """Every artifact x backend the parity gate checked, as candidates."""
    return [candidate_of(role, bundle, label.partition("@")[0], r.backend, r.to_dict())
            for label, r in gate.reports.items()]


def bundle_candidates(bundle: Bundle) -> list[Candidate]:
    """Every artifact x backend of an exported bundle, from the parity records in its bundle.json."""
    out = []
    for key, art in bundle.manifest.artifacts.items():
        if art.parity:
            out.append(candidate_of(bundle.manifest.model.role, bundle, key, art.parity.get("backend", "cpu"),
                                    art.parity))
            out += [candidate_of(bundle.manifest.model.role, bundle, key, b, r)
                    for b, r in (art.parity.get("backends") or {}).items()]
    return out


def measure(cands: list[Candidate], bundles: dict[str, Bundle], deploy: DeployConfig) -> list[Candidate]:
    """Time every candidate (`bundles` keyed by each candidate's `bundle` path) side by side, on its backend:
    latency at batch 1 with every session open, in alternating blocks; then throughput at `deploy.batch`
    one candidate at a time, each session closed before the next opens (a session's memory arena grows to
    the batch's activations: ViT-B/16's four sessions at batch 16 held 6 GB at once)."""
    with logger_at("edgekiln.runtime"):  # the candidates' table says what ran where
        runners, inputs = {}, {}
        for i, c in enumerate(cands):
            b = bundles[c.bundle]
            run = session_for_artifact(b, c.artifact, backend=c.backend, intra_op_threads=deploy.threads).run
            if c.bundle not in inputs:
                inputs[c.bundle] = timing_inputs(b, 1)
            runners[i] = (run, inputs[c.bundle])
        blocks = 3
        per = max(1, deploy.latency_rounds // blocks)
        lat = alternating_latency({i: (lambda _x, r=r, x=x1: r(x)) for i, (r, x1) in runners.items()}, None,
                                  blocks=blocks, per_block=per, warmup=3)
        runners.clear()
        for i, c in enumerate(cands):
            b = bundles[c.bundle]
            run = session_for_artifact(b, c.artifact, backend=c.backend, intra_op_threads=deploy.threads).run
            thr = alternating_latency({i: run}, timing_inputs(b, deploy.batch), blocks=2, per_block=2, warmup=1)
            del run
            c.latency_p50_ms = float(np.median(lat[i])) * 1e3
            c.throughput_ips = deploy.batch / float(np.median(thr[i]))
        return cands


def pareto_front(cands: list[Candidate], metric: str = "accuracy") -> None:
    """Mark the candidates (of those that passed their gates) no other beats on latency, size and quality at once."""
    ok = [c for c in cands if c.passed]
    for c in cands:
        q = c.quality(metric)
        c.pareto = c.passed and not any(
            o is not c and o.latency_p50_ms <= c.latency_p50_ms and o.size_mb <= c.size_mb and o.quality(metric) >= q
            and (o.latency_p50_ms < c.latency_p50_ms or o.size_mb < c.size_mb or o.quality(metric) > q) for o in ok)


def _rank_key(c: Candidate, objective: str, metric: str = "accuracy") -> tuple:
    q = c.quality(metric)
    return {"latency": (c.latency_p50_ms, -q, c.size_mb),
            "size": (c.size_mb, c.latency_p50_ms, -q),
            "accuracy": (-q, c.latency_p50_ms, c.size_mb)}[objective]


def choose(cands: list[Candidate], deploy: DeployConfig) -> Choice:
    """Mark what each candidate missed, the Pareto front and the chosen one; say why in one sentence."""
    for c in cands:
        c.missed = [] if c.passed else ["parity: " + "; ".join(c.failures)]
        if deploy.max_latency_ms is not None and c.latency_p50_ms > deploy.max_latency_ms:
            c.missed.append(f"latency {c.latency_p50_ms:.2f} ms > {deploy.max_latency_ms:g}")
        if deploy.max_size_mb is not None and c.size_mb > deploy.max_size_mb:
            c.missed.append(f"size {c.size_mb:.2f} MB > {deploy.max_size_mb:g}")
        if deploy.min_accuracy is not None and c.accuracy < deploy.min_accuracy:
            c.missed.append(f"accuracy {c.accuracy:.4f} < {deploy.min_accuracy:g}")
        if deploy.min_ood_auroc is not None and (c.ood_auroc is None or c.ood_auroc < deploy.min_ood_auroc):
            c.missed.append(f"OOD AUROC {c.ood_auroc:.3f} < {deploy.min_ood_auroc:g}" if c.ood_auroc is not None
                            else "OOD AUROC unmeasured (no data.ood images, or the unknown answer is off)")
    metric = deploy.metric or "accuracy"
    pareto_front(cands, metric)
    ok = sorted((c for c in cands if c.eligible), key=lambda c: _rank_key(c, deploy.objective, metric))
    if not ok:
        return Choice(cands, None, f"none of the {len(cands)} candidates passed its gates and met the budgets", deploy)
    best = ok[0]
    best.chosen = True
    limits = ", ".join(f"{k} {v:g}" for k, v in budgets(deploy).items())
    objective = ("highest macro-F1" if deploy.objective == "accuracy" and metric == "macro_f1"
                 else OBJECTIVE_WORDS[deploy.objective])
    reason = (f"{best.label} was chosen as the {objective} of the {len(ok)} of "
              f"{len(cands)} candidates that passed their parity gates" + (f" and met the budgets ({limits})" if limits
                                                                         else " (no budgets set)")
              + f": {best.latency_p50_ms:.2f} ms at batch 1, {best.size_mb:.2f} MB, accuracy {best.accuracy:.4f}"
              + (f", macro-F1 {best.macro_f1:.4f}" if best.macro_f1 is not None else "") + ".")
    return Choice(cands, best, reason, deploy)


TABLE_COLUMNS = ("", "model", "format", "precision", "runtime", "accuracy", "macro-F1", "drop pts [95% CI]", "n", "agreement (n)",
                 "MB", "p50 ms b=1", "img/s b=N", "status")


def table_rows(cands: list[Candidate]) -> list[list[str]]:
    """One row per candidate: the figures, and shipped / Pareto / what it missed."""
    rows = []
    for c in cands:
        status = "shipped" if c.chosen else ("; ".join(c.missed) if c.missed else "passed")
        mark = "★" if c.chosen else ("◆" if c.pareto else "")
        rows.append([mark, f"{c.model}: {c.arch.split('/')[-1]}", c.format, c.precision, c.backend, f"{c.accuracy:.4f}",
                     "—" if c.macro_f1 is None else f"{c.macro_f1:.4f}",
                     f"{c.accuracy_drop * 100 + 0.0:+.1f} [{c.drop_low * 100:+.1f}, {c.drop_high * 100:+.1f}]", str(c.n),
                     f"{c.agreement:.2%} ({c.agreement_n})", f"{c.size_mb:.2f}", f"{c.latency_p50_ms:.2f}",
                     f"{c.throughput_ips:.0f}", status])
    return rows


def text_table(cands: list[Candidate], batch: int) -> str:
    """A plain-text table of every candidate (for error messages and logs)."""
    header = [h.replace("b=N", f"b={batch}") for h in TABLE_COLUMNS]
    rows = [header] + table_rows(cands)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def no_candidate_error(choice: Choice) -> DeployError:
    limits = ", ".join(f"{k} {v:g}" for k, v in budgets(choice.deploy).items()) or "no budgets set"
    return DeployError(f"no candidate passed its parity gate and met the deploy budgets ({limits}); "
                       f"{len(choice.candidates)} candidates measured, nothing shipped",
                       text_table(choice.candidates, choice.deploy.batch))


def set_default(bundle_dir: Path, artifact: str, backend: str | None, record: dict[str, Any] | None) -> None:
    """Record the default artifact (and the deploy record) in a bundle's bundle.json, in place."""
    b = read_bundle(bundle_dir, verify=False)
    write_manifest(b.root, b.manifest.model_copy(update={"default_artifact": artifact, "default_backend": backend,
                                                         "deploy": record}))


def ship(src: Path, out: Path, chosen: Candidate, keep: list[str], record: dict[str, Any]) -> Bundle:
    """The shipped bundle at `out`: `src`'s files without the artifacts not in `keep` (those that failed
    their gates), with `chosen` as its default artifact and the deploy record; assembled in a temporary
    directory and renamed into place."""
    b = read_bundle(src, verify=True)
    m = b.manifest
    dropped = {m.artifacts[k].file for k in m.artifacts if k not in keep}
    dropped |= {f + ".data" for f in dropped}
    with atomic_dir(out) as tmp:
        for p in Path(src).iterdir():
            if p.is_file() and p.name != "bundle.json" and p.name not in dropped:
                shutil.copy2(p, tmp / p.name)
        manifest = m.model_copy(update={
            "artifacts": {k: a for k, a in m.artifacts.items() if k in keep},
            "golden": m.golden and m.golden.model_copy(
                update={"artifacts": {k: o for k, o in m.golden.artifacts.items() if k in keep}}),
            "default_artifact": chosen.artifact, "default_backend": chosen.backend, "deploy": record,
            "parity": m.parity.model_copy(update={"passed": True}) if m.parity else None,
        })
        write_manifest(tmp, manifest)
    return read_bundle(out, verify=False)


def plot_pareto(cands: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Accuracy vs latency p50 of every candidate (dicts as in the deploy record): marker area = size,
    the Pareto front joined, refused ones hollow grey, the chosen one a star. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for c in cands:
        x, y, s = c["latency_p50_ms"], c["accuracy"] * 100, 30 + 6 * c["size_mb"]
        if c["chosen"]:
            ax.scatter(x, y, s=s * 3, marker="*", color="tab:orange", edgecolor="k", zorder=3, label="chosen")
        elif c["missed"]:
            ax.scatter(x, y, s=s, facecolors="none", edgecolors="grey", zorder=2)
        else:
            ax.scatter(x, y, s=s, color="tab:blue" if c["pareto"] else "tab:green", alpha=0.8, zorder=2)
        ax.annotate(f"{c['model']} {c['precision']}\n{c['backend']}, {c['size_mb']:.1f} MB", (x, y),
                    textcoords="offset points", xytext=(6, 4), fontsize=7)
    front, best = [], -1.0  # the accuracy-vs-latency front of those that passed: more accurate than every faster one
    for c in sorted((c for c in cands if c["passed"]), key=lambda c: (c["latency_p50_ms"], -c["accuracy"])):
        if c["accuracy"] > best:
            front.append(c)
            best = c["accuracy"]
    if len(front) > 1:
        ax.step([c["latency_p50_ms"] for c in front], [c["accuracy"] * 100 for c in front], where="post",
                linestyle="--", color="tab:blue", alpha=0.6, label="front: accuracy vs latency")
    ax.set_xscale("log")
    ax.margins(x=0.3, y=0.25)
    ax.set_xlabel("latency p50, batch 1 (ms, this machine)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "candidates: accuracy vs latency (area = size; blue = Pareto in latency, size and "
                          "accuracy; hollow = refused)", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
