"""Every Prometheus metric of the guard, declared once. Labels are bounded: never a client id.

Label values come from closed sets: the policy's tier names, ``Action`` values, the stable
error codes, and the vocabularies below (``DECISION_REASONS``, ``STORE_OPS``). Dashboards and
alerts (k8s monitoring) read the names from here.

Under ``serve --workers N`` every worker process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, chosen by that variable
when prometheus-client is first imported); :func:`exposition_registry` then sums them, so any
worker's ``/metrics`` shows the whole guard under the same names and labels.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
# Set by the supervisor (workers.py) for its workers; read once, as prometheus-client does.
MULTIPROC_DIR: Final = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
# Store calls: the embedded store answers in microseconds, Redis in a fraction of a
# millisecond on a LAN; the decision budget (50 ms by default) is the upper end that matters.
_STORE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

# The closed vocabulary of the ``reason`` label of DECISIONS: the decision core's stable codes
# (core/decision.py, challenge/gate.py) and the detectors' reasons (detect/). Operator pins
# (``pinned_<level>``) fold into ``pinned``; anything else is ``other``; no reason is ``none``.
DECISION_REASONS: Final = frozenset(
    {
        "none",
        "other",
        "invalid_api_key",
        "deny_list",
        "terms_not_accepted",
        "operator_block",
        "store_unavailable",
        "rate_limited",
        "challenge_required",
        "challenge_passed",
        "pinned",
        "prada_non_normal",
        "near_duplicates",
        "cross_client_probing",
        "boundary_probing",
        "volume_spike",
        "sustained_volume",
        "input_coverage",
        "augmentation_steps",
    }
)


def reason_label(reasons: Sequence[str]) -> str:
    """Return the ``reason`` label of a decision: its first (primary) reason, the code a refusal
    body shows, mapped into ``DECISION_REASONS``; never a value from outside that set."""
    if not reasons:
        return "none"
    first = reasons[0]
    if first in DECISION_REASONS:
        return first
    return "pinned" if first.startswith("pinned_") else "other"


DECISIONS = Counter(
    "extauthz_decisions",
    "Verdicts by path (check or ext_proc), action, tier and primary reason (a closed set: "
    "deny_list, rate_limited, challenge_required, a detector's reason, ..., other, none).",
    ["path", "action", "tier", "reason"],
    registry=REGISTRY,
)
DECISION_SECONDS = Histogram(
    "extauthz_decision_seconds",
    "Time to decide one request, by path.",
    ["path"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ERRORS = Counter(
    "extauthz_errors",
    "Errors and rejections by stable reason code (store_unavailable, body_parse_error, ...).",
    ["reason"],
    registry=REGISTRY,
)
INSTANCES = Counter(
    "extauthz_instances",
    "Model instances counted on protected routes, by tier.",
    ["tier"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "extauthz_tokens",
    "LLM tokens charged from answers' usage, by tier.",
    ["tier"],
    registry=REGISTRY,
)
LIMITED = Counter(
    "extauthz_rate_limited",
    "Requests refused by a limit, by unit (requests, instances, tokens) and scope.",
    ["unit", "scope"],
    registry=REGISTRY,
)
CHALLENGES = Counter(
    "extauthz_challenges",
    "Challenge outcomes: issued, solved, pass_ok, replayed, expired, bad_signature, wrong_client, "
    "insufficient_work, malformed, pass_budget_exhausted, captcha_<reason>, ...",
    ["outcome"],
    registry=REGISTRY,
)
DETECTIONS = Counter(
    "extauthz_detections",
    "Detector verdicts scoring 0.5 or more, by detector and reason.",
    ["detector", "reason"],
    registry=REGISTRY,
)
LEVEL_CHANGES = Counter(
    "extauthz_risk_level_changes",
    "Clients whose detected risk level changed, by the new level.",
    ["level"],
    registry=REGISTRY,
)
EVIDENCE = Counter(
    "extauthz_evidence_records",
    "Label-marked answers handed to the evidence ledger (queued for a shared one; failed "
    "writes count as errors ledger_unavailable, ledger_dropped).",
    registry=REGISTRY,
)
BODY_REWRITES = Counter(
    "extauthz_body_rewrites",
    "Model responses rewritten by an output policy, by dialect and policy.",
    ["dialect", "policy"],
    registry=REGISTRY,
)
DISTORTION_L1 = Histogram(
    "extauthz_rewrite_l1",
    "Mean L1 distance between original and served outputs over the instances of a rewritten answer.",
    buckets=(0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
    registry=REGISTRY,
)
TOP1_CHANGED = Counter(
    "extauthz_rewrite_top1_changed",
    "Rewritten instances whose top-1 class changed (label_only and top_k never; watermarks may).",
    registry=REGISTRY,
)
REQUEST_RULES = Counter(
    "extauthz_request_rules",
    "LLM request rules applied, by rule (top_logprobs_capped, logit_bias_refused, ...).",
    ["rule"],
    registry=REGISTRY,
)
STREAMS = Counter(
    "extauthz_extproc_streams",
    "ext_proc streams by outcome (complete, passthrough, immediate, aborted, error).",
    ["outcome"],
    registry=REGISTRY,
)
POLICY_RELOADS = Counter(
    "extauthz_policy_reloads",
    "Policy files applied after a change.",
    registry=REGISTRY,
)
POLICY_RELOAD_ERRORS = Counter(
    "extauthz_policy_reload_errors",
    "Policy changes refused because the new file was invalid (the old policy stays).",
    registry=REGISTRY,
)
POLICY_INFO = Gauge(
    "extauthz_policy_loaded_timestamp_seconds",
    "When the policy in force was loaded.",
    registry=REGISTRY,
    # Workers: the newest load among live workers (each polls the same file).
    multiprocess_mode="livemax",
)
ADMIN_CALLS = Counter(
    "extauthz_admin_calls",
    "Admin API calls by method and result (ok, unauthenticated, invalid, not_found).",
    ["method", "result"],
    registry=REGISTRY,
)
READY = Gauge(
    "extauthz_ready",
    "1 while serving, 0 while starting or draining.",
    registry=REGISTRY,
    # Workers: 1 only while every live worker serves (a restarting or draining one makes it 0),
    # one series without a pid label, so the ExtauthzNotReady alert reads it unchanged.
    multiprocess_mode="livemin",
)


class _Documented(Collector):
    """Sum the workers' value files, keeping each family's help text from ``REGISTRY``
    (prometheus-client's multiprocess collector alone writes "Multiprocess metric")."""

    def __init__(self, path: str) -> None:
        # prometheus-client leaves the multiprocess module untyped.
        self._merged = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]
        self._help = {family.name: family.documentation for family in REGISTRY.collect()}

    def collect(self) -> list[Metric]:
        families: list[Metric] = list(self._merged.collect())  # type: ignore[no-untyped-call]
        for family in families:
            family.documentation = self._help.get(family.name, family.documentation)
        return families


