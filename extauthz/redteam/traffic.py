"""Generate model queries for detection tests and the red team: natural clients and extractors.

Every generator yields float64 batches of shape ``(n, 64)`` in the demo model's input space
(8x8 digit pixels, clipped to ``[0, 16]``), is deterministic from the ``np.random.Generator``
passed in, and sends nothing: callers send the rows and, for attackers that learn from answers,
hand the model's answers back with ``observe(inputs, probabilities)``. ``probabilities`` may be
``(n, classes)`` scores (only the argmax is used, so rounded, top-k, label-only or noisy answers
all work) or ``(n,)`` integer labels. Attackers never need answers: without them they degrade to
a blind version of the same attack, which is what an attacker facing a refusing guard does.

- :class:`BenignClient`: held-out digits with small Gaussian jitter, each pool row once before any
  repeats, and a share of exactly repeated ``popular`` inputs (many users send the same one).
- :class:`UniformNoiseAttacker`: uniform points in the box ``[0, 16]^64`` (Tramèr's 1 - R_unif
  queries, and the crudest extractor).
- :class:`LineSearchAttacker`: Tramèr-style line search between pairs of seeds of different
  classes, bisecting toward the decision boundary; blind, it walks each segment on a fixed grid.
- :class:`JacobianAttacker`: Papernot-style augmentation (JbDA, defenses.md §4),
  ``x + step * sign(direction)`` from a few seeds; many near-duplicates of few seeds, the signal
  PRADA and Blacklight look for.
- :class:`AdaptiveKnockoff`: Knockoff Nets' adaptive sampling (defenses.md §4, ART): a gradient
  bandit picks which class of the attacker's labelled pool to send next, rewarded by the answer's
  top-2 margin, or by disagreement with the pool label when answers are labels only.
- :class:`SybilSplitter`: one attacker's stream spread over K identities, round robin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from extauthz.demo.model import FEATURE_MAX, N_FEATURES, load_data

__all__ = [
    "AdaptiveKnockoff",
    "BenignClient",
    "Bracket",
    "GradientProxy",
    "JacobianAttacker",
    "LineSearchAttacker",
    "QuerySource",
    "SybilBatch",
    "SybilSplitter",
    "UniformNoiseAttacker",
    "arrival_times",
    "natural_pool",
    "popular_inputs",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: Label of a seed or point whose class the attacker has not been told.
UNKNOWN: Final = -1
#: JbDA's reservoir size κ (prediction-poisoning's ``jacobian.py`` default).
DEFAULT_RESERVOIR: Final = 400

#: A substitute model's input gradient for the given labels: ``(points, labels) -> (n, 64)``.
GradientProxy = Callable[[FloatArray, IntArray], FloatArray]


class QuerySource(Protocol):
    """Anything that produces query batches and may learn from the model's answers."""

    def next_batch(self, n: int) -> FloatArray:
        """Return the next ``n`` queries, shape ``(n, 64)``."""
        ...

    def observe(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike) -> None:
        """Take the model's answers to the last batch."""
        ...


def natural_pool(seed: int = 0) -> tuple[FloatArray, IntArray]:
    """Return the held-out digits ``(X, y)`` of split ``seed``: inputs the model never trained on."""
    _, x_test, _, y_test = load_data(seed)
    return x_test, y_test


def popular_inputs(pool: npt.ArrayLike, k: int, rng: np.random.Generator) -> FloatArray:
    """Return ``k`` distinct rows of ``pool`` to be sent, exactly, by many clients."""
    rows = _check_rows(pool, "pool")
    if not 0 < k <= rows.shape[0]:
        raise ValueError(f"k must be in 1..{rows.shape[0]}, got {k}")
    return rows[rng.choice(rows.shape[0], size=k, replace=False)].copy()


