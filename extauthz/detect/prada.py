"""PRADA (Juuti et al., EuroS&P 2019): flag a client whose query distances stop looking natural.

Per client and per predicted class ``c`` PRADA keeps a growing set ``G_c`` with a threshold
``T_c`` (0 at first). Each query ``x`` of class ``c`` gives ``d_min``, its smallest L2 distance to
``G_c`` in input space, appended to the stream of distances ``D_c``; when ``d_min > T_c``, ``x``
joins ``G_c`` and ``T_c = max(T_c, mean - std)`` of the distances with which members joined (the
first member joins with 0). Every ``check_every`` queries the distances of classes with at least
10 of them are pooled, values beyond 3 sigma dropped, and when more than ``min_distances`` remain
the Shapiro-Wilk statistic ``W`` is computed: natural queries give roughly normal distances,
synthetic ones (Jacobian steps, noise around seeds) do not, so ``W < delta`` raises an alarm that
holds until the next check.

Costs are bounded, so the state fits the Store:

- each growing set keeps at most ``max_growing`` members; a full set replaces its oldest member
  (first in, first out). ``T_c`` stays exact: it is kept as running sums over every join;
- the distance stream is one ring of the last ``max_distances`` distances of all classes; a
  class's eligibility (10 distances) counts every distance it ever had;
- at most ``max_classes`` classes are tracked; a new class beyond that evicts the least recently
  queried one with its members and distances.

So the state is at most ``max_classes * (max_growing * 4 * dim + 44) + 6 * max_distances`` bytes
plus a 32-byte header. The test suite measures how close this stays to the unbounded algorithm.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import stats

from extauthz.detect.base import Observation, Verdict

REASON: Final = "prada_non_normal"
_MIN_CLASS_DISTANCES: Final = 10
"""A class joins the pooled test once it has this many distances (the reference's rule)."""
_OUTLIER_SIGMAS: Final = 3.0
_W_NORMAL: Final = 0.98
"""The W at which the pre-alarm score starts to rise: natural streams sit above it."""
_PRE_ALARM_CEILING: Final = 0.6

_SPACE_RAW: Final = 0
_SPACE_VECTORS: Final = 1

_MAGIC: Final = b"PRD1"
# magic, space, alarm, classes, dim, queries, ring length, last W, pooled count at last W
_HEADER: Final = struct.Struct("<4sBBHIQIfI")
_CLASS: Final = np.dtype(
    [
        ("label", "<i8"),
        ("threshold", "<f4"),
        ("set_n", "<u4"),  # members that ever joined (each with its joining distance)
        ("set_sum", "<f8"),
        ("set_sumsq", "<f8"),
        ("members", "<u2"),  # rows kept (<= max_growing)
        ("head", "<u2"),  # oldest row once the set is full
        ("dist_n", "<u4"),  # distances ever appended to D_c
        ("last_seen", "<u4"),  # query index of the class's latest query (LRU eviction)
    ]
)

F32 = npt.NDArray[np.float32]


class _Client:
    """One client's PRADA state, decoded into arrays that ``update`` mutates in place."""

    __slots__ = (
        "space",
        "dim",
        "queries",
        "alarm",
        "last_w",
        "last_n",
        "classes",
        "members",
        "slots",
        "ring_d",
        "ring_s",
        "ring_len",
    )

    def __init__(self, space: int, dim: int) -> None:
        self.space = space
        self.dim = dim
        self.queries = 0
        self.alarm = False
        self.last_w = float("nan")
        self.last_n = 0
        self.classes = np.zeros(0, dtype=_CLASS)
        self.members: list[F32] = []
        self.slots: dict[int, int] = {}
        self.ring_d = np.zeros(0, dtype=np.float32)
        self.ring_s = np.zeros(0, dtype=np.uint16)
        self.ring_len = 0


@dataclass(frozen=True, slots=True)
class PradaStatus:
    """What one client's PRADA state holds, for tests, benches and operators."""

    space: str
    """``raw`` (input space) or ``vectors`` (the fixed projection)."""
    dim: int
    queries: int
    alarm: bool
    w: float
    """The latest Shapiro-Wilk statistic (NaN before the first test)."""
    pooled: int
    """Distances that went into ``w``."""
    classes: int
    members: int
    """Growing-set members over all classes."""
    distances: int
    """Distances in the ring."""


class PradaDetector:
    """PRADA per client over bounded state; see the module docstring for the algorithm.

    ``update`` reads the observation's ``top1`` and its input rows: ``raw`` (input space, as in
    the paper) when given, else ``vectors``. The space a client started in is kept; a request in
    neither the client's space nor width restarts its state.
    """

    name = "prada"

    def __init__(
        self,
        delta: float = 0.9,
        check_every: int = 10,
        min_distances: int = 100,
        max_growing: int = 512,
        max_distances: int = 2048,
        max_classes: int = 128,
        repeat_distance: float = 1e-6,
    ) -> None:
        """``repeat_distance``: a query this close to a member of its class is a repeat and
        stays out of the distance stream (0 keeps the reference algorithm)."""
        if not 0.0 < delta < 1.0:
            raise ValueError("delta must be in (0, 1)")
        if check_every <= 0 or min_distances < 3:
            raise ValueError("check_every must be positive and min_distances at least 3")
        if not 1 <= max_growing <= 65_535 or not 1 <= max_classes <= 65_535:
            raise ValueError("max_growing and max_classes must be in [1, 65535]")
        if max_distances <= min_distances:
            raise ValueError("max_distances must exceed min_distances")
        self.delta = delta
        self.check_every = check_every
        self.min_distances = min_distances
        self.max_growing = max_growing
        self.max_distances = max_distances
        self.max_classes = max_classes
        self.repeat_distance = repeat_distance

    # -- the Detector interface -------------------------------------------------------------

    def update(self, state: bytes | None, observation: Observation) -> tuple[bytes, Verdict]:
        """Fold the observation's instances into the client's state, in order; return the new
        state and a verdict (1.0 while alarmed, else a score rising as W falls toward delta)."""
        client = self._decode(state) if state else None
        top1 = observation.top1
        picked = self._rows(client, observation)
        if picked is None or top1 is None or np.asarray(top1).shape[0] != picked[1].shape[0]:
            if client is None:
                return (state or b""), Verdict(0.0)
            return self._encode(client), self._verdict(client)
        space, rows = picked
        if client is None or client.space != space or client.dim != rows.shape[1]:
            client = _Client(space, rows.shape[1])
        self._fold(client, rows, np.asarray(top1, dtype=np.int64).reshape(-1))
        return self._encode(client), self._verdict(client)

    def status(self, state: bytes) -> PradaStatus | None:
        """Summarize a state (None when the bytes are not a PRADA state)."""
        client = self._decode(state)
        if client is None:
            return None
        return PradaStatus(
            space="raw" if client.space == _SPACE_RAW else "vectors",
            dim=client.dim,
            queries=client.queries,
            alarm=client.alarm,
            w=client.last_w,
            pooled=client.last_n,
            classes=int(client.classes.size),
            members=int(sum(members.shape[0] for members in client.members)),
            distances=client.ring_len,
        )

    # -- the algorithm ----------------------------------------------------------------------

    @staticmethod
    def _rows(client: _Client | None, observation: Observation) -> tuple[int, F32] | None:
        """Pick the input rows: the client's own space when the observation has it, else raw
        (input space), else the projected vectors."""
        candidates: list[tuple[int, F32]] = []
        for space, array in ((_SPACE_RAW, observation.raw), (_SPACE_VECTORS, observation.vectors)):
            if array is None:
                continue
            rows = np.asarray(array, dtype=np.float32)
            if rows.ndim == 2 and rows.shape[0] > 0 and rows.shape[1] > 0:
                candidates.append((space, rows))
        if not candidates:
            return None
        if client is not None:
            for space, rows in candidates:
                if space == client.space and rows.shape[1] == client.dim:
                    return space, rows
        return candidates[0]

    def _fold(self, client: _Client, rows: F32, labels: npt.NDArray[np.int64]) -> None:
        """Process the instances in order, as single queries would be."""
        n = rows.shape[0]
        if not np.isfinite(rows).all():
            rows = np.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)
        # Room for this batch's distances after the ring.
        ring_d = np.empty(client.ring_len + n, dtype=np.float32)
        ring_s = np.empty(client.ring_len + n, dtype=np.uint16)
        ring_d[: client.ring_len] = client.ring_d[: client.ring_len]
        ring_s[: client.ring_len] = client.ring_s[: client.ring_len]
        client.ring_d, client.ring_s = ring_d, ring_s
        # Only the batch's last check decides the state it leaves: earlier ones are overwritten.
        last_query = client.queries + n - 1
        last_check = last_query - last_query % self.check_every
        for i in range(n):
            query = client.queries
            self._query(client, rows[i], int(labels[i]), query)
            if query == last_check:
                self._check(client)
            client.queries += 1
        keep = min(client.ring_len, self.max_distances)
        start = client.ring_len - keep
        client.ring_d = client.ring_d[start : client.ring_len]
        client.ring_s = client.ring_s[start : client.ring_len]
        client.ring_len = keep

    def _query(self, client: _Client, x: F32, label: int, query: int) -> None:
        """One query: d_min against the class's growing set, the distance stream, the set."""
        slot = client.slots.get(label)
        if slot is None:
            slot = self._new_class(client, label)
            client.classes["last_seen"][slot] = query
            client.members[slot] = x[None, :].copy()
            row = client.classes[slot : slot + 1]
            row["members"] = 1
            row["set_n"] = 1  # the first member joins with distance 0
            return
        row = client.classes[slot : slot + 1]
        row["last_seen"] = query
        members = client.members[slot]
        diff = members - x
        d_min = float(np.sqrt(np.einsum("ij,ij->i", diff, diff).min()))
        if d_min <= self.repeat_distance:
            # An exact repeat (a popular input, a retry) says nothing about the query
            # distribution, and benign users repeat: keep it out of the distance stream.
            return
        client.ring_d[client.ring_len] = d_min
        client.ring_s[client.ring_len] = slot
        client.ring_len += 1
        row["dist_n"] += 1
        if d_min <= float(row["threshold"][0]):
            return
        kept = int(row["members"][0])
        if kept < self.max_growing:
            client.members[slot] = np.concatenate((members, x[None, :]))
            row["members"] = kept + 1
        else:
            if not members.flags.writeable:
                members = client.members[slot] = members.copy()
            head = int(row["head"][0])
            members[head] = x
            row["head"] = (head + 1) % self.max_growing
        set_n = int(row["set_n"][0]) + 1
        set_sum = float(row["set_sum"][0]) + d_min
        set_sumsq = float(row["set_sumsq"][0]) + d_min * d_min
        mean = set_sum / set_n
        std = np.sqrt(max(set_sumsq / set_n - mean * mean, 0.0))
        row["set_n"] = set_n
        row["set_sum"] = set_sum
        row["set_sumsq"] = set_sumsq
        row["threshold"] = max(float(row["threshold"][0]), mean - std)

    def _new_class(self, client: _Client, label: int) -> int:
        """Add a class, evicting the least recently queried one when ``max_classes`` are held."""
        if client.classes.size >= self.max_classes:
            self._evict(client, int(np.argmin(client.classes["last_seen"])))
        client.classes = np.concatenate((client.classes, np.zeros(1, dtype=_CLASS)))
        client.classes["label"][-1] = label
        client.members.append(np.zeros((0, client.dim), dtype=np.float32))
        slot = client.classes.size - 1
        client.slots[label] = slot
        return slot

    @staticmethod
    def _evict(client: _Client, slot: int) -> None:
        """Drop one class: its row, its members and its distances; renumber later slots."""
        client.classes = np.delete(client.classes, slot)
        del client.members[slot]
        used = client.ring_len
        keep = client.ring_s[:used] != slot
        kept = int(keep.sum())
        client.ring_d[:kept] = client.ring_d[:used][keep]
        client.ring_s[:kept] = client.ring_s[:used][keep]
        client.ring_len = kept
        shifted = client.ring_s[:kept] > slot
        client.ring_s[:kept][shifted] -= 1
        client.slots = {int(label): i for i, label in enumerate(client.classes["label"])}

    def _check(self, client: _Client) -> None:
        """Pool the recent distances of eligible classes and test them for normality."""
        start = max(0, client.ring_len - self.max_distances)
        eligible = client.classes["dist_n"] >= _MIN_CLASS_DISTANCES
        ring_s = client.ring_s[start : client.ring_len]
        pooled = client.ring_d[start : client.ring_len][eligible[ring_s]].astype(np.float64)
        if pooled.size == 0:
            return
        mean, std = pooled.mean(), pooled.std()
        pooled = pooled[np.abs(pooled - mean) < _OUTLIER_SIGMAS * std]
        if pooled.size <= self.min_distances:
            return
        with warnings.catch_warnings():
            # A constant or huge sample only warns; W is still defined.
            warnings.simplefilter("ignore")
            w = float(stats.shapiro(pooled).statistic)
        client.last_w = float(np.float32(w))  # as the state keeps it
        client.last_n = int(pooled.size)
        client.alarm = w < self.delta

    def _verdict(self, client: _Client) -> Verdict:
        """Score 1.0 while alarmed; before that, up to 0.6 as W falls from 0.98 toward delta."""
        if np.isnan(client.last_w):
            return Verdict(0.0)
        detail = f"W={client.last_w:.4f} n={client.last_n} queries={client.queries}"
        if client.alarm:
            return Verdict(1.0, REASON, detail)
        span = max(_W_NORMAL - self.delta, 1e-6)
        score = float(np.clip((_W_NORMAL - client.last_w) / span, 0.0, 1.0)) * _PRE_ALARM_CEILING
        return Verdict(score, REASON if score > 0.0 else "", detail)

    # -- state bytes --------------------------------------------------------------------------

    def _encode(self, client: _Client) -> bytes:
        """Serialize: header, class table, each class's members, then the distance ring."""
        header = _HEADER.pack(
            _MAGIC,
            client.space,
            int(client.alarm),
            client.classes.size,
            client.dim,
            client.queries,
            client.ring_len,
            client.last_w,
            client.last_n,
        )
        parts = [header, client.classes.tobytes()]
        parts.extend(members.astype(np.float32, copy=False).tobytes() for members in client.members)
        parts.append(client.ring_d[: client.ring_len].tobytes())
        parts.append(client.ring_s[: client.ring_len].tobytes())
        return b"".join(parts)

    def _decode(self, state: bytes) -> _Client | None:
        """Parse state bytes (None when they are not ours) and fit them to the current caps."""
        if len(state) < _HEADER.size or state[:4] != _MAGIC:
            return None
        _, space, alarm, n_classes, dim, queries, ring_len, last_w, last_n = _HEADER.unpack_from(
            state
        )
        offset = _HEADER.size
        table_bytes = n_classes * _CLASS.itemsize
        if space not in (_SPACE_RAW, _SPACE_VECTORS) or dim == 0:
            return None
        if len(state) < offset + table_bytes:
            return None
        classes = np.frombuffer(state, dtype=_CLASS, count=n_classes, offset=offset).copy()
        offset += table_bytes
        counts = classes["members"].astype(np.int64)
        expected = offset + int(counts.sum()) * dim * 4 + ring_len * 6
        if len(state) != expected:
            return None
        client = _Client(space, dim)
        client.queries, client.alarm = queries, bool(alarm)
        client.last_w, client.last_n = last_w, last_n
        client.classes = classes
        total = int(counts.sum())
        block = np.frombuffer(state, dtype=np.float32, count=total * dim, offset=offset)
        offset += total * dim * 4
        ends = np.cumsum(counts).tolist()
        starts = [0, *ends[:-1]]
        block = block.reshape(total, dim)
        client.members = [
            self._fit_members(classes[slot : slot + 1], block[start:end])
            for slot, (start, end) in enumerate(zip(starts, ends, strict=True))
        ]
        client.ring_d = np.frombuffer(state, dtype=np.float32, count=ring_len, offset=offset)
        offset += ring_len * 4
        client.ring_s = np.frombuffer(state, dtype=np.uint16, count=ring_len, offset=offset)
        client.ring_len = ring_len
        client.slots = {int(label): i for i, label in enumerate(classes["label"])}
        if ring_len > self.max_distances:
            client.ring_d = client.ring_d[-self.max_distances :]
            client.ring_s = client.ring_s[-self.max_distances :]
            client.ring_len = self.max_distances
        while client.classes.size > self.max_classes:
            client.ring_d, client.ring_s = client.ring_d.copy(), client.ring_s.copy()
            self._evict(client, int(np.argmin(client.classes["last_seen"])))
        return client

    def _fit_members(self, row: np.ndarray, members: F32) -> F32:
        """Keep a set's members in arrival order from its oldest, at most ``max_growing``."""
        head = int(row["head"][0])
        kept = members.shape[0]
        if kept == self.max_growing or (head == 0 and kept < self.max_growing):
            return members
        ordered = np.roll(members, -head, axis=0)[-self.max_growing :]
        row["members"] = ordered.shape[0]
        row["head"] = 0
        return ordered
