"""The admin API (``extauthz.v1.Admin``) and ``extauthz admin``, against a guard started in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2

from extauthz._proto.v1 import admin_pb2, admin_pb2_grpc
from extauthz.cli import main
from tests.integration.service_fixtures import (
    ADMIN_TOKEN,
    ALICE_KEY,
    RunningGuard,
    check_request,
    running_guard,
)

AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)

_Call = Callable[[admin_pb2_grpc.AdminStub, tuple[tuple[str, str], ...]], Awaitable[Any]]

# One call per method, each valid apart from its credentials.
METHODS: dict[str, _Call] = {
    "GetClient": lambda stub, md: stub.GetClient(
        admin_pb2.GetClientRequest(client_id="key:alice"), metadata=md
    ),
    "ListClients": lambda stub, md: stub.ListClients(
        admin_pb2.ListClientsRequest(page_size=2), metadata=md
    ),
    "ResetClient": lambda stub, md: stub.ResetClient(
        admin_pb2.ResetClientRequest(client_id="key:alice"), metadata=md
    ),
    "SetClientLevel": lambda stub, md: stub.SetClientLevel(
        admin_pb2.SetClientLevelRequest(client_id="key:alice", level="abusive"), metadata=md
    ),
}


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[RunningGuard]:
    async with running_guard(tmp_path) as running:
        yield running


def _cli_json(out: str) -> dict[str, Any]:
    """Return the JSON document the CLI printed; in-process server logs may share stdout."""
    lines = out.splitlines()
    start = lines.index("{")
    end = len(lines) - lines[::-1].index("}")
    document: dict[str, Any] = json.loads("\n".join(lines[start:end]))
    return document


async def _code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


class TestAuthentication:
    """Every method needs the bearer token from the token file; without a file the API is closed."""

    @pytest.mark.parametrize("method", sorted(METHODS))
    async def test_missing_token_unauthenticated(self, guarded: RunningGuard, method: str) -> None:
        assert await _code_of(METHODS[method](guarded.admin, ())) == grpc.StatusCode.UNAUTHENTICATED

    @pytest.mark.parametrize("method", sorted(METHODS))
    async def test_wrong_token_unauthenticated(self, guarded: RunningGuard, method: str) -> None:
        wrong = (("authorization", "Bearer not-the-token"),)
        assert (
            await _code_of(METHODS[method](guarded.admin, wrong)) == grpc.StatusCode.UNAUTHENTICATED
        )

    async def test_non_bearer_scheme_unauthenticated(self, guarded: RunningGuard) -> None:
        basic = (("authorization", f"Basic {ADMIN_TOKEN}"),)
        assert (
            await _code_of(METHODS["ListClients"](guarded.admin, basic))
            == grpc.StatusCode.UNAUTHENTICATED
        )

    @pytest.mark.parametrize("method", sorted(METHODS))
    async def test_no_token_file_permission_denied(self, tmp_path: Path, method: str) -> None:
        async with running_guard(tmp_path, token=None) as running:
            code = await _code_of(METHODS[method](running.admin, AUTH))
        assert code == grpc.StatusCode.PERMISSION_DENIED

    async def test_refused_call_changes_nothing(self, guarded: RunningGuard) -> None:
        await _code_of(METHODS["SetClientLevel"](guarded.admin, ()))
        assert await guarded.guard.store.get_client("key:alice") is None

    async def test_token_rotation(self, guarded: RunningGuard) -> None:
        assert guarded.token_file is not None
        guarded.token_file.write_text("rotated-token\n", "utf-8")
        new = (("authorization", "Bearer rotated-token"),)
        assert await _code_of(METHODS["ListClients"](guarded.admin, new)) == grpc.StatusCode.OK
        assert (
            await _code_of(METHODS["ListClients"](guarded.admin, AUTH))
            == grpc.StatusCode.UNAUTHENTICATED
        )


class TestClientControl:
    """Pinning a level or a block changes the next Check; a reset forgets the client."""

    async def test_set_abusive_then_check_is_403(self, guarded: RunningGuard) -> None:
        client = await guarded.admin.SetClientLevel(
            admin_pb2.SetClientLevelRequest(
                client_id="key:alice", level="abusive", reason="scraping"
            ),
            metadata=AUTH,
        )
        assert (client.pinned_level, client.effective_level, client.action) == (
            "abusive",
            "abusive",
            "block",
        )
        response = await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        assert response.denied_response.status.code == 403
        assert json.loads(response.denied_response.body)["action"] == "block"

    async def test_block_flag_refuses_with_operator_block(self, guarded: RunningGuard) -> None:
        await guarded.admin.SetClientLevel(
            admin_pb2.SetClientLevelRequest(client_id="key:alice", blocked=True), metadata=AUTH
        )
        response = await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        assert response.status.code == code_pb2.PERMISSION_DENIED
        assert json.loads(response.denied_response.body)["error"] == "operator_block"

    async def test_reset_allows_again(self, guarded: RunningGuard) -> None:
        await guarded.admin.SetClientLevel(
            admin_pb2.SetClientLevelRequest(client_id="key:alice", level="abusive"), metadata=AUTH
        )
        reset = await guarded.admin.ResetClient(
            admin_pb2.ResetClientRequest(client_id="key:alice"), metadata=AUTH
        )
        assert reset.existed
        response = await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        assert response.HasField("ok_response")
        again = await guarded.admin.ResetClient(
            admin_pb2.ResetClientRequest(client_id="nobody"), metadata=AUTH
        )
        assert not again.existed

    async def test_get_client_reports_counters(self, guarded: RunningGuard) -> None:
        for _ in range(2):
            await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        client = await guarded.admin.GetClient(
            admin_pb2.GetClientRequest(client_id="key:alice"), metadata=AUTH
        )
        assert (client.client_id, client.tier, client.requests) == ("key:alice", "free", 2)
        assert (client.effective_level, client.action, client.pinned_level) == (
            "normal",
            "allow",
            "",
        )

    async def test_get_unknown_client_not_found(self, guarded: RunningGuard) -> None:
        call = guarded.admin.GetClient(
            admin_pb2.GetClientRequest(client_id="key:ghost"), metadata=AUTH
        )
        assert await _code_of(call) == grpc.StatusCode.NOT_FOUND

    @pytest.mark.parametrize(
        "request_",
        [
            admin_pb2.SetClientLevelRequest(client_id="key:alice", level="furious"),
            admin_pb2.SetClientLevelRequest(client_id="key:alice", level="abusive", ttl_seconds=-1),
            admin_pb2.SetClientLevelRequest(client_id="   ", level="abusive"),
            admin_pb2.SetClientLevelRequest(client_id="x" * 300, level="abusive"),
        ],
        ids=["bad_level", "negative_ttl", "blank_id", "long_id"],
    )
    async def test_invalid_set_level_arguments(
        self, guarded: RunningGuard, request_: admin_pb2.SetClientLevelRequest
    ) -> None:
        assert await _code_of(guarded.admin.SetClientLevel(request_, metadata=AUTH)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await guarded.guard.store.get_client("key:alice") is None

    async def test_pin_with_ttl_expires(self, guarded: RunningGuard) -> None:
        await guarded.admin.SetClientLevel(
            admin_pb2.SetClientLevelRequest(client_id="key:alice", level="abusive", ttl_seconds=30),
            metadata=AUTH,
        )
        blocked = await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        guarded.clock.now += 31
        allowed = await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        assert blocked.denied_response.status.code == 403
        assert allowed.HasField("ok_response")


class TestListClients:
    """ListClients pages through every client once, following next_page_token."""

    async def _five_clients(self, guarded: RunningGuard) -> set[str]:
        addresses = [f"198.51.100.{i}" for i in range(1, 6)]
        for address in addresses:
            await guarded.authz.Check(check_request(address=address))
        return {f"ip:{address}" for address in addresses}

    async def test_pages_of_two(self, guarded: RunningGuard) -> None:
        expected = await self._five_clients(guarded)
        seen: list[str] = []
        sizes: list[int] = []
        token = ""
        for _ in range(10):
            page = await guarded.admin.ListClients(
                admin_pb2.ListClientsRequest(page_size=2, page_token=token), metadata=AUTH
            )
            sizes.append(len(page.clients))
            seen.extend(client.client_id for client in page.clients)
            token = page.next_page_token
            if not token:
                break
        assert sizes == [2, 2, 1]
        assert sorted(seen) == sorted(expected)

    async def test_default_page_holds_all(self, guarded: RunningGuard) -> None:
        expected = await self._five_clients(guarded)
        page = await guarded.admin.ListClients(admin_pb2.ListClientsRequest(), metadata=AUTH)
        assert {client.client_id for client in page.clients} == expected
        assert page.next_page_token == ""

    @pytest.mark.parametrize("size", [-1, 1001])
    async def test_bad_page_size_invalid(self, guarded: RunningGuard, size: int) -> None:
        call = guarded.admin.ListClients(
            admin_pb2.ListClientsRequest(page_size=size), metadata=AUTH
        )
        assert await _code_of(call) == grpc.StatusCode.INVALID_ARGUMENT

    async def test_malformed_page_token_invalid(self, guarded: RunningGuard) -> None:
        await self._five_clients(guarded)
        call = guarded.admin.ListClients(
            admin_pb2.ListClientsRequest(page_size=2, page_token="not-a-cursor!"), metadata=AUTH
        )
        assert await _code_of(call) == grpc.StatusCode.INVALID_ARGUMENT


class TestAdminCli:
    """``extauthz admin`` talks to the running guard and prints JSON."""

    async def test_list_prints_json(
        self, guarded: RunningGuard, capsys: pytest.CaptureFixture[str]
    ) -> None:
        await guarded.authz.Check(check_request({"x-api-key": ALICE_KEY}))
        assert guarded.token_file is not None
        argv = [
            "admin",
            "--target",
            guarded.target,
            "--token-file",
            str(guarded.token_file),
            "list",
        ]
        code = await asyncio.to_thread(main, argv)
        out = capsys.readouterr().out
        assert code == 0
        document = _cli_json(out)
        assert [client["client_id"] for client in document["clients"]] == ["key:alice"]
        assert document["clients"][0]["requests"] == "1"  # int64 fields are JSON strings

    async def test_set_level_then_get_client(
        self, guarded: RunningGuard, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert guarded.token_file is not None
        base = ["admin", "--target", guarded.target, "--token-file", str(guarded.token_file)]
        assert (
            await asyncio.to_thread(main, [*base, "set-level", "ip:203.0.113.9", "suspicious"]) == 0
        )
        capsys.readouterr()
        assert await asyncio.to_thread(main, [*base, "get-client", "ip:203.0.113.9"]) == 0
        document = _cli_json(capsys.readouterr().out)
        assert (document["pinned_level"], document["action"]) == ("suspicious", "challenge")

    async def test_wrong_token_exits_1(
        self, guarded: RunningGuard, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        wrong = tmp_path / "wrong-token"
        wrong.write_text("nope\n", "utf-8")
        argv = ["admin", "--target", guarded.target, "--token-file", str(wrong), "list"]
        assert await asyncio.to_thread(main, argv) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
