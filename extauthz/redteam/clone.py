"""Train a clone of the victim from the answers an attack collected, and score it.

The clone learns hard labels: the argmax of each answer when answers are scores, or the labels
as given. Hard labels are what every guard answer still carries (rounded, top-k, noisy or
label-only), so one training rule fits all of them and clones stay comparable across defenses.

Fidelity is top-1 agreement with the victim on held-out inputs (what an extractor wants);
accuracy is agreement with the true labels (what the clone is worth on its own).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from extauthz.demo.model import FEATURE_MAX, N_FEATURES

__all__ = ["Clone", "CloneKind", "accuracy", "fidelity", "labels_of", "train_clone"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
CloneKind = Literal["softmax", "mlp"]

#: The victim's answers to a batch: ``(n, classes)`` scores or ``(n,)`` labels.
VictimPredict = Callable[[FloatArray], npt.ArrayLike]


def labels_of(answers: npt.ArrayLike) -> IntArray:
    """Return one class per answer: the argmax of ``(n, k)`` scores, or ``(n,)`` labels as given."""
    values = np.asarray(answers)
    if values.ndim == 2 and values.shape[1] > 0:
        top: IntArray = np.argmax(values, axis=1).astype(np.int64)
        return top
    if values.ndim == 1:
        return values.astype(np.int64)
    raise ValueError(f"answers must have shape (n, classes) or (n,), got {values.shape}")


@dataclass(frozen=True, slots=True)
class Clone:
    """A trained substitute: ``estimator`` is a fitted sklearn classifier, or None when every
    answer named one class (sklearn refuses to fit one class), in which case it predicts it."""

    kind: CloneKind
    # sklearn ships no type stubs.
    estimator: Any
    constant: int
    trained_on: int

    def predict(self, x: npt.ArrayLike) -> IntArray:
        """Return the clone's class for each row of ``x`` ``(n, 64)``."""
        rows = np.asarray(x, dtype=np.float64)
        if self.estimator is None:
            return np.full(rows.shape[0], self.constant, dtype=np.int64)
        predicted: IntArray = np.asarray(self.estimator.predict(rows / FEATURE_MAX), dtype=np.int64)
        return predicted

    def predict_proba(self, x: npt.ArrayLike, n_classes: int) -> FloatArray:
        """Return ``(n, n_classes)`` probabilities: the estimator's, or one-hot of its classes.

        Columns follow class indices even when the clone never saw some classes.
        """
        rows = np.asarray(x, dtype=np.float64)
        out = np.zeros((rows.shape[0], n_classes))
        known = getattr(self.estimator, "classes_", None)
        if self.estimator is None or known is None or not hasattr(self.estimator, "predict_proba"):
            out[np.arange(rows.shape[0]), np.clip(self.predict(rows), 0, n_classes - 1)] = 1.0
            return out
        columns = np.asarray(known, dtype=np.int64)
        keep = columns < n_classes
        out[:, columns[keep]] = np.asarray(self.estimator.predict_proba(rows / FEATURE_MAX))[
            :, keep
        ]
        return out


def train_clone(x: npt.ArrayLike, answers: npt.ArrayLike, kind: CloneKind, seed: int) -> Clone:
    """Fit a ``kind`` clone on inputs ``x`` and the victim's ``answers`` (scores or labels).

    ``softmax`` is multinomial logistic regression, ``mlp`` a one-hidden-layer network of 64
    units like the demo victim; both see pixels scaled to [0, 1] as the victim does.
    """
    rows = np.asarray(x, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != N_FEATURES:
        raise ValueError(f"x must have shape (n, {N_FEATURES}), got {rows.shape}")
    labels = labels_of(answers)
    if labels.shape[0] != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} inputs but {labels.shape[0]} answers")
    if rows.shape[0] == 0:
        raise ValueError("cannot train a clone on no answers")
    classes = np.unique(labels)
    if classes.shape[0] == 1:
        return Clone(kind, None, int(classes[0]), int(rows.shape[0]))
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    estimator: Any
    if kind == "softmax":
        # lbfgs fits the multinomial (softmax) loss for more than two classes.
        estimator = LogisticRegression(max_iter=1000, random_state=seed)
    elif kind == "mlp":
        estimator = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
    else:
        raise ValueError(f"unknown clone kind {kind!r} (expected softmax or mlp)")
    with warnings.catch_warnings():
        # Small answer sets stop short of sklearn's tolerance; the clone is still usable.
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(rows / FEATURE_MAX, labels)
    return Clone(kind, estimator, int(classes[0]), int(rows.shape[0]))


def fidelity(clone: Clone, victim_predict: VictimPredict, x_eval: npt.ArrayLike) -> float:
    """Return the share of ``x_eval`` rows where the clone's class is the victim's top-1 class."""
    rows = np.asarray(x_eval, dtype=np.float64)
    return float(np.mean(clone.predict(rows) == labels_of(victim_predict(rows))))


def accuracy(clone: Clone, x_eval: npt.ArrayLike, y_eval: npt.ArrayLike) -> float:
    """Return the share of ``x_eval`` rows the clone labels as ``y_eval``."""
    return float(np.mean(clone.predict(x_eval) == np.asarray(y_eval, dtype=np.int64)))
