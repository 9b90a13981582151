"""Verify watermarks in a suspect model: per mark a statistic, its chance level, a p-value.

- :func:`verify_label_marks`: how often the suspect's top-1 on the recorded marked inputs equals
  the keyed wrong label, against the rate at which it matches *decoy* keys' labels on the same
  inputs (a model that never saw the marks matches the true key no more often than a decoy key);
  a one-sided binomial test.
- :func:`verify_soft_mark`: the Lomb–Scargle power of the suspect's ``p_c*`` along ``<v, x>`` at
  the key frequency, against the mean power at decoy frequencies nearby. Under the null a
  periodogram ordinate is exponential with that mean, so ``p = exp(-power / mean)``.
- :func:`combine_p_values`: Fisher's method over independent marks.

Evidence names the key id it was checked under, so marks served before a rotation still verify.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import signal, stats

from extauthz.keys import KeyRing
from extauthz.protect.perturb import wrong_classes
from extauthz.protect.watermark import marked_label, soft_key

__all__ = [
    "MarkEvidence",
    "combine_p_values",
    "decoy_labels",
    "verify_label_marks",
    "verify_soft_mark",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Decoy keys for the label null and decoy frequencies for the soft null.
DEFAULT_DECOYS: Final = 200
#: Decoy frequencies lie within this many main-lobe widths of f, outside the main lobe, so they
#: see the same local noise level as the key frequency.
_DECOY_LOBES: Final = 6.0
#: The smallest p-value reported: beyond it floats and the null models say nothing.
P_FLOOR: Final = 1e-300


@dataclass(frozen=True, slots=True)
class MarkEvidence:
    """One mark's test: ``statistic`` (match rate or spectral power), ``null_rate`` (its chance
    level under the calibrated null), the one-sided ``p_value`` and ``n`` inputs used."""

    mark: str
    statistic: float
    null_rate: float
    p_value: float
    n: int
    kid: str = ""


def decoy_labels(
    keys: KeyRing,
    canonical: Sequence[bytes],
    classes: int,
    original: npt.ArrayLike,
    *,
    count: int = DEFAULT_DECOYS,
    kid: str | None = None,
) -> IntArray:
    """Return ``(count, n)`` keyed other labels under ``count`` decoy keys derived from ``kid``.

    Decoys share the true key's construction, so they calibrate the chance rate of a match.
    """
    chosen = keys.current_id if kid is None else kid
    secret = keys.derive("watermark/decoy").keys[chosen]
    rows = [
        marked_label(
            KeyRing.single(hmac.new(secret, f"decoy{i}".encode(), hashlib.sha256).digest()),
            canonical,
            classes,
            original,
        )
        for i in range(count)
    ]
    return np.stack(rows) if rows else np.zeros((0, len(canonical)), np.int64)


def verify_label_marks(
    suspect_labels: npt.ArrayLike,
    target_labels: npt.ArrayLike,
    classes: int,
    *,
    decoys: npt.ArrayLike | None = None,
    original_labels: npt.ArrayLike | None = None,
    kid: str = "",
) -> MarkEvidence:
    """Test whether the suspect answers the keyed wrong labels more often than chance.

    The chance rate comes from ``decoys`` (``(D, n)`` labels under decoy keys), smoothed by one
    pseudo-match so that a suspect that never errs still gets a rate above 0. Without decoys it
    is ``share of suspect answers != original / (K - 1)`` (targets are uniform over the other
    classes), or ``1 / K`` without the originals.
    """
    suspect = np.asarray(suspect_labels, dtype=np.int64).ravel()
    targets = np.asarray(target_labels, dtype=np.int64).ravel()
    if suspect.shape != targets.shape:
        raise ValueError("suspect and target labels must have the same length")
    n = int(suspect.size)
    if n == 0:
        return MarkEvidence("label", 0.0, 0.0, 1.0, 0, kid)
    matches = int(np.count_nonzero(suspect == targets))
    if decoys is not None:
        decoy = np.asarray(decoys, dtype=np.int64).reshape(-1, n)
        null = float((np.count_nonzero(decoy == suspect) + 1.0) / (decoy.size + 1.0))
    elif original_labels is not None:
        original = np.asarray(original_labels, dtype=np.int64).ravel()
        null = max(float(np.mean(suspect != original)), 1.0 / n) / (classes - 1)
    else:
        null = 1.0 / classes
    p = float(stats.binom.sf(matches - 1, n, null)) if matches else 1.0
    return MarkEvidence("label", matches / n, float(null), max(p, P_FLOOR), n, kid)


def verify_soft_mark(
    suspect_probs: npt.ArrayLike,
    inputs_vectors: npt.ArrayLike,
    keys: KeyRing,
    *,
    kid: str | None = None,
    frequency: float = 0.0,
    decoys: int = DEFAULT_DECOYS,
) -> MarkEvidence:
    """Look for the key's periodic signal in the suspect's ``p_c*`` along ``<v, x>``.

    Only rows whose suspect top-1 is not ``c*`` count: there ``p_c*`` is small and the bump
    dominates, where a confident ``c*`` answer would only add class noise.
    """
    probs = np.asarray(suspect_probs, dtype=np.float64)
    x = np.asarray(inputs_vectors, dtype=np.float64).reshape(probs.shape[0], -1)
    key = soft_key(keys, probs.shape[1], x.shape[1], frequency=frequency, kid=kid)
    keep = np.argmax(probs, axis=1) != key.target_class
    t = x[keep] @ key.direction
    y = probs[keep, key.target_class]
    n = int(y.size)
    if n < 8 or float(np.ptp(t)) == 0.0 or float(np.ptp(y)) == 0.0:
        return MarkEvidence("soft", 0.0, 0.0, 1.0, n, key.kid)
    # Decoys avoid the key peak's main lobe, about 2 pi / span wide on either side.
    lobe = 2.0 * (2.0 * math.pi / float(np.ptp(t)))
    low = max(key.frequency - _DECOY_LOBES * lobe, 0.25 * lobe)
    grid = np.linspace(low, key.frequency + _DECOY_LOBES * lobe, 2 * decoys)
    grid = grid[np.abs(grid - key.frequency) > lobe][: decoys * 2 : 2]
    freqs = np.concatenate(([key.frequency], grid))
    power = np.atleast_1d(signal.lombscargle(t, y - y.mean(), freqs, floating_mean=True))
    level = float(np.mean(power[1:])) if power.size > 1 else 0.0
    if level <= 0.0:
        return MarkEvidence("soft", float(power[0]), 0.0, 1.0, n, key.kid)
    p = math.exp(-float(power[0]) / level)
    return MarkEvidence("soft", float(power[0]), level, max(p, P_FLOOR), n, key.kid)


#: Probe inputs a class needs before its majority answer counts in the misinformation test.
MIN_PER_CLASS: Final = 5


def verify_misinformation(
    suspect_labels: npt.ArrayLike,
    model_labels: npt.ArrayLike,
    key: bytes,
    classes: int,
    *,
    min_per_class: int = MIN_PER_CLASS,
) -> MarkEvidence:
    """Test whether the suspect answers the key's misinformation map of the model's classes.

    A clone trained on ``misinform`` answers learned ``wrong[c]`` where the model says ``c``. The
    statistic is ``T``, the probe inputs (among classes with at least ``min_per_class`` of them)
    the suspect answers with ``wrong[c]``. Under the null hypothesis (the suspect owes nothing to
    the key) the suspect's answers are fixed and the key's map is what is random: ``wrong[c]`` is
    uniform over the other ``K - 1`` classes, independently per class, so ``T`` is the sum over
    classes of one of the suspect's counts ``n_c[j]`` (``j != c``) picked at random. That
    distribution is computed exactly (a convolution) and ``p = P(T_null >= T)``. The test is
    exact for any suspect, and per class, not per input: an honest model that confuses one class
    exactly as the key's map does gets ``p = 1 / (K - 1)``, never a verdict.
    """
    suspect = np.asarray(suspect_labels, dtype=np.int64).ravel()
    model = np.asarray(model_labels, dtype=np.int64).ravel()
    if suspect.shape != model.shape:
        raise ValueError("suspect and model labels must have the same length")
    if classes < 3:
        return MarkEvidence("misinform", 0.0, 0.0, 1.0, 0)
    wrong = wrong_classes(key, classes)
    null = np.ones(1)  # the pmf of T_null over 0, 1, 2, ...
    observed = used = 0
    expected = 0.0
    for c in range(classes):
        answers = suspect[model == c]
        if answers.size < min_per_class:
            continue
        counts = np.bincount(answers[(answers >= 0) & (answers < classes)], minlength=classes)
        others = np.delete(counts, c)
        pick = np.bincount(others, minlength=int(others.max()) + 1) / others.size
        null = np.convolve(null, pick)
        observed += int(counts[wrong[c]])
        expected += float(others.mean())
        used += int(answers.size)
    if used == 0:
        return MarkEvidence("misinform", 0.0, 0.0, 1.0, 0)
    p = float(np.clip(null[observed:].sum(), 0.0, 1.0)) if observed else 1.0
    return MarkEvidence("misinform", observed / used, expected / used, max(p, P_FLOOR), used)


def combine_p_values(ps: Sequence[float]) -> float:
    """Return Fisher's combined p-value of independent tests (1.0 for none)."""
    if len(ps) == 0:
        return 1.0
    clipped = np.clip(np.asarray(ps, dtype=np.float64), P_FLOOR, 1.0)
    return max(float(stats.combine_pvalues(clipped, method="fisher").pvalue), P_FLOOR)
