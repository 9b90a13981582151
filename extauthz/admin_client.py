"""A synchronous client of the admin API, used by ``extauthz admin``, the demo and the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from extauthz._proto.v1 import admin_pb2, admin_pb2_grpc


class AdminClient:
    """Call ``extauthz.v1.Admin`` at ``target`` with a bearer ``token`` (None sends none)."""

    def __init__(
        self,
        target: str,
        token: str | None,
        *,
        timeout_s: float = 5.0,
        tls: tuple[Path, Path | None, Path | None] | None = None,
    ) -> None:
        """``tls`` is (CA, client certificate, client key); certificate and key only for mTLS."""
        if tls is None:
            self._channel = grpc.insecure_channel(target)
        else:
            ca, cert, key = tls
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca.read_bytes(),
                private_key=key.read_bytes() if key else None,
                certificate_chain=cert.read_bytes() if cert else None,
            )
            self._channel = grpc.secure_channel(target, credentials)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout_s

    def get_client(self, client_id: str) -> dict[str, Any]:
        return _plain(
            self._stub.GetClient(
                admin_pb2.GetClientRequest(client_id=client_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        )

    def list_clients(self, *, limit: int = 100, page_token: str = "") -> dict[str, Any]:
        return _plain(
            self._stub.ListClients(
                admin_pb2.ListClientsRequest(page_size=limit, page_token=page_token),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        )

    def reset(self, client_id: str) -> dict[str, Any]:
        return _plain(
            self._stub.ResetClient(
                admin_pb2.ResetClientRequest(client_id=client_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        )

    def set_level(
        self,
        client_id: str,
        level: str | None,
        *,
        blocked: bool = False,
        reason: str = "",
        ttl_s: float = 0.0,
    ) -> dict[str, Any]:
        request = admin_pb2.SetClientLevelRequest(
            client_id=client_id,
            level=level or "",
            blocked=blocked,
            reason=reason,
            ttl_seconds=ttl_s,
        )
        return _plain(
            self._stub.SetClientLevel(request, metadata=self._metadata, timeout=self._timeout)
        )

    def export_evidence(self, client_id: str = "", *, limit: int = 0) -> list[str]:
        request = admin_pb2.ExportEvidenceRequest(client_id=client_id, limit=limit)
        reply = self._stub.ExportEvidence(request, metadata=self._metadata, timeout=self._timeout)
        return list(reply.lines)

    def erase_evidence(self, client_id: str) -> int:
        request = admin_pb2.EraseEvidenceRequest(client_id=client_id)
        reply = self._stub.EraseEvidence(request, metadata=self._metadata, timeout=self._timeout)
        return int(reply.erased)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )
    return result
