"""Watermark power curve: p-values of clones against their training size, and of null models.

A clone distils the demo digits MLP from its served (marked) soft labels with an
``MLPRegressor`` on the probabilities: the soft-label attacker is the one the soft mark targets,
and a regressor is how scikit-learn fits soft targets (an ``MLPClassifier`` only takes hard labels,
which carry the label marks but none of the soft mark). Null models are ``MLPClassifier`` s trained
on the true labels of the same inputs. Everything is seeded, so a run is reproducible.

Run ``python tests/bench/power_curve.py`` (about a minute): it prints one row per clone size
(250 .. 4,000), a 3-account pooled clone and 20 null models. The unit tests import
:class:`Scenario` from here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from extauthz.demo.model import DemoModel, load_data
from extauthz.evidence.verify import (
    MarkEvidence,
    combine_p_values,
    decoy_labels,
    verify_label_marks,
    verify_soft_mark,
)
from extauthz.keys import KeyRing
from extauthz.protect.perturb import canonical_rows
from extauthz.protect.watermark import (
    CANONICAL_QUANTUM,
    MarkSettings,
    apply_label_marks,
    apply_soft_mark,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

QUANTUM = CANONICAL_QUANTUM
SIZES = (250, 500, 1000, 2000, 4000)
KEYS = KeyRing.single(b"power-curve-deployment-key-0123", "wm1")
SETTINGS = MarkSettings(label_rate=0.005)


@dataclass(frozen=True, slots=True)
class Served:
    """What the guard served for a batch, and what it recorded for the evidence ledger."""

    probs: FloatArray
    marked: npt.NDArray[np.bool_]
    targets: IntArray
    original: IntArray
    kid: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """Both marks' evidence for one suspect and their combined p-value."""

    label: MarkEvidence
    soft: MarkEvidence
    combined: float


def serve(
    model: DemoModel, x: FloatArray, keys: KeyRing = KEYS, settings: MarkSettings = SETTINGS
) -> Served:
    """Answer ``x`` as the guard would: soft mark on every row, then label marks at the rate."""
    p = model.predict_proba(x)
    soft = apply_soft_mark(p, x, keys, settings.soft_epsilon, frequency=settings.soft_frequency)
    marks = apply_label_marks(soft, canonical_rows(x, quantum=QUANTUM), keys, settings.label_rate)
    return Served(marks.served, marks.marked, marks.targets, np.argmax(p, axis=1), marks.kid)


