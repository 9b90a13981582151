"""Challenges through the real Envoy: a suspicious client solves proof-of-work with the Python
helper, gets a pass, and spends its instance budget; replays and foreign solutions are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from extauthz.admin_client import AdminClient
from extauthz.challenge.client import ChallengeSession
from extauthz.challenge.pow import solve
from extauthz.demo.client import Client
from tests.e2e.browser import chromium_binary, open_and_wait
from tests.e2e.conftest import E2E

KSERVE = "/v1/models/digits:predict"


def _rows(n: int) -> list[list[float]]:
    return np.random.default_rng(n).integers(0, 17, size=(n, 64)).astype(float).tolist()


JSON = {"content-type": "application/json"}


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def _pin(e2e: E2E, client: str, level: str | None) -> None:
    with AdminClient(e2e.local.admin_target, e2e.local.admin_token) as admin:
        admin.set_level(client, level, reason="e2e challenge")


class TestProofOfWork:
    """A client pinned suspicious is challenged, solves, and gets through with a pass."""

    def test_python_helper_solves_and_reuses_the_pass(self, e2e: E2E) -> None:
        _pin(e2e, "ip:127.0.0.50", "suspicious")
        try:
            with Client(e2e.port, source="127.0.0.50") as http:
                first = http.post(KSERVE, {"instances": _rows(1)})
            assert first.status == 401
            challenge = first.json()["challenge"]
            assert challenge["scheme"] == "ExtauthzPoW" and challenge["difficulty"] >= 16
            assert first.headers["www-authenticate"].startswith("ExtauthzPoW")

            session = ChallengeSession("127.0.0.1", e2e.port, source_address="127.0.0.50")
            with session:
                answers = [
                    session.request(
                        "POST", KSERVE, body=_json({"instances": _rows(1)}), headers=JSON
                    )
                    for _ in range(3)
                ]
            assert [a.status for a in answers] == [200, 200, 200]
            assert session.solved == 1  # the pass covered the next two requests
            assert session.pass_token
        finally:
            _pin(e2e, "ip:127.0.0.50", None)

    def test_replayed_or_foreign_solutions_are_refused(self, e2e: E2E) -> None:
        for source in ("127.0.0.51", "127.0.0.52"):
            _pin(e2e, f"ip:{source}", "suspicious")
        try:
            with Client(e2e.port, source="127.0.0.51") as http:
                challenge = http.post(KSERVE, {"instances": _rows(1)}).json()["challenge"]
                header = (
                    f"{challenge['token']}:{solve(challenge['token'], challenge['difficulty'])}"
                )
                solved = http.post(
                    KSERVE, {"instances": _rows(1)}, headers={"x-extauthz-pow": header}
                )
                replayed = http.post(
                    KSERVE, {"instances": _rows(1)}, headers={"x-extauthz-pow": header}
                )
            with Client(e2e.port, source="127.0.0.52") as http:
                foreign = http.post(
                    KSERVE, {"instances": _rows(1)}, headers={"x-extauthz-pow": header}
                )
        finally:
            for source in ("127.0.0.51", "127.0.0.52"):
                _pin(e2e, f"ip:{source}", None)
        assert solved.status == 200
        assert (
            "x-extauthz-pass" in solved.headers and "extauthz_pass=" in solved.headers["set-cookie"]
        )
        assert replayed.status == 401  # single use: a new challenge, not a second pass
        assert foreign.status == 401  # bound to the client that was challenged

    def test_a_big_batch_spends_the_pass_and_is_challenged_harder(self, e2e: E2E) -> None:
        _pin(e2e, "ip:127.0.0.53", "suspicious")
        try:
            session = ChallengeSession("127.0.0.1", e2e.port, source_address="127.0.0.53")
            with session:
                small = session.request(
                    "POST", KSERVE, body=_json({"instances": _rows(1)}), headers=JSON
                )
                with Client(e2e.port, source="127.0.0.53") as http:
                    big = http.post(
                        KSERVE,
                        {"instances": _rows(16)},  # the pass budget here is 20
                        headers={"x-extauthz-pass": session.pass_token},
                    )
                    bigger = http.post(
                        KSERVE,
                        {"instances": _rows(16)},
                        headers={"x-extauthz-pass": session.pass_token},
                    )
        finally:
            _pin(e2e, "ip:127.0.0.53", None)
        assert small.status == 200
        assert big.status == 200  # 1 + 16 of 20
        assert bigger.status == 401  # 16 more do not fit: a new challenge
        assert bigger.json()["challenge"]["difficulty"] > 16  # 16 instances add 4 bits


class TestBrowser:
    """A real browser gets the HTML challenge, solves it in a Web Worker and lands on the API."""

    def test_chromium_solves_the_page_and_lands(
        self, e2e: E2E, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        chromium_binary()
        screenshot = tmp_path_factory.mktemp("screenshots") / "challenge-solved.png"
        _pin(e2e, "ip:127.0.0.1", "suspicious")
        try:
            with Client(e2e.port, source="127.0.0.1") as http:
                page = http.request("GET", "/debug/headers", headers={"accept": "text/html"})
            text = open_and_wait(
                f"http://127.0.0.1:{e2e.port}/debug/headers",
                until_text="x-extauthz-client",
                screenshot=screenshot,
                timeout_s=60,
            )
        finally:
            _pin(e2e, "ip:127.0.0.1", None)
        assert page.status == 401
        assert page.headers["content-type"].startswith("text/html")
        assert "content-security-policy" in page.headers
        assert "ip:127.0.0.1" in text  # the model's /debug/headers, reached with the pass cookie
        assert screenshot.stat().st_size > 0
