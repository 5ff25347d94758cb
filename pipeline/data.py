"""Data: ImageFolder scanning, a seeded stratified split, the built-in demo set,
and the evaluation transform whose numpy twin lives in runtime.preprocess."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from pipeline.errors import DataError
from runtime.files import atomic_dir, atomic_write_text
from runtime.preprocess import PreprocessSpec, open_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEKILN_CACHE", Path.home() / ".cache" / "edgekiln"))


def demo_data_dir() -> Path:
    """scikit-learn's digits as an ImageFolder of PNGs, written once (atomically) to the cache."""
    dest = cache_dir() / "digits-v1"
    if dest.is_dir():
        return dest
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    try:
        with atomic_dir(dest, replace=False) as tmp:
            for i, (img, label) in enumerate(zip(digits.images, digits.target)):
                d = tmp / str(label)
                d.mkdir(exist_ok=True)
                pixels = np.round(img * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
                Image.fromarray(pixels, mode="L").save(d / f"{i:04d}.png")
    except OSError:
        if not dest.is_dir():
            raise
        # another process won the race; theirs is complete too
    return dest


Label = int | list[int]  # a class index, or (task multilabel) the sorted class indices of one image


@dataclass(frozen=True)
class Split:
    """A deterministic train/val/test split of an ImageFolder or manifest, saved as split.json. With
    task multilabel each item's label is the list of its class indices (its label set)."""

    root: Path
    class_names: list[str]
    train: list[tuple[str, Label]]
    val: list[tuple[str, Label]]
    test: list[tuple[str, Label]]
    task: str = "multiclass"

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def paths(self, part: str) -> list[Path]:
        return [self.root / p for p, _ in getattr(self, part)]

    def labels(self, part: str) -> list:
        """Class indices; with task multilabel, multi-hot rows (one 0.0/1.0 per class), the training
        side's target format (a float (N, classes) tensor)."""
        if self.multilabel:
            return [multi_hot(y, len(self.class_names)) for _, y in getattr(self, part)]
        return [y for _, y in getattr(self, part)]

    def save(self, path: Path) -> None:
        data = {
            "root": str(self.root),
            "class_names": self.class_names,
            **({"task": self.task} if self.multilabel else {}),
            **{part: getattr(self, part) for part in ("train", "val", "test")},
        }
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Split":
        if not path.is_file():
            raise DataError(f"{path}: no split file; run the adapt stage first")
        d = json.loads(path.read_text())
        task = d.get("task", "multiclass")
        label = (lambda y: [int(i) for i in y]) if task == "multilabel" else int
        return cls(
            root=Path(d["root"]),
            class_names=d["class_names"],
            task=task,
            **{part: [(p, label(y)) for p, y in d[part]] for part in ("train", "val", "test")},
        )


def multi_hot(indices: list[int], num_classes: int) -> list[float]:
    row = [0.0] * num_classes
    for i in indices:
        row[i] = 1.0
    return row


def label_tensor(labels: list) -> torch.Tensor:
    """Class indices -> a long tensor (N,); multi-hot rows (task multilabel) -> a float tensor (N, classes)."""
    if labels and isinstance(labels[0], (list, tuple)):
        return torch.tensor(labels, dtype=torch.float32)
    return torch.tensor(labels, dtype=torch.long)


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes are the sub-folders of `root` (sorted); images are files with known extensions."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data.root: directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"data.root: not a directory: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"data.root: {root} needs at least 2 class sub-folders, found {len(class_dirs)}")
    items: list[tuple[str, int]] = []
    for label, d in enumerate(class_dirs):
        files = sorted(
            p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            raise DataError(
                f"data.root: class folder '{d.name}' ({d}) has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        items.extend((p.relative_to(root).as_posix(), label) for p in files)
    return [d.name for d in class_dirs], items


MANIFEST_SUFFIXES = (".csv", ".jsonl")
SPLIT_PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Manifest:
    """A labeled image list read from a CSV (`path,label[,split]`) or JSON Lines file
    (`{"path": ..., "label": ..., "split": ...}`); paths are relative to the manifest's folder.
    Items come in the order `scan_image_folder` gives (by class, then by path), so the same images
    as a folder and as a manifest make the same split."""

    root: Path
    class_names: list[str]
    items: list[tuple[str, Label]]
    parts: dict[str, str] | None  # path -> train/val/test when the manifest has a split column
    task: str = "multiclass"


def _manifest_rows(path: Path, label_key: str = "label") -> list[dict]:
    import csv

    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"data.manifest: {path} line {n}: not valid JSON") from None
            if not isinstance(row, dict):
                raise DataError(f"data.manifest: {path} line {n}: expected an object with path and label")
            rows.append(row)
        return rows
    reader = csv.DictReader(text.splitlines())
    missing = {"path", label_key} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"data.manifest: {path}: the header needs the columns path,{label_key} (missing: "
                        f"{', '.join(sorted(missing))}; found: {', '.join(reader.fieldnames or []) or 'none'})")
    return list(reader)


