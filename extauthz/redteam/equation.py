"""Steal a logistic model outright by solving equations on its scores (Tramèr et al. 2016, §4.1).

A multinomial logistic model answers ``p = softmax(W z + b)`` with ``z = x / 16``. For every
class ``i``, ``log(p_i / p_0) = (w_i - w_0) · z + (b_i - b_0)`` is linear in ``z``, so ``d + 1``
answered queries in general position (65 for the 8x8 digits) pin down ``W`` and ``b`` up to the
shift every softmax ignores: the clone *is* the victim. The attack needs the full scores; hard
labels, rounding, top-k truncation and noise break the equations, and the fit's residual says so.

- :class:`EquationSolvingAttacker`: a query source (uniform points of the box ``[0, 16]^64``)
  that keeps every answer it is given and solves them with :meth:`~EquationSolvingAttacker.solve`.
- :func:`solve_logistic`: least squares on the ``k - 1`` log-ratio systems of (inputs, answers).
- :class:`LinearClone`: the recovered model; :meth:`LinearClone.as_clone` wraps it as a
  :class:`~extauthz.redteam.clone.Clone` so :func:`~extauthz.redteam.clone.fidelity` and
  :func:`~extauthz.redteam.clone.accuracy` score it like any other clone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np
import numpy.typing as npt

from extauthz.demo.model import FEATURE_MAX, N_FEATURES
from extauthz.redteam.clone import Clone

__all__ = [
    "EXACT_QUERIES",
    "PROBABILITY_FLOOR",
    "EquationSolvingAttacker",
    "LinearClone",
    "solve_logistic",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Queries that determine a logistic model on the digits from exact scores: one per weight
#: of a class (64 pixels) plus its bias.
EXACT_QUERIES: Final = N_FEATURES + 1
#: Smallest probability taken into a logarithm: rounded or truncated answers hold zeros.
PROBABILITY_FLOOR: Final = 1e-12


def _check_inputs(x: npt.ArrayLike, what: str, features: int | None = None) -> FloatArray:
    """Return ``x`` as a finite float64 ``(n, d)`` array (``d == features`` when given)."""
    rows = np.array(x, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] < 1 or (features is not None and rows.shape[1] != features):
        expected = f"(n, {features})" if features is not None else "(n, features)"
        raise ValueError(f"{what} must have shape {expected}, got {rows.shape}")
    if not np.isfinite(rows).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return rows


def _check_answers(probabilities: npt.ArrayLike, n: int) -> FloatArray:
    """Return answers as float64 ``(n, k)`` scores with ``k >= 2``, or ``(n,)`` labels."""
    answers = np.array(probabilities, dtype=np.float64)
    if answers.ndim == 2 and answers.shape[0] == n and answers.shape[1] >= 2:
        return answers
    if answers.ndim == 1 and answers.shape[0] == n:
        labels_ok = np.isfinite(answers) & (answers >= 0) & (answers == np.round(answers))
        if not labels_ok.all():
            raise ValueError("label answers must be non-negative integers")
        return answers
    raise ValueError(
        f"expected answers of shape ({n}, classes >= 2) or ({n},) labels, got {answers.shape}"
    )


def _one_hot(labels: FloatArray, n_classes: int | None) -> FloatArray:
    """Return labels as one-hot rows over ``n_classes`` (default: the largest label + 1, >= 2)."""
    classes = labels.astype(np.int64)
    top = int(classes.max()) + 1 if classes.shape[0] else 0
    k = max(2, top) if n_classes is None else n_classes
    if k < max(2, top):
        raise ValueError(f"n_classes={k} is below 2 or below the largest label + 1 ({top})")
    rows = np.zeros((classes.shape[0], k), dtype=np.float64)
    rows[np.arange(classes.shape[0]), classes] = 1.0
    return rows


def _softmax(logits: FloatArray) -> FloatArray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    proba: FloatArray = shifted / shifted.sum(axis=1, keepdims=True)
    return proba


# eq=False: the fields are arrays, whose == is elementwise.
@dataclass(frozen=True, slots=True, eq=False)
class LinearClone:
    """A logistic model recovered by equation solving: ``softmax(W x / feature_max + b)``.

    ``W`` ``(k, d)`` and ``b`` ``(k,)`` are relative to class 0 (its row and bias are zero),
    the only part of a softmax model its answers determine. ``residual`` is the RMS residual of
    the log-ratio fit: about 1e-12 when the victim is logistic and answered exactly, large when
    its answers were rounded, truncated, noised or label-only (or it is not logistic). It only
    tells once there are more usable rows than ``d + 1``: a determined system fits any answers.
    ``trained_on`` counts the answers the fit used, ``dropped`` those that were not
    probability vectors, and ``rank`` the rank of the design (``d + 1`` when determined).
    """

    W: FloatArray
    b: FloatArray
    residual: float
    trained_on: int
    dropped: int
    rank: int
    feature_max: float = FEATURE_MAX

    kind: ClassVar[str] = "equation"

    def _logits(self, x: npt.ArrayLike) -> FloatArray:
        rows = _check_inputs(x, "x", self.W.shape[1])
        logits: FloatArray = (rows / self.feature_max) @ self.W.T + self.b
        return logits

    def predict_proba(self, x: npt.ArrayLike) -> FloatArray:
        """Return the clone's class probabilities ``(n, k)`` for raw inputs ``x`` ``(n, d)``."""
        return _softmax(self._logits(x))

    def predict(self, x: npt.ArrayLike) -> IntArray:
        """Return the clone's class for each row of raw inputs ``x`` ``(n, d)``."""
        top: IntArray = np.argmax(self._logits(x), axis=1).astype(np.int64)
        return top

    def as_clone(self) -> Clone:
        """Wrap the model as a red-team :class:`Clone` (kind ``softmax``: it is one).

        ``Clone.predict`` hands its estimator ``x / FEATURE_MAX``; the adapter maps that back to
        this clone's own scaling, so the wrapped clone predicts exactly as :meth:`predict`.
        """
        return Clone("softmax", _ScaledEstimator(self), 0, self.trained_on)


