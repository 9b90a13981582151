"""The CAPTCHA path of the challenge gate against a local fake provider: a good token grants a
pass, a bad one a new challenge, and a provider timeout follows the policy's fail mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from extauthz.challenge.gate import CaptchaRegistry, ChallengeGate
from extauthz.core.decision import DecisionCore
from extauthz.core.identity import RequestInfo
from extauthz.core.risk import Action
from extauthz.keys import KeyRing
from extauthz.policy.loader import Snapshot, parse_policy
from extauthz.store.memory import MemoryStore
from tests.store_contract import FakeClock

GOOD = "good-token"
SLOW = "slow-token"


@pytest.fixture
async def provider() -> AsyncIterator[str]:
    async def siteverify(request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("response") == SLOW:
            await asyncio.sleep(1.0)
        ok = form.get("secret") == "provider-secret" and form.get("response") == GOOD
        return web.json_response({"success": ok})

    app = web.Application()
    app.router.add_post("/siteverify", siteverify)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/siteverify"
    await runner.cleanup()


def _snapshot(url: str, fail_mode: str) -> Snapshot:
    return parse_policy(
        f"""
levels: {{normal: challenge}}
challenge:
  captcha:
    provider: turnstile
    site_key: site-key
    secret: provider-secret
    verify_url: {url}
    timeout_s: 0.2
    fail_mode: {fail_mode}
""",
        source="test",
    )


async def _admit(url: str, fail_mode: str, token: str) -> Action:
    snapshot = _snapshot(url, fail_mode)
    clock = FakeClock()
    core = DecisionCore(lambda: snapshot, MemoryStore(clock=clock), clock=clock, budget_s=0.05)
    registry = CaptchaRegistry()
    gate = ChallengeGate(core, KeyRing.random(), clock=clock, captcha=registry.for_snapshot)
    try:
        headers = {"x-extauthz-captcha": token}
        decision = await core.decide(
            RequestInfo(headers=headers, source_address="198.51.100.30"), snapshot=snapshot
        )
        admitted = await gate.admit(decision, headers, snapshot)
        assert gate.widget(snapshot) is not None
        return admitted.action
    finally:
        await registry.close()


class TestCaptchaPath:
    """The gate asks the provider, within its timeout, and follows the fail mode."""

    async def test_good_token_is_admitted(self, provider: str) -> None:
        assert await _admit(provider, "fail_closed", GOOD) is Action.ALLOW

    async def test_bad_token_is_challenged(self, provider: str) -> None:
        assert await _admit(provider, "fail_closed", "forged") is Action.CHALLENGE

    @pytest.mark.parametrize(
        ("fail_mode", "action"), [("fail_closed", Action.CHALLENGE), ("fail_open", Action.ALLOW)]
    )
    async def test_timeout_follows_the_fail_mode(
        self, provider: str, fail_mode: str, action: Action
    ) -> None:
        started = asyncio.get_running_loop().time()
        assert await _admit(provider, fail_mode, SLOW) is action
        assert (
            asyncio.get_running_loop().time() - started < 0.9
        )  # bounded by timeout_s, not the provider

    async def test_unreachable_provider_is_challenged(self) -> None:
        assert await _admit("http://127.0.0.1:9/siteverify", "fail_open", GOOD) is Action.CHALLENGE
