"""Issue 17 acceptance on a finished run: the same answers (label or unknown) from every artifact and
backend, and from the server, on the test split; OOD quality of each on a folder of outliers.

    python bench/ood_images.py /tmp/ood
    edgekiln demo --runs-dir /tmp/runs --ood /tmp/ood
    PYTHONPATH=. python bench/trust_acceptance.py /tmp/runs/demo --ood /tmp/ood [--json out.json]

For every bundle of the run (the shipped one and runs/<name>/candidates/*), every artifact on every
backend of its runtimes that starts here (through runtime.load, as it serves): test accuracy of the
known answers, unknown rate on the test split and on the OOD images, AUROC and FPR at 95 % TPR of the
runtime's own scores, and agreement of decisions with the bundle's FP32 ONNX model on cpu; the parity
gate's agreement with PyTorch (bundle.json); and the FP32 model behind the HTTP server (/v1/classify,
in-process) against the runtime.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import runtime
from exporters.agreement import list_images
from exporters.trust import auroc, fpr_at_tpr
from runtime.bundle import read_bundle


def server_decisions(bundle_dir: Path, files: list[Path], clf) -> list[tuple[str, bool]]:
    """(label, known) for each file from /v1/classify of an in-process server."""
    from fastapi.testclient import TestClient

    from runtime.serve import ServeSettings, create_app

    app = create_app(ServeSettings(bundle_dir=str(bundle_dir), backend="cpu", max_images_per_request=64), classifier=clf)
    out = []
    with TestClient(app) as c:
        for i in range(0, len(files), 64):
            chunk = files[i : i + 64]
            r = c.post("/v1/classify", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in chunk])
            r.raise_for_status()
            out += [(p["label"], p["known"]) for p in r.json()["predictions"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--ood", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    split = json.loads((args.run_dir / "split.json").read_text())
    test = [Path(split["root"]) / p for p, _ in split["test"]]
    labels = np.array([y for _, y in split["test"]])
    ood = list_images(args.ood) if args.ood else []
    bundles = [args.run_dir / "bundle", *sorted((args.run_dir / "candidates").glob("*"))]
    rows = []
    for bdir in bundles:
        if not (bdir / "bundle.json").is_file():
            continue
        b = read_bundle(bdir)
        m = b.manifest
        ref = runtime.load(bdir, backend="cpu", artifact="onnx")
        ref_dec = ref.outputs(ref.logits(test)).decisions
        for key, art in m.artifacts.items():
            for backend in art.runtimes:
                try:
                    clf = runtime.load(bdir, backend=backend, artifact=key)
                except runtime.EdgekilnError as e:
                    rows.append({"bundle": bdir.name, "model": m.model.role, "artifact": key, "backend": backend,
                                 "skipped": str(e).split(": ")[-1][:80]})
                    continue
                out = clf.outputs(clf.logits(test))
                dec = out.decisions
                row = {"bundle": bdir.name, "model": m.model.role, "artifact": key, "precision": art.precision,
                       "backend": backend, "n_test": len(test),
                       "accuracy_known": float((dec == labels).mean()),
                       "test_unknown_rate": float((~out.known).mean()),
                       "agree_with_fp32_runtime": float((dec == ref_dec).mean()),
                       "agree_with_pytorch_gate": (art.parity or {}).get("decision_agreement")}
                if ood:
                    o = clf.outputs(clf.logits(ood))
                    row.update(n_ood=len(ood), ood_unknown_rate=float((~o.known).mean()),
                               auroc=auroc(out.score, o.score), fpr_at_95_tpr=fpr_at_tpr(out.score, o.score))
                if key == "onnx" and backend == "cpu":
                    srv = server_decisions(bdir, test, clf)
                    want = [(p.label, p.known) for p in clf.predictions_from_logits(clf.logits(test))]
                    row["server_agrees_with_runtime"] = float(np.mean([a == b for a, b in zip(srv, want)]))
                rows.append(row)
    cols = ["model", "artifact", "backend", "accuracy_known", "test_unknown_rate", "agree_with_fp32_runtime",
            "agree_with_pytorch_gate", "ood_unknown_rate", "auroc", "fpr_at_95_tpr", "server_agrees_with_runtime"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['artifact']} | {r['backend']} | skipped: {r['skipped']} |")
            continue
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "—")) for c in cols]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