def arrival_times(count: int, rate_per_s: float, rng: np.random.Generator) -> FloatArray:
    """Return ``count`` increasing send times (seconds from 0) of a Poisson process at ``rate_per_s``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    gaps: FloatArray = rng.exponential(1.0 / rate_per_s, size=count)
    return np.cumsum(gaps)


def _check_rows(x: npt.ArrayLike, what: str, *, at_least: int = 1) -> FloatArray:
    """Return ``x`` as a float64 ``(m, 64)`` copy, or raise ValueError."""
    rows = np.array(x, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != N_FEATURES:
        raise ValueError(f"{what} must have shape (m, {N_FEATURES}), got {rows.shape}")
    if rows.shape[0] < at_least:
        raise ValueError(f"{what} needs at least {at_least} rows, got {rows.shape[0]}")
    if not np.isfinite(rows).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return rows


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def _check_labels(labels: npt.ArrayLike | None, m: int) -> IntArray:
    """Return known seed labels, or ``UNKNOWN`` for each of ``m`` seeds when none are given."""
    if labels is None:
        return np.full(m, UNKNOWN, dtype=np.int64)
    known = np.array(labels, dtype=np.int64)
    if known.shape != (m,) or (known < 0).any():
        raise ValueError(f"labels must be {m} non-negative class indices")
    return known


def _classes(probabilities: npt.ArrayLike, n: int) -> IntArray:
    """Return the predicted class per row: argmax of ``(n, k)`` scores, or ``(n,)`` labels as given."""
    answers = np.asarray(probabilities)
    if answers.ndim == 2 and answers.shape[0] == n and answers.shape[1] > 0:
        top: IntArray = np.argmax(answers, axis=1).astype(np.int64)
        return top
    if answers.ndim == 1 and answers.shape[0] == n:
        return answers.astype(np.int64)
    raise ValueError(f"expected answers of shape ({n}, classes) or ({n},), got {answers.shape}")


class _Pending:
    """The last batch an attacker sent, so ``observe`` can check answers belong to it."""

    __slots__ = ("_inputs",)

    def __init__(self) -> None:
        self._inputs: FloatArray | None = None

    def sent(self, inputs: FloatArray) -> None:
        self._inputs = inputs.copy()

    def answered(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike) -> IntArray:
        """Return the classes answered for the last batch, or raise ValueError for another batch."""
        if self._inputs is None:
            raise ValueError(
                "observe() takes the answers to the last next_batch(), none is pending"
            )
        if not np.array_equal(np.asarray(inputs, dtype=np.float64), self._inputs):
            raise ValueError("observe() got inputs that are not the last batch sent")
        classes = _classes(probabilities, self._inputs.shape[0])
        self._inputs = None
        return classes


class BenignClient:
    """Send held-out digits as a real user would: jittered, varied, sometimes a popular input.

    Each client walks its own shuffle of ``pool`` (every row once before any repeats), adds
    Gaussian noise of sd ``jitter`` (a re-scan of the same digit), and clips to ``[0, 16]``. With
    probability ``popular_share`` a row is instead one of ``popular``, sent exactly as is: clients
    sharing the same ``popular`` array send byte-identical queries, as users of a real service do.
    """

    def __init__(
        self,
        pool: npt.ArrayLike,
        *,
        rng: np.random.Generator,
        jitter: float = 0.3,
        popular: npt.ArrayLike | None = None,
        popular_share: float = 0.1,
    ) -> None:
        if not jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        if not 0 <= popular_share <= 1:
            raise ValueError(f"popular_share must be in [0, 1], got {popular_share}")
        self._pool = _check_rows(pool, "pool")
        self._popular = None if popular is None else _check_rows(popular, "popular")
        self._rng = rng
        self._jitter = jitter
        self._share = popular_share if self._popular is not None else 0.0
        self._order: IntArray = np.empty(0, dtype=np.int64)

    def _pool_rows(self, n: int) -> IntArray:
        """Return the next ``n`` pool indices of this client's walk, reshuffling when it ends."""
        m = self._pool.shape[0]
        while self._order.shape[0] < n:
            self._order = np.concatenate([self._order, self._rng.permutation(m)])
        taken, self._order = self._order[:n], self._order[n:]
        return taken

    def next_batch(self, n: int) -> FloatArray:
        """Return ``n`` natural queries."""
        _check_n(n)
        noise = self._rng.normal(0.0, self._jitter, size=(n, N_FEATURES))
        batch = np.clip(self._pool[self._pool_rows(n)] + noise, 0.0, FEATURE_MAX)
        if self._popular is not None:
            chosen = self._rng.random(n) < self._share
            picks = self._rng.integers(self._popular.shape[0], size=int(chosen.sum()))
            batch[chosen] = self._popular[picks]
        return batch

    def observe(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike) -> None:
        """Ignore answers: a benign client's next question does not depend on them."""


