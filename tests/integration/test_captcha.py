"""CaptchaVerifier against a local fake siteverify server, in each provider's request shape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import get_args

import aiohttp
import pytest
from aiohttp import web

from extauthz.challenge.captcha import (
    MAX_TOKEN_CHARS,
    CaptchaResult,
    CaptchaVerifier,
    Provider,
)
from tests.integration.conftest import free_port

SECRET = "0x-test-secret"
SITE_KEY = "site-key-123"
GOOD_TOKEN = "good-token"
PROVIDERS: tuple[Provider, ...] = get_args(Provider)


@dataclass
class FakeProvider:
    """A siteverify endpoint: accepts ``GOOD_TOKEN`` with ``SECRET``, records every form it gets,
    and can be told to stall, answer garbage, or fail."""

    url: str = ""
    mode: str = "normal"  # normal | stall | not_json | no_success | error_500
    forms: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def siteverify(self, request: web.Request) -> web.StreamResponse:
        assert request.content_type == "application/x-www-form-urlencoded"
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.forms.append(form)
        if self.mode == "stall":
            try:
                await asyncio.wait_for(self.release.wait(), timeout=10)
            except TimeoutError:
                pass
        if self.mode == "not_json":
            return web.Response(text="<html>upstream proxy error</html>", content_type="text/html")
        if self.mode == "no_success":
            return web.json_response({"error-codes": []})
        if self.mode == "error_500":
            return web.json_response({"success": False}, status=500)
        if form.get("secret") != SECRET:
            return web.json_response({"success": False, "error-codes": ["invalid-input-secret"]})
        if form.get("response") != GOOD_TOKEN:
            return web.json_response({"success": False, "error-codes": ["invalid-input-response"]})
        return web.json_response({"success": True, "hostname": "localhost", "error-codes": []})


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    """Serve a FakeProvider on 127.0.0.1, port 0."""
    provider = FakeProvider()
    app = web.Application()
    app.router.add_post("/siteverify", provider.siteverify)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    provider.url = f"http://127.0.0.1:{port}/siteverify"
    try:
        yield provider
    finally:
        provider.release.set()
        await runner.cleanup()


def _verifier(
    provider: Provider, url: str, *, secret: str = SECRET, timeout_s: float = 2.0
) -> CaptchaVerifier:
    return CaptchaVerifier(
        provider, secret=secret, site_key=SITE_KEY, verify_url=url, timeout_s=timeout_s
    )


@pytest.mark.parametrize("provider", PROVIDERS)
class TestVerdicts:
    """Every provider maps the siteverify answer to ok / rejected / malformed and never raises."""

    async def test_good_token_is_ok(self, provider: Provider, fake: FakeProvider) -> None:
        verifier = _verifier(provider, fake.url)
        try:
            result = await verifier.verify(GOOD_TOKEN, remote_ip="203.0.113.7")
        finally:
            await verifier.close()
        assert result == CaptchaResult(ok=True, reason="ok")

    async def test_other_token_is_rejected(self, provider: Provider, fake: FakeProvider) -> None:
        verifier = _verifier(provider, fake.url)
        try:
            result = await verifier.verify("forged-token")
        finally:
            await verifier.close()
        assert result == CaptchaResult(ok=False, reason="rejected")

    async def test_wrong_secret_is_rejected(self, provider: Provider, fake: FakeProvider) -> None:
        verifier = _verifier(provider, fake.url, secret="not-the-secret")
        try:
            result = await verifier.verify(GOOD_TOKEN)
        finally:
            await verifier.close()
        assert result == CaptchaResult(ok=False, reason="rejected")

    @pytest.mark.parametrize("mode", ["not_json", "no_success"])
    async def test_unexpected_answer_is_malformed(
        self, provider: Provider, fake: FakeProvider, mode: str
    ) -> None:
        fake.mode = mode
        verifier = _verifier(provider, fake.url)
        try:
            result = await verifier.verify(GOOD_TOKEN)
        finally:
            await verifier.close()
        assert result == CaptchaResult(ok=False, reason="malformed")

    async def test_server_error_is_unavailable(
        self, provider: Provider, fake: FakeProvider
    ) -> None:
        fake.mode = "error_500"
        verifier = _verifier(provider, fake.url)
        try:
            result = await verifier.verify(GOOD_TOKEN)
        finally:
            await verifier.close()
        assert result == CaptchaResult(ok=False, reason="unavailable")

    @pytest.mark.parametrize("token", ["", "x" * (MAX_TOKEN_CHARS + 1)])
    async def test_empty_or_oversized_token_is_malformed_without_a_call(
        self, provider: Provider, fake: FakeProvider, token: str
    ) -> None:
        verifier = _verifier(provider, fake.url)
        try:
            result = await verifier.verify(token)
        finally:
            await verifier.close()
        assert result == CaptchaResult(ok=False, reason="malformed")
        assert fake.forms == []


@pytest.mark.parametrize("provider", PROVIDERS)
class TestFailures:
    """A stalled or absent provider costs at most the time budget and yields a stable code."""

    async def test_stalled_provider_times_out_within_budget(
        self, provider: Provider, fake: FakeProvider
    ) -> None:
        fake.mode = "stall"
        verifier = _verifier(provider, fake.url, timeout_s=0.3)
        started = time.monotonic()
        try:
            result = await verifier.verify(GOOD_TOKEN)
        finally:
            await verifier.close()
        elapsed = time.monotonic() - started
        assert result == CaptchaResult(ok=False, reason="timeout")
        assert 0.25 <= elapsed < 1.5
        assert len(fake.forms) == 1  # the request did reach the provider

    async def test_closed_port_is_unavailable(self, provider: Provider) -> None:
        verifier = _verifier(provider, f"http://127.0.0.1:{free_port()}/siteverify")
        try:
            result = await verifier.verify(GOOD_TOKEN)
        finally:
            await verifier.close()
        assert result == CaptchaResult(ok=False, reason="unavailable")


class TestRequestShape:
    """Each provider gets the documented form fields: secret, response, optional remoteip, and
    hCaptcha also the expected sitekey."""

    @pytest.mark.parametrize("provider", PROVIDERS)
    async def test_form_fields(self, provider: Provider, fake: FakeProvider) -> None:
        verifier = _verifier(provider, fake.url)
        try:
            await verifier.verify(GOOD_TOKEN, remote_ip="203.0.113.7")
            await verifier.verify(GOOD_TOKEN)
        finally:
            await verifier.close()
        with_ip, without_ip = fake.forms
        expected = {"secret": SECRET, "response": GOOD_TOKEN}
        if provider == "hcaptcha":
            expected["sitekey"] = SITE_KEY
        assert without_ip == expected
        assert with_ip == {**expected, "remoteip": "203.0.113.7"}

    async def test_given_session_is_reused_and_left_open(self, fake: FakeProvider) -> None:
        async with aiohttp.ClientSession() as session:
            verifier = CaptchaVerifier(
                "turnstile",
                secret=SECRET,
                site_key=SITE_KEY,
                verify_url=fake.url,
                timeout_s=2.0,
                session=session,
            )
            assert (await verifier.verify(GOOD_TOKEN)).ok
            await verifier.close()
            assert not session.closed


class TestWidgetAndDefaults:
    """The widget and default endpoint of each provider are the documented ones."""

    @pytest.mark.parametrize(
        ("provider", "script_url", "div_class", "csp_source"),
        [
            (
                "turnstile",
                "https://challenges.cloudflare.com/turnstile/v0/api.js",
                "cf-turnstile",
                "https://challenges.cloudflare.com",
            ),
            ("hcaptcha", "https://js.hcaptcha.com/1/api.js", "h-captcha", "https://*.hcaptcha.com"),
            (
                "recaptcha",
                "https://www.google.com/recaptcha/api.js",
                "g-recaptcha",
                "https://www.gstatic.com/recaptcha/",
            ),
        ],
    )
    def test_widget(
        self, provider: Provider, script_url: str, div_class: str, csp_source: str
    ) -> None:
        widget = CaptchaVerifier(provider, secret=SECRET, site_key=SITE_KEY, timeout_s=1.0).widget()
        assert (widget.provider, widget.site_key) == (provider, SITE_KEY)
        assert (widget.script_url, widget.div_class) == (script_url, div_class)
        assert csp_source in widget.csp_sources
        assert script_url.startswith(widget.origin) or any(
            script_url.startswith(s.replace("*.", "js.")) for s in widget.csp_sources
        )

    @pytest.mark.parametrize(
        ("provider", "url"),
        [
            ("turnstile", "https://challenges.cloudflare.com/turnstile/v0/siteverify"),
            ("hcaptcha", "https://api.hcaptcha.com/siteverify"),
            ("recaptcha", "https://www.google.com/recaptcha/api/siteverify"),
        ],
    )
    def test_default_verify_url(self, provider: Provider, url: str) -> None:
        verifier = CaptchaVerifier(provider, secret=SECRET, site_key=SITE_KEY, timeout_s=1.0)
        assert verifier.verify_url == url

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"provider": "friendly", "secret": SECRET, "timeout_s": 1.0},
            {"provider": "turnstile", "secret": "", "timeout_s": 1.0},
            {"provider": "turnstile", "secret": SECRET, "timeout_s": 0.0},
        ],
    )
    def test_bad_configuration_raises(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            CaptchaVerifier(site_key=SITE_KEY, **kwargs)  # type: ignore[arg-type]