class _ScaledEstimator:
    """Give a :class:`LinearClone` the sklearn-like ``predict(x / FEATURE_MAX)`` Clone calls."""

    __slots__ = ("_clone",)

    def __init__(self, clone: LinearClone) -> None:
        self._clone = clone

    def predict(self, scaled: npt.ArrayLike) -> IntArray:
        return self._clone.predict(np.asarray(scaled, dtype=np.float64) * FEATURE_MAX)


def solve_logistic(
    x: npt.ArrayLike,
    probabilities: npt.ArrayLike,
    *,
    feature_max: float = FEATURE_MAX,
    floor: float = PROBABILITY_FLOOR,
    n_classes: int | None = None,
) -> LinearClone:
    """Recover a multinomial logistic model from raw inputs ``x`` ``(n, d)`` and its answers.

    ``probabilities`` are ``(n, k)`` scores. Each class ``i > 0`` gives the system
    ``log(p_i / p_0) = (w_i - w_0) · z + (b_i - b_0)`` with ``z = x / feature_max``; all
    ``k - 1`` are solved at once by least squares with an intercept column, exact from ``d + 1``
    exact answers in general position. Degraded answers still give a clone, the one the attacker
    would get: rows with NaN, negative entries or a zero sum are dropped, the rest are
    renormalized (ratios ignore scale) and clipped to ``floor`` before the logarithm (zeros of
    rounded or top-k answers). ``(n,)`` labels are taken as one-hot rows over ``n_classes``
    (default: the largest label + 1): a crude least-squares classifier, flagged by its residual.

    Raise ValueError on shapes that do not match or when no row is usable.
    """
    if not (np.isfinite(feature_max) and feature_max > 0):
        raise ValueError(f"feature_max must be a positive number, got {feature_max}")
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    rows = _check_inputs(x, "x")
    answers = _check_answers(probabilities, rows.shape[0])
    if answers.ndim == 1:
        answers = _one_hot(answers, n_classes)
    elif n_classes is not None and n_classes != answers.shape[1]:
        raise ValueError(f"n_classes={n_classes} but the answers hold {answers.shape[1]} classes")
    with np.errstate(invalid="ignore"):
        totals = answers.sum(axis=1)
        usable = np.isfinite(answers).all(axis=1) & (answers >= 0).all(axis=1) & (totals > 0)
    if not usable.any():
        raise ValueError(f"none of the {rows.shape[0]} answers is a usable probability vector")
    p = np.clip(answers[usable] / totals[usable, None], floor, 1.0)
    log_p = np.log(p)
    targets = log_p[:, 1:] - log_p[:, :1]
    design = np.column_stack([rows[usable] / feature_max, np.ones(int(usable.sum()))])
    solution, _, rank, _ = np.linalg.lstsq(design, targets, rcond=None)
    fitted = design @ solution
    d = rows.shape[1]
    return LinearClone(
        W=np.vstack([np.zeros((1, d)), solution[:d].T]),
        b=np.concatenate([[0.0], solution[d]]),
        residual=float(np.sqrt(np.mean((fitted - targets) ** 2))),
        trained_on=int(usable.sum()),
        dropped=int(rows.shape[0] - usable.sum()),
        rank=int(rank),
        feature_max=float(feature_max),
    )


