"""Run the detectors on answered requests and fold their verdicts into the client's risk.

The pipeline runs after the answer is served (a background task, so no request waits on it):
it loads the client's detection state from the Store, updates every detector, combines the
verdicts (core/scoring.py), and saves the state with the new risk, which the next decision for
the client reads with its record.

One task per client at a time: requests of a client that arrive while its detection runs
queue up and are detected together next, their instances in arrival order in one observation.
A client sending many requests at once costs one state load, one update per detector and one
save per burst, not per request; a client sending one request at a time is detected per
request, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from extauthz.core.identity import Identity
from extauthz.core.risk import RiskLevel
from extauthz.core.scoring import Risk, Scoring, update
from extauthz.detect.augmentation import AugmentationDetector
from extauthz.detect.base import Observation, Verdict
from extauthz.detect.coverage import CoverageDetector
from extauthz.detect.features import Projector, numeric_matrix, top1_margin
from extauthz.detect.fingerprint import (
    CrossClientDetector,
    FingerprintDetector,
    Fingerprinter,
    FingerprintIndex,
    MemoryFingerprintIndex,
    observe_all,
)
from extauthz.detect.margin import MarginDetector
from extauthz.detect.prada import PradaDetector
from extauthz.detect.volume import VolumeDetector
from extauthz.dialects.base import ParsedRequest, ParsedResponse
from extauthz.policy.loader import Snapshot
from extauthz.policy.model import Detection
from extauthz.protect.perturb import detect_kind
from extauthz.store.base import DetectionState, Store, StoreError
from extauthz.telemetry import metrics

log = structlog.get_logger("extauthz.detect")


# Calibrated in-process on the demo model (20 benign clients x 600 natural queries vs uniform,
# line-search and Jacobian attackers): no single detector but boundary probing and coverage
# takes a client to `suspicious` alone, and the cross-client signal only adds to others, since
# benign users of one data distribution send near-duplicates of each other's inputs.
# Sign-step augmentation takes a client to `suspicious` alone too: 0 steps in 10 benign
# clients' 20,000 queries, two thirds of a Jacobian attacker's from its first batch.
def detection_projector() -> Projector:
    """Return the projection every detector's vectors (and a coverage reference) go through."""
    return Projector(dim=32, seed=0)


DEFAULT_WEIGHTS = {
    "prada": 0.7,
    "margin": 0.8,
    "fingerprint": 0.7,
    "cross_client": 0.3,
    "volume": 0.5,
    "coverage": 0.8,
    "augmentation": 0.8,
}
TIMELINE = 10


@dataclass(frozen=True, slots=True)
class _Suite:
    """The detectors one policy asks for, built once per policy snapshot."""

    projector: Projector
    prada: PradaDetector
    margin: MarginDetector
    fingerprint: FingerprintDetector
    cross_client: CrossClientDetector
    volume: VolumeDetector
    coverage: CoverageDetector | None
    augmentation: AugmentationDetector
    scoring: Scoring


