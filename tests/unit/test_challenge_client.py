"""The client helper: solve a 401 body; a session solves once, retries once and reuses the pass."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from extauthz.challenge import client
from extauthz.challenge.client import ChallengeError, ChallengeSession, solve_challenge
from extauthz.challenge.passes import issue_pass, read_pass
from extauthz.challenge.pow import issue, verify
from extauthz.keys import KeyRing

KEYS = KeyRing.single(b"s" * 32)
POW_KEYS, PASS_KEYS = KEYS.derive("challenge"), KEYS.derive("pass")
NOW = 1_700_000_000.0
BINDING = "client-a"


def body_for(token: str, difficulty: int) -> dict[str, object]:
    return {
        "challenge": {
            "scheme": "ExtauthzPoW",
            "token": token,
            "difficulty": difficulty,
            "header": "x-extauthz-pow",
            "expires_at": NOW + 60,
        }
    }


@dataclass
class Guard:
    """A tiny stand-in for Envoy + guard: challenge, accept one solution, honour passes."""

    difficulty: int = 8
    pass_budget: int = 2  # requests a pass covers before the guard challenges again
    throttle_first: int = 0  # answer this many requests with 429 Retry-After: 1 first
    seen: list[dict[str, str]] = field(default_factory=list)
    spent: set[str] = field(default_factory=set)
    used: dict[str, int] = field(default_factory=dict)
    issued: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.seen.append(headers)
            if self.throttle_first > 0:
                self.throttle_first -= 1
                return 429, {"retry-after": "1"}, b'{"error":"slow down"}'
            token = headers.get("x-extauthz-pass", "")
            if token:
                check = read_pass(PASS_KEYS, token, binding=BINDING, address="", now=NOW)
                if check.ok and check.pass_ is not None:
                    used = self.used.get(check.pass_.id, 0)
                    if used < check.pass_.budget:
                        self.used[check.pass_.id] = used + 1
                        return 200, {}, b"ok:" + body
            solution = headers.get("x-extauthz-pow", "")
            if solution:
                v = verify(POW_KEYS, solution, binding=BINDING, now=NOW)
                if v.ok and v.challenge_id not in self.spent:
                    self.spent.add(v.challenge_id)
                    self.issued += 1
                    granted = issue_pass(
                        PASS_KEYS,
                        binding=BINDING,
                        ttl_s=600,
                        budget=self.pass_budget - 1,  # this request is the first use
                        now=NOW,
                        rng_bytes=self.issued.to_bytes(16, "big"),
                    )
                    return 200, {"x-extauthz-pass": granted}, b"ok:" + body
            c = issue(
                POW_KEYS,
                binding=BINDING,
                difficulty=self.difficulty,
                now=NOW,
                ttl_s=60,
                rng_bytes=len(self.seen).to_bytes(16, "big"),
            )
            payload = json.dumps(body_for(c.token, c.difficulty)).encode()
            return 401, {"content-type": "application/json"}, payload


@pytest.fixture
def guard() -> Iterator[tuple[Guard, int]]:
    """Serve a Guard on a free loopback port for one test."""
    state = Guard()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, payload = state.answer(headers, body)
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _handle

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class TestSolveChallenge:
    """solve_challenge answers a well formed 401 body and refuses anything else."""

    def test_answer_verifies(self) -> None:
        """The returned header value is accepted by the guard's verify."""
        c = issue(POW_KEYS, binding=BINDING, difficulty=10, now=NOW, ttl_s=60, rng_bytes=b"r" * 16)
        header = solve_challenge(body_for(c.token, c.difficulty))
        assert header.startswith(c.token + ":")
        assert verify(POW_KEYS, header, binding=BINDING, now=NOW).ok

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"challenge": "x"},
            {"challenge": {"scheme": "Other", "token": "t", "difficulty": 1}},
            {"challenge": {"scheme": "ExtauthzPoW", "token": "", "difficulty": 1}},
            {"challenge": {"scheme": "ExtauthzPoW", "token": "t", "difficulty": "8"}},
            {"challenge": {"scheme": "ExtauthzPoW", "token": "t", "difficulty": 65}},
            {"challenge": {"scheme": "ExtauthzPoW", "token": "t", "difficulty": True}},
        ],
    )
    def test_bad_bodies(self, body: dict[str, object]) -> None:
        """A body without an ExtauthzPoW challenge of sane difficulty is a ChallengeError."""
        with pytest.raises(ChallengeError):
            solve_challenge(body)


