"""Do two models give the same answer? The runtime's decision (label, or "unknown") from each side's
logits through its one postprocessing path (runtime.trust.postprocess), compared image by image.

Used by the parity gate (exporters.parity, on the test split) and by the INT8 guard
(exporters.quantize, on the validation split), so both count agreement the same way.
"""

from __future__ import annotations

import numpy as np

from runtime.bundle import Trust
from runtime.trust import Outputs, postprocess

# An image whose reference OOD score sits within SCORE_TIE of the unknown threshold is a tie: float noise far
# below any tolerance decides its known/unknown answer (a degenerate model, e.g. one epoch from random
# weights, puts every test image there and failed even FP32 on 1e-6 differences). Ties count as agreeing
# and are reported. 1e-4 is the FP32 score tolerance.
SCORE_TIE = 1e-4


def compare_decisions(ref: Outputs, cand: Outputs, trust: Trust | None) -> tuple[np.ndarray, np.ndarray]:
    """(same, tie) per image, from both sides' postprocessed outputs: `same` counts a tie as agreeing."""
    rd, cd = ref.decisions, cand.decisions
    tie = np.zeros(len(rd), dtype=bool)
    if trust is not None and trust.ood is not None and ref.score is not None:
        tie = (ref.known != cand.known) & (np.abs(ref.score - trust.ood.threshold) <= SCORE_TIE)
    return (rd == cd) | tie, tie


def same_decisions(reference: np.ndarray, candidate: np.ndarray, trust: Trust | None) -> np.ndarray:
    """Per image, whether the candidate's logits give the reference's decision (ties agree)."""
    return compare_decisions(postprocess(reference, trust), postprocess(candidate, trust), trust)[0]
