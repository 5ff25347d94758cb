"""`edgekiln check-data`: every problem of a labeled image set in one pass.

    report = check_data(DataConfig(root=...), seed=0)
    report.errors      # problems that would break or bias training (exit 1)
    report.warnings    # worth a look (duplicates in a class, imbalance, EXIF rotation, ...)
    report.to_dict()   # the JSON report

One pass decodes every image once: unreadable, corrupt, truncated and zero-byte files; files
that are not images; exact duplicates (sha256 of the bytes) and near-duplicates (a 64-bit
difference hash) within a class, across classes (conflicting labels) and across the
train/val/test parts of the split the config would make (leakage); classes below the size
the split needs; imbalance; and a summary of sizes, modes, bit depths and formats.
`adapt` (and so `run`) runs the same check first: `data.on_bad_file: fail` stops with every
problem listed, `skip` leaves the bad files out and says which.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import IMAGE_EXTENSIONS, min_images_per_class, read_manifest
from runtime.preprocess import open_image

#: Hamming distance (of 64 bits) at or under which two images count as near-duplicates.
NEAR_DUPLICATE_BITS = 4
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Problem:
    kind: str  # zero_byte, corrupt, not_image, duplicate_across_classes, leakage, too_few, ...
    severity: str  # error | warning
    message: str
    files: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "message": self.message, "files": list(self.files)}


@dataclass
class DataReport:
    source: str
    images: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def bad_files(self) -> list[str]:
        """Files that cannot be trained on (unreadable): what `on_bad_file: skip` leaves out."""
        return sorted({f for p in self.problems if p.kind in UNREADABLE for f in p.files})

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "images": self.images, "per_class": self.per_class,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "problems": [p.to_dict() for p in self.problems], "summary": self.summary}


UNREADABLE = ("zero_byte", "corrupt", "truncated")


def _dhash(img: Image.Image) -> int:
    # A difference hash (Krawetz): 9x8 grayscale, one bit per left/right comparison. Written here
    # because ImageHash would pull in PyWavelets for these few lines.
    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _inspect(path: Path) -> tuple[str | None, str | None, dict[str, Any]]:
    """(problem kind or None, reason, facts) for one file; decodes it fully."""
    size = path.stat().st_size
    if size == 0:
        return "zero_byte", "empty file (0 bytes)", {}
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums; the image must be reopened after verify
        with Image.open(path) as im:
            facts = {"format": im.format, "mode": im.mode, "size": im.size,
                     "bits": 16 if im.mode.startswith("I;16") else {"1": 1, "I": 32, "F": 32}.get(im.mode, 8),
                     "exif_rotated": im.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)}
            im.load()  # decodes every pixel: a truncated file fails here
            # Hashed as training and the runtime see it (runtime.preprocess.open_image): PIL's own
            # convert("L") clips 16-bit scans to white, which made every 16-bit image a near-duplicate
            # of every other, across classes.
            facts["dhash"] = _dhash(open_image(im, max_pixels=None))
    except OSError as e:
        text = str(e)
        kind = "truncated" if "truncated" in text.lower() else "corrupt"
        return kind, text.splitlines()[0][:160] or type(e).__name__, {}
    except Exception as e:  # PIL raises a zoo of errors on hostile files (SyntaxError, ValueError, ...)
        return "corrupt", f"{type(e).__name__}: {str(e)[:160]}", {}
    facts["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return None, None, facts


def _listing(data: DataConfig) -> tuple[Path, list[str], list[tuple[str, int]], list[str]]:
    """(root, class names, (relative path, label) of every image candidate, other files)."""
    if data.manifest is not None:
        m = read_manifest(Path(data.manifest))
        return m.root, m.class_names, m.items, []
    from pipeline.adapt_stage import data_root

    root = data_root(data)
    if not root.is_dir():
        from pipeline.errors import DataError

        raise DataError(f"data.root: directory not found: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items, others = [], []
    for label, d in enumerate(class_dirs):
        for p in sorted(d.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            rel = p.relative_to(root).as_posix()
            (items.append((rel, label)) if p.suffix.lower() in IMAGE_EXTENSIONS else others.append(rel))
    others += sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    return root, [d.name for d in class_dirs], items, others


def _groups(keys: dict[str, Any]) -> list[list[str]]:
    by: dict[Any, list[str]] = defaultdict(list)
    for f, k in keys.items():
        by[k].append(f)
    return [sorted(v) for v in by.values() if len(v) > 1]


def _near_groups(hashes: dict[str, int], exact: dict[str, str]) -> list[list[str]]:
    """Groups of images within NEAR_DUPLICATE_BITS of the group's first image (in path order) that are not
    byte-identical to it. Each image joins the first earlier image it is near, never a chain of them:
    joining every pair within the bound (connected components) chained 269 of scikit-learn's 8x8 digit
    scans, of eight labels, into one "near-duplicate" group whose members lay up to 34 bits apart.
    Pairwise over n images: fine for the small sets this tool is for (10,000 images: 50M XORs in numpy)."""
    files = sorted(hashes)
    h = np.array([hashes[f] for f in files], dtype=np.uint64)
    taken = np.zeros(len(files), dtype=bool)
    groups = []
    for i in range(len(files) - 1):
        if taken[i]:
            continue
        dist = np.unpackbits(np.bitwise_xor(h[i + 1 :], h[i]).view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        near = [i + 1 + int(j) for j in np.nonzero(dist <= NEAR_DUPLICATE_BITS)[0]
                if not taken[i + 1 + j] and exact[files[i + 1 + int(j)]] != exact[files[i]]]
        if near:
            taken[near] = True
            groups.append([files[i]] + [files[j] for j in near])
    return groups


def _listed(files: list[str], shown: int = 5) -> str:
    """The first few of a group's files for a one-line message; the JSON report keeps every one."""
    rest = len(files) - shown
    return ", ".join(files[:shown]) + (f" and {rest} more (all listed in the JSON report: a run's data_check.json, "
                                        "or check-data --json)" if rest > 0 else "")


