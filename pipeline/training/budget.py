"""Training budgets in optimizer steps, sized to the data.

An epoch count tuned on one data set is wrong on the next: 15 epochs at batch 64 are 300 steps on
1,257 images but 30 steps on 124, too few for any network to learn. So a budget is a number of
optimizer steps: by default `target_epochs` passes over the data, but never fewer than
`min_steps` nor more than `max_steps`; epochs are derived from it. On a small set the batch also
shrinks (at least 8 steps per epoch), so that one pass is more than one or two steps.
Validation runs about `validations` times in all (every epoch when there are few), and early
stopping counts validations without a better accuracy.

    b = plan_budget("distill", n_train=124, batch_size=64)
    b.describe()   # '600 steps = 75 epochs x 8 steps (batch 16, 124 images; sized to the data); validation every 3 epochs'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# (target epochs, min steps, max steps) per kind of training. The floors are what a network needs
# to learn anything from a small set: a linear head on frozen features converges in a few hundred
# steps; fine-tuning starts from good features; a student trained from scratch needs the most.
DEFAULTS: dict[str, tuple[int, int, int]] = {
    "feature_extraction": (30, 300, 5_000),
    "finetune": (10, 200, 5_000),
    "lora": (10, 200, 5_000),
    "distill": (30, 600, 20_000),
}


@dataclass(frozen=True)
class Budget:
    steps: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    n_train: int
    validate_every: int  # epochs between validations
    source: str  # "auto", "epochs" or "steps": what fixed the length

    def describe(self) -> str:
        how = {"auto": "sized to the data", "epochs": "from the configured epochs", "steps": "configured"}[self.source]
        val = "every epoch" if self.validate_every == 1 else f"every {self.validate_every} epochs"
        return (f"{self.steps} steps = {self.epochs} epochs x {self.steps_per_epoch} steps (batch {self.batch_size}, "
                f"{self.n_train} images; {how}); validation {val}")


def fit_batch_size(n_train: int, batch_size: int, min_steps_per_epoch: int = 8) -> int:
    """`batch_size`, or on a small set the largest power of two that still gives
    `min_steps_per_epoch` steps per epoch, but not under 16 (BatchNorm needs a batch to average)."""
    if n_train >= batch_size * min_steps_per_epoch:
        return batch_size
    fit = 2 ** int(math.floor(math.log2(max(1, n_train // min_steps_per_epoch))))
    return min(batch_size, max(16, fit))


def plan_budget(kind: str, n_train: int, batch_size: int, *, epochs: int | None = None, steps: int | None = None,
                min_steps: int | None = None, validations: int = 30) -> Budget:
    """The training length for `n_train` images: `steps` or `epochs` when configured (at most one),
    else DEFAULTS[kind] (min_steps overrides its floor)."""
    if epochs is not None and steps is not None:
        raise ValueError("set epochs or steps, not both")
    target, floor, cap = DEFAULTS[kind]
    floor = min_steps if min_steps is not None else floor
    batch = fit_batch_size(n_train, batch_size)
    spe = max(1, math.ceil(n_train / batch))
    if steps is not None:
        total, source = steps, "steps"
    elif epochs is not None:
        total, source = epochs * spe, "epochs"
    else:
        total, source = min(max(target * spe, floor), max(cap, floor)), "auto"
    n_epochs = max(1, round(total / spe))  # whole epochs: the nearest to the step budget
    return Budget(steps=n_epochs * spe, epochs=n_epochs, steps_per_epoch=spe, batch_size=batch, n_train=n_train,
                  validate_every=max(1, math.ceil(n_epochs / validations)), source=source)