def _label_set(row: dict, path: Path, n: int, separator: str) -> tuple[str, ...]:
    """A multilabel row's labels: a JSON list, or a CSV cell of labels joined by `separator`
    (an empty cell or list: an image with none of the labels)."""
    raw = row.get("labels")
    if raw is None:
        raise DataError(f"data.manifest: {path} row {n}: task multilabel needs a `labels` "
                        f"{'list' if path.suffix.lower() == '.jsonl' else 'column'}")
    if isinstance(raw, str):
        names = [t.strip() for t in raw.split(separator)] if raw.strip() else []
    elif isinstance(raw, list):
        names = [str(t).strip() for t in raw]
    else:
        raise DataError(f"data.manifest: {path} row {n}: labels must be a list of label names")
    if any(not t for t in names):
        raise DataError(f"data.manifest: {path} row {n}: an empty label name in {raw!r} (separator '{separator}')")
    return tuple(sorted(set(names)))


def _manifest_entries(path: Path, label_of, label_column: str = "label") -> tuple[Path, dict[str, tuple]]:
    """The checks every manifest gets, whatever its labels: the file, and per row a path, a valid split,
    an existing image, no path twice. `label_of(row, n)` reads (and checks) a row's label(s).
    Returns the image root and {posix path: (label(s), split or None)}, in file order."""
    if not path.is_file():
        raise DataError(f"data.manifest: file not found: {path}")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"data.manifest: {path}: expected a .csv or .jsonl file")
    root = path.parent.resolve()
    entries: dict[str, tuple] = {}
    for n, row in enumerate(_manifest_rows(path, label_column), 2 if path.suffix.lower() == ".csv" else 1):
        rel = str(row.get("path") or "").strip()
        part = str(row.get("split") or "").strip().lower() or None
        label = label_of(row, n)
        if part is not None and part not in SPLIT_PARTS:
            raise DataError(f"data.manifest: {path} row {n}: split '{part}' is not one of {', '.join(SPLIT_PARTS)}")
        if not (root / rel).is_file():
            raise DataError(f"data.manifest: {path} row {n}: image not found: {rel}")
        key = PurePosixPath(Path(rel).as_posix()).as_posix()
        if key in entries:
            raise DataError(f"data.manifest: {path} row {n}: {rel} is listed twice")
        entries[key] = (label, part)
    return root, entries


def _split_column(path: Path, entries: dict[str, tuple], order: list[str]) -> dict[str, str | None] | None:
    """The user's split per path (in `order`), None when the manifest has no split column."""
    parts = {k: entries[k][1] for k in order}
    given = [p for p in parts.values() if p is not None]
    if given and len(given) != len(parts):
        raise DataError(f"data.manifest: {path}: the split column is filled for {len(given)} of {len(parts)} "
                        "rows; fill it for every row or for none")
    return parts if given else None