def check_data(data: DataConfig, seed: int = 0, progress: bool = True) -> DataReport:
    """Inspect every file once and report every problem (see the module docstring)."""
    from tqdm.auto import tqdm

    root, class_names, items, others = _listing(data)
    report = DataReport(source=str(data.manifest or root))
    add = report.problems.append
    for rel in others:
        add(Problem("not_image", "warning", f"{rel}: not an image ({Path(rel).suffix or 'no extension'}); ignored",
                    (rel,)))
    label_of = dict(items)
    facts: dict[str, dict[str, Any]] = {}
    for rel, _ in tqdm(items, desc="check-data", unit="file", leave=False, disable=not progress or None):
        kind, reason, f = _inspect(root / rel)
        if kind:
            add(Problem(kind, "error", f"{rel}: {reason}", (rel,)))
        else:
            facts[rel] = f
    report.images = len(facts)
    counts = Counter(label_of[r] for r in facts)
    report.per_class = {name: counts.get(i, 0) for i, name in enumerate(class_names)}

    if len(class_names) < 2:
        add(Problem("too_few_classes", "error", f"{len(class_names)} class(es); a classifier needs at least 2"))
    need = min_images_per_class(data.val_fraction, data.test_fraction)
    for name, n in report.per_class.items():
        if n == 0:
            add(Problem("too_few", "error", f"class '{name}' has no readable images"))
        elif n < need:
            add(Problem("too_few", "error", f"class '{name}' has {n} readable image(s); the split "
                        f"(val {data.val_fraction:g}, test {data.test_fraction:g}) needs at least {need} per class "
                        "so that train, val and test each get one"))
    nonzero = [n for n in report.per_class.values() if n]
    if nonzero and max(nonzero) / min(nonzero) >= 3:
        big = max(report.per_class, key=report.per_class.get)
        small = min(report.per_class, key=report.per_class.get)
        add(Problem("imbalance", "warning", f"imbalance {max(nonzero) / min(nonzero):.1f}:1 ('{big}' "
                    f"{report.per_class[big]} vs '{small}' {report.per_class[small]}); consider data.balance"))
    rotated = sorted(r for r, f in facts.items() if f["exif_rotated"])
    if rotated:
        add(Problem("exif_rotated", "warning", f"{len(rotated)} image(s) carry an EXIF rotation (applied when "
                    "loading, as the runtime does; a camera pipeline that ignores EXIF sees them turned)",
                    tuple(rotated)))

    exact = {r: f["sha256"] for r, f in facts.items()}
    part_of = _parts(data, seed, root, class_names, [(r, label_of[r]) for r in facts], need, report)
    for group, near in [(g, False) for g in _groups(exact)] + [(g, True) for g in _near_groups(
            {r: f["dhash"] for r, f in facts.items()}, exact)]:
        what = "near-duplicates" if near else "identical files"
        # Identical bytes are certain; a near-duplicate is a hash within a few bits (a burst of
        # photos, a re-encoded copy, or simply two plain images), so it warns and does not stop a run.
        severity = "warning" if near else "error"
        labels = {class_names[label_of[f]] for f in group}
        if len(labels) > 1:
            add(Problem("conflicting_labels", severity, f"{what} with different labels ({', '.join(sorted(labels))}): "
                        + _listed(group), tuple(group)))
            continue
        parts = {part_of[f] for f in group if f in part_of}
        if len(parts) > 1:
            add(Problem("leakage", severity, f"{what} across the split ({', '.join(sorted(parts))}): the test "
                        "score would count memorised images: " + _listed(group), tuple(group)))
        else:
            add(Problem("near_duplicate" if near else "duplicate", "warning",
                        f"{what} in class '{next(iter(labels))}': " + _listed(group), tuple(group)))

    sizes = np.array([f["size"] for f in facts.values()]) if facts else np.zeros((0, 2))
    report.summary = {
        "formats": dict(Counter(f["format"] for f in facts.values())),
        "modes": dict(Counter(f["mode"] for f in facts.values())),
        "bit_depths": {str(k): v for k, v in Counter(f["bits"] for f in facts.values()).items()},
        "width": _range(sizes[:, 0]), "height": _range(sizes[:, 1]),
        "min_images_per_class": need, "near_duplicate_bits": NEAR_DUPLICATE_BITS,
    }
    return report


