"""Every Prometheus metric of the guard, declared once. Labels are bounded: never a client id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)

DECISIONS = Counter(
    "extauthz_decisions",
    "Verdicts by path (check or ext_proc), action and tier.",
    ["path", "action", "tier"],
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
    "Label-marked answers written to the evidence ledger.",
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
)
ADMIN_CALLS = Counter(
    "extauthz_admin_calls",
    "Admin API calls by method and result (ok, unauthenticated, invalid, not_found).",
    ["method", "result"],
    registry=REGISTRY,
)
READY = Gauge("extauthz_ready", "1 while serving, 0 while starting or draining.", registry=REGISTRY)
