"""The browser challenge page: safe HTML, a tight CSP, and a real Chromium that solves it.

The pure tests read the rendered HTML. The browser tests serve the page from a tiny aiohttp
server on 127.0.0.1 that plays the guard (it checks the proof-of-work with its own SHA-256, sets
the pass cookie, and answers WELCOME to requests carrying it) and drive headless Chromium there.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from aiohttp import web

from extauthz.challenge.captcha import CaptchaWidget
from extauthz.challenge.page import (
    CAPTCHA_CALLBACK,
    CAPTCHA_HEADER,
    PAGE_CSP,
    POW_HEADER,
    page_csp,
    render_challenge_page,
)
from tests.e2e.browser import open_and_wait

EXPIRES_AT = 1_900_000_000.0
PASS_VALUE = "pass-for-tests"
TURNSTILE = CaptchaWidget(
    provider="turnstile",
    site_key="0xSITEKEY",
    script_url="https://challenges.cloudflare.com/turnstile/v0/api.js",
    div_class="cf-turnstile",
    origin="https://challenges.cloudflare.com",
    csp_sources=("https://challenges.cloudflare.com",),
)


def _render(**overrides: object) -> str:
    args: dict[str, object] = {
        "token": "c1.k1.payload.mac",
        "difficulty": 8,
        "expires_at": EXPIRES_AT,
        "retry_url": "/v1/models/iris:predict",
    }
    args.update(overrides)
    return render_challenge_page(**args).decode("utf-8")  # type: ignore[arg-type]


def _config(page: str) -> dict[str, object]:
    match = re.search(
        r'<script type="application/json" id="extauthz-challenge">(.*?)</script>', page, re.S
    )
    assert match is not None
    loaded: dict[str, object] = json.loads(match.group(1))
    return loaded


def _inline_scripts(page: str) -> list[str]:
    return re.findall(r"<script>(.*?)</script>", page, re.S)


class _UrlAttributes(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action", "data")]


def _urls_loaded(page: str) -> list[str]:
    """Return every URL the page's markup (not its script text) refers to."""
    parser = _UrlAttributes()
    parser.feed(page)
    return parser.urls