class UniformNoiseAttacker:
    """Query uniform random points of the input box ``[0, 16]^64``."""

    def __init__(self, *, rng: np.random.Generator) -> None:
        self._rng = rng

    def next_batch(self, n: int) -> FloatArray:
        """Return ``n`` uniform points."""
        _check_n(n)
        return self._rng.uniform(0.0, FEATURE_MAX, size=(n, N_FEATURES))

    def observe(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike) -> None:
        """Ignore answers: uniform points do not depend on them."""


# eq=False: the fields are arrays, whose == is elementwise.
@dataclass(frozen=True, slots=True, eq=False)
class Bracket:
    """A finished line search: the boundary lies between ``start + t (end - start)`` at ``lo`` and ``hi``.

    The point at ``lo`` was answered with the start's class, the point at ``hi`` with another.
    """

    start: FloatArray
    end: FloatArray
    lo: float
    hi: float

    @property
    def inside(self) -> FloatArray:
        """Return the last point found on the start's side of the boundary."""
        return self.start + self.lo * (self.end - self.start)

    @property
    def outside(self) -> FloatArray:
        """Return the first point found past the boundary."""
        return self.start + self.hi * (self.end - self.start)

    @property
    def width(self) -> float:
        """Return the L2 distance between ``inside`` and ``outside``."""
        return float((self.hi - self.lo) * np.linalg.norm(self.end - self.start))