_EXPOSITION: CollectorRegistry | None = None


def exposition_registry() -> CollectorRegistry:
    """Return what ``/metrics`` serves: ``REGISTRY``, or under ``--workers`` the sum over every
    worker's files (dead workers' counters included, so totals never go backwards)."""
    global _EXPOSITION
    if MULTIPROC_DIR is None:
        return REGISTRY
    if _EXPOSITION is None:
        _EXPOSITION = CollectorRegistry(auto_describe=False)
        _EXPOSITION.register(_Documented(MULTIPROC_DIR))
    return _EXPOSITION


# --- Store calls ---------------------------------------------------------------------------------

# The Store Protocol's methods (store/base.py): the ``op`` label of the store metrics.
STORE_OPS: Final = frozenset(
    {
        "record",
        "get_client",
        "list_clients",
        "set_level",
        "load_detection",
        "save_detection",
        "reset_client",
        "ping",
        "close",
    }
)
STORE_BACKENDS: Final = frozenset({"memory", "redis"})

STORE_SECONDS = Histogram(
    "extauthz_store_seconds",
    "Time of one store call, by backend (memory, redis) and op (a Store method: record, "
    "get_client, list_clients, set_level, load_detection, save_detection, reset_client, ping, "
    "close). Failed calls are timed too.",
    ["backend", "op"],
    buckets=_STORE_BUCKETS,
    registry=REGISTRY,
)
STORE_ERRORS = Counter(
    "extauthz_store_errors",
    "Store calls that failed, by backend, op and kind (timeout, error). What the guard did "
    'without the store is counted apart: extauthz_errors_total{reason="store_unavailable"}.',
    ["backend", "op", "kind"],
    registry=REGISTRY,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")


def timed_store(
    backend: str, op: str, *, failure: type[BaseException]
) -> Callable[[Callable[_P, Awaitable[_T]]], Callable[_P, Coroutine[Any, Any, _T]]]:
    """Decorate a store method: time each call into STORE_SECONDS and count the calls that
    raise ``failure`` (the store's own error type) into STORE_ERRORS.

    The labelled children are bound once, here, so a call costs two ``perf_counter`` reads
    and one ``observe`` (about a microsecond) and allocates nothing of its own.
    """
    if backend not in STORE_BACKENDS or op not in STORE_OPS:
        raise ValueError(f"unknown store backend/op {backend!r}/{op!r}")
    observe = STORE_SECONDS.labels(backend, op).observe
    timeouts = STORE_ERRORS.labels(backend, op, "timeout")
    errors = STORE_ERRORS.labels(backend, op, "error")
    clock = time.perf_counter

    def decorate(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
        @functools.wraps(method)
        async def timed(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            started = clock()
            try:
                return await method(*args, **kwargs)
            except failure as exc:
                timed_out = isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError)
                (timeouts if timed_out else errors).inc()
                raise
            finally:
                observe(clock() - started)

        return timed

    return decorate
