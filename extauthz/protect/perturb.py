"""Output protection: rewrite a response's numeric outputs by an output pipeline.

A pipeline is a tuple of :class:`~extauthz.policy.model.OutputStep` applied in order. Each output
array is first classified (:data:`Kind`): probabilities get every step, embeddings get rounding and
a keyed rotation, other float outputs (logits, regression) are only rounded, and integer outputs
(labels) never change. Every step on probabilities keeps each row's top-1 class, so a client that
only needs the label loses nothing, while an attacker training on the soft labels does:

- ``round``: ``np.round``; when rounding ties the top class with an earlier one, the top class is
  raised by one rounding unit so ``np.argmax`` still returns it;
- ``top_k``: the ``k`` largest entries kept, the rest zeroed (no renormalising; ties go to the
  lower index, as ``np.argmax`` breaks them);
- ``label_only``: one-hot of each row's own argmax (ART's ``ClassLabels`` mixes a batch's rows);
- ``reverse_sigmoid``: ART's ``ReverseSigmoid`` formula, then :func:`restore_argmax`;
- ``keyed_noise``: ``softmax(log p + scale * z)`` with ``z`` drawn from a generator seeded by
  HMAC(key, client, canonical input), then :func:`restore_argmax`. The same client asking the same
  (or a jittered) question gets the same answer, so averaging repeats recovers nothing; other
  clients and other keys get other noise, so Sybil accounts cannot average each other's either;
- ``misinform``: the exception to the rule above (Adaptive Misinformation, Kariyappa & Qureshi
  2020): each row whose top-1 probability is at most ``below`` swaps its top class with a wrong
  class that depends only on the key and the top class. The wrong answers are consistent (a
  clone learns a wrong decision function, not label noise it would average away), and Sybil
  accounts all get the same ones. Later steps keep the misinformed top class. Scores (logits) are
  swapped the same way.

Rows holding NaN or infinity are served as they came. Every rewrite records its distortion per
instance (:attr:`Protected.l1`, :attr:`Protected.top1_changed`) for the metrics.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
import unicodedata
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from extauthz.policy.model import OutputStep

__all__ = [
    "Kind",
    "NoiseContext",
    "Protected",
    "canonical_rows",
    "canonical_text",
    "detect_kind",
    "embedding_noise",
    "keyed_noise",
    "misinform",
    "protect_outputs",
    "restore_argmax",
    "reverse_sigmoid",
    "row_seeds",
    "wrong_classes",
]

FloatArray = npt.NDArray[np.float64]
Kind = Literal["probabilities", "embedding", "scores", "integer"]

#: A row of probabilities may miss 1 by this much (float32 softmax outputs, JSON round trips).
SUM_TOLERANCE: Final = 1e-3
#: ART's ReverseSigmoid clips probabilities to [1e-9, 1 - 1e-9] before taking the logit.
_CLIP: Final = 1e-9
#: Wire datatypes (``ParsedResponse.dtypes``) whose outputs are labels, never rewritten.
_LABEL_DTYPES: Final = ("INT", "UINT", "BOOL")
#: The shortest accepted noise key: a guessable key lets a client subtract the noise.
MIN_KEY_BYTES: Final = 16
# canonical_rows: NaN gets a value no finite input quantizes to; the rest is clipped inside it.
_NAN_CODE: Final = np.iinfo(np.int64).min
_CODE_LIMIT: Final = float(2**62)
# SplitMix64 constants: derive distinct seeds for the several rows of one instance.
_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX2: Final = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True, slots=True)
class NoiseContext:
    """What keyed noise is derived from: the secret, the client, and each instance's input.

    ``canonical_inputs`` holds one canonical byte string per instance (:func:`canonical_rows`,
    :func:`canonical_text`); with ``None`` the noise is keyed by each instance's output rows
    instead (quantized to the step's ``quantum``), which still defeats plain repetition. The key
    must be the same on every replica: different keys let a client average across replicas.
    """

    key: bytes
    client_id: str
    canonical_inputs: Sequence[bytes] | None = None

    def __post_init__(self) -> None:
        if len(self.key) < MIN_KEY_BYTES:
            raise ValueError(f"noise key must be at least {MIN_KEY_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class Protected:
    """Rewritten outputs and what the rewrite cost each instance."""

    outputs: dict[str, np.ndarray]
    """Every output by name: rewritten ones as float64 of the original shape, others as given."""
    l1: FloatArray
    """Per instance: L1 distance between original and served rows, summed over its outputs."""
    top1_changed: npt.NDArray[np.bool_]
    """Per instance: some row of probabilities or scores now has another top-1 class."""
    kinds: dict[str, str]
    """Per output: the detected :data:`Kind`."""


# --- the pipeline -----------------------------------------------------------------------------


def protect_outputs(
    outputs: Mapping[str, np.ndarray],
    steps: Sequence[OutputStep],
    ctx: NoiseContext,
    *,
    embedding_names: Collection[str] = (),
    dtypes: Mapping[str, str] | None = None,
) -> Protected | None:
    """Apply ``steps`` to every output; return ``None`` when nothing changes.

    Axis 0 of each array is the instance; the last axis holds the classes (or dimensions) and
    the axes between are flattened into more rows of the same instance. ``dtypes`` are the wire
    datatypes the dialect read (``ParsedResponse.dtypes``): dialects hand integer outputs over as
    float64, and those named ``INT*``, ``UINT*`` or ``BOOL`` are labels that stay as they are.
    """
    active = [(index, step) for index, step in enumerate(steps) if step.policy != "passthrough"]
    if not active or not outputs:
        return None
    dtypes = dtypes or {}
    n = max((np.shape(v)[0] for v in outputs.values() if np.ndim(v) >= 1), default=0)
    keys = _Keys(ctx, outputs)
    served: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    l1 = np.zeros(n)
    changed = np.zeros(n, dtype=bool)
    any_change = False
    for name, values in outputs.items():
        kind = detect_kind(name, values, embedding_names=embedding_names, dtype=dtypes.get(name))
        kinds[name] = kind
        new = _protect_array(name, values, kind, active, keys, l1, changed)
        served[name] = values if new is None else new
        any_change = any_change or new is not None
    if not any_change:
        return None
    return Protected(served, l1, changed, kinds)


def detect_kind(
    name: str,
    values: np.ndarray,
    *,
    embedding_names: Collection[str] = (),
    dtype: str | None = None,
) -> Kind:
    """Classify one output array (see the module docstring); non-finite rows are not looked at."""
    if (dtype is not None and dtype.startswith(_LABEL_DTYPES)) or not np.issubdtype(
        values.dtype, np.floating
    ):
        return "integer"
    if name in embedding_names:
        return "embedding"
    if values.size == 0:
        return "scores"
    k = values.shape[-1] if values.ndim >= 2 else 1
    rows = values.reshape(-1, k)
    rows = rows[np.isfinite(rows).all(axis=1)]
    if rows.shape[0] == 0:
        return "scores"
    if k == 1:
        return "probabilities" if bool(((rows >= 0) & (rows <= 1)).all()) else "scores"
    if bool((rows >= 0).all()) and bool((np.abs(rows.sum(axis=1) - 1.0) <= SUM_TOLERANCE).all()):
        return "probabilities"
    return "scores"


def _protect_array(
    name: str,
    values: np.ndarray,
    kind: Kind,
    active: Sequence[tuple[int, OutputStep]],
    keys: _Keys,
    l1: FloatArray,
    changed: npt.NDArray[np.bool_],
) -> FloatArray | None:
    """Run the pipeline over one array's finite rows; return the new array or None if unchanged."""
    if kind == "integer" or values.ndim == 0 or values.size == 0:
        return None
    n = values.shape[0]
    k = values.shape[-1] if values.ndim >= 2 else 1
    original = np.asarray(values, dtype=np.float64).reshape(n, -1, k)
    per_instance = original.shape[1]
    flat = original.reshape(-1, k)
    good = np.asarray(np.isfinite(flat).all(axis=1), dtype=np.bool_)
    orig = flat[good]
    cur = orig
    # The top class later steps preserve: the model's, or the misinformed one once swapped.
    reference = orig
    for index, step in active:
        if step.policy == "misinform":
            if kind == "scores" or (kind == "probabilities" and cur.shape[1] > 1):
                below = step.below if kind == "probabilities" else np.inf
                cur = reference = misinform(cur, keys.wrong_classes(cur.shape[1]), below)
            continue
        seeds = partial(keys.seeds, index, step, name, n, good)
        cur = _apply(step, kind, reference, cur, seeds)
    if cur is orig or np.array_equal(cur, orig):
        return None
    out = flat.copy()
    out[good] = cur
    instance = np.repeat(np.arange(n), per_instance)[good]
    l1[:n] += np.bincount(instance, weights=np.abs(cur - orig).sum(axis=1), minlength=n)
    if kind != "embedding":
        moved = _top1(orig) != _top1(cur) if kind == "probabilities" else _argmax_moved(orig, cur)
        changed[:n] |= np.bincount(instance, weights=moved, minlength=n) > 0
    return out.reshape(values.shape)


def _apply(
    step: OutputStep,
    kind: Kind,
    orig: FloatArray,
    cur: FloatArray,
    seeds: Callable[[], npt.NDArray[np.uint64]],
) -> FloatArray:
    """Apply one step to the rows of one output (``orig``: the model's rows, for the top-1)."""
    policy = step.policy
    if policy == "round":
        rounded = np.round(cur, step.decimals)
        if kind == "embedding":
            return rounded
        return _keep_first_max(orig, rounded, step.decimals, binary=kind == "probabilities")
    if kind == "embedding":
        if policy == "keyed_noise" and step.cosine_change > 0:
            return embedding_noise(cur, seeds(), step.cosine_change)
        return cur
    if kind != "probabilities":
        return cur
    if policy == "top_k":
        return _top_k(cur, step.k) if cur.shape[1] > step.k else cur
    if policy == "label_only":
        return _label_only(cur)
    if policy == "reverse_sigmoid":
        return restore_argmax(orig, reverse_sigmoid(cur, step.beta, step.gamma))
    if policy == "keyed_noise":
        if step.scale == 0:
            return cur
        return restore_argmax(orig, keyed_noise(cur, seeds(), step.scale))
    return cur


# --- the steps ----------------------------------------------------------------------------------


def reverse_sigmoid(p: FloatArray, beta: float, gamma: float) -> FloatArray:
    """Apply ART's ``ReverseSigmoid(beta, gamma)`` to rows of probabilities ``(N, K)``.

    ``r = beta * (sigmoid(-gamma * log((1 - p̂) / p̂)) - 0.5)`` with ``p̂`` clipped to
    ``[1e-9, 1 - 1e-9]``; ``q = clip(p - r, 0, 1)`` scaled by ``1 / sum(q)``. A single column
    (K = 1) is the positive class of a binary model: ``p`` and ``1 - p`` are perturbed and the
    positive column returned, as ART does. The argmax is not restored here.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.shape[1] == 1:
        return reverse_sigmoid(_binary(p), beta, gamma)[:, 1:]
    clipped = np.clip(p, _CLIP, 1.0 - _CLIP)
    r = beta * (_sigmoid(-gamma * np.log((1.0 - clipped) / clipped)) - 0.5)
    q = np.clip(p - r, 0.0, 1.0)
    total = q.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        out: FloatArray = (1.0 / total) * q
    if empty.any():  # beta so large every entry clipped to 0: serve the label alone
        out[empty] = _label_only(p[empty])
    return out


def restore_argmax(original: FloatArray, served: FloatArray) -> FloatArray:
    """Swap entries back so each served row's top-1 is the original row's top-1.

    Where the served argmax moved, the entries at the two positions trade places; a top-1 left
    tied with another entry is raised by one ulp so it is strictly the largest. A single column
    is a binary model's positive class: a decision that crossed 0.5 is reflected (``1 - q``).
    """
    served = np.array(served, dtype=np.float64)
    if served.shape[0] == 0:
        return served
    if served.shape[1] == 1:
        positive = original[:, 0] > 0.5
        flip = positive != (served[:, 0] > 0.5)
        served[flip, 0] = 1.0 - served[flip, 0]
        tie = positive & (served[:, 0] <= 0.5)
        served[tie, 0] = np.nextafter(0.5, 1.0)
        return served
    rows = np.arange(served.shape[0])
    want = np.argmax(original, axis=1)
    got = np.argmax(served, axis=1)
    moved = rows[want != got]
    top = served[moved, got[moved]]
    served[moved, got[moved]] = served[moved, want[moved]]
    served[moved, want[moved]] = top
    best = served[rows, want]
    others = served.copy()
    others[rows, want] = -np.inf
    tie = others.max(axis=1) >= best
    served[tie, want[tie]] = np.nextafter(best[tie], np.inf)
    return served


def keyed_noise(p: FloatArray, seeds: npt.NDArray[np.uint64], scale: float) -> FloatArray:
    """Return ``softmax(log p + scale * z)`` per row, the original top-1 kept.

    ``z`` is standard normal from a generator set by ``seeds[i]`` (one per row), so the same
    seed always draws the same noise whatever else is in the batch. Zero entries stay zero; a
    single column is perturbed as the binary row ``(1 - p, p)``.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.shape[1] == 1:
        return keyed_noise(_binary(p), seeds, scale)[:, 1:]
    z = _normals(seeds, p.shape[1])
    usable = (p > 0).any(axis=1)
    with np.errstate(divide="ignore"):
        logits = np.log(p[usable]) + scale * z[usable]
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    out = p.copy()
    out[usable] = e / e.sum(axis=1, keepdims=True)
    return restore_argmax(p, out)


def misinform(p: FloatArray, wrong: npt.NDArray[np.intp], below: float) -> FloatArray:
    """Swap each row's top entry with entry ``wrong[top]`` where the top value is at most ``below``.

    ``wrong`` maps each class to another (:meth:`_Keys.wrong_classes`); the swap keeps the row's
    values, so the answer looks as confident as the model's.
    """
    k = p.shape[1]
    if k < 2 or p.shape[0] == 0:
        return p
    rows = np.arange(p.shape[0])
    top = np.argmax(p, axis=1)
    chosen = p[rows, top] <= below
    r, t, o = rows[chosen], top[chosen], wrong[top[chosen]]
    out = p.copy()
    out[r, t], out[r, o] = p[r, o], p[r, t]
    return out


@functools.lru_cache(maxsize=64)
def wrong_classes(key: bytes, k: int) -> npt.NDArray[np.intp]:
    """Return, for each of ``k`` classes, the keyed other class ``misinform`` answers with.

    One map per (key, k): cached, so a misinformed answer costs no HMAC; read-only, since the
    one array is shared by every caller.
    """
    digest = hmac.new(key, b"misinform:%d" % k, hashlib.sha256).digest()
    while len(digest) < 8 * k:
        digest += hashlib.sha256(digest).digest()
    draws = np.frombuffer(digest[: 8 * k], dtype="<u8").astype(np.uint64)
    offsets = 1 + (draws % np.uint64(max(k - 1, 1))).astype(np.intp)
    wrong: npt.NDArray[np.intp] = (np.arange(k) + offsets) % k
    wrong.setflags(write=False)
    return wrong


def embedding_noise(
    v: FloatArray, seeds: npt.NDArray[np.uint64], cosine_change: float
) -> FloatArray:
    """Rotate each row towards a keyed direction orthogonal to it; keep its norm.

    The cosine between a row and its rotation is exactly ``1 - cosine_change``. Zero rows and
    one-dimensional rows (no orthogonal direction) are returned as they are.
    """
    v = np.asarray(v, dtype=np.float64)
    out = v.copy()
    if v.shape[1] < 2 or cosine_change == 0:
        return out
    norms = np.linalg.norm(v, axis=1)
    ok = norms > 0
    unit = v[ok] / norms[ok, None]
    z = _normals(seeds[ok], v.shape[1])
    for _ in range(2):  # Gram-Schmidt twice: orthogonal to rounding error
        z -= np.einsum("ij,ij->i", z, unit)[:, None] * unit
    z_norm = np.linalg.norm(z, axis=1)
    ok_z = z_norm > 0
    cos = 1.0 - cosine_change
    sin = np.sqrt(1.0 - cos * cos)
    rotated = cos * unit[ok_z] + sin * (z[ok_z] / z_norm[ok_z, None])
    rotated *= (norms[ok][ok_z] / np.linalg.norm(rotated, axis=1))[:, None]
    out[np.flatnonzero(ok)[ok_z]] = rotated
    return out


def _top_k(p: FloatArray, k: int) -> FloatArray:
    """Zero all but the ``k`` largest entries of each row; ties at the cut go to lower indexes."""
    cut = -np.partition(-p, k - 1, axis=1)[:, k - 1 : k]
    above = p > cut
    at = p == cut
    room = k - above.sum(axis=1, keepdims=True)
    keep = above | (at & (np.cumsum(at, axis=1) <= room))
    return np.where(keep, p, 0.0)


def _label_only(p: FloatArray) -> FloatArray:
    """One-hot of each row's own argmax; a single column becomes ``p > 0.5`` (ART's K = 1)."""
    if p.shape[1] == 1:
        return (p > 0.5).astype(np.float64)
    out = np.zeros_like(p, dtype=np.float64)
    out[np.arange(p.shape[0]), np.argmax(p, axis=1)] = 1.0
    return out


def _keep_first_max(
    orig: FloatArray, rounded: FloatArray, decimals: int, *, binary: bool
) -> FloatArray:
    """Raise the original top-1 by one rounding unit where rounding tied it with an earlier entry.

    Rounding is monotone, so it can only create ties; raising by the unit keeps the value on the
    rounding grid, so the served body still shows ``decimals`` places.
    """
    if rounded.shape[0] == 0:
        return rounded
    unit = 10.0**-decimals
    if rounded.shape[1] == 1:
        if not binary:
            return rounded
        lost = (orig[:, 0] > 0.5) & (rounded[:, 0] <= 0.5)
        rounded[lost, 0] = np.round((np.floor(0.5 / unit) + 1) * unit, decimals)
        return rounded
    want = np.argmax(orig, axis=1)
    tied = np.flatnonzero(np.argmax(rounded, axis=1) != want)
    rounded[tied, want[tied]] = np.round(rounded[tied].max(axis=1) + unit, decimals)
    return rounded


def _top1(p: FloatArray) -> npt.NDArray[np.intp]:
    """Return each probability row's top class; a single column decides at 0.5."""
    top: npt.NDArray[np.intp] = (
        (p[:, 0] > 0.5).astype(np.intp) if p.shape[1] == 1 else np.argmax(p, axis=1)
    )
    return top


def _argmax_moved(orig: FloatArray, cur: FloatArray) -> npt.NDArray[np.bool_]:
    if orig.shape[1] == 1:
        return np.zeros(orig.shape[0], dtype=bool)
    moved: npt.NDArray[np.bool_] = np.argmax(orig, axis=1) != np.argmax(cur, axis=1)
    return moved


def _binary(p: FloatArray) -> FloatArray:
    return np.concatenate([1.0 - p, p], axis=1)


def _sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = 1.0 / (1.0 + np.exp(-x))
    return out


def _normals(seeds: npt.NDArray[np.uint64], k: int) -> FloatArray:
    """Draw ``k`` standard normals per seed, each row from a PCG64 generator set by its seed.

    The generator's 128-bit state is set from the seed directly: building a seeded generator
    per row (SeedSequence) costs about 6 us, setting the state about 1 us.
    """
    z = np.empty((len(seeds), k))
    if len(seeds) == 0:
        return z
    seeds = np.asarray(seeds, dtype=np.uint64)
    highs, lows, incs = seeds.tolist(), _mix(seeds).tolist(), _mix(seeds ^ _GOLDEN).tolist()
    bitgen = np.random.PCG64(0)
    gen = np.random.Generator(bitgen)
    for i, (high, low, inc) in enumerate(zip(highs, lows, incs, strict=True)):
        bitgen.state = {
            "bit_generator": "PCG64",
            "state": {"state": high << 64 | low, "inc": inc << 1 | 1},
            "has_uint32": 0,
            "uinteger": 0,
        }
        gen.standard_normal(out=z[i])
    return z


# --- keys ---------------------------------------------------------------------------------------


def row_seeds(ctx: NoiseContext, n: int, salt: bytes) -> npt.NDArray[np.uint64]:
    """Return one 64-bit seed per instance: HMAC-SHA256(key, client, canonical input, salt).

    Client id and input are length-prefixed so no two (client, input) pairs share a message.
    """
    return _salted(_instance_macs(ctx, n), salt)


def _instance_macs(ctx: NoiseContext, n: int) -> list[hmac.HMAC]:
    """Return each instance's HMAC over (client, input), to be copied and salted per use.

    Hashing a large input is most of the cost; the salted copies reuse it.
    """
    inputs = ctx.canonical_inputs
    if inputs is None or len(inputs) != n:
        got = "none" if inputs is None else str(len(inputs))
        raise ValueError(f"need {n} canonical inputs, have {got}")
    client = ctx.client_id.encode("utf-8")
    prefix = struct.pack("<Q", len(client)) + client
    return [
        hmac.new(ctx.key, b"".join((prefix, struct.pack("<Q", len(data)), data)), hashlib.sha256)
        for data in inputs
    ]


def _salted(macs: Sequence[hmac.HMAC], salt: bytes) -> npt.NDArray[np.uint64]:
    seeds = np.empty(len(macs), dtype=np.uint64)
    for i, mac in enumerate(macs):
        salted = mac.copy()
        salted.update(salt)
        seeds[i] = int.from_bytes(salted.digest()[:8], "little")
    return seeds


def canonical_rows(inputs: np.ndarray, *, quantum: float) -> list[bytes]:
    """Return one canonical byte string per row (axis 0) of a numeric input array.

    Values are quantized to multiples of ``quantum`` (so 1, 1.0 and 1 + 1e-7 agree, and -0.0 is
    0.0), written as little-endian int64 after the row's shape. Values near a grid midpoint can
    still fall on either side when jittered: the grid bounds the jitter that is absorbed, not
    every jitter.
    """
    if not quantum > 0:
        raise ValueError("quantum must be greater than 0")
    values = np.asarray(inputs, dtype=np.float64)
    if values.ndim == 0:
        raise ValueError("inputs need an instance axis")
    n, shape = values.shape[0], values.shape[1:]
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.rint(values.reshape(n, -1) / quantum)
    codes = np.clip(np.nan_to_num(scaled, nan=0.0), -_CODE_LIMIT, _CODE_LIMIT).astype("<i8")
    codes[np.isnan(scaled)] = _NAN_CODE
    header = struct.pack(f"<I{len(shape)}q", len(shape), *shape)
    data = codes.tobytes()
    width = codes.shape[1] * 8
    return [header + data[i * width : (i + 1) * width] for i in range(n)]


def canonical_text(text: str) -> bytes:
    """Return text in NFC with runs of whitespace collapsed to one space and the ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split()).encode("utf-8")


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's finalizer: spread a counter into an unrelated 64-bit seed."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    out: npt.NDArray[np.uint64] = x ^ (x >> np.uint64(31))
    return out


class _Keys:
    """Seeds for one response: per step and output, one per row, computed when first needed."""

    __slots__ = ("_ctx", "_outputs", "_macs")

    def __init__(self, ctx: NoiseContext, outputs: Mapping[str, np.ndarray]) -> None:
        self._ctx = ctx
        self._outputs = outputs
        self._macs: dict[tuple[float | None, int], list[hmac.HMAC]] = {}

    def seeds(
        self, index: int, step: OutputStep, name: str, n: int, good: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.uint64]:
        """Return the seeds of the finite rows (``good``) of output ``name`` (``n`` instances)."""
        salt = b"step:%d:" % index + name.encode("utf-8")
        seeds = _salted(self._instance_macs(step.quantum, n), salt)
        per_instance = len(good) // n
        if per_instance > 1:  # several rows per instance: one seed each, from the instance's
            counters = np.repeat(seeds, per_instance) + _GOLDEN * np.tile(
                np.arange(1, per_instance + 1, dtype=np.uint64), n
            )
            seeds = _mix(counters)
        return seeds[good]

    def wrong_classes(self, k: int) -> npt.NDArray[np.intp]:
        """Return the key's misinformation map over ``k`` classes (the same for every client)."""
        return wrong_classes(self._ctx.key, k)

    def _instance_macs(self, quantum: float, n: int) -> list[hmac.HMAC]:
        ctx = self._ctx
        by_inputs = ctx.canonical_inputs is not None and len(ctx.canonical_inputs) == n
        cache_key = (None if by_inputs else quantum, n)
        if cache_key not in self._macs:
            if not by_inputs:
                # No (or mismatched) inputs: key each instance by its own outputs, quantized.
                parts = [
                    canonical_rows(values, quantum=quantum)
                    for _, values in sorted(self._outputs.items())
                    if np.ndim(values) >= 1 and np.shape(values)[0] == n
                ]
                rows = [b"".join(row) for row in zip(*parts, strict=True)]
                ctx = NoiseContext(ctx.key, ctx.client_id, rows)
            self._macs[cache_key] = _instance_macs(ctx, n)
        return self._macs[cache_key]