class DetectionPipeline:
    """Detect extraction per client; state in the Store, so any replica continues it."""

    def __init__(
        self,
        store: Store,
        *,
        key: bytes,
        clock: Callable[[], float],
        index: FingerprintIndex | None = None,
        max_pending: int = 256,
    ) -> None:
        self._store = store
        self._key = key
        self._clock = clock
        self._index = index or MemoryFingerprintIndex()
        self._suites: dict[tuple[int, str | None], _Suite] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._max_pending = max_pending
        # Per client with a detection running: the requests that arrived since it started.
        self._queued: dict[str, list[_Answered]] = {}
        self._waiting = 0

    def submit(
        self,
        identity: Identity,
        request: ParsedRequest,
        response: ParsedResponse,
        snapshot: Snapshot,
    ) -> None:
        """Detect in the background; when too much is pending, skip and count it."""
        if not snapshot.policy.detection.enabled:
            return
        if self._waiting >= self._max_pending:
            metrics.ERRORS.labels("detection_skipped").inc()
            return
        answered = _Answered(identity, request, response, snapshot, self._clock())
        self._waiting += 1
        queue = self._queued.get(identity.client_id)
        if queue is not None:  # its detection is running: this request joins the next burst
            queue.append(answered)
            return
        self._queued[identity.client_id] = [answered]
        task = asyncio.create_task(self._run_client(identity.client_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait for pending detections (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _run_client(self, client_id: str) -> None:
        """Detect the client's queued requests, burst by burst, until none is left."""
        try:
            while True:
                burst = self._queued.get(client_id)
                if not burst:
                    return
                self._queued[client_id] = []
                self._waiting -= len(burst)
                # One policy at a time: a reload between requests splits the burst.
                start = 0
                for end in range(1, len(burst) + 1):
                    if end == len(burst) or burst[end].snapshot is not burst[start].snapshot:
                        await self._guarded(burst[start:end])
                        start = end
        finally:
            left = self._queued.pop(client_id, [])
            self._waiting -= len(left)

    async def _guarded(self, burst: Sequence[_Answered]) -> None:
        identity = burst[-1].identity
        try:
            await self._observe_burst(burst)
        except StoreError as exc:
            metrics.ERRORS.labels("store_unavailable").inc()
            log.warning("detection_store_unavailable", detail=str(exc)[:200])
        except Exception:
            metrics.ERRORS.labels("detection_failed").inc()
            log.exception("detection_failed", client=identity.client_id)

    async def observe(
        self,
        identity: Identity,
        request: ParsedRequest,
        response: ParsedResponse,
        snapshot: Snapshot,
    ) -> Risk:
        """Run every detector on one answered request; save and return the client's new risk."""
        return await self._observe_burst(
            [_Answered(identity, request, response, snapshot, self._clock())]
        )

    async def _observe_burst(self, burst: Sequence[_Answered]) -> Risk:
        """Run every detector once on a client's answered requests (one policy snapshot), their
        instances in order; save and return the client's new risk."""
        identity, snapshot = burst[-1].identity, burst[-1].snapshot
        settings = snapshot.policy.detection
        suite = self._suite(settings, snapshot)
        now = self._clock()
        observation = _merged(
            [self._observation(a.identity, a.request, a.response, suite, a.at) for a in burst],
            now,
        )
        previous = await self._store.load_detection(identity.client_id) or DetectionState()
        states = dict(previous.detectors)
        verdicts: dict[str, Verdict] = {}

        def run(name: str, detector: object, obs: Observation) -> None:
            state, verdict = detector.update(states.get(name), obs)  # type: ignore[attr-defined]
            states[name] = state
            verdicts[name] = verdict

        if observation.vectors is not None and observation.top1 is not None:
            # PRADA on the projected vectors keeps its state small (32 values per member).
            run("prada", suite.prada, _without_raw(observation))
        if observation.margin is not None:
            run("margin", suite.margin, observation)
        run("volume", suite.volume, observation)
        if suite.coverage is not None and observation.vectors is not None:
            run("coverage", suite.coverage, observation)
        if observation.raw is not None:
            run("augmentation", suite.augmentation, observation)
            hashes = suite.fingerprint.fingerprinter(observation.raw)
            state, verdict = suite.fingerprint.update_hashes(states.get("fingerprint"), hashes)
            states["fingerprint"], verdicts["fingerprint"] = state, verdict
            matches = await observe_all(self._index, identity.client_id, hashes, now)
            state, verdict = suite.cross_client.verdict(states.get("cross_client"), matches, now)
            states["cross_client"], verdicts["cross_client"] = state, verdict

        old = Risk(
            previous.risk,
            RiskLevel.parse(previous.level or "normal"),
            previous.reasons,
            previous.updated_at,
        )
        risk = update(
            old, {n: (v.score, v.reason) for n, v in verdicts.items()}, now, suite.scoring
        )
        for name, verdict in verdicts.items():
            if verdict.score >= 0.5 and verdict.reason:
                metrics.DETECTIONS.labels(name, verdict.reason).inc()
        timeline = previous.timeline
        if risk.level != old.level:
            metrics.LEVEL_CHANGES.labels(risk.level.label).inc()
            log.info(
                "risk_level_changed",
                client=identity.client_id,
                level=risk.level.label,
                risk=round(risk.score, 3),
                reasons=risk.reasons,
            )
            timeline = (*timeline, (now, risk.level.label, ",".join(risk.reasons)))[-TIMELINE:]
        await self._store.save_detection(
            identity.client_id,
            DetectionState(states, risk.score, risk.level.label, risk.reasons, now, timeline),
            ttl_s=settings.state_ttl_s,
        )
        return risk

    def _observation(
        self,
        identity: Identity,
        request: ParsedRequest,
        response: ParsedResponse,
        suite: _Suite,
        now: float,
    ) -> Observation:
        raw = numeric_matrix(request.inputs, request.instances) if request.inputs else None
        vectors = suite.projector.project(raw) if raw is not None else None
        top1 = margin = None
        for name in sorted(response.outputs):
            values = response.outputs[name]
            kind = detect_kind(
                name, values, embedding_names=response.embeddings, dtype=response.dtypes.get(name)
            )
            if kind == "probabilities" and values.shape[0] == request.instances:
                top1, margin = top1_margin(values.reshape(values.shape[0], -1))
                break
        return Observation(
            client_id=identity.client_id,
            now=now,
            instances=request.instances,
            vectors=vectors,
            raw=raw,
            top1=top1,
            margin=margin,
        )

    def _suite(self, settings: Detection, snapshot: Snapshot) -> _Suite:
        cache_key = (id(settings), settings.coverage_reference)
        suite = self._suites.get(cache_key)
        if suite is None:
            self._suites.clear()  # one policy in force at a time
            suite = self._suites[cache_key] = self._build(settings, snapshot)
        return suite

    def _build(self, settings: Detection, snapshot: Snapshot) -> _Suite:
        weights = {name: DEFAULT_WEIGHTS[name] for name in DEFAULT_WEIGHTS}
        shadow = set()
        for name, detector in settings.detectors.items():
            weights[name] = detector.weight
            if detector.shadow:
                shadow.add(name)
        projector = detection_projector()
        coverage = None
        if settings.coverage_reference:
            path = Path(settings.coverage_reference)
            if not path.is_absolute() and snapshot.watched_files:
                path = snapshot.watched_files[0].parent / path
            coverage = CoverageDetector(np.load(path))
        return _Suite(
            projector=projector,
            prada=PradaDetector(max_growing=64, max_distances=512, max_classes=32),
            margin=MarginDetector(settings.margin_baseline),
            fingerprint=FingerprintDetector(
                Fingerprinter(key=self._key, scale=settings.input_scale), max_entries=256
            ),
            cross_client=CrossClientDetector(),
            volume=VolumeDetector(sustained_per_min=settings.sustained_per_min),
            coverage=coverage,
            augmentation=AugmentationDetector(key=self._key),
            scoring=Scoring(
                weights=weights,
                shadow=frozenset(shadow),
                elevated=settings.elevated,
                suspicious=settings.suspicious,
                abusive=settings.abusive,
                hysteresis=settings.hysteresis,
                half_life_s=settings.half_life_s,
            ),
        )


@dataclass(frozen=True, slots=True)
class _Answered:
    """One answered request waiting for detection."""

    identity: Identity
    request: ParsedRequest
    response: ParsedResponse
    snapshot: Snapshot
    at: float


def _merged(observations: Sequence[Observation], now: float) -> Observation:
    """One observation of a burst: instances in order, each array field kept only when every
    request has it with one width (a request without it, or of another width, leaves it out)."""
    if len(observations) == 1:
        return observations[0]

    def joined(name: str) -> np.ndarray | None:
        parts = [getattr(o, name) for o in observations]
        if any(p is None for p in parts):
            return None
        if len({p.shape[1:] for p in parts}) != 1:
            return None
        return np.concatenate(parts)

    rows = {name: joined(name) for name in ("vectors", "raw", "top1", "margin")}
    total = sum(o.instances for o in observations)
    if any(v is not None and v.shape[0] != total for v in rows.values()):
        rows = {name: None for name in rows}  # counts disagree: keep only the volume
    return Observation(
        client_id=observations[-1].client_id,
        now=now,
        instances=total,
        vectors=rows["vectors"],
        raw=rows["raw"],
        top1=rows["top1"],
        margin=rows["margin"],
    )


def _without_raw(observation: Observation) -> Observation:
    return Observation(
        client_id=observation.client_id,
        now=observation.now,
        instances=observation.instances,
        vectors=observation.vectors,
        top1=observation.top1,
        margin=observation.margin,
    )