class EquationSolvingAttacker:
    """Query uniform points of ``[0, 16]^64`` and keep the answers to solve for the model.

    ``EXACT_QUERIES`` answered points suffice for exact scores; the attacker keeps sending fresh
    uniform points for as long as it is asked (more rows average out rounding or noise).
    Unlike the other attackers it needs the full scores: ``observe`` keeps ``(n, k)``
    probabilities, and accepts ``(n,)`` labels only to record that no scores came back (a guard
    answering labels defeats equation solving). Any answered rows may be observed, not only the
    last batch: every (input, answer) pair is one more equation.
    """

    def __init__(self, *, rng: np.random.Generator) -> None:
        self._rng = rng
        self._inputs: list[FloatArray] = []
        self._scores: list[FloatArray] = []
        self._label_inputs: list[FloatArray] = []
        self._labels: list[FloatArray] = []

    def next_batch(self, n: int) -> FloatArray:
        """Return ``n`` uniform points of the input box."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self._rng.uniform(0.0, FEATURE_MAX, size=(n, N_FEATURES))

    def observe(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike) -> None:
        """Keep the answers ``(n, k)`` scores (or ``(n,)`` labels) to the rows ``inputs``."""
        rows = _check_inputs(inputs, "inputs", N_FEATURES)
        answers = _check_answers(probabilities, rows.shape[0])
        if answers.ndim == 1:
            self._label_inputs.append(rows)
            self._labels.append(answers)
            return
        if self._scores and answers.shape[1] != self._scores[0].shape[1]:
            raise ValueError(
                f"answers hold {answers.shape[1]} classes, earlier ones {self._scores[0].shape[1]}"
            )
        self._inputs.append(rows)
        self._scores.append(answers)

    @property
    def scored(self) -> int:
        """Return how many observed answers carried scores."""
        return sum(s.shape[0] for s in self._scores)

    @property
    def labelled(self) -> int:
        """Return how many observed answers were labels only."""
        return sum(s.shape[0] for s in self._labels)

    @property
    def scores_seen(self) -> bool:
        """Return whether any answer carried scores (else the solve is label-only guesswork)."""
        return bool(self._scores)

    def solve(
        self, *, floor: float = PROBABILITY_FLOOR, n_classes: int | None = None
    ) -> LinearClone:
        """Return the model solved from the scored answers, or from labels if no score came back.

        Raise ValueError when nothing has been observed.
        """
        if self._scores:
            x, answers = np.concatenate(self._inputs), np.concatenate(self._scores)
        elif self._labels:
            x, answers = np.concatenate(self._label_inputs), np.concatenate(self._labels)
        else:
            raise ValueError("no answers observed yet: send next_batch() rows and observe()")
        return solve_logistic(x, answers, floor=floor, n_classes=n_classes)
