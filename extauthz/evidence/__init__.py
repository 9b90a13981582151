"""Ownership evidence: statistics that tell a clone of the served model from an independent one."""

from __future__ import annotations

from extauthz.evidence.verify import (
    MarkEvidence,
    combine_p_values,
    decoy_labels,
    verify_label_marks,
    verify_soft_mark,
)

__all__ = [
    "MarkEvidence",
    "combine_p_values",
    "decoy_labels",
    "verify_label_marks",
    "verify_soft_mark",
]
