"""The admin API (``extauthz.v1.Admin``): inspect clients, pin their risk level, block, reset.

Every call needs ``authorization: Bearer <token>`` matching the token file; without a
token file the API refuses everything, so an unconfigured guard is never open.
"""

from __future__ import annotations

import hmac
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import structlog

from extauthz._proto.v1 import admin_pb2, admin_pb2_grpc
from extauthz.core.decision import DecisionCore
from extauthz.core.identity import Identity
from extauthz.core.risk import RiskLevel
from extauthz.evidence.ledger import Ledger, export_jsonl
from extauthz.store.base import ClientRecord, StoreError
from extauthz.telemetry import metrics

log = structlog.get_logger("extauthz.admin")

MAX_PAGE = 1000
_T = TypeVar("_T")


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, result: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.result = result


def read_token(path: Path | None) -> str | None:
    """Return the admin token in ``path`` (stripped), or None when unset or empty."""
    if path is None:
        return None
    try:
        token = path.read_text("utf-8").strip()
    except OSError as exc:
        log.error("admin_token_unreadable", path=str(path), error=str(exc))
        return None
    return token or None


class AdminService(admin_pb2_grpc.AdminServicer):
    """Operators' view of clients. The token file is read on each call, so rotation needs no restart."""

    def __init__(
        self,
        core: DecisionCore,
        *,
        token_file: Path | None,
        clock: Callable[[], float],
        ledger: Ledger | None = None,
    ) -> None:
        self._core = core
        self._ledger = ledger
        self._token_file = token_file
        self._clock = clock

    async def GetClient(
        self, request: admin_pb2.GetClientRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Client:  # noqa: N802
        async def run() -> admin_pb2.Client:
            client_id = _client_id(request.client_id)
            record = await self._core.store.get_client(client_id)
            if record is None:
                raise _Refused(
                    grpc.StatusCode.NOT_FOUND, f"unknown client {request.client_id!r}", "not_found"
                )
            client = self._client(record)
            detection = await self._core.store.load_detection(client_id)
            if detection is not None:
                client.timeline.extend(
                    admin_pb2.LevelChange(time=t, level=level, reasons=reasons)
                    for t, level, reasons in detection.timeline
                )
            return client

        return await self._call("GetClient", context, run)

    async def ListClients(
        self, request: admin_pb2.ListClientsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListClientsResponse:  # noqa: N802
        async def run() -> admin_pb2.ListClientsResponse:
            size = request.page_size or 100
            if not 1 <= size <= MAX_PAGE:
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, f"page_size must be 1..{MAX_PAGE}", "invalid"
                )
            records, cursor = await self._core.store.list_clients(
                limit=size, cursor=request.page_token
            )
            return admin_pb2.ListClientsResponse(
                clients=[self._client(r) for r in records], next_page_token=cursor
            )

        return await self._call("ListClients", context, run)

    async def ResetClient(
        self, request: admin_pb2.ResetClientRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ResetClientResponse:  # noqa: N802
        async def run() -> admin_pb2.ResetClientResponse:
            existed = await self._core.store.reset_client(_client_id(request.client_id))
            log.info("admin_reset_client", client=request.client_id, existed=existed)
            return admin_pb2.ResetClientResponse(existed=existed)

        return await self._call("ResetClient", context, run)

    async def SetClientLevel(
        self, request: admin_pb2.SetClientLevelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Client:  # noqa: N802
        async def run() -> admin_pb2.Client:
            level: str | None = None
            if request.level:
                try:
                    level = RiskLevel.parse(request.level).label
                except ValueError as exc:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "invalid") from None
            if request.ttl_seconds < 0:
                raise _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, "ttl_seconds must not be negative", "invalid"
                )
            record = await self._core.store.set_level(
                _client_id(request.client_id),
                level=level,
                blocked=request.blocked,
                reason=request.reason[:200],
                now=self._clock(),
                ttl_s=request.ttl_seconds or None,
            )
            log.info(
                "admin_set_level",
                client=request.client_id,
                level=level,
                blocked=request.blocked,
                reason=request.reason[:200],
            )
            return self._client(record)

        return await self._call("SetClientLevel", context, run)

    async def ExportEvidence(  # noqa: N802
        self, request: admin_pb2.ExportEvidenceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ExportEvidenceResponse:
        async def run() -> admin_pb2.ExportEvidenceResponse:
            if self._ledger is None:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "no evidence ledger", "invalid")
            records = await self._ledger.read(
                client_id=request.client_id or None, limit=request.limit or 100_000
            )
            out = io.StringIO()
            export_jsonl(records, out)
            return admin_pb2.ExportEvidenceResponse(lines=out.getvalue().splitlines())

        return await self._call("ExportEvidence", context, run)

    async def EraseEvidence(  # noqa: N802
        self, request: admin_pb2.EraseEvidenceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EraseEvidenceResponse:
        async def run() -> admin_pb2.EraseEvidenceResponse:
            if self._ledger is None:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "no evidence ledger", "invalid")
            erased = await self._ledger.erase(_client_id(request.client_id))
            log.info("admin_erase_evidence", client=request.client_id, erased=erased)
            return admin_pb2.EraseEvidenceResponse(erased=erased)

        return await self._call("EraseEvidence", context, run)

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext, run: Callable[[], Awaitable[_T]]
    ) -> _T:
        try:
            self._authenticate(context)
            result = await run()
        except _Refused as exc:
            metrics.ADMIN_CALLS.labels(method, exc.result).inc()
            await context.abort(exc.code, exc.message)
            raise  # abort raises; this keeps the type checker informed
        except ValueError as exc:  # the store refuses a bad cursor or argument
            metrics.ADMIN_CALLS.labels(method, "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        except StoreError as exc:
            metrics.ADMIN_CALLS.labels(method, "store_unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store unavailable: {exc}")
            raise
        metrics.ADMIN_CALLS.labels(method, "ok").inc()
        return result

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        expected = read_token(self._token_file)
        if expected is None:
            raise _Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                "the admin API is disabled: start the guard with --admin-token-file",
                "disabled",
            )
        supplied = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                supplied = value[len("Bearer ") :].strip()
        if not supplied or not hmac.compare_digest(supplied.encode(), expected.encode()):
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong admin bearer token",
                "unauthenticated",
            )

    def _client(self, record: ClientRecord) -> admin_pb2.Client:
        snapshot = self._core.snapshot()
        identity = Identity(record.client_id, record.tier, "anonymous")
        decision = self._core.judge(identity, record, snapshot)
        terms = snapshot.policy.terms
        tier = snapshot.policy.tiers.get(record.tier)
        accepted = self._core.terms_on_record(record.client_id, snapshot)
        return admin_pb2.Client(
            client_id=record.client_id,
            tier=record.tier,
            pinned_level=record.pinned_level or "",
            blocked=record.blocked,
            reason=record.reason,
            first_seen=record.first_seen,
            last_seen=record.last_seen,
            requests=record.requests,
            instances=record.instances,
            effective_level=decision.level.label,
            action=decision.action.value,
            risk=record.risk,
            detected_level=record.detected_level,
            risk_reasons=list(record.risk_reasons),
            terms_version=terms.version if terms is not None else "",
            terms_required=bool(terms is not None and tier is not None and tier.require_terms),
            terms_accepted=accepted,
            terms_admitted=terms is not None and terms.admits(accepted, self._clock()),
        )


def _client_id(text: str) -> str:
    text = text.strip()
    if not text or len(text) > 256:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "client_id must be 1..256 characters", "invalid"
        )
    return text
