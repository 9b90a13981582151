"""``extauthz demo``: the local stack with real Envoy, a tour of the guard, then the red team.

First a tour: benign, keyed, trusted, leaked, challenged and harvesting clients, one report each.
Then the heart of the demo: the red team's attacks and a benign workload against the model
directly (undefended) and through Envoy and the guard (defended), at a modest budget; it prints
the side-by-side table and writes the JSON and HTML reports.
"""

from __future__ import annotations

import collections
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from extauthz.admin_client import AdminClient
from extauthz.challenge.client import ChallengeSession
from extauthz.demo.client import Client, Reply
from extauthz.demo.local import LocalStack
from extauthz.demo.workspace import DEMO_POLICY, prepare
from extauthz.keys import KeyRing
from extauthz.redteam.campaign import PROBE, Endpoint, Plan, reference_for, run_campaign
from extauthz.redteam.cli import THRESHOLDS
from extauthz.redteam.html import render_html
from extauthz.redteam.report import RunReport, document, to_json, to_table

__all__ = ["DEMO_POLICY", "RED_TEAM_BUDGET", "run_demo"]

#: Instances per attack in the demo: enough for the curves to mean something, quick to run.
RED_TEAM_BUDGET = 600
#: Raw keys of the demo policy's red-team and benign identities (their names: thief-NN, user-NN).
THIEF_KEYS = [f"demo-thief-{i:02d}-key" for i in range(24)]
USER_KEYS = [f"demo-user-{i:02d}-key" for i in range(10)]
KSERVE = "/v1/models/digits:predict"
OIP = "/v2/models/digits/infer"


@dataclass
class ClientReport:
    """What one demo client sent and got back."""

    label: str
    source: str
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    instances_sent: int = 0
    instances_answered: int = 0
    max_decimals: int = 0
    notes: list[str] = field(default_factory=list)

    def record(self, reply: Reply, instances: int) -> Reply:
        self.statuses[reply.status] += 1
        self.instances_sent += instances
        if reply.status == 200:
            self.instances_answered += instances
            self.max_decimals = max(self.max_decimals, _decimals(reply.json()))
        return reply


def _kserve(rows: np.ndarray) -> dict[str, Any]:
    return {"instances": rows.tolist()}


def _oip(rows: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input-0",
                "shape": list(rows.shape),
                "datatype": "FP64",
                "data": rows.ravel().tolist(),
            }
        ]
    }


def _decimals(document: Any) -> int:
    """The most decimals any float in ``document`` shows: how much detail an answer kept."""
    if isinstance(document, float):
        text = repr(document)
        return 17 if "e" in text else len(text.split(".")[1])
    if isinstance(document, list):
        return max((_decimals(v) for v in document), default=0)
    if isinstance(document, dict):
        return max((_decimals(v) for v in document.values()), default=0)
    return 0


