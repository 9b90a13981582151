"""Ask the evidence ledger whether a red-team clone carries the guard's watermarks.

The operator's own check (``extauthz verify``) run on the clone: the DAWN label marks of the
ledger records served to the attack's identities, and the CosWM soft mark on a probe set, combined
by Fisher's method. ``stolen`` means p < 1e-6, the verdict threshold of ``extauthz verify``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from extauthz.evidence.cli import VERDICT_P, label_evidence
from extauthz.evidence.ledger import EvidenceRecord
from extauthz.evidence.verify import combine_p_values, verify_soft_mark
from extauthz.keys import KeyRing
from extauthz.redteam.clone import Clone

__all__ = ["WatermarkVerdict", "check_clone"]


@dataclass(frozen=True, slots=True)
class WatermarkVerdict:
    """The combined verdict: ``stolen`` or ``not shown``, its p-value and the records used."""

    verdict: str
    p_value: float
    checked: int


def check_clone(
    clone: Clone,
    records: Sequence[EvidenceRecord],
    keys: KeyRing,
    probe: npt.ArrayLike,
    *,
    n_classes: int,
) -> WatermarkVerdict | None:
    """Test ``clone`` against ``records`` (the answers marked for the attack); None without any."""
    marked = [r for r in records if r.mark == "label"]
    if not marked:
        return None
    inputs = np.asarray([json.loads(r.input) for r in marked], dtype=np.float64)
    label = label_evidence(marked, keys, clone.predict_proba(inputs, n_classes))
    rows = np.asarray(probe, dtype=np.float64)
    soft = verify_soft_mark(clone.predict_proba(rows, n_classes), rows, keys, kid=marked[0].kid)
    p_value = combine_p_values([label.p_value, soft.p_value])
    return WatermarkVerdict(
        "stolen" if p_value < VERDICT_P else "not shown", float(p_value), len(marked)
    )
