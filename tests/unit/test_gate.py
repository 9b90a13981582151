"""The challenge gate: every bad pass or solution is refused with its reason counted; a good
solution grants a pass that works until its expiry or its budget, and not after."""

from __future__ import annotations

import hashlib

import pytest

from extauthz.challenge import passes, pow
from extauthz.challenge.gate import ChallengeGate, binding_of
from extauthz.core.decision import Decision, DecisionCore
from extauthz.core.identity import RequestInfo
from extauthz.core.risk import Action
from extauthz.keys import KeyRing
from extauthz.policy.loader import Snapshot
from extauthz.store.memory import MemoryStore
from extauthz.telemetry import metrics
from tests.store_contract import FakeClock
from tests.unit.conftest import PolicyFromText

KEYS = KeyRing.single(b"gate-test-secret-0123456789")
ADDRESS = "198.51.100.20"


def _outcome(name: str) -> float:
    return metrics.REGISTRY.get_sample_value("extauthz_challenges_total", {"outcome": name}) or 0.0


@pytest.fixture
def snapshot(policy_from_text: PolicyFromText) -> Snapshot:
    return policy_from_text(
        """
        tiers:
          anonymous: {max_instances: 8}
        levels: {normal: challenge}
        challenge: {difficulty: {normal: 6}, bits_per_doubling: 1, ttl_s: 60, pass_ttl_s: 300, pass_budget: 5}
        """
    )


@pytest.fixture
def gate_and_core(snapshot: Snapshot, clock: FakeClock) -> tuple[ChallengeGate, DecisionCore]:
    store = MemoryStore(clock=clock)
    core = DecisionCore(lambda: snapshot, store, clock=clock, budget_s=0.05)
    counter = iter(range(10**6))
    gate = ChallengeGate(
        core, KEYS, clock=clock, random_bytes=lambda n: next(counter).to_bytes(n, "big")
    )
    return gate, core


async def _decide(
    core: DecisionCore,
    gate: ChallengeGate,
    snapshot: Snapshot,
    headers: dict[str, str],
    address: str = ADDRESS,
) -> Decision:
    info = RequestInfo(headers=headers, source_address=address)
    decision = await core.decide(info, snapshot=snapshot)
    return await gate.admit(decision, headers, snapshot)


def _solution(decision: Decision) -> str:
    assert decision.challenge is not None
    token = decision.challenge.token
    return f"{token}:{pow.solve(token, decision.challenge.difficulty)}"


class TestSolutions:
    """A valid solution grants a pass once; every bad one gets a new challenge and a counted reason."""

    async def test_valid_solution_grants_a_pass_once(self, gate_and_core, snapshot) -> None:
        gate, core = gate_and_core
        challenged = await _decide(core, gate, snapshot, {})
        assert challenged.action is Action.CHALLENGE and challenged.status == 401
        header = _solution(challenged)
        solved = await _decide(core, gate, snapshot, {"x-extauthz-pow": header})
        assert solved.action is Action.ALLOW and solved.granted_pass and solved.pass_id
        before = _outcome("replayed")
        replayed = await _decide(core, gate, snapshot, {"x-extauthz-pow": header})
        assert replayed.action is Action.CHALLENGE and not replayed.granted_pass
        assert _outcome("replayed") == before + 1

    @pytest.mark.parametrize(
        "reason", ["bad_signature", "expired", "wrong_client", "insufficient_work", "malformed"]
    )
    async def test_bad_solutions_are_refused_with_their_reason(
        self, gate_and_core, snapshot, clock, reason: str
    ) -> None:
        gate, core = gate_and_core
        challenged = await _decide(core, gate, snapshot, {})
        header = _solution(challenged)
        address = ADDRESS
        if reason == "bad_signature":
            token, nonce = header.rsplit(":", 1)
            forged = pow.issue(
                KeyRing.single(b"another-secret-0123456789").derive("challenge"),
                binding=binding_of(challenged.identity),
                difficulty=1,
                now=clock(),
                ttl_s=60,
                rng_bytes=b"x" * 16,
            )
            header = f"{forged.token}:{pow.solve(forged.token, 1)}"
        elif reason == "expired":
            clock.advance(61)
        elif reason == "wrong_client":
            address = "198.51.100.21"
        elif reason == "insufficient_work":
            token = challenged.challenge.token
            nonce = next(
                str(n)
                for n in range(10**6)
                if pow.leading_zero_bits(hashlib.sha256(f"{token}:{n}".encode()).digest()) == 0
            )
            header = f"{token}:{nonce}"
        else:
            header = "not a solution"
        before = _outcome(reason)
        again = await _decide(core, gate, snapshot, {"x-extauthz-pow": header}, address=address)
        assert again.action is Action.CHALLENGE and not again.granted_pass
        assert _outcome(reason) == before + 1


class TestPasses:
    """A pass works until its budget or its expiry, for its client only."""

    async def _pass(self, gate: ChallengeGate, core: DecisionCore, snapshot: Snapshot) -> str:
        challenged = await _decide(core, gate, snapshot, {})
        return (
            await _decide(core, gate, snapshot, {"x-extauthz-pow": _solution(challenged)})
        ).granted_pass

    async def test_budget_then_refused(self, gate_and_core, snapshot) -> None:
        gate, core = gate_and_core
        token = await self._pass(gate, core, snapshot)
        admitted = await _decide(
            core, gate, snapshot, {"cookie": f"theme=dark; extauthz_pass={token}"}
        )
        assert admitted.action is Action.ALLOW and admitted.pass_id
        assert await gate.charge_pass(admitted, snapshot, 4)  # 4 of 5
        assert not await gate.charge_pass(admitted, snapshot, 2)  # 2 more do not fit
        assert await gate.charge_pass(admitted, snapshot, 1)  # 5 of 5
        before = _outcome("pass_budget_exhausted")
        spent = await _decide(core, gate, snapshot, {"x-extauthz-pass": token})
        assert spent.action is Action.CHALLENGE
        assert _outcome("pass_budget_exhausted") == before + 1

    async def test_expired_forged_and_foreign_passes(self, gate_and_core, snapshot, clock) -> None:
        gate, core = gate_and_core
        token = await self._pass(gate, core, snapshot)
        cases = {
            "pass_bad_signature": (
                token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB"),
                ADDRESS,
                0,
            ),
            "pass_wrong_client": (token, "198.51.100.99", 0),
            "pass_expired": (token, ADDRESS, 301),
        }
        for outcome, (value, address, advance) in cases.items():
            clock.advance(advance)
            before = _outcome(outcome)
            decision = await _decide(
                core, gate, snapshot, {"x-extauthz-pass": value}, address=address
            )
            assert decision.action is Action.CHALLENGE, outcome
            assert _outcome(outcome) == before + 1, outcome

    def test_cookie_and_header_are_read(self) -> None:
        assert passes.pass_from_headers({"x-extauthz-pass": "p1.a"}) == "p1.a"
        assert passes.pass_from_headers({"cookie": "a=b; extauthz_pass=p1.b"}) == "p1.b"


class TestDifficulty:
    """Riskier clients and bigger batches get harder challenges."""

    async def test_batches_cost_more_work(self, gate_and_core, snapshot) -> None:
        gate, core = gate_and_core
        challenged = await _decide(core, gate, snapshot, {})
        single = gate.challenge(challenged, snapshot, instances=1).challenge
        batch = gate.challenge(challenged, snapshot, instances=64).challenge
        assert single is not None and batch is not None
        assert batch.difficulty == single.difficulty + 6