def _quiet_fit(model: Any, x: FloatArray, y: npt.NDArray[Any]) -> Any:
    """Fit an sklearn model, hiding the convergence warning of a capped iteration count."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def train_clone(x: FloatArray, soft_labels: FloatArray, seed: int) -> Any:
    """Distil a clone from served probabilities (an MLP regressor on the soft labels)."""
    from sklearn.neural_network import MLPRegressor

    return _quiet_fit(
        MLPRegressor(hidden_layer_sizes=(128,), max_iter=400, random_state=seed), x, soft_labels
    )


def train_null(x: FloatArray, labels: IntArray, seed: int) -> Any:
    """Train an independent model on the true labels (it never saw a served answer)."""
    from sklearn.neural_network import MLPClassifier

    return _quiet_fit(
        MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed), x, labels
    )


def suspect_probs(model: Any, x: FloatArray) -> FloatArray:
    """Return a suspect's probabilities: ``predict_proba``, or a regressor's clipped outputs."""
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(x), dtype=np.float64)
    raw = np.clip(np.asarray(model.predict(x), dtype=np.float64), 1e-6, None)
    out: FloatArray = raw / raw.sum(axis=1, keepdims=True)
    return out


@dataclass
class Scenario:
    """The demo model, an attacker's pool of natural queries (noisy digits) and their truth."""

    seed: int = 0
    pool_size: int = 12_000
    model: DemoModel = field(init=False)
    pool: FloatArray = field(init=False)
    truth: IntArray = field(init=False)
    served: Served = field(init=False)

    def __post_init__(self) -> None:
        self.model = DemoModel.train(self.seed)
        x_train, x_test, y_train, y_test = load_data(self.seed)
        base = np.concatenate([x_train, x_test])
        labels = np.concatenate([y_train, y_test])
        rng = np.random.default_rng(self.seed + 1)
        pick = rng.integers(len(base), size=self.pool_size)
        noisy = base[pick] + rng.normal(0.0, 2.0, size=(self.pool_size, base.shape[1]))
        self.pool = np.clip(np.rint(noisy), 0.0, 16.0)
        self.truth = labels[pick]
        self.served = serve(self.model, self.pool)

    def verify(self, suspect: Any, rows: npt.NDArray[np.int64]) -> Verdict:
        """Verify a suspect on the recorded queries ``rows`` (the ledger of that client)."""
        x = self.pool[rows]
        probs = suspect_probs(suspect, x)
        marked = rows[self.served.marked[rows]]
        labels = np.argmax(suspect_probs(suspect, self.pool[marked]), axis=1)
        decoys = decoy_labels(
            KEYS,
            canonical_rows(self.pool[marked], quantum=QUANTUM),
            probs.shape[1],
            self.served.original[marked],
            kid=self.served.kid,
        )
        label = verify_label_marks(
            labels, self.served.targets[marked], probs.shape[1], decoys=decoys, kid=self.served.kid
        )
        soft = verify_soft_mark(probs, x, KEYS, kid=self.served.kid)
        return Verdict(label, soft, combine_p_values([label.p_value, soft.p_value]))

    def clone_verdict(self, size: int, seed: int = 0) -> Verdict:
        """Train a clone on the first ``size`` served answers and verify it on those queries."""
        rows = np.arange(size, dtype=np.int64)
        clone = train_clone(self.pool[rows], self.served.probs[rows], seed)
        return self.verify(clone, rows)

    def pooled_verdict(self, per_account: int = 2000, accounts: int = 3) -> Verdict:
        """Pool ``accounts`` overlapping accounts' answers (vote on repeats) into one clone."""
        rng = np.random.default_rng(self.seed + 7)
        asked = [
            rng.choice(2 * per_account, size=per_account, replace=False) for _ in range(accounts)
        ]
        rows = np.unique(np.concatenate(asked)).astype(np.int64)
        # Repeats got identical answers (keyed by the input only), so the vote is the answer.
        votes = np.stack([np.isin(rows, a) for a in asked]).sum(axis=0)
        assert votes.max() > 1, "accounts must overlap for the vote to matter"
        clone = train_clone(self.pool[rows], self.served.probs[rows], 0)
        return self.verify(clone, rows)

    def null_verdicts(self, count: int, size: int = 2000) -> list[Verdict]:
        """Train ``count`` independent models on true labels of the same queries; verify each."""
        rows = np.arange(size, dtype=np.int64)
        return [
            self.verify(train_null(self.pool[rows], self.truth[rows], 100 + i), rows)
            for i in range(count)
        ]


def _row(name: str, v: Verdict) -> str:
    return (
        f"{name:>12}  marked={v.label.n:>3}  label match={v.label.statistic:.2f} "
        f"(chance {v.label.null_rate:.4f}) p={v.label.p_value:.2e}  "
        f"soft power={v.soft.statistic:.3g} (chance {v.soft.null_rate:.3g}) p={v.soft.p_value:.2e}"
        f"  combined p={v.combined:.2e}"
    )


def main() -> None:
    """Print the power curve, the pooled clone and 20 null models."""
    scenario = Scenario()
    print("clone size -> p-values (label marks at r = 0.5%, soft mark eps = 0.05)")
    for size in SIZES:
        print(_row(f"clone {size}", scenario.clone_verdict(size)))
    print(_row("pooled x3", scenario.pooled_verdict()))
    nulls = scenario.null_verdicts(20)
    for i, v in enumerate(nulls):
        print(_row(f"null {i}", v))
    print(f"smallest null combined p = {min(v.combined for v in nulls):.3e}")


if __name__ == "__main__":
    main()