def read_manifest(path: Path, task: str = "multiclass", separator: str = "|") -> Manifest:
    """Read and check a manifest: every row has a path and a label (task multilabel: a `labels` set),
    every file exists, no path twice."""
    path = Path(path)
    if task == "multilabel":
        return _read_multilabel_manifest(path, separator)

    def label_of(row, n):
        rel, label = str(row.get("path") or "").strip(), str(row.get("label") or "").strip()
        if not rel or not label:
            raise DataError(f"data.manifest: {path} row {n}: needs a path and a label")
        return label

    root, entries = _manifest_entries(path, label_of)
    class_names = sorted({label for label, _ in entries.values()})
    if len(class_names) < 2:
        raise DataError(f"data.manifest: {path} needs at least 2 labels, found {len(class_names)}")
    index = {c: i for i, c in enumerate(class_names)}
    order = sorted(entries, key=lambda k: (index[entries[k][0]], PurePosixPath(k).parts))
    return Manifest(root, class_names, [(k, index[entries[k][0]]) for k in order], _split_column(path, entries, order))


def _read_multilabel_manifest(path: Path, separator: str) -> Manifest:
    """read_manifest for task multilabel: items (path, sorted class indices), ordered by path."""

    def label_of(row, n):
        if not str(row.get("path") or "").strip():
            raise DataError(f"data.manifest: {path} row {n}: needs a path")
        return _label_set(row, path, n, separator)

    root, entries = _manifest_entries(path, label_of, "labels")
    class_names = sorted({name for names, _ in entries.values() for name in names})
    if len(class_names) < 2:
        raise DataError(f"data.manifest: {path} needs at least 2 labels, found {len(class_names)}")
    index = {c: i for i, c in enumerate(class_names)}
    order = sorted(entries, key=lambda k: PurePosixPath(k).parts)
    items = [(k, [index[c] for c in entries[k][0]]) for k in order]
    return Manifest(root, class_names, items, _split_column(path, entries, order), task="multilabel")


def make_split(root: Path, val_fraction: float, test_fraction: float, seed: int,
               manifest: Path | None = None, exclude: frozenset[str] = frozenset(),
               task: str = "multiclass", separator: str = "|") -> Split:
    """Stratified, seeded split of an ImageFolder (`root`) or a manifest: the same inputs always
    give the same files in each part. A manifest with a split column keeps the user's split."""
    if manifest is not None:
        m = read_manifest(manifest, task, separator)
        root, class_names, items = m.root, m.class_names, [it for it in m.items if it[0] not in exclude]
        if m.parts is not None:
            split = Split(root=root, class_names=class_names, task=m.task,
                          **{part: [it for it in items if m.parts[it[0]] == part] for part in SPLIT_PARTS})
            empty = [part for part in SPLIT_PARTS if not getattr(split, part)]
            if empty:
                raise DataError(f"data.manifest: {manifest}: the split column gives no {' and no '.join(empty)} images")
            return split
        if m.task == "multilabel":
            return split_multilabel(Path(root), class_names, items, val_fraction, test_fraction, seed)
    else:
        class_names, items = scan_image_folder(root)
        items = [it for it in items if it[0] not in exclude]
    return split_items(Path(root), class_names, items, val_fraction, test_fraction, seed)


