"""A small HTTP client for demo and test traffic: pick the source address, keep connections."""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One keep-alive HTTP/1.1 connection to ``port`` from ``source`` (any 127.0.0.0/8 address)."""

    def __init__(
        self,
        port: int,
        *,
        source: str = "127.0.0.1",
        host: str = "127.0.0.1",
        timeout_s: float = 30.0,
    ) -> None:
        self._connection = http.client.HTTPConnection(
            host, port, timeout=timeout_s, source_address=(source, 0)
        )

    def request(
        self, method: str, path: str, *, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> Reply:
        data: bytes | None
        all_headers = dict(headers or {})
        if body is None or isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode()
            all_headers.setdefault("content-type", "application/json")
        self._connection.request(method, path, body=data, headers=all_headers)
        response = self._connection.getresponse()
        payload = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, payload)

    def post(self, path: str, body: Any, headers: Mapping[str, str] | None = None) -> Reply:
        return self.request("POST", path, body=body, headers=headers)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