def run_traffic(stack: LocalStack, say: Callable[[str], None]) -> list[ClientReport]:
    """Send the demo's traffic through Envoy; return one report per client."""
    from extauthz.demo.model import load_data

    _, x_test, _, _ = load_data()
    port = stack.ports.listener
    reports: list[ClientReport] = []

    # 1. A benign anonymous user: single queries, answered with 2 decimals.
    anon = ClientReport("benign anonymous", "127.0.0.2")
    with Client(port, source=anon.source) as http:
        for row in x_test[:20]:
            reply = anon.record(http.post(KSERVE, _kserve(row[None, :])), 1)
        anon.notes.append(f"answers carry at most {anon.max_decimals} decimals (tier anonymous)")
        forged = http.post(KSERVE, _kserve(x_test[:1]), headers={"x-extauthz-tier": "trusted"})
        anon.record(forged, 1)
        anon.notes.append(
            f"forged x-extauthz-tier: trusted -> still served as anonymous ({_decimals(forged.json())} decimals at most)"
        )
    reports.append(anon)

    # 2. A free-tier customer with an API key: batches of 8, 3 decimals.
    free = ClientReport("alice (free key)", "127.0.0.4")
    with Client(port, source=free.source) as http:
        for start in range(0, 80, 8):
            reply = free.record(
                http.post(
                    KSERVE,
                    _kserve(x_test[start : start + 8]),
                    headers={"x-api-key": "demo-free-key"},
                ),
                8,
            )
        free.notes.append(f"answers carry at most {free.max_decimals} decimals (tier free)")
    reports.append(free)

    # 3. A trusted customer on Open Inference v2: full detail, large batches.
    trusted = ClientReport("bob (trusted key, OIP v2)", "127.0.0.5")
    with Client(port, source=trusted.source) as http:
        reply = trusted.record(
            http.post(OIP, _oip(x_test[:256]), headers={"x-api-key": "demo-trusted-key"}), 256
        )
        trusted.notes.append(
            f"answers carry up to {trusted.max_decimals} decimals (full precision)"
        )
    reports.append(trusted)

    # 4. A leaked key on the deny list, and a made-up key.
    leaked = ClientReport("mallory (deny-listed key)", "127.0.0.6")
    with Client(port, source=leaked.source) as http:
        reply = leaked.record(
            http.post(KSERVE, _kserve(x_test[:1]), headers={"x-api-key": "demo-stolen-key"}), 1
        )
        leaked.notes.append(f"refused: {reply.json().get('error')}")
        reply = leaked.record(
            http.post(KSERVE, _kserve(x_test[:1]), headers={"x-api-key": "guessed-key"}), 1
        )
        leaked.notes.append(f"unknown key refused: {reply.json().get('error')}")
    reports.append(leaked)

    # 5. A client an operator finds suspicious: challenged, it pays proof-of-work for a pass.
    suspect = ClientReport("suspect (pinned suspicious)", "127.0.0.7")
    with AdminClient(stack.admin_target, stack.admin_token) as admin:
        admin.set_level(f"ip:{suspect.source}", "suspicious", reason="demo")
    with Client(port, source=suspect.source) as http:
        reply = suspect.record(http.post(KSERVE, _kserve(x_test[:1])), 1)
    suspect.notes.append(
        f"challenged: {reply.status}, difficulty {reply.json()['challenge']['difficulty']} bits"
    )
    with ChallengeSession("127.0.0.1", port, source_address=suspect.source) as session:
        for row in x_test[:5]:
            body = orjson.dumps(_kserve(row[None, :]))
            answer = session.request(
                "POST", KSERVE, body=body, headers={"content-type": "application/json"}
            )
            suspect.statuses[answer.status] += 1
            suspect.instances_sent += 1
            suspect.instances_answered += answer.status == 200
        suspect.notes.append(
            f"solved {session.solved} challenge in {session.work_s * 1000:.0f} ms; its pass covered the other requests"
        )
    reports.append(suspect)

    # 6. A harvester: batches until its daily instance quota is spent, an oversized batch,
    #    then pinned abusive by an operator and blocked.
    harvester = ClientReport("harvester (anonymous)", "127.0.0.3")
    with Client(port, source=harvester.source) as http:
        for start in range(0, 16 * 20, 16):
            reply = harvester.record(http.post(KSERVE, _kserve(x_test[start : start + 16])), 16)
            if reply.status != 200:
                break
        limit = reply.json().get("limit", {})
        harvester.notes.append(
            f"daily quota of {limit.get('quota')} anonymous instances spent after "
            f"{harvester.instances_answered}: {reply.status} {reply.json().get('error')}, "
            f"Retry-After {reply.headers.get('retry-after')} s"
        )
        harvester.notes.append(f"RateLimit: {reply.headers.get('ratelimit')}")
        reply = harvester.record(http.post(KSERVE, _kserve(x_test[:64])), 64)
        harvester.notes.append(
            f"batch of 64 over the anonymous cap of 16: {reply.status} {reply.json().get('error')}"
        )
        with AdminClient(stack.admin_target, stack.admin_token) as admin:
            admin.set_level("ip:127.0.0.3", "abusive", blocked=True, reason="demo: harvesting")
        harvester.notes.append(
            "operator blocked ip:127.0.0.3 (extauthz admin set-level ... abusive --block)"
        )
        for start in range(0, 48, 16):
            reply = harvester.record(http.post(KSERVE, _kserve(x_test[start : start + 16])), 16)
        harvester.notes.append(f"after the pin: {reply.status} {reply.json().get('error')}")
    reports.append(harvester)
    return reports


