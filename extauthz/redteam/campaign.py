"""Run the red team's attacks and benign clients against one endpoint and report the run.

A campaign is what ``extauthz redteam`` and ``extauthz demo`` run per target: each attack of the
plan (one identity, or K for its Sybil variant), the logprob probe on an OpenAI-compatible path,
and a benign workload of natural clients; then clones are trained and scored against the victim's
own labels, read from an unguarded reference of the same model. With an admin connection to the
guard, the run also records each client's risk after every request and checks each clone
against the evidence ledger (the watermark verdict).
"""

from __future__ import annotations

import sys
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from extauthz.admin_client import AdminClient
from extauthz.challenge.client import ChallengeSession
from extauthz.demo.model import N_CLASSES, TOY_VOCAB_SIZE
from extauthz.evidence.ledger import import_jsonl
from extauthz.keys import KeyRing
from extauthz.redteam.attacks import (
    API_KEY_HEADER,
    AttackResult,
    BatchEvent,
    attack_data,
    predict_over_http,
    read_scores,
    request_body,
    run_attack,
)
from extauthz.redteam.clone import Clone, labels_of
from extauthz.redteam.llm_probe import (
    ATTACK as PROBE,
)
from extauthz.redteam.llm_probe import (
    ProbeResult,
    probe_fidelity,
    requests_needed,
    run_logprob_probe,
)
from extauthz.redteam.marks import check_clone
from extauthz.redteam.report import AttackReport, BenignReport, RunReport, evaluate
from extauthz.redteam.traffic import BenignClient, natural_pool, popular_inputs

__all__ = ["PROBE", "Endpoint", "Plan", "Reference", "reference_for", "run_campaign"]

#: The probe's prompt: any user message works, the toy's distribution depends on it.
PROBE_PROMPT: Final = "the quick brown fox jumps over the lazy dog"
PROBE_TOP_K: Final = 5

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A target: ``base_url`` (scheme, host, port) and the API keys to use there.

    Attack ``i`` takes the next ``identities`` of ``keys``; ``client_ids`` are the guard's ids
    for the same keys (``key:NAME``), for risk samples and evidence. Benign client ``j`` sends
    with ``benign_keys[j]``. No keys: every client is anonymous.
    """

    label: str
    base_url: str
    keys: Sequence[str] = ()
    client_ids: Sequence[str] = ()
    benign_keys: Sequence[str] = ()
    benign_client_ids: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send: attacks, budgets, paths, the benign workload."""

    attacks: Sequence[str]
    path: str
    budget: int = 1000
    batch: int = 32
    seed: int = 0
    identities: int = 1
    sybil: Sequence[str] = ()
    """Attacks run a second time spread over ``sybil_identities`` identities."""
    sybil_identities: int = 4
    paths: Mapping[str, str] = field(default_factory=dict)
    """Per attack, a path other than ``path`` (``equation``: the logistic victim; the probe)."""
    benign_clients: int = 0
    benign_queries: int = 400
    """Instances per benign client."""
    benign_batch: int = 8
    wait_on_429: bool = True

    def path_for(self, attack: str) -> str:
        return self.paths.get(attack, self.path)


@dataclass(frozen=True, slots=True, eq=False)
class Reference:
    """The victim's own answers, read once from an unguarded endpoint: the yardstick."""

    labels: dict[str, npt.NDArray[np.int64]]
    """Per path: the victim's top-1 class on the evaluation set."""
    logits: npt.NDArray[np.float64] | None
    """The toy LLM's relative logits at the probe's prompt (None without the probe)."""
    base_url: str | None


def _session(base_url: str) -> ChallengeSession:
    return ChallengeSession.from_url(base_url)[0]


def reference_for(plan: Plan, base_url: str | None, *, key: str | None = None) -> Reference:
    """Read the victim's labels on the evaluation set (and the probe's truth) from ``base_url``.

    Without a reference, fidelity is left out of the report.
    """
    if base_url is None:
        return Reference({}, None, None)
    x_eval = attack_data(plan.seed).x_eval
    headers = {API_KEY_HEADER: key} if key else {}
    labels: dict[str, npt.NDArray[np.int64]] = {}
    logits = None
    for attack in plan.attacks:
        path = plan.path_for(attack)
        if attack == PROBE:
            with _session(base_url) as session:
                budget = requests_needed(TOY_VOCAB_SIZE, PROBE_TOP_K)
                truth = run_logprob_probe(
                    session, path, prompt=PROBE_PROMPT, budget=budget, top_k=PROBE_TOP_K
                )
            logits = truth.logits if not np.isnan(truth.logits).any() else None
        elif path not in labels:
            with _session(base_url) as session:
                labels[path] = predict_over_http(session, path, x_eval, headers=headers)
    return Reference(labels, logits, base_url)


class _Progress:
    """A tqdm bar on a terminal; one line per finished step otherwise."""

    def __init__(self, total: int, desc: str, say: Say | None) -> None:
        from tqdm import tqdm

        self._say = say
        self._desc = desc
        self._bar = tqdm(
            total=total, desc=desc, unit="inst", file=sys.stderr, leave=False, disable=None
        )

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self, summary: str) -> None:
        self._bar.close()
        if self._say is not None:
            self._say(f"  {self._desc}: {summary}")


