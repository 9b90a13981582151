"""CAPTCHA providers behind one interface: Cloudflare Turnstile, hCaptcha and Google reCAPTCHA.

The browser side is a ``CaptchaWidget`` (script, div class, the origins a page's CSP must allow);
the server side is ``CaptchaVerifier.verify``, which POSTs the widget's token to the provider's
siteverify endpoint within a time budget and never raises: every outcome is a ``CaptchaResult``
whose ``reason`` is a stable code (``ok``, ``rejected``, ``timeout``, ``unavailable``, ``malformed``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Final, Literal

import aiohttp

Provider = Literal["turnstile", "hcaptcha", "recaptcha"]

# Longest token forwarded to a provider. Turnstile documents 2048 characters; hCaptcha and
# reCAPTCHA tokens are of the same order. Anything longer is refused without a network call.
MAX_TOKEN_CHARS: Final = 4096
# Longest siteverify answer read: the documented answers are a few hundred bytes of JSON.
_MAX_ANSWER_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class CaptchaWidget:
    """What a challenge page needs to embed one provider's widget.

    ``origin`` is the provider's main origin; ``csp_sources`` lists every source expression
    the page's Content-Security-Policy must allow for the widget's scripts and frames (hCaptcha
    and reCAPTCHA load from more than one host).
    """

    provider: str
    site_key: str
    script_url: str
    div_class: str
    origin: str
    csp_sources: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CaptchaResult:
    """The outcome of one verification; ``reason`` is a stable code usable as a metric label."""

    ok: bool
    reason: str  # "ok" | "rejected" | "timeout" | "unavailable" | "malformed"


@dataclass(frozen=True, slots=True)
class _ProviderSpec:
    verify_url: str
    script_url: str
    div_class: str
    origin: str
    csp_sources: tuple[str, ...]
    sends_site_key: bool  # hCaptcha's siteverify takes the expected sitekey as well


# Endpoints, scripts, classes and CSP sources as each provider's documentation gives them.
_PROVIDERS: Final[dict[str, _ProviderSpec]] = {
    "turnstile": _ProviderSpec(
        verify_url="https://challenges.cloudflare.com/turnstile/v0/siteverify",
        script_url="https://challenges.cloudflare.com/turnstile/v0/api.js",
        div_class="cf-turnstile",
        origin="https://challenges.cloudflare.com",
        csp_sources=("https://challenges.cloudflare.com",),
        sends_site_key=False,
    ),
    "hcaptcha": _ProviderSpec(
        verify_url="https://api.hcaptcha.com/siteverify",
        script_url="https://js.hcaptcha.com/1/api.js",
        div_class="h-captcha",
        origin="https://hcaptcha.com",
        csp_sources=("https://hcaptcha.com", "https://*.hcaptcha.com"),
        sends_site_key=True,
    ),
    "recaptcha": _ProviderSpec(
        verify_url="https://www.google.com/recaptcha/api/siteverify",
        script_url="https://www.google.com/recaptcha/api.js",
        div_class="g-recaptcha",
        origin="https://www.google.com",
        csp_sources=(
            "https://www.google.com/recaptcha/",
            "https://www.gstatic.com/recaptcha/",
            "https://recaptcha.google.com/recaptcha/",
        ),
        sends_site_key=False,
    ),
}

_OK: Final = CaptchaResult(ok=True, reason="ok")
_REJECTED: Final = CaptchaResult(ok=False, reason="rejected")
_TIMEOUT: Final = CaptchaResult(ok=False, reason="timeout")
_UNAVAILABLE: Final = CaptchaResult(ok=False, reason="unavailable")
_MALFORMED: Final = CaptchaResult(ok=False, reason="malformed")


class CaptchaVerifier:
    """Verify widget tokens against one provider's siteverify endpoint.

    Hold one ``aiohttp.ClientSession`` (given, or made on first use and closed by ``close``),
    so that verifications reuse connections to the provider.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        secret: str,
        site_key: str,
        verify_url: str | None = None,
        timeout_s: float,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        spec = _PROVIDERS.get(provider)
        if spec is None:
            raise ValueError(
                f"unknown CAPTCHA provider {provider!r}; expected one of {sorted(_PROVIDERS)}"
            )
        if not secret:
            raise ValueError("a CAPTCHA provider needs its secret")
        if not site_key:
            raise ValueError("a CAPTCHA provider needs its site key")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self._provider: str = provider
        self._spec = spec
        self._secret = secret
        self._site_key = site_key
        self._verify_url = verify_url or spec.verify_url
        self._timeout_s = float(timeout_s)
        self._session = session
        self._owns_session = session is None

    @property
    def provider(self) -> str:
        """Return the provider's name (``turnstile``, ``hcaptcha`` or ``recaptcha``)."""
        return self._provider

    @property
    def verify_url(self) -> str:
        """Return the siteverify endpoint this verifier posts to."""
        return self._verify_url

    def widget(self) -> CaptchaWidget:
        """Return what a challenge page embeds for this provider and site key."""
        spec = self._spec
        return CaptchaWidget(
            provider=self._provider,
            site_key=self._site_key,
            script_url=spec.script_url,
            div_class=spec.div_class,
            origin=spec.origin,
            csp_sources=spec.csp_sources,
        )

    async def verify(self, token: str, *, remote_ip: str = "") -> CaptchaResult:
        """Ask the provider whether ``token`` is a fresh solution; never raise.

        Refuse empty or over-long tokens without a call ("malformed"); bound the whole exchange
        by ``timeout_s`` ("timeout"); map connection failures to "unavailable", an answer that is
        not the documented JSON object to "malformed", and ``success`` other than true to
        "rejected".
        """
        if not token or len(token) > MAX_TOKEN_CHARS:
            return _MALFORMED
        form = {"secret": self._secret, "response": token}
        if remote_ip:
            form["remoteip"] = remote_ip
        if self._spec.sends_site_key:
            form["sitekey"] = self._site_key
        try:
            async with asyncio.timeout(self._timeout_s):
                status, body = await self._post(form)
        except TimeoutError:
            return _TIMEOUT
        except (aiohttp.ClientError, OSError):
            return _UNAVAILABLE
        return _judge(status, body)

    async def close(self) -> None:
        """Close the HTTP session if this verifier made it."""
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    async def _post(self, form: dict[str, str]) -> tuple[int, bytes]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        async with self._session.post(
            self._verify_url, data=form, headers={"accept": "application/json"}
        ) as resp:
            body = await resp.content.read(_MAX_ANSWER_BYTES + 1)
            return resp.status, body


def _judge(status: int, body: bytes) -> CaptchaResult:
    """Turn a siteverify answer into a result: a 5xx is the provider being down, not a verdict."""
    if status >= 500:
        return _UNAVAILABLE
    if len(body) > _MAX_ANSWER_BYTES:
        return _MALFORMED
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _MALFORMED
    if not isinstance(answer, dict) or not isinstance(answer.get("success"), bool):
        return _MALFORMED
    if status != 200:
        return _REJECTED
    return _OK if answer["success"] is True else _REJECTED