class LineSearchAttacker:
    """Find decision boundaries by line search between seeds of different classes (Tramèr 2016).

    Without ``labels`` the attacker first queries its seeds to learn their classes. Each search
    takes a pair (start, end), of different classes once they are known, and spends ``steps``
    queries on the segment: with answers it bisects, keeping the boundary of the start's class
    between ``lo`` and ``hi`` (width ``2**-steps`` of the segment); without an answer to its last
    query it walks the segment on the grid ``t = k / (steps + 1)``. A batch holds one query per
    search (a search needs the answer before its next step), so a batch of ``n`` runs ``n``
    searches side by side, starting new ones as old ones finish.
    """

    def __init__(
        self,
        seeds: npt.ArrayLike,
        steps: int,
        *,
        rng: np.random.Generator,
        labels: npt.ArrayLike | None = None,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self._seeds = _check_rows(seeds, "seeds", at_least=2)
        self._labels = _check_labels(labels, self._seeds.shape[0])
        self._steps = steps
        self._rng = rng
        # Seeds still to be queried for their labels (none when labels were given).
        self._seed_cursor = 0 if labels is None else self._seeds.shape[0]
        # One entry per search: endpoints (seed indices), bracket, queries spent, state flags.
        self._start: IntArray = np.empty(0, dtype=np.int64)
        self._end: IntArray = np.empty(0, dtype=np.int64)
        self._lo: FloatArray = np.empty(0)
        self._hi: FloatArray = np.empty(0)
        self._t: FloatArray = np.empty(0)
        self._spent: IntArray = np.empty(0, dtype=np.int64)
        self._waiting: BoolArray = np.empty(0, dtype=np.bool_)
        self._dropped: BoolArray = np.empty(0, dtype=np.bool_)
        # Rows of the last batch: seed index (or -1) and search index (or -1).
        self._sent_seeds: IntArray = np.empty(0, dtype=np.int64)
        self._sent_searches: IntArray = np.empty(0, dtype=np.int64)
        self._pending = _Pending()

    def _pairs(self, count: int) -> tuple[IntArray, IntArray]:
        """Draw ``count`` (start, end) seed pairs: of different known classes when two are known."""
        m = self._seeds.shape[0]
        known = np.flatnonzero(self._labels != UNKNOWN)
        if np.unique(self._labels[known]).shape[0] < 2:
            start = self._rng.integers(m, size=count)
            return start, (start + self._rng.integers(1, m, size=count)) % m
        start = self._rng.choice(known, size=count)
        end = self._rng.choice(known, size=count)
        same = self._labels[start] == self._labels[end]
        while same.any():  # rejection sampling: a few rounds at most
            end[same] = self._rng.choice(known, size=int(same.sum()))
            same = self._labels[start] == self._labels[end]
        return start, end

    def _open(self, count: int) -> IntArray:
        """Start ``count`` new searches and return their indices."""
        start, end = self._pairs(count)
        first = self._start.shape[0]
        self._start = np.concatenate([self._start, start])
        self._end = np.concatenate([self._end, end])
        self._lo = np.concatenate([self._lo, np.zeros(count)])
        self._hi = np.concatenate([self._hi, np.ones(count)])
        self._t = np.concatenate([self._t, np.zeros(count)])
        self._spent = np.concatenate([self._spent, np.zeros(count, dtype=np.int64)])
        self._waiting = np.concatenate([self._waiting, np.zeros(count, dtype=np.bool_)])
        self._dropped = np.concatenate([self._dropped, np.zeros(count, dtype=np.bool_)])
        return np.arange(first, first + count, dtype=np.int64)

    def _informed(self, searches: IntArray) -> BoolArray:
        """Return which searches know both endpoint classes (and so can bisect)."""
        informed: BoolArray = (self._labels[self._start[searches]] != UNKNOWN) & (
            self._labels[self._end[searches]] != UNKNOWN
        )
        return informed

    def next_batch(self, n: int) -> FloatArray:
        """Return ``n`` queries: unlabelled seeds first, then one step of ``n`` searches."""
        _check_n(n)
        m = self._seeds.shape[0]
        seed_rows = np.arange(self._seed_cursor, min(m, self._seed_cursor + n), dtype=np.int64)
        self._seed_cursor += seed_rows.shape[0]
        room = n - seed_rows.shape[0]
        active = np.flatnonzero((self._spent < self._steps) & ~self._dropped)[:room]
        searches = np.concatenate([active, self._open(room - active.shape[0])])
        bisect = ~self._waiting[searches] & self._informed(searches)
        midpoint = (self._lo[searches] + self._hi[searches]) / 2
        grid = (self._spent[searches] + 1) / (self._steps + 1)
        t = np.where(bisect, midpoint, grid)
        self._t[searches] = t
        self._spent[searches] += 1
        self._waiting[searches] = True
        start = self._seeds[self._start[searches]]
        points = start + t[:, None] * (self._seeds[self._end[searches]] - start)
        batch: FloatArray = np.clip(
            np.concatenate([self._seeds[seed_rows], points]), 0.0, FEATURE_MAX
        )
        self._sent_seeds = np.concatenate([seed_rows, np.full(room, -1, dtype=np.int64)])
        self._sent_searches = np.concatenate([np.full(seed_rows.shape[0], -1), searches])
        self._pending.sent(batch)
        return batch

    def observe(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike) -> None:
        """Learn seed labels and narrow each search's bracket from the answers to the last batch."""
        classes = self._pending.answered(inputs, probabilities)
        is_seed = self._sent_seeds >= 0
        self._labels[self._sent_seeds[is_seed]] = classes[is_seed]
        searches = self._sent_searches[~is_seed]
        answer = classes[~is_seed]
        start_class = self._labels[self._start[searches]]
        end_class = self._labels[self._end[searches]]
        informed = self._informed(searches)
        # A pair found to share a class has no boundary between its ends worth bisecting.
        self._dropped[searches[informed & (start_class == end_class)]] = True
        t, lo, hi = self._t[searches], self._lo[searches], self._hi[searches]
        inside = informed & (lo < t) & (t < hi)
        self._lo[searches] = np.where(inside & (answer == start_class), t, lo)
        self._hi[searches] = np.where(inside & (answer != start_class), t, hi)
        self._waiting[searches] = False

    def brackets(self) -> list[Bracket]:
        """Return the finished, answered searches between endpoints of different classes."""
        done = (self._spent >= self._steps) & ~self._waiting & ~self._dropped
        done &= (self._lo > 0) | (self._hi < 1)  # at least one answer narrowed [0, 1]
        found = np.flatnonzero(done & self._informed(np.arange(self._start.shape[0])))
        return [
            Bracket(
                start=self._seeds[self._start[i]].copy(),
                end=self._seeds[self._end[i]].copy(),
                lo=float(self._lo[i]),
                hi=float(self._hi[i]),
            )
            for i in found
        ]


class JacobianAttacker:
    """Grow a query set from a few seeds by Jacobian-based augmentation (Papernot et al., JbDA).

    Each round, every point ``x`` of the set (a reservoir of at most ``reservoir`` of them, κ)
    yields ``x + step * sign(direction)``, clipped to ``[0, 16]``; the set is the union of the old
    points and their children, as in S_{ρ+1} = S_ρ ∪ {x + λ sign(∇ F_sub[O(x)](x))}. The
    direction is ``gradient(x, label)`` when a substitute's gradient is given, else the
    difference between the mean of another answered class (drawn at random) and ``x``; for a
    point whose class is not known yet (no answer, or answered after its child was made) it is
    a random sign per pixel. Each child is within ``step`` per pixel of its parent: many
    near-duplicates of few seeds. Without ``labels`` the seeds are queried first.
    """

    def __init__(
        self,
        seeds: npt.ArrayLike,
        step: float = 0.5,
        *,
        rng: np.random.Generator,
        labels: npt.ArrayLike | None = None,
        reservoir: int = DEFAULT_RESERVOIR,
        gradient: GradientProxy | None = None,
    ) -> None:
        if not step > 0:
            raise ValueError(f"step must be > 0, got {step}")
        if reservoir < 1:
            raise ValueError(f"reservoir must be >= 1, got {reservoir}")
        self._points = _check_rows(seeds, "seeds")
        m = self._points.shape[0]
        self._labels = _check_labels(labels, m)
        self._step = step
        self._rng = rng
        self._reservoir = reservoir
        self._gradient = gradient
        self._seeds = m
        self._seed_cursor = 0 if labels is None else m
        self._queue: IntArray = np.empty(0, dtype=np.int64)
        self._round = 0
        self._sent: IntArray = np.empty(0, dtype=np.int64)
        self._pending = _Pending()

    @property
    def round(self) -> int:
        """Return how many augmentation rounds have started."""
        return self._round

    @property
    def size(self) -> int:
        """Return the number of points in the set (seeds and children)."""
        return int(self._points.shape[0])

    def _directions(self, parents: IntArray) -> FloatArray:
        """Return the sign of each parent's direction: gradient, toward another class, or random."""
        x = self._points[parents]
        label = self._labels[parents]
        known = label != UNKNOWN
        signs = self._rng.choice(np.array([-1.0, 1.0]), size=x.shape)
        if self._gradient is not None:
            if known.any():
                signs[known] = np.sign(self._gradient(x[known], label[known]))
            return signs
        answered = np.flatnonzero(self._labels != UNKNOWN)
        if answered.shape[0] == 0:
            return signs
        n_classes = int(self._labels[answered].max()) + 1
        onehot = (self._labels[answered][:, None] == np.arange(n_classes)).astype(np.float64)
        counts = onehot.sum(axis=0)
        means = (onehot.T @ self._points[answered]) / np.maximum(counts, 1)[:, None]
        # Pick, per parent, a random other class among those with answered points.
        other = (counts > 0)[None, :] & (np.arange(n_classes)[None, :] != label[:, None])
        scores = self._rng.random((x.shape[0], n_classes)) * other
        target = np.argmax(scores, axis=1)
        toward = known & other.any(axis=1)
        signs[toward] = np.sign(means[target[toward]] - x[toward])
        return signs

    def _augment(self, count: int) -> IntArray:
        """Add up to ``count`` children of the current round's queue; return their indices."""
        if self._queue.shape[0] == 0:
            size = self._points.shape[0]
            self._queue = (
                self._rng.permutation(size)
                if size <= self._reservoir
                else self._rng.choice(size, size=self._reservoir, replace=False)
            ).astype(np.int64)
            self._round += 1
        parents, self._queue = self._queue[:count], self._queue[count:]
        children = np.clip(
            self._points[parents] + self._step * self._directions(parents), 0.0, FEATURE_MAX
        )
        first = self._points.shape[0]
        self._points = np.concatenate([self._points, children])
        self._labels = np.concatenate(
            [self._labels, np.full(parents.shape[0], UNKNOWN, dtype=np.int64)]
        )
        return np.arange(first, first + parents.shape[0], dtype=np.int64)

    def next_batch(self, n: int) -> FloatArray:
        """Return ``n`` queries: unlabelled seeds first, then children of the current round."""
        _check_n(n)
        cursor = self._seed_cursor
        seed_rows = np.arange(cursor, min(cursor + n, self._seeds), dtype=np.int64)
        self._seed_cursor += seed_rows.shape[0]
        parts = [seed_rows]
        room = n - seed_rows.shape[0]
        while room > 0:
            made = self._augment(room)
            parts.append(made)
            room -= made.shape[0]
        self._sent = np.concatenate(parts)
        batch = self._points[self._sent].copy()
        self._pending.sent(batch)
        return batch

    def observe(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike) -> None:
        """Record the answered class of each point of the last batch."""
        self._labels[self._sent] = self._pending.answered(inputs, probabilities)


class AdaptiveKnockoff:
    """Choose which class of its own pool to query next by a gradient bandit (Knockoff Nets, adaptive).

    The attacker holds a labelled pool; its actions are the pool's classes (``classes``). Each
    query draws an action from the softmax policy ``policy`` over preferences H, takes an unused
    row of that class (a class's rows are reshuffled once all were sent), adds Gaussian noise of
    sd ``jitter`` and clips to ``[0, 16]``. ``observe`` scores every answered query and moves H by
    Sutton & Barto's gradient bandit, ``H_b += α (r − r̄)(1[b = a] − π_b)``, ``α = step_size``.

    Rewards: ``"cert"`` is the answer's top-2 margin (the top score when only one is returned),
    as in ART; answers given as ``(n,)`` labels have no margin, so ``"cert"`` then falls back to
    the disagreement reward. ``"div"`` is always that disagreement reward: 1 when the answered
    class differs from the pool label of the row sent, else 0, because the attacker learns most
    where the victim disagrees with its own labels. It stands in for ART's ``div``; ART's
    ``loss`` needs a thief model and is not offered.

    A batch is one bandit round of ``n`` pulls: its actions are drawn from the policy at the
    start of the batch, and the update sums the ``n`` per-query steps with π and the baseline
    r̄ held at their batch-start values, so each query moves H as much as one of ART's
    sequential steps. r̄ is the mean reward of all earlier answered queries (the first batch's
    own mean before any), then takes in the batch's rewards.
    """

    #: The rewards it can learn from.
    REWARDS: Final = frozenset({"cert", "div"})

    def __init__(
        self,
        pool: npt.ArrayLike,
        pool_labels: npt.ArrayLike,
        *,
        rng: np.random.Generator,
        jitter: float = 1.0,
        step_size: float = 0.1,
        reward: str = "cert",
    ) -> None:
        if not jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if reward not in self.REWARDS:
            raise ValueError(f"reward must be one of {sorted(self.REWARDS)}, got {reward!r}")
        self._pool = _check_rows(pool, "pool")
        self._labels = _check_labels(pool_labels, self._pool.shape[0])
        self._rng = rng
        self._jitter = jitter
        self._step = step_size
        self._reward = reward
        self._classes: IntArray = np.unique(self._labels)
        # Action index (into ``_classes``) of every pool row.
        self._row_action: IntArray = np.searchsorted(self._classes, self._labels).astype(np.int64)
        self._members = [np.flatnonzero(self._row_action == a) for a in range(self._classes.size)]
        self._queues: list[IntArray] = [np.empty(0, dtype=np.int64) for _ in self._members]
        self._h: FloatArray = np.zeros(self._classes.size)
        self._mean_reward = 0.0
        self._answered = 0
        self._sent_rows: IntArray = np.empty(0, dtype=np.int64)
        self._sent_policy: FloatArray = self.policy
        self._pending = _Pending()

    @property
    def classes(self) -> IntArray:
        """Return the actions: the distinct pool labels, in the order ``policy`` uses."""
        return self._classes.copy()

    @property
    def policy(self) -> FloatArray:
        """Return π, the softmax of the preferences H, one probability per entry of ``classes``."""
        weights = np.exp(self._h - self._h.max())
        pi: FloatArray = weights / weights.sum()
        return pi

    @property
    def mean_reward(self) -> float:
        """Return r̄, the mean reward of all answered queries so far (0 before any)."""
        return self._mean_reward

    def _draw_rows(self, actions: IntArray) -> IntArray:
        """Return, per action, the next unused pool row of its class (loops over classes only)."""
        rows = np.empty(actions.shape[0], dtype=np.int64)
        for a, count in enumerate(np.bincount(actions, minlength=self._classes.size)):
            if count == 0:
                continue
            members = self._members[a]
            while self._queues[a].shape[0] < count:
                shuffled = members[self._rng.permutation(members.shape[0])]
                self._queues[a] = np.concatenate([self._queues[a], shuffled])
            rows[actions == a], self._queues[a] = self._queues[a][:count], self._queues[a][count:]
        return rows

    def next_batch(self, n: int) -> FloatArray:
        """Return ``n`` jittered pool rows of classes drawn from the current policy."""
        _check_n(n)
        self._sent_policy = self.policy
        actions = self._rng.choice(self._classes.size, size=n, p=self._sent_policy)
        self._sent_rows = self._draw_rows(actions.astype(np.int64))
        noise = self._rng.normal(0.0, self._jitter, size=(n, N_FEATURES))
        batch: FloatArray = np.clip(self._pool[self._sent_rows] + noise, 0.0, FEATURE_MAX)
        self._pending.sent(batch)
        return batch

    def _rewards(self, probabilities: npt.ArrayLike, answered: IntArray) -> FloatArray:
        """Return one reward per query: top-2 margin for ``"cert"`` with scores, else disagreement."""
        answers = np.asarray(probabilities, dtype=np.float64)
        if self._reward == "cert" and answers.ndim == 2:
            top = -np.sort(-answers, axis=1)
            second = top[:, 1] if top.shape[1] > 1 else np.zeros(top.shape[0])
            margin: FloatArray = top[:, 0] - second
            return margin
        disagree: FloatArray = (answered != self._labels[self._sent_rows]).astype(np.float64)
        return disagree

    def observe(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike) -> None:
        """Reward each answered query of the last batch and update the preferences H."""
        answered = self._pending.answered(inputs, probabilities)
        n = answered.shape[0]
        if n == 0:
            return
        rewards = self._rewards(probabilities, answered)
        baseline = self._mean_reward if self._answered > 0 else float(rewards.mean())
        advantage = rewards - baseline
        actions = self._row_action[self._sent_rows]
        # Σ_i (r_i − r̄)(1[a_i] − π): per-action sums of the advantage, minus π times the total.
        per_action = np.bincount(actions, weights=advantage, minlength=self._classes.size)
        self._h += self._step * (per_action - self._sent_policy * advantage.sum())
        self._answered += n
        self._mean_reward += (float(rewards.sum()) - n * self._mean_reward) / self._answered


@dataclass(frozen=True, slots=True, eq=False)  # an array field: no elementwise ==
class SybilBatch:
    """One batch of a split attack and the identity (0..K-1) that must send it."""

    identity: int
    inputs: FloatArray


class SybilSplitter:
    """Spread one attacker's queries over ``identities`` accounts so per-client state sees a share.

    ``next_batch`` hands consecutive batches to identities 0, 1, ..., K-1, 0, ...; callers that
    drive each identity themselves ask with ``next_for``. Both draw from the one attacker, so
    the attack advances as if a single client sent everything.
    """

    def __init__(self, attacker: QuerySource, identities: int) -> None:
        if identities < 1:
            raise ValueError(f"identities must be >= 1, got {identities}")
        self._attacker = attacker
        self._identities = identities
        self._turn = 0
        self._sent: IntArray = np.zeros(identities, dtype=np.int64)

    @property
    def identities(self) -> int:
        """Return K, the number of identities."""
        return self._identities

    @property
    def sent(self) -> IntArray:
        """Return the number of queries handed to each identity so far."""
        return self._sent.copy()

    def next_batch(self, n: int) -> SybilBatch:
        """Return the next batch of ``n`` queries and the identity whose turn it is."""
        identity = self._turn
        self._turn = (self._turn + 1) % self._identities
        return SybilBatch(identity=identity, inputs=self.next_for(identity, n))

    def next_for(self, identity: int, n: int) -> FloatArray:
        """Return the attacker's next ``n`` queries, to be sent as ``identity``."""
        if not 0 <= identity < self._identities:
            raise ValueError(f"identity must be in 0..{self._identities - 1}, got {identity}")
        batch = self._attacker.next_batch(n)
        self._sent[identity] += batch.shape[0]
        return batch

    def observe(self, inputs: npt.ArrayLike, probabilities: npt.ArrayLike) -> None:
        """Pass the answers, whichever identity got them, back to the attacker."""
        self._attacker.observe(inputs, probabilities)
