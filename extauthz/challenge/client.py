"""Client side of the proof-of-work challenge, for API clients and the ``extauthz solve`` verb.

When the guard owes a client a challenge it answers 401 with a JSON body::

    {"challenge": {"scheme": "ExtauthzPoW", "token": "c1...", "difficulty": 16,
                   "header": "x-extauthz-pow", "expires_at": 1700000000}}

:func:`solve_challenge` turns that body into the header value to send back, and
:class:`ChallengeSession` does the whole dance over ``http.client``: solve, retry once, keep the
``x-extauthz-pass`` the guard returns and send it on later requests. Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extauthz.challenge.pow import MAX_DIFFICULTY, solve

SCHEME = "ExtauthzPoW"
POW_HEADER = "x-extauthz-pow"
PASS_HEADER = "x-extauthz-pass"


class ChallengeError(ValueError):
    """A 401 body that does not carry a challenge this client can answer."""


def _challenge_of(body: object) -> Mapping[str, object] | None:
    if isinstance(body, Mapping):
        challenge = body.get("challenge")
        if isinstance(challenge, Mapping):
            return challenge
    return None


def solve_challenge(body: Mapping[str, object]) -> str:
    """Return the ``x-extauthz-pow`` value ``<token>:<nonce>`` answering the guard's 401 body.

    Raise :class:`ChallengeError` when the body holds no ``ExtauthzPoW`` challenge.
    """
    challenge = _challenge_of(body)
    if challenge is None:
        raise ChallengeError("no 'challenge' object in the body")
    scheme, token, difficulty = (challenge.get(k) for k in ("scheme", "token", "difficulty"))
    if scheme != SCHEME:
        raise ChallengeError(f"unknown challenge scheme {scheme!r}")
    if not isinstance(token, str) or not token:
        raise ChallengeError("challenge.token must be a non-empty string")
    if (
        isinstance(difficulty, bool)
        or not isinstance(difficulty, int)
        or not 0 <= difficulty <= MAX_DIFFICULTY
    ):
        raise ChallengeError(f"challenge.difficulty must be an int in [0, {MAX_DIFFICULTY}]")
    return f"{token}:{solve(token, difficulty)}"


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP answer: status, headers (lower-case names, repeats joined by ``", "``), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> object:
        """Return the body parsed as JSON (raises ``ValueError`` if it is not)."""
        return json.loads(self.body)


_RETRYABLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class ChallengeSession:
    """Send requests to one ``host:port``, answering proof-of-work challenges on the way.

    On a 401 whose JSON body carries a challenge, solve it (up to ``max_difficulty`` bits) and
    retry once with ``x-extauthz-pow``. Remember the ``x-extauthz-pass`` of any answer and send
    it on later requests. On a 429, wait ``Retry-After`` seconds and retry only when
    ``wait_on_429`` is set, waiting at most ``max_wait_s`` in all per request (delta-seconds
    only; an HTTP date is not waited for). ``work_s`` is the time spent solving, ``solved`` the
    number of challenges solved. One keep-alive connection; not thread-safe.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        timeout_s: float = 30.0,
        wait_on_429: bool = False,
        max_wait_s: float = 60.0,
        max_difficulty: int = 28,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        source_address: str | None = None,
    ) -> None:
        """Prepare a session; nothing connects until the first request. ``source_address``
        binds the local end (a test sends as several clients from 127.0.0.0/8)."""
        self.host = host
        self.source_address = source_address
        self.port = port
        self.tls = tls
        self.timeout_s = timeout_s
        self.wait_on_429 = wait_on_429
        self.max_wait_s = max_wait_s
        self.max_difficulty = max_difficulty
        self.pass_token = ""
        self.work_s = 0.0
        self.solved = 0
        self._clock = clock
        self._sleep = sleep
        self._conn: http.client.HTTPConnection | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> tuple[ChallengeSession, str]:
        """Return a session for the URL's host and the path (with query) to request."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, tls=tls, **kwargs), path

    def close(self) -> None:
        """Close the connection (a later request opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ChallengeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.tls else http.client.HTTPConnection
            source = (self.source_address, 0) if self.source_address else None
            self._conn = cls(self.host, self.port, timeout=self.timeout_s, source_address=source)
        return self._conn

    def _send(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Response:
        # A keep-alive connection the server closed while idle fails on first use: reopen once.
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=dict(headers))
                raw = conn.getresponse()
                data = raw.read()
            except _RETRYABLE:
                self.close()
                if attempt:
                    raise
                continue
            joined: dict[str, str] = {}
            for name, value in raw.getheaders():
                key = name.lower()
                joined[key] = f"{joined[key]}, {value}" if key in joined else value
            if raw.will_close:
                self.close()
            return Response(raw.status, joined, data)
        raise AssertionError("unreachable")

    def _challenge_header(self, response: Response) -> tuple[str, str] | None:
        """Return ``(header name, value)`` solving the challenge in a 401, or None."""
        if response.status != 401:
            return None
        try:
            challenge = _challenge_of(response.json())
        except ValueError:
            return None
        if challenge is None:
            return None
        difficulty = challenge.get("difficulty")
        if isinstance(difficulty, int) and difficulty > self.max_difficulty:
            return None
        name = challenge.get("header")
        started = self._clock()
        try:
            value = solve_challenge({"challenge": challenge})
        except ChallengeError:
            return None
        finally:
            self.work_s += self._clock() - started
        self.solved += 1
        return (name if isinstance(name, str) and name else POW_HEADER), value

    def _retry_after(self, response: Response, waited: float) -> float | None:
        if not self.wait_on_429 or response.status != 429:
            return None
        raw = response.headers.get("retry-after", "").strip()
        if not raw.isascii() or not raw.isdigit():
            return None
        delay = float(int(raw))
        return delay if waited + delay <= self.max_wait_s else None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send a request and return the final answer, after at most one solved challenge."""
        payload = body.encode("utf-8") if isinstance(body, str) else body
        base = {k.lower(): v for k, v in (headers or {}).items()}
        waited = 0.0
        challenged = False
        extra: dict[str, str] = {}
        while True:
            sent = dict(base)
            if self.pass_token:
                sent.setdefault(PASS_HEADER, self.pass_token)
            sent.update(extra)
            response = self._send(method, path, payload, sent)
            extra = {}  # a solution is single use: never send it twice
            issued = response.headers.get(PASS_HEADER, "")
            if issued:
                self.pass_token = issued
            if not challenged:
                solution = self._challenge_header(response)
                if solution is not None:
                    challenged = True
                    # The guard refused the pass we sent (expired or spent): do not resend it.
                    if not issued and sent.get(PASS_HEADER) == self.pass_token:
                        self.pass_token = ""
                    extra = {solution[0]: solution[1]}
                    continue
            delay = self._retry_after(response, waited)
            if delay is None:
                return response
            self._sleep(delay)
            waited += delay


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'name: value', got {text!r}")
    return name.strip(), value.strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``extauthz solve``: print a solution, or send a request and solve on the way.

    ``extauthz solve TOKEN DIFFICULTY`` prints the ``x-extauthz-pow`` value.
    ``extauthz solve --url URL [--method M] [--data @file|text] [--header 'k: v']...`` prints the
    status and the body; exit 0 when the status is below 400, else 1.
    """
    parser = argparse.ArgumentParser(
        prog="extauthz solve", description="Answer an extauthz proof-of-work challenge."
    )
    parser.add_argument("token", nargs="?", help="the challenge token")
    parser.add_argument("difficulty", nargs="?", type=int, help="leading zero bits")
    parser.add_argument("--url", help="send a request to URL, solving any challenge")
    parser.add_argument("--method", default=None, help="HTTP method (GET, or POST with --data)")
    parser.add_argument("--data", help="request body, or @FILE to read it from a file")
    parser.add_argument(
        "--header", action="append", type=_parse_header, default=[], help="'name: value'"
    )
    parser.add_argument("--wait-on-429", action="store_true", help="honour Retry-After")
    args = parser.parse_args(argv)

    if args.url is None:
        if args.token is None or args.difficulty is None:
            parser.error("give TOKEN DIFFICULTY, or --url URL")
        if not 0 <= args.difficulty <= MAX_DIFFICULTY:
            parser.error(f"DIFFICULTY must be in [0, {MAX_DIFFICULTY}]")
        print(f"{args.token}:{solve(args.token, args.difficulty)}")
        return 0
    if args.token is not None:
        parser.error("give either TOKEN DIFFICULTY or --url, not both")

    body: bytes | None = None
    if args.data is not None:
        body = (
            Path(args.data[1:]).read_bytes()
            if args.data.startswith("@")
            else args.data.encode("utf-8")
        )
    method = args.method or ("POST" if body is not None else "GET")
    headers = dict(args.header)
    if body is not None and not any(k.lower() == "content-type" for k in headers):
        headers["content-type"] = "application/json"
    try:
        session, path = ChallengeSession.from_url(args.url, wait_on_429=args.wait_on_429)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        with session:
            response = session.request(method, path, body=body, headers=headers)
    except OSError as exc:
        print(f"extauthz solve: {exc}", file=sys.stderr)
        return 1
    print(response.status)
    sys.stdout.write(response.body.decode("utf-8", "replace"))
    if response.body and not response.body.endswith(b"\n"):
        print()
    print(f"solved {session.solved} challenge(s) in {session.work_s:.3f} s", file=sys.stderr)
    return 0 if response.status < 400 else 1