def print_report(
    reports: list[ClientReport], stack: LocalStack, say: Callable[[str], None]
) -> None:
    say("")
    say(f"{'client':28} {'source':10} {'responses':24} {'instances sent/answered':>24}")
    for r in reports:
        statuses = " ".join(f"{code}x{count}" for code, count in sorted(r.statuses.items()))
        say(
            f"{r.label:28} {r.source:10} {statuses:24} {r.instances_sent:>12}/{r.instances_answered:<11}"
        )
        for note in r.notes:
            say(f"{'':4}- {note}")
    with AdminClient(stack.admin_target, stack.admin_token) as admin:
        clients = admin.list_clients(limit=50)["clients"]
    say("")
    say("what the guard recorded (extauthz admin list):")
    for c in sorted(clients, key=lambda c: c["client_id"]):
        say(
            f"    {c['client_id']:16} tier={c['tier']:9} requests={c['requests']:>4} instances={c['instances']:>5} "
            f"level={c['effective_level']:8} action={c['action']}"
        )


def expectations(reports: list[ClientReport]) -> list[str]:
    """Return what did not go as the demo promises (empty when all held)."""
    by_label = {r.label: r for r in reports}
    problems = []
    if by_label["benign anonymous"].statuses != collections.Counter({200: 21}):
        problems.append("the benign anonymous user was refused")
    if by_label["alice (free key)"].statuses != collections.Counter({200: 10}):
        problems.append("the free-tier customer was refused")
    if by_label["bob (trusted key, OIP v2)"].statuses[200] != 1:
        problems.append("the trusted customer was refused")
    if (
        by_label["benign anonymous"].max_decimals > 2
        or by_label["alice (free key)"].max_decimals > 3
    ):
        problems.append("answers kept more detail than the tier allows")
    if by_label["bob (trusted key, OIP v2)"].max_decimals <= 3:
        problems.append("the trusted customer lost detail")
    if by_label["mallory (deny-listed key)"].statuses != collections.Counter({403: 1, 401: 1}):
        problems.append("the leaked or unknown key was not refused")
    if by_label["suspect (pinned suspicious)"].statuses != collections.Counter({401: 1, 200: 5}):
        problems.append("the suspicious client was not challenged, or could not pass its challenge")
    harvester = by_label["harvester (anonymous)"].statuses
    if harvester != collections.Counter({200: 12, 429: 1, 413: 1, 403: 3}):
        problems.append("the harvester was not limited, capped and blocked")
    return problems


def red_team_plan(*, budget: int = RED_TEAM_BUDGET, seed: int = 0) -> Plan:
    """Return the demo's red-team plan: every attack, a Sybil variant, benign clients."""
    from extauthz.redteam.attacks import ATTACKS

    return Plan(
        attacks=[*ATTACKS, PROBE],
        path=KSERVE,
        budget=budget,
        batch=32,
        seed=seed,
        sybil=["jacobian"],
        sybil_identities=4,
        paths={"equation": "/v1/models/digits-linear:predict", PROBE: "/v1/chat/completions"},
        benign_clients=5,
        benign_queries=budget // 5,
    )