def _directives(csp: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in csp.split(";"):
        name, *values = part.split()
        out[name] = values
    return out


def _zero_bits(digest: bytes) -> int:
    return 256 - int.from_bytes(digest, "big").bit_length()


class TestEscaping:
    """Request values reach the page only as JSON data or escaped text, never as markup or code."""

    def test_hostile_values_round_trip_through_the_json_block(self) -> None:
        token = "c1.</script><script>alert(1)</script>.<!--x-->&amp;"
        retry = "/v1/x?q=\"'><img src=x onerror=alert(1)>&y=</script>"
        page = _render(token=token, retry_url=retry)
        assert "</script><script>alert(1)" not in page
        assert "<img src=x" not in page
        assert "<!--x-->" not in page
        cfg = _config(page)
        assert cfg == {
            "token": token,
            "difficulty": 8,
            "expires_at": EXPIRES_AT,
            "retry_url": retry,
            "captcha": False,
        }

    def test_widget_attributes_are_escaped(self) -> None:
        widget = CaptchaWidget(
            provider="hcaptcha",
            site_key='k"><script>alert(1)</script>',
            script_url="https://js.hcaptcha.com/1/api.js?x=1&y=2",
            div_class="h-captcha",
            origin="https://hcaptcha.com",
            csp_sources=("https://hcaptcha.com", "https://*.hcaptcha.com"),
        )
        page = _render(captcha=widget)
        assert "<script>alert(1)</script>" not in page
        assert f'data-sitekey="{html.escape(widget.site_key)}"' in page
        assert '<script src="https://js.hcaptcha.com/1/api.js?x=1&amp;y=2" async defer>' in page

    def test_page_is_utf8_with_noscript_and_status(self) -> None:
        raw = render_challenge_page(
            token="t", difficulty=3, expires_at=EXPIRES_AT, retry_url="/", captcha=None
        )
        page = raw.decode("utf-8")
        assert '<meta charset="utf-8">' in page
        assert "<noscript>" in page and "JavaScript is needed" in page
        assert 'id="status" role="status"' in page
        assert '<progress id="bar"' in page
        assert 'about <span id="expected">8</span>' in page  # 2**3 expected hashes
        assert "2030-03-17 17:46:40 UTC" in page  # EXPIRES_AT, formatted without a clock

    @pytest.mark.parametrize(
        "bad", [{"difficulty": -1}, {"difficulty": 65}, {"expires_at": float("nan")}]
    )
    def test_out_of_range_inputs_raise(self, bad: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            _render(**bad)


class TestResources:
    """The page loads nothing from elsewhere except the provider script when a widget is given."""

    def test_pow_page_has_no_external_resources(self) -> None:
        page = _render()
        assert _urls_loaded(page) == []
        assert len(_inline_scripts(page)) == 1

    def test_widget_page_embeds_div_and_one_provider_script(self) -> None:
        page = _render(captcha=TURNSTILE)
        assert _urls_loaded(page) == [TURNSTILE.script_url]
        assert (
            f'<div class="captcha cf-turnstile" data-sitekey="0xSITEKEY"\n'
            f' data-callback="{CAPTCHA_CALLBACK}"></div>'
        ) in page
        assert _config(page)["captcha"] is True
        assert '<progress id="bar"' not in page

    def test_script_names_both_headers(self) -> None:
        (script,) = _inline_scripts(_render())
        assert json.dumps(POW_HEADER) in script
        assert json.dumps(CAPTCHA_HEADER) in script
        assert "crypto.subtle.digest('SHA-256'" in script
        assert "Promise.all" in script


class TestCsp:
    """The CSP allows exactly what the page needs; the inline script is pinned by its hash."""

    def test_page_csp_directives(self) -> None:
        d = _directives(PAGE_CSP)
        assert d["default-src"] == ["'none'"]
        assert d["worker-src"] == ["blob:"]
        assert d["connect-src"] == ["'self'"]
        assert d["style-src"] == ["'unsafe-inline'"]
        assert d["img-src"] == ["data:"]
        assert d["frame-src"] == ["'none'"]
        assert d["frame-ancestors"] == ["'none'"]
        assert "'unsafe-inline'" in d["script-src"]
        assert not any(v.startswith("http") for v in d["script-src"])

    def test_script_hash_matches_the_inline_script(self) -> None:
        (script,) = _inline_scripts(_render())
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in _directives(PAGE_CSP)["script-src"]
        assert page_csp(TURNSTILE) != PAGE_CSP
        assert f"'sha256-{digest}'" in _directives(page_csp(TURNSTILE))["script-src"]

    def test_widget_csp_allows_provider_everywhere_it_is_needed(self) -> None:
        widget = CaptchaWidget(
            provider="recaptcha",
            site_key="k",
            script_url="https://www.google.com/recaptcha/api.js",
            div_class="g-recaptcha",
            origin="https://www.google.com",
            csp_sources=("https://www.google.com/recaptcha/", "https://www.gstatic.com/recaptcha/"),
        )
        d = _directives(page_csp(widget))
        for directive in ("script-src", "frame-src", "connect-src", "style-src"):
            assert "https://www.gstatic.com/recaptcha/" in d[directive], directive
        assert d["frame-src"] == list(widget.csp_sources)
        assert d["default-src"] == ["'none'"]

    def test_origin_used_when_no_sources_listed(self) -> None:
        widget = CaptchaWidget(
            "turnstile", "k", "https://a.example/api.js", "c", "https://a.example"
        )
        assert _directives(page_csp(widget))["frame-src"] == ["https://a.example"]

    @pytest.mark.parametrize("source", ["https://x; script-src *", "'unsafe-eval'", "*", ""])
    def test_source_that_could_inject_a_directive_raises(self, source: str) -> None:
        widget = CaptchaWidget("turnstile", "k", "https://a/api.js", "c", "https://a", (source,))
        with pytest.raises(ValueError):
            page_csp(widget)


# ---------------------------------------------------------------------------------------------
# Real browser


@dataclass
class FakeGuard:
    """Plays the guard for one challenge: 401 + page without a pass, cookie for a good answer."""

    page: bytes
    csp: str
    token: str
    difficulty: int
    captcha_token: str = ""
    accept_solutions: bool = True
    provider_script: str = ""
    solutions: list[str] = field(default_factory=list)
    captchas: list[str] = field(default_factory=list)

    def _pow_ok(self, answer: str) -> bool:
        token, sep, nonce = answer.rpartition(":")
        if not sep or token != self.token or not nonce:
            return False
        digest = hashlib.sha256(f"{token}:{nonce}".encode()).digest()
        return _zero_bits(digest) >= self.difficulty

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.cookies.get("extauthz_pass") == PASS_VALUE:
            return web.Response(text="WELCOME to the model API", content_type="text/plain")
        pow_answer = request.headers.get(POW_HEADER)
        captcha = request.headers.get(CAPTCHA_HEADER)
        ok = False
        if pow_answer is not None:
            self.solutions.append(pow_answer)
            ok = self.accept_solutions and self._pow_ok(pow_answer)
        elif captcha is not None:
            self.captchas.append(captcha)
            ok = bool(self.captcha_token) and captcha == self.captcha_token
        if ok:
            resp = web.Response(text="pass issued", content_type="text/plain")
            resp.set_cookie("extauthz_pass", PASS_VALUE, path="/", httponly=True, samesite="Strict")
            resp.headers["x-extauthz-pass"] = PASS_VALUE
            return resp
        return web.Response(
            status=401,
            body=self.page,
            content_type="text/html",
            charset="utf-8",
            headers={"content-security-policy": self.csp, "cache-control": "no-store"},
        )

    async def fake_provider_script(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=self.provider_script, content_type="text/javascript")


Serve = Callable[[FakeGuard], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Return a function that serves a FakeGuard on 127.0.0.1 (port 0) and gives its base URL."""
    runners: list[web.AppRunner] = []

    async def start(guard: FakeGuard) -> str:
        app = web.Application()
        app.router.add_get("/provider/api.js", guard.fake_provider_script)
        app.router.add_get("/{tail:.*}", guard.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def _browse(url: str, until: str, shot: Path) -> str:
    return await asyncio.to_thread(
        open_and_wait, url, until_text=until, screenshot=shot, timeout_s=60.0
    )


class TestInChromium:
    """Headless Chromium solves the page with Web Workers + Web Crypto and lands on the API."""

    async def test_solves_pow_and_lands_with_the_cookie(self, serve: Serve, tmp_path: Path) -> None:
        token, difficulty = "c1.k1.eyJ0ZXN0Ijp0cnVlfQ.mac", 8
        page = render_challenge_page(
            token=token, difficulty=difficulty, expires_at=EXPIRES_AT, retry_url="/v1/predict"
        )
        guard = FakeGuard(page=page, csp=PAGE_CSP, token=token, difficulty=difficulty)
        base = await serve(guard)
        shot = tmp_path / "welcome.png"
        text = await _browse(f"{base}/v1/predict", "WELCOME", shot)
        assert "WELCOME to the model API" in text
        assert shot.exists() and shot.stat().st_size > 0
        assert len(guard.solutions) == 1
        assert guard._pow_ok(guard.solutions[0])  # the guard checked it; check it once more

    async def test_rejected_solution_shows_an_error(self, serve: Serve, tmp_path: Path) -> None:
        token, difficulty = "c1.k1.stale.mac", 4
        page = render_challenge_page(
            token=token, difficulty=difficulty, expires_at=EXPIRES_AT, retry_url="/v1/predict"
        )
        guard = FakeGuard(
            page=page, csp=PAGE_CSP, token=token, difficulty=difficulty, accept_solutions=False
        )
        base = await serve(guard)
        shot = tmp_path / "rejected.png"
        text = await _browse(f"{base}/v1/predict", "did not accept", shot)
        assert "Reload to get a new challenge" in text
        assert "Start again" in text
        assert len(guard.solutions) == 1 and guard._pow_ok(guard.solutions[0])
        assert shot.stat().st_size > 0

    async def test_captcha_widget_callback_redeems_the_widget_token(
        self, serve: Serve, tmp_path: Path
    ) -> None:
        # A stand-in provider script, served from the test origin: it finds the widget div and
        # calls the page's callback with a token, as Turnstile, hCaptcha and reCAPTCHA do.
        guard = FakeGuard(
            page=b"",
            csp="",
            token="unused",
            difficulty=30,  # a PoW run would not finish in time: the widget path must be taken
            captcha_token="widget-token-42",
            provider_script=(
                "setTimeout(() => { const d = document.querySelector('.fake-captcha');"
                " window[d.dataset.callback]('widget-token-42'); }, 200);"
            ),
        )
        base = await serve(guard)
        widget = CaptchaWidget(
            provider="turnstile",
            site_key="site",
            script_url=f"{base}/provider/api.js",
            div_class="fake-captcha",
            origin=base,
        )
        guard.page = render_challenge_page(
            token="unused", difficulty=30, expires_at=EXPIRES_AT, retry_url="/v1/x", captcha=widget
        )
        guard.csp = page_csp(widget)
        shot = tmp_path / "captcha.png"
        text = await _browse(f"{base}/v1/x", "WELCOME", shot)
        assert "WELCOME" in text
        assert guard.captchas == ["widget-token-42"]
        assert guard.solutions == []
