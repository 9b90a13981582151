"""The challenge gate: what happens to a request whose verdict is CHALLENGE.

In order: a valid pass with budget left admits it; a valid, unspent proof-of-work solution (or
CAPTCHA token) admits it and grants a pass; anything else gets a new challenge. Spent solutions
and pass budgets live in the Store as GCRA limits (a solution is a limit of one), so replicas
agree and no new store operation is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Mapping

import structlog

from extauthz.challenge import passes, pow
from extauthz.challenge.captcha import CaptchaVerifier, CaptchaWidget
from extauthz.core.decision import Decision, DecisionCore, IssuedChallenge
from extauthz.core.identity import Identity
from extauthz.core.limiter import AppliedLimit, ChargeMode, LimitCharge
from extauthz.core.risk import Action
from extauthz.keys import KeyRing, b64url
from extauthz.policy.loader import Snapshot
from extauthz.policy.model import Limit
from extauthz.telemetry import metrics

log = structlog.get_logger("extauthz.challenge")

POW_HEADER = "x-extauthz-pow"
CAPTCHA_HEADER = "x-extauthz-captcha"
# How long a spent solution is remembered, as a multiple of the challenge lifetime.
_SPENT_MEMORY = 2.0
# A pass budget refills over this many pass lifetimes: in practice, never within one.
_PASS_REFILL_LIFETIMES = 1000.0
_PASS_LIMIT = Limit(name="pass", unit="instances", rate=1.0)  # describes pass charges in answers


def binding_of(identity: Identity) -> str:
    """The opaque client binding carried by challenges and passes."""
    return hashlib.sha256(identity.client_id.encode()).hexdigest()[:32]


class ChallengeGate:
    """Admit challenged requests that bring a pass or a solution; challenge the rest."""

    def __init__(
        self,
        core: DecisionCore,
        keys: KeyRing,
        *,
        clock: Callable[[], float],
        random_bytes: Callable[[int], bytes] = os.urandom,
        captcha: Callable[[Snapshot], CaptchaVerifier | None] = lambda _: None,
    ) -> None:
        self._core = core
        self._challenge_keys = keys.derive("challenge")
        self._pass_keys = keys.derive("pass")
        self._clock = clock
        self._random = random_bytes
        self._captcha = captcha

    async def admit(
        self,
        decision: Decision,
        headers: Mapping[str, str],
        snapshot: Snapshot,
        *,
        instances: int = 1,
    ) -> Decision:
        """Turn a CHALLENGE verdict into an admission or a 401 carrying a new challenge."""
        if decision.action is not Action.CHALLENGE:
            return decision
        refused = [limit for limit in decision.limits if not limit.state.allowed]
        if refused:
            # A proof answers the challenge, not the limits: over one, the client waits first
            # (and spends no solution on a request that could not pass).
            return self._throttled(decision, refused, snapshot)
        identity = decision.identity
        binding = binding_of(identity)
        settings = snapshot.policy.challenge
        now = self._clock()
        address = identity.address if settings.bind_address else ""

        token = passes.pass_from_headers(headers)
        if token:
            check = passes.read_pass(
                self._pass_keys, token, binding=binding, address=identity.address, now=now
            )
            if check.ok and check.pass_ is not None:
                if await self._budget_left(identity, check.pass_, snapshot):
                    metrics.CHALLENGES.labels("pass_ok").inc()
                    return self._admitted(decision, pass_id=check.pass_.id)
                metrics.CHALLENGES.labels("pass_budget_exhausted").inc()
            else:
                metrics.CHALLENGES.labels(f"pass_{check.reason}").inc()

        solution = headers.get(POW_HEADER, "")
        if solution:
            verified = pow.verify(self._challenge_keys, solution, binding=binding, now=now)
            if verified.ok and await self._first_use(identity, verified.challenge_id, snapshot):
                metrics.CHALLENGES.labels("solved").inc()
                return self._grant(decision, snapshot, binding=binding, address=address, now=now)
            metrics.CHALLENGES.labels("replayed" if verified.ok else verified.reason).inc()

        captcha_token = headers.get(CAPTCHA_HEADER, "")
        verifier = self._captcha(snapshot)
        if captcha_token and verifier is not None and settings.captcha is not None:
            result = await verifier.verify(captcha_token, remote_ip=identity.address)
            metrics.CHALLENGES.labels(f"captcha_{result.reason}").inc()
            admitted = result.ok or (
                result.reason == "timeout" and settings.captcha.fail_mode == "fail_open"
            )
            if admitted:
                return self._grant(decision, snapshot, binding=binding, address=address, now=now)

        return self.challenge(decision, snapshot, instances=instances)

    def widget(self, snapshot: Snapshot) -> CaptchaWidget | None:
        """The CAPTCHA widget browsers get in the challenge page, when the policy names one."""
        verifier = self._captcha(snapshot)
        return verifier.widget() if verifier is not None else None

    def challenge(self, decision: Decision, snapshot: Snapshot, *, instances: int = 1) -> Decision:
        """A 401 with a fresh challenge, harder for riskier clients and bigger batches."""
        settings = snapshot.policy.challenge
        difficulty = settings.difficulty_for(decision.level, instances)
        issued = pow.issue(
            self._challenge_keys,
            binding=binding_of(decision.identity),
            difficulty=difficulty,
            now=self._clock(),
            ttl_s=settings.ttl_s,
            rng_bytes=self._random(16),
        )
        metrics.CHALLENGES.labels("issued").inc()
        return dataclasses.replace(
            decision,
            action=Action.CHALLENGE,
            status=401,
            reasons=(
                "challenge_required",
                *[r for r in decision.reasons if r != "challenge_required"],
            ),
            challenge=IssuedChallenge(issued.token, issued.difficulty, issued.expires_at),
        )

    async def charge_pass(self, decision: Decision, snapshot: Snapshot, instances: int) -> bool:
        """Take ``instances`` from the pass the request came with; False when the budget is short."""
        if not decision.pass_id:
            return True
        charge = self._pass_charge(decision.pass_id, snapshot, instances, ChargeMode.CHARGE)
        charged = await self._core.charge(
            decision.identity, requests=0, instances=0, limits=[(_PASS_LIMIT, charge)]
        )
        if charged.record is None or not charged.record.limits:
            return True  # the store's fail mode already decided; do not refuse on a missing answer
        allowed = charged.record.limits[0].allowed
        if not allowed:
            metrics.CHALLENGES.labels("pass_budget_exhausted").inc()
        return allowed

    def _grant(
        self, decision: Decision, snapshot: Snapshot, *, binding: str, address: str, now: float
    ) -> Decision:
        settings = snapshot.policy.challenge
        pass_id = self._random(16)
        token = passes.issue_pass(
            self._pass_keys,
            binding=binding,
            address=address,
            ttl_s=settings.pass_ttl_s,
            budget=settings.pass_budget,
            now=now,
            rng_bytes=pass_id,
        )
        return dataclasses.replace(
            self._admitted(decision, pass_id=b64url(pass_id)), granted_pass=token
        )

    def _throttled(
        self, decision: Decision, refused: list[AppliedLimit], snapshot: Snapshot
    ) -> Decision:
        """The 429 of a challenged client over a limit, as ``DecisionCore.apply_limits`` gives
        an allowed one (which it leaves challenged)."""
        worst = max(refused, key=lambda limit: limit.state.retry_after_s)
        metrics.LIMITED.labels(worst.unit, worst.scope).inc()
        throttled = self._core.verdict(
            Action.THROTTLE,
            decision.identity,
            decision.level,
            ("rate_limited", *decision.reasons),
            snapshot,
        )
        return dataclasses.replace(
            throttled,
            limits=decision.limits,
            refused_by=worst,
            retry_after_s=max(1, math.ceil(worst.state.retry_after_s)),
        )

    @staticmethod
    def _admitted(decision: Decision, *, pass_id: str) -> Decision:
        return dataclasses.replace(
            decision,
            action=Action.ALLOW,
            status=200,
            reasons=(*decision.reasons, "challenge_passed"),
            pass_id=pass_id,
        )

    async def _budget_left(
        self, identity: Identity, pass_: passes.Pass, snapshot: Snapshot
    ) -> bool:
        charge = self._pass_charge(pass_.id, snapshot, 1, ChargeMode.PROBE)
        charged = await self._core.charge(
            identity, requests=0, instances=0, limits=[(_PASS_LIMIT, charge)]
        )
        return (
            charged.record is None or not charged.record.limits or charged.record.limits[0].allowed
        )

    async def _first_use(self, identity: Identity, challenge_id: str, snapshot: Snapshot) -> bool:
        """Mark a solution spent; True only the first time (on every replica)."""
        ttl = snapshot.policy.challenge.ttl_s * _SPENT_MEMORY
        charge = LimitCharge(f"s:{challenge_id}", "spent", ttl, 1, 1, ChargeMode.CHARGE)
        charged = await self._core.charge(
            identity, requests=0, instances=0, limits=[(_PASS_LIMIT, charge)]
        )
        if charged.record is None or not charged.record.limits:
            # The store is down: a solution cannot be checked for reuse, so it is not accepted.
            return False
        return charged.record.limits[0].allowed

    @staticmethod
    def _pass_charge(pass_id: str, snapshot: Snapshot, cost: int, mode: ChargeMode) -> LimitCharge:
        """A pass's budget as a GCRA limit that practically never refills within its lifetime.

        The policy in force sets the budget, so a reload applies to passes already out.
        """
        settings = snapshot.policy.challenge
        budget = settings.pass_budget
        interval = settings.pass_ttl_s * _PASS_REFILL_LIFETIMES / budget
        return LimitCharge(f"p:{pass_id}", "budget", interval, budget, cost, mode)


class CaptchaRegistry:
    """One CAPTCHA verifier per provider configuration of the policy in force."""

    def __init__(self) -> None:
        self._verifiers: dict[object, CaptchaVerifier] = {}

    def for_snapshot(self, snapshot: Snapshot) -> CaptchaVerifier | None:
        config = snapshot.policy.challenge.captcha
        if config is None:
            return None
        verifier = self._verifiers.get(config)
        if verifier is None:
            verifier = self._verifiers[config] = CaptchaVerifier(
                config.provider,
                secret=config.secret,
                site_key=config.site_key,
                verify_url=config.verify_url,
                timeout_s=config.timeout_s,
            )
        return verifier

    async def close(self) -> None:
        for verifier in self._verifiers.values():
            await verifier.close()
        self._verifiers.clear()