class _RiskSampler:
    """Record a client's risk score and level after each of its requests, from the admin API."""

    def __init__(self, admin: AdminClient | None, client_ids: Sequence[str]) -> None:
        self._admin = admin
        self._ids = list(client_ids)
        self.samples: list[dict[str, Any]] = []

    def sample(self, identity: int, sent: int) -> None:
        if self._admin is None or identity >= len(self._ids):
            return
        try:
            record = self._admin.get_client(self._ids[identity])
        except Exception:  # noqa: BLE001 - a missed sample must not stop the attack
            return
        self.samples.append(
            {
                "client": self._ids[identity],
                "sent": sent,
                "score": round(float(record.get("risk") or 0.0), 4),
                "level": record.get("effective_level") or "normal",
            }
        )


def _watermark_check(
    admin: AdminClient | None,
    keyring: KeyRing | None,
    client_ids: Sequence[str],
    probe: Any,
    *,
    noise_key: bytes | None,
    probe_labels: npt.NDArray[np.int64] | None,
) -> Callable[[Clone, AttackResult], dict[str, Any] | None] | None:
    if admin is None or keyring is None or not client_ids:
        return None

    def check(clone: Clone, result: AttackResult) -> dict[str, Any] | None:
        records = [
            record
            for client_id in client_ids
            for record in import_jsonl(admin.export_evidence(client_id))
        ]
        verdict = check_clone(
            clone,
            records,
            keyring,
            probe,
            n_classes=N_CLASSES,
            noise_key=noise_key,
            probe_labels=probe_labels,
        )
        if verdict is None:
            return None
        return {
            "verdict": verdict.verdict,
            "p_value": float(f"{verdict.p_value:.3g}"),
            "checked": verdict.checked,
            "marks": {name: float(f"{p:.3g}") for name, p in verdict.marks.items()},
        }

    return check


def _probe_report(
    result: ProbeResult, truth: npt.NDArray[np.float64] | None, path: str, risk: list[Any]
) -> AttackReport:
    fid = None if truth is None else round(probe_fidelity(result, truth), 4)
    return AttackReport(
        attack=result.attack,
        target=path,
        identities=1,
        sent=result.sent,
        answered=result.answered,
        first_refusal=result.first_refusal,
        first_refusal_by_identity=[result.first_refusal],
        work_s=round(result.work_s, 3),
        challenges=result.challenges,
        statuses={str(k): v for k, v in sorted(result.statuses.items())},
        fidelity_softmax=None,
        accuracy_softmax=None,
        fidelity_mlp=None,
        accuracy_mlp=None,
        fidelity=fid,
        accuracy=None,
        watermark=None,
        curve=[],
        risk=risk,
    )


def _summary(report: AttackReport) -> str:
    refusal = (
        "never refused"
        if report.first_refusal is None
        else f"first refusal at {report.first_refusal}"
    )
    fid = "-" if report.fidelity is None else f"{report.fidelity:.3f}"
    return f"{report.answered}/{report.sent} answered, {refusal}, fidelity {fid}"


def run_campaign(
    endpoint: Endpoint,
    plan: Plan,
    reference: Reference,
    *,
    admin: AdminClient | None = None,
    keyring: KeyRing | None = None,
    noise_key: bytes | None = None,
    say: Say | None = None,
) -> RunReport:
    """Run ``plan`` against ``endpoint``; score clones against ``reference``; return the run.

    With ``admin`` and ``keyring`` each clone gets a watermark verdict; ``noise_key`` (the
    guard's ``--noise-key-file``) adds the misinformation mark.
    """
    data = attack_data(plan.seed)
    jobs = [(name, plan.identities) for name in plan.attacks]
    jobs += [(name, plan.sybil_identities) for name in plan.sybil if name != PROBE]
    needed = sum(k for _, k in jobs)
    if endpoint.keys and len(endpoint.keys) < needed:
        raise ValueError(
            f"{endpoint.label}: {needed} attacker identities need as many keys, got {len(endpoint.keys)}"
        )
    reports: list[AttackReport] = []
    next_key = 0
    for offset, (name, identities) in enumerate(jobs):
        keys = list(endpoint.keys[next_key : next_key + identities]) if endpoint.keys else []
        ids = list(endpoint.client_ids[next_key : next_key + identities])
        if endpoint.keys:
            next_key += identities
        path = plan.path_for(name)
        sampler = _RiskSampler(admin, ids)
        label = name if identities == 1 else f"{name} (K={identities})"
        budget = plan.budget if name != PROBE else requests_needed(TOY_VOCAB_SIZE, PROBE_TOP_K)
        progress = _Progress(budget, f"{endpoint.label}: {label}", say)

        def on_batch(
            event: BatchEvent, sampler: _RiskSampler = sampler, progress: _Progress = progress
        ) -> None:
            progress.update(event.instances)
            sampler.sample(event.identity, event.sent)

        if name == PROBE:
            with _session(endpoint.base_url) as session:
                headers = {API_KEY_HEADER: keys[0]} if keys else {}
                probe = run_logprob_probe(
                    session,
                    path,
                    prompt=PROBE_PROMPT,
                    budget=budget,
                    top_k=PROBE_TOP_K,
                    headers=headers,
                    on_request=lambda sent: on_batch(BatchEvent(0, 1, sent, 0, True)),
                )
            report = _probe_report(probe, reference.logits, path, sampler.samples)
        else:
            result = run_attack(
                name,
                lambda _identity: _session(endpoint.base_url),
                path=path,
                budget=plan.budget,
                batch=plan.batch,
                rng=np.random.default_rng([plan.seed, offset]),
                pool=data.pool,
                pool_labels=data.pool_labels,
                identities=identities,
                keys=keys,
                wait_on_429=plan.wait_on_429,
                on_batch=on_batch,
            )
            report = evaluate(
                result,
                data.x_eval,
                data.y_eval,
                reference.labels.get(path),
                seed=plan.seed,
                target=path,
                watermark=_watermark_check(
                    admin,
                    keyring,
                    ids,
                    data.x_eval,
                    noise_key=noise_key,
                    probe_labels=reference.labels.get(path),
                ),
                risk=sampler.samples,
            )
        progress.close(_summary(report))
        reports.append(report)
    benign = None
    if plan.benign_clients > 0:
        benign = run_benign(endpoint, plan, reference, admin=admin, say=say)
    return RunReport(endpoint.label, endpoint.base_url, reports, benign)