class TestChallengeSession:
    """A session pays one challenge, keeps the pass, and pays again only when the pass runs out."""

    def test_solves_once_and_reuses_the_pass(self, guard: tuple[Guard, int]) -> None:
        """401 -> one retry with the solution -> 200 with a pass; the next request sends the pass."""
        state, port = guard
        with ChallengeSession("127.0.0.1", port) as session:
            first = session.request("POST", "/v1/models/m:predict", body=b'{"x":1}')
            assert (first.status, first.body) == (200, b'ok:{"x":1}')
            assert session.solved == 1 and session.work_s > 0
            assert session.pass_token.startswith("p1.")
            second = session.request("POST", "/v1/models/m:predict", body="two")
            assert (second.status, second.body) == (200, b"ok:two")
        assert session.solved == 1
        assert len(state.seen) == 3
        assert "x-extauthz-pow" not in state.seen[0] and "x-extauthz-pass" not in state.seen[0]
        assert "x-extauthz-pow" in state.seen[1]
        assert state.seen[2].get("x-extauthz-pass") == session.pass_token
        assert "x-extauthz-pow" not in state.seen[2]

    def test_spent_pass_is_replaced(self, guard: tuple[Guard, int]) -> None:
        """When the guard refuses the pass, the session solves again and switches to the new pass."""
        state, port = guard
        with ChallengeSession("127.0.0.1", port) as session:
            statuses = [session.request("GET", "/").status for _ in range(3)]
        assert statuses == [200, 200, 200]
        assert session.solved == 2 and state.issued == 2
        # Request 3 carries pass 1 (spent), is challenged, and retries without the stale pass.
        assert "x-extauthz-pass" in state.seen[3] and "x-extauthz-pow" not in state.seen[3]
        assert "x-extauthz-pass" not in state.seen[4] and "x-extauthz-pow" in state.seen[4]

    def test_retries_only_once(self, guard: tuple[Guard, int]) -> None:
        """A guard that refuses the solution gets exactly one retry, and its 401 is returned."""
        state, port = guard
        original = state.answer

        def refuse(headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
            return original({**headers, "x-extauthz-pow": ""}, body)  # ignore every solution

        state.answer = refuse  # type: ignore[method-assign]
        with ChallengeSession("127.0.0.1", port) as session:
            response = session.request("GET", "/")
        assert response.status == 401 and session.solved == 1
        assert len(state.seen) == 2

    def test_too_hard_is_not_attempted(self, guard: tuple[Guard, int]) -> None:
        """A challenge above max_difficulty comes back as the 401, unsolved."""
        state, port = guard
        state.difficulty = 30
        with ChallengeSession("127.0.0.1", port, max_difficulty=20) as session:
            response = session.request("GET", "/")
        assert response.status == 401 and session.solved == 0
        assert "challenge" in response.json()  # type: ignore[operator]

    def test_429_returned_unless_told_to_wait(self, guard: tuple[Guard, int]) -> None:
        """By default a 429 is returned as is, without sleeping."""
        state, port = guard
        state.throttle_first = 1
        slept: list[float] = []
        with ChallengeSession("127.0.0.1", port, sleep=slept.append) as session:
            assert session.request("GET", "/").status == 429
        assert slept == []

    def test_429_waits_retry_after_within_bound(self, guard: tuple[Guard, int]) -> None:
        """With wait_on_429 the session sleeps Retry-After and retries, up to max_wait_s."""
        state, port = guard
        state.throttle_first = 2
        slept: list[float] = []
        with ChallengeSession(
            "127.0.0.1", port, wait_on_429=True, max_wait_s=5, sleep=slept.append
        ) as session:
            assert session.request("GET", "/").status == 200
        assert slept == [1.0, 1.0]
        state.throttle_first = 3
        slept.clear()
        with ChallengeSession(
            "127.0.0.1", port, wait_on_429=True, max_wait_s=2, sleep=slept.append
        ) as session:
            assert session.request("GET", "/").status == 429
        assert slept == [1.0, 1.0]

    def test_from_url(self) -> None:
        """A URL gives host, port, TLS and the path with its query."""
        session, path = ChallengeSession.from_url("https://api.example:8443/v1/x?a=1")
        assert (session.host, session.port, session.tls, path) == (
            "api.example",
            8443,
            True,
            "/v1/x?a=1",
        )
        with pytest.raises(ValueError):
            ChallengeSession.from_url("ftp://x/")


class TestMain:
    """``extauthz solve`` prints a solution, or sends a request and prints the answer."""

    def test_token_and_difficulty(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The printed line is a header value the guard accepts."""
        c = issue(POW_KEYS, binding=BINDING, difficulty=8, now=NOW, ttl_s=60, rng_bytes=b"q" * 16)
        assert client.main([c.token, "8"]) == 0
        line = capsys.readouterr().out.strip()
        assert verify(POW_KEYS, line, binding=BINDING, now=NOW).ok

    def test_url_with_data_file(
        self, guard: tuple[Guard, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--data @file is POSTed through a session; status and body are printed; exit 0."""
        state, port = guard
        data = tmp_path / "body.json"
        data.write_text('{"instances":[[1]]}')
        argv = ["--url", f"http://127.0.0.1:{port}/p", "--data", f"@{data}", "--header", "x-a: 1"]
        assert client.main(argv) == 0
        out = capsys.readouterr()
        assert out.out.splitlines() == ["200", 'ok:{"instances":[[1]]}']
        assert "solved 1 challenge(s)" in out.err
        assert state.seen[-1]["x-a"] == "1"
        assert state.seen[-1]["content-type"] == "application/json"

    def test_refused_request_exits_1(
        self, guard: tuple[Guard, int], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A final status of 400 or more exits 1."""
        state, port = guard
        state.throttle_first = 5
        assert client.main(["--url", f"http://127.0.0.1:{port}/"]) == 1
        assert capsys.readouterr().out.startswith("429")

    def test_usage_errors(self) -> None:
        """Neither form, or both, is a usage error (exit 2)."""
        for argv in ([], ["tok"], ["tok", "8", "--url", "http://x/"], ["tok", "99"]):
            with pytest.raises(SystemExit) as exc:
                client.main(argv)
            assert exc.value.code == 2
