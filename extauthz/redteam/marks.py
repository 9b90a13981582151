"""Ask the evidence ledger whether a red-team clone carries the guard's watermarks.

The operator's own check (``extauthz verify``) run on the clone: the DAWN label marks of the
ledger records served to the attack's identities, the CosWM soft mark on a probe set and, with
the noise key and the model's own labels of the probe, the misinformation mark (the key's wrong
classes a misinformed clone learned), combined by Fisher's method. ``stolen`` means p < 1e-6,
the verdict threshold of ``extauthz verify``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from extauthz.evidence.cli import VERDICT_P, label_evidence
from extauthz.evidence.ledger import EvidenceRecord
from extauthz.evidence.verify import (
    MarkEvidence,
    combine_p_values,
    verify_misinformation,
    verify_soft_mark,
)
from extauthz.keys import KeyRing
from extauthz.redteam.clone import Clone

__all__ = ["WatermarkVerdict", "check_clone"]


@dataclass(frozen=True, slots=True)
class WatermarkVerdict:
    """The combined verdict: ``stolen`` or ``not shown``, its p-value and the records used."""

    verdict: str
    p_value: float
    checked: int
    marks: dict[str, float]
    """Each mark's own p-value (``label``, ``soft``, ``misinform``)."""


def check_clone(
    clone: Clone,
    records: Sequence[EvidenceRecord],
    keys: KeyRing,
    probe: npt.ArrayLike,
    *,
    n_classes: int,
    noise_key: bytes | None = None,
    probe_labels: npt.ArrayLike | None = None,
) -> WatermarkVerdict | None:
    """Test ``clone`` against ``records`` (the answers marked for the attack) and the probe.

    ``probe_labels`` are the protected model's classes of ``probe``; with ``noise_key`` they
    enable the misinformation mark. None when there is nothing to test.
    """
    rows = np.asarray(probe, dtype=np.float64)
    evidence: list[MarkEvidence] = []
    marked = [r for r in records if r.mark == "label"]
    if marked:
        inputs = np.asarray([json.loads(r.input) for r in marked], dtype=np.float64)
        evidence.append(label_evidence(marked, keys, clone.predict_proba(inputs, n_classes)))
        soft = verify_soft_mark(clone.predict_proba(rows, n_classes), rows, keys, kid=marked[0].kid)
        evidence.append(soft)
    if noise_key is not None and probe_labels is not None:
        evidence.append(
            verify_misinformation(clone.predict(rows), probe_labels, noise_key, n_classes)
        )
    if not evidence:
        return None
    p_value = combine_p_values([e.p_value for e in evidence])
    return WatermarkVerdict(
        "stolen" if p_value < VERDICT_P else "not shown",
        float(p_value),
        len(marked),
        {e.mark: float(e.p_value) for e in evidence},
    )