def run_benign(
    endpoint: Endpoint,
    plan: Plan,
    reference: Reference,
    *,
    admin: AdminClient | None = None,
    say: Say | None = None,
) -> BenignReport:
    """Send ``plan.benign_clients`` natural clients, interleaved request by request.

    Each sends ``plan.benign_queries`` held-out digits (jittered scans, a few popular inputs
    shared by all) in small batches and solves any challenge as a browser would. A top-1 change
    is an answered instance whose class differs from the reference model's on the same input.
    """
    clients = plan.benign_clients
    if endpoint.benign_keys and len(endpoint.benign_keys) < clients:
        raise ValueError(f"{clients} benign clients need as many keys")
    pool, _ = natural_pool(plan.seed)
    rng = np.random.default_rng([plan.seed, 7])
    popular = popular_inputs(pool, 10, rng)
    sources = [
        BenignClient(pool, rng=np.random.default_rng([plan.seed, 100 + j]), popular=popular)
        for j in range(clients)
    ]
    sessions = [_session(endpoint.base_url) for _ in range(clients)]
    headers = [
        {"content-type": "application/json"}
        | ({API_KEY_HEADER: endpoint.benign_keys[j]} if endpoint.benign_keys else {})
        for j in range(clients)
    ]
    sampler = _RiskSampler(admin, endpoint.benign_client_ids)
    progress = _Progress(clients * plan.benign_queries, f"{endpoint.label}: benign", say)
    statuses: Counter[int] = Counter()
    sent_by = [0] * clients
    refusals = 0
    served_inputs: list[npt.NDArray[np.float64]] = []
    served_labels: list[npt.NDArray[np.int64]] = []
    try:
        while min(sent_by) < plan.benign_queries:
            for j in range(clients):
                n = min(plan.benign_batch, plan.benign_queries - sent_by[j])
                if n <= 0:
                    continue
                rows = sources[j].next_batch(n)
                response = sessions[j].request("POST", plan.path, request_body(rows), headers[j])
                statuses[response.status] += 1
                sent_by[j] += n
                progress.update(n)
                scores = read_scores(response, n)
                if scores is None:
                    refusals += 1
                else:
                    served_inputs.append(rows)
                    served_labels.append(labels_of(scores))
                sampler.sample(j, sent_by[j])
    finally:
        for session in sessions:
            session.close()
    answered = sum(x.shape[0] for x in served_inputs)
    changes = None
    if reference.base_url is not None and served_inputs:
        with _session(reference.base_url) as session:
            truth = predict_over_http(session, plan.path, np.concatenate(served_inputs))
        changes = round(float(np.mean(truth != np.concatenate(served_labels))), 4)
    report = BenignReport(
        clients=clients,
        queries=sum(sent_by),
        answered=answered,
        refusals=refusals,
        challenges=sum(s.solved for s in sessions),
        top1_changes=changes,
        statuses={str(k): v for k, v in sorted(statuses.items())},
        risk=sampler.samples,
    )
    progress.close(
        f"{answered}/{report.queries} answered, {refusals} refused, {report.challenges} challenges"
    )
    return report


def base_url_of(url: str) -> tuple[str, str]:
    """Split ``http://host:port/path`` into ``("http://host:port", "/path")``.

    The URL is checked by :meth:`ChallengeSession.from_url`, the parser every session uses.
    """
    path = ChallengeSession.from_url(url)[1]
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", path