def _range(v: np.ndarray) -> dict[str, int] | None:
    return {"min": int(v.min()), "median": int(np.median(v)), "max": int(v.max())} if len(v) else None


def _parts(data: DataConfig, seed: int, root: Path, class_names: list[str], items: list[tuple[str, int]],
           need: int, report: DataReport) -> dict[str, str]:
    """Which part of the split each readable image would land in (a manifest's own split column, or
    the seeded split the run would make); {} when the split cannot be made (reported elsewhere)."""
    if data.manifest is not None:
        m = read_manifest(Path(data.manifest))
        if m.parts is not None:
            return dict(m.parts)
    # The classes big enough to split (a too-small class is reported on its own), relabelled 0..k-1.
    keep = [i for i, name in enumerate(class_names) if report.per_class.get(name, 0) >= need]
    if not keep:
        return {}
    from pipeline.data import split_items

    new = {old: n for n, old in enumerate(keep)}
    split = split_items(root, [class_names[i] for i in keep], [(p, new[y]) for p, y in items if y in new],
                        data.val_fraction, data.test_fraction, seed)
    return {p: part for part in ("train", "val", "test") for p, _ in getattr(split, part)}


def print_report(report: DataReport, console=None) -> None:
    """The table of problems and the summary lines (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    if report.problems:
        table = Table(title=f"check-data: {report.source}")
        for col in ("severity", "problem", "details"):
            table.add_column(col, overflow="fold")
        for p in sorted(report.problems, key=lambda p: (p.severity != "error", p.kind)):
            table.add_row("❌ error" if p.severity == "error" else "⚠ warning", p.kind, p.message)
        console.print(table)
    s = report.summary
    size = (f"{s['width']['min']}-{s['width']['max']} x {s['height']['min']}-{s['height']['max']} px"
            if s.get("width") else "no readable images")
    console.print(f"{report.images} readable image(s) in {len(report.per_class)} class(es) "
                  f"({', '.join(f'{k}: {v}' for k, v in report.per_class.items())}); {size}; formats "
                  f"{s.get('formats')}; modes {s.get('modes')}")
    console.print(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")


def blocking_problems(report: DataReport, on_bad_file: str) -> list[Problem]:
    """What stops `adapt`: every error, less the unreadable files when on_bad_file is 'skip'."""
    return [p for p in report.errors if not (on_bad_file == "skip" and p.kind in UNREADABLE)]
