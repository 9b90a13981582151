"""Output policies applied to a response's numeric outputs (arrays in, arrays out)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from extauthz.policy.model import OutputPolicy


def apply_output_policy(
    outputs: Mapping[str, np.ndarray], policy: OutputPolicy
) -> dict[str, np.ndarray] | None:
    """Return the rewritten outputs, or ``None`` when the policy leaves them as they are."""
    if policy.policy == "passthrough":
        return None
    if policy.policy == "round":
        return {name: round_floats(values, policy.decimals) for name, values in outputs.items()}
    raise ValueError(f"unknown output policy {policy.policy!r}")


def round_floats(values: np.ndarray, decimals: int) -> np.ndarray:
    """Round floating-point values to ``decimals``; integer outputs (labels) stay as they are."""
    if not np.issubdtype(values.dtype, np.floating):
        return values
    return np.round(values, decimals)
