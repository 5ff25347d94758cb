"""The deployment-domain images: `data.target` (unlabeled, flat or nested) and the optional
`data.target_labeled` (an ImageFolder used only to score and choose a method)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import DataError
from runtime.preprocess import PreprocessSpec

MAX_TARGET_IMAGES = 2000  # more adds little to statistics and costs memory; a seeded sample is kept


@dataclass
class TargetSet:
    x_uint8: torch.Tensor  # unlabeled target crops (the evaluation resize + crop), uint8
    labeled_uint8: torch.Tensor | None = None
    labeled_y: torch.Tensor | None = None
    spec: PreprocessSpec | None = None

    def x(self) -> torch.Tensor:
        return normalize(self.x_uint8, self.spec)

    def labeled_x(self) -> torch.Tensor:
        return normalize(self.labeled_uint8, self.spec)


def normalize(x_uint8: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 crops -> the model's input (the evaluation transform's ToDtype + Normalize)."""
    from pipeline.strategies.data import train_transform

    return train_transform("none", spec)(x_uint8)


CHECK_SHARE = 0.5  # of the data.target images, held out of distillation (see target_paths)


def target_paths(target: Path, seed: int = 0, part: str = "all") -> list[Path]:
    """The images of `data.target` (every image under it, folder names ignored; at most MAX_TARGET_IMAGES,
    seeded). part 'train' / 'check': a seeded half each. Distillation's KD term trains on 'train'; the
    student's target gate and the OOD threshold are fitted on 'check', images no model trained on. On
    the images a student saw in its KD term its unknown rate was 4 %, on 50 other images of the same
    camera 20 % (lfw_faces -> dusk), and its agreement with the teacher 2-4 points higher."""
    from pipeline.distill import unlabeled_paths
    from pipeline.errors import EdgekilnError

    try:
        paths = unlabeled_paths(target)
    except EdgekilnError as e:
        raise DataError(str(e).replace("distill.unlabeled", "data.target")) from None
    if len(paths) > MAX_TARGET_IMAGES:
        keep = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:MAX_TARGET_IMAGES]
        paths = [paths[i] for i in sorted(keep.tolist())]
    if part == "all" or len(paths) < 2:
        return paths
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    k = max(1, min(len(paths) - 1, round(len(paths) * CHECK_SHARE)))
    chosen = order[:k] if part == "check" else order[k:]
    return [paths[i] for i in sorted(chosen)]


def load_target(target: Path, labeled: Path | None, class_names: list[str], spec: PreprocessSpec,
                seed: int = 0, part: str = "all") -> TargetSet:
    """Read `data.target` (`target_paths(target, seed, part)`) and, if given, the labeled target
    ImageFolder, whose class folders must be classes of the source data."""
    from pipeline.data import scan_image_folder
    from pipeline.strategies.data import load_uint8

    paths = target_paths(target, seed, part)
    out = TargetSet(load_uint8(paths, spec), spec=spec)
    if labeled is not None:
        if not Path(labeled).is_dir():
            raise DataError(f"data.target_labeled: {labeled} is not a directory")
        names, items = scan_image_folder(Path(labeled))
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise DataError(f"data.target_labeled: class folder(s) {', '.join(unknown)} are not classes of the "
                            f"source data ({', '.join(class_names)})")
        out.labeled_uint8 = load_uint8([Path(labeled) / rel for rel, _ in items], spec)
        out.labeled_y = torch.tensor([class_names.index(names[y]) for _, y in items], dtype=torch.long)
    return out