def split_multilabel(root: Path, class_names: list[str], items: list[tuple[str, list[int]]], val_fraction: float,
                     test_fraction: float, seed: int) -> Split:
    """The seeded split of multilabel items, stratified by each image's rarest label (an image without
    labels is a stratum of its own); when a stratum is too small to stratify, a plain seeded shuffle."""
    from sklearn.model_selection import train_test_split

    counts = np.zeros(len(class_names), dtype=int)
    for _, ys in items:
        counts[ys] += 1
    need = min_images_per_class(val_fraction, test_fraction)
    if counts.min() < need:
        few = [f"'{class_names[i]}' ({counts[i]})" for i in np.nonzero(counts < need)[0]]
        raise DataError(f"data: label {', '.join(few)} on fewer than {need} images: the split (val {val_fraction:g}, "
                        f"test {test_fraction:g}) needs at least {need} per label; add images or change "
                        "data.val_fraction / data.test_fraction")
    strata = np.array([min(ys, key=lambda i: (counts[i], i)) if ys else -1 for _, ys in items])
    idx = np.arange(len(items))
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=strata, random_state=seed)
        train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), stratify=strata[rest],
                                      random_state=seed)
    except ValueError:  # a stratum with too few images for the fractions
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed)
        train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), random_state=seed)
    pick = lambda ids: [items[i] for i in sorted(ids)]  # noqa: E731
    return Split(root=Path(root).resolve(), class_names=class_names, train=pick(train), val=pick(val),
                 test=pick(test), task="multilabel")


def min_images_per_class(val_fraction: float, test_fraction: float) -> int:
    """The fewest images a class may have so that the stratified split gives it at least one image
    in each of train, val and test."""
    train = 1 - val_fraction - test_fraction
    return max(3, *(math.ceil(1 / f - 1e-9) for f in (val_fraction, test_fraction, train)))


def split_items(root: Path, class_names: list[str], items: list[tuple[str, int]], val_fraction: float,
                test_fraction: float, seed: int) -> Split:
    """The seeded, stratified split of (relative path, label) items."""
    from sklearn.model_selection import train_test_split

    labels = np.array([y for _, y in items])
    counts = np.bincount(labels, minlength=len(class_names))
    need = min_images_per_class(val_fraction, test_fraction)
    if counts.min() < need:
        few = [f"'{class_names[i]}' ({counts[i]})" for i in np.nonzero(counts < need)[0]]
        raise DataError(f"data: class {', '.join(few)} below {need} images: the split (val {val_fraction:g}, test "
                        f"{test_fraction:g}) needs at least {need} per class so that train, val and test each get "
                        "one; add images or change data.val_fraction / data.test_fraction")
    idx = np.arange(len(items))
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
        train, val = train_test_split(
            rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
        )
    except ValueError as e:
        raise DataError(f"data: cannot make a stratified split ({e}); add images or change the fractions") from None
    pick = lambda ids: [items[i] for i in sorted(ids)]  # noqa: E731
    return Split(root=Path(root).resolve(), class_names=class_names, train=pick(train), val=pick(val), test=pick(test))


def eval_transform(spec: PreprocessSpec) -> v2.Compose:
    """The evaluation transform. runtime.preprocess reproduces it without torch. An int `resize` / `crop`
    is the shorter side / a square; an (h, w) pair an exact size (torchvision's own meaning)."""
    interp = {
        "nearest": v2.InterpolationMode.NEAREST,
        "bilinear": v2.InterpolationMode.BILINEAR,
        "bicubic": v2.InterpolationMode.BICUBIC,
    }[spec.interpolation]
    return v2.Compose(
        [
            v2.Resize(spec.resize, interpolation=interp),
            v2.CenterCrop(spec.crop),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )


class ImageListDataset(Dataset):
    def __init__(self, paths: list[Path], labels: list[int], transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(open_image(self.paths[i])), self.labels[i]


def load_tensors(paths: list[Path], labels: list[int], spec: PreprocessSpec, desc: str = "loading images"):
    """Decode and preprocess every image once into (X, y) tensors.

    Small data sets (the use case: a few thousand labeled images) fit in memory,
    and a deterministic eval transform then needs to run once, not every epoch.
    """
    tf = eval_transform(spec)
    x = torch.empty((len(paths), 3, *spec.hw), dtype=torch.float32)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", leave=False, disable=None)):
        x[i] = tf(open_image(p))
    return x, label_tensor(labels)
