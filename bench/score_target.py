"""Score the teacher and the student of run directories on a domain benchmark's labeled target test
images (bench/domain_shift.py's layout: <data>/<set>/target_test/<class>/...).

    python bench/score_target.py RUNS_DIR   # every run under RUNS_DIR whose data.target has a sibling target_test
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from pipeline.checkpoint import load_checkpoint
from pipeline.domain import load_target
from pipeline.domain.methods import target_accuracy


def main(runs: Path) -> None:
    for run in sorted(p for p in runs.iterdir() if (p / "split.json").is_file()):
        names = json.loads((run / "split.json").read_text())["class_names"]
        test_dir = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["target"]).parent / "target_test"
        row = [run.name]
        for role in ("teacher", "student"):
            ckpt = run / "checkpoints" / f"{role}.safetensors"
            if not ckpt.is_file():
                row.append(f"{role} -")
                continue
            model, meta = load_checkpoint(ckpt)
            test = load_target(test_dir, test_dir, names, meta.preprocess)
            row.append(f"{role} target_test {target_accuracy(model, test):.3f}")
        m = json.loads((run / "metrics.json").read_text())
        s, t = m.get("student", {}), m.get("teacher", {})
        row += [f"domain {(t.get('domain') or {}).get('method')}", f"source test t {t.get('test_accuracy')}",
                f"s {s.get('test_accuracy')}", f"target gate {s.get('target_gate')}",
                f"adopted {s.get('adopted')}", f"train s {round(s.get('train_seconds', 0))}"]
        print(" | ".join(str(c) for c in row), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