def run_red_team(
    stack: LocalStack, plan: Plan, say: Callable[[str], None]
) -> tuple[list[RunReport], dict[str, object]]:
    """Attack the model directly and through Envoy + guard; return both runs and the document."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    direct = f"http://127.0.0.1:{stack.ports.model}"
    reference = reference_for(plan, direct)
    undefended = run_campaign(Endpoint("undefended", direct), plan, reference, say=say)
    defended_endpoint = Endpoint(
        "defended",
        f"http://127.0.0.1:{stack.ports.listener}",
        keys=THIEF_KEYS,
        client_ids=[f"key:thief-{i:02d}" for i in range(len(THIEF_KEYS))],
        benign_keys=USER_KEYS,
        benign_client_ids=[f"key:user-{i:02d}" for i in range(len(USER_KEYS))],
    )
    keyring = KeyRing.from_file(stack.workdir / "keys.yaml")
    noise_key = (stack.workdir / "noise.key").read_bytes().strip()
    with AdminClient(stack.admin_target, stack.admin_token) as admin:
        defended = run_campaign(
            defended_endpoint,
            plan,
            reference,
            admin=admin,
            keyring=keyring,
            noise_key=noise_key,
            say=say,
        )
    runs = [undefended, defended]
    doc = document(
        runs,
        started=started,
        seed=plan.seed,
        budget=plan.budget,
        batch=plan.batch,
        dialect="kserve_v1",
        thresholds=THRESHOLDS,
    )
    return runs, doc


def red_team_problems(runs: list[RunReport]) -> list[str]:
    """Return what the red team's run shows the defense failed at (empty when it held)."""
    defended = runs[-1]
    problems = []
    if defended.benign is not None and defended.benign.refusals:
        problems.append(f"{defended.benign.refusals} benign requests were refused")
    if not any(a.first_refusal is not None for a in defended.attacks):
        problems.append("no attack was refused or challenged")
    return problems


def run_demo(
    *,
    keep: bool = False,
    workdir: Path | None = None,
    budget: int = RED_TEAM_BUDGET,
    seed: int = 0,
    report_dir: Path | None = None,
) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    say("starting the local stack: demo model, guard, Envoy (real binary) ...")
    started = time.monotonic()
    stack = LocalStack(policy=None, workdir=workdir, fixed_ports=keep)
    files = prepare(stack.workdir, seed=0)
    stack.policy = files.policy
    stack.add_guard_args(files.guard_args)
    with stack:
        say(
            f"  up in {time.monotonic() - started:.1f}s: Envoy :{stack.ports.listener} -> guard :{stack.ports.guard} "
            f"-> model :{stack.ports.model} (logs in {stack.workdir})"
        )
        say("sending benign and abusive traffic through Envoy ...")
        reports = run_traffic(stack, say)
        print_report(reports, stack, say)
        problems = expectations(reports)
        say("")
        say(
            f"red team: {len(red_team_plan().attacks) + 1} attacks x {budget} instances and "
            f"5 benign clients, against the model directly and through Envoy + guard (seed {seed}) ..."
        )
        runs, doc = run_red_team(stack, red_team_plan(budget=budget, seed=seed), say)
        out_dir = report_dir or Path.cwd()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "redteam-report.json").write_text(to_json(doc) + "\n")
        (out_dir / "redteam-report.html").write_text(render_html(doc))
        say("")
        say(to_table(doc))
        say(f"reports: {out_dir / 'redteam-report.html'} (and .json)")
        problems += red_team_problems(runs)
        if problems:
            for problem in problems:
                say(f"UNEXPECTED: {problem}")
            return 1
        say(
            "demo ok: benign clients served; the suspect paid proof-of-work for a pass; the leaked key, "
            "the harvester's spent quota, its oversized batch and the blocked client refused; "
            "the red team's clones compared with and without extauthz"
        )
        if keep:
            say(
                f"KEEP=1: the stack stays up (Envoy http://127.0.0.1:{stack.ports.listener}); Ctrl-C stops it"
            )
            try:
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
