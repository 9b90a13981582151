"""The policy: one YAML document validated into immutable objects.

Pydantic does the validation because its errors carry the location of every bad field,
which ``loader`` turns into YAML paths such as ``tiers.free.max_instances``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from extauthz.core.risk import Action, RiskLevel

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# A terms version travels in a header and a JSON body: a short token, no spaces or commas.
_TERMS_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}$")
_HEADER_NAME = re.compile(r"^[a-z0-9-]+$")


def is_terms_version(value: str) -> bool:
    """Whether ``value`` is a well-formed terms version (a short header-safe token)."""
    return _TERMS_VERSION.match(value) is not None


def _terms_version(value: str) -> str:
    if not is_terms_version(value):
        raise ValueError("must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', ':', '+', '-'")
    return value


TermsVersion = Annotated[str, AfterValidator(_terms_version)]


def _network(value: object) -> object:
    """Parse a CIDR leniently (host bits allowed: 10.0.0.1/8 means 10.0.0.0/8)."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"not an IP network (CIDR): {value!r}") from None


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class ApiKey(_Frozen):
    """One API key, stored only as the SHA-256 hex digest of the key."""

    name: str = Field(description="label shown to operators; the client id is key:<name>")
    sha256: str
    tier: str
    terms_version: TermsVersion | None = Field(
        default=None, description="the terms of use version this key's holder accepted"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-63 characters of a-z, 0-9, '_', '.', '-'")
        return value

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        value = value.lower()
        if not _SHA256_HEX.match(value):
            raise ValueError("must be the 64-character hex SHA-256 of the key")
        return value


class JwtIdentity(_Frozen):
    """Where Envoy's jwt_authn filter leaves verified claims (``payload_in_metadata``)."""

    namespace: str = "envoy.filters.http.jwt_authn"
    payload_key: str = "jwt_payload"
    subject_claim: str = "sub"
    tier_claim: str = "tier"
    default_tier: str | None = Field(
        default=None,
        description="tier when the claim is missing or unknown; None: the anonymous tier",
    )


class Identity(_Frozen):
    api_key_header: str = "x-api-key"
    api_keys: tuple[ApiKey, ...] = ()
    keys_file: str | None = Field(
        default=None,
        description="YAML file with more api_keys (a k8s Secret); reloaded with the policy",
    )
    unknown_key: Literal["deny", "anonymous"] = "deny"
    jwt: JwtIdentity | None = JwtIdentity()
    anonymous_tier: str = "anonymous"

    @field_validator("api_key_header")
    @classmethod
    def _header(cls, value: str) -> str:
        return _header_name(value)


def _header_name(value: str) -> str:
    value = value.lower()
    if not _HEADER_NAME.match(value):
        raise ValueError("must be an HTTP header name")
    return value


class TermsAcceptance(_Frozen):
    """Where the guard reads the terms version a client accepted (each source may be off).

    ``jwt_claim``: a claim in the verified JWT payload (jwt_authn metadata); ``api_key``: the
    key's ``terms_version`` (policy or keys file); ``header``: a request header the operator's
    signup flow sets, which Envoy must strip from clients as it strips ``x-extauthz-*``.
    """

    jwt_claim: str | None = "terms_version"
    api_key: bool = True
    header: str | None = None

    @field_validator("header")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        return None if value is None else _header_name(value)


class TermsGrace(_Frozen):
    """A rollout window: ``previous`` still admits until ``until`` (a timezone-aware time)."""

    previous: TermsVersion
    until: AwareDatetime

    @property
    def until_s(self) -> float:
        """``until`` in seconds since the epoch (the guard's clock)."""
        return self.until.timestamp()


class Terms(_Frozen):
    """The terms of use in force: told to every client, required by the tiers that say so."""

    url: str
    version: TermsVersion
    grace: TermsGrace | None = None
    accepted_from: TermsAcceptance = TermsAcceptance()

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s<>\"]+$", value):
            raise ValueError("must be an http(s) URL without spaces, '<', '>' or quotes")
        return value

    @model_validator(mode="after")
    def _grace(self) -> Terms:
        if self.grace is not None and self.grace.previous == self.version:
            raise ValueError("grace.previous: must differ from version")
        return self

    def admits(self, accepted: str, now: float) -> bool:
        """Whether a client that accepted version ``accepted`` may use a tier requiring terms."""
        if not accepted:
            return False
        if accepted == self.version:
            return True
        grace = self.grace
        return grace is not None and accepted == grace.previous and now < grace.until_s


class OutputStep(_Frozen):
    """One step of an output pipeline (extauthz/protect/perturb.py applies them in order).

    - ``passthrough``: nothing;
    - ``round``: ``decimals`` places;
    - ``top_k``: keep the ``k`` largest probabilities of each row, zero the rest (no renormalising);
    - ``label_only``: one-hot of the argmax;
    - ``reverse_sigmoid``: ART's ReverseSigmoid(``beta``, ``gamma``), then the original argmax restored;
    - ``keyed_noise``: an argmax-preserving perturbation of size ``scale`` (log space) derived from
      HMAC(key, client, canonical input), inputs quantized to ``quantum`` so repeats and jitter get
      the same noise; embeddings get a keyed rotation whose cosine change is ``cosine_change``;
    - ``misinform``: Adaptive Misinformation (Kariyappa & Qureshi 2020) at the gateway: rows whose
      top-1 probability is at most ``below`` get their top class swapped with a keyed other class
      (one per top class, the same for every client), so a clone trained on them learns a wrong
      decision function. Meant for ``output_by_level`` of suspicious clients; it is the one step
      that changes the top-1 class on purpose.
    """

    policy: Literal[
        "passthrough",
        "round",
        "top_k",
        "label_only",
        "reverse_sigmoid",
        "keyed_noise",
        "misinform",
    ] = "passthrough"
    decimals: Annotated[int, Field(ge=0, le=12)] = 4
    k: Annotated[int, Field(ge=1)] = 3
    beta: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    gamma: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.1
    scale: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 0.5
    quantum: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    cosine_change: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.01
    below: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0


def _steps(value: object) -> object:
    """Accept one step (a mapping) or a list of steps."""
    return [value] if isinstance(value, dict) else value


def _effective(steps: tuple[OutputStep, ...]) -> tuple[OutputStep, ...]:
    """Drop passthrough steps: an empty pipeline means the answer is not touched (nor parsed)."""
    return tuple(step for step in steps if step.policy != "passthrough")


OutputPolicy = Annotated[
    tuple[OutputStep, ...], BeforeValidator(_steps), AfterValidator(_effective)
]
PASSTHROUGH: tuple[OutputStep, ...] = ()


class LlmRules(_Frozen):
    """Request rules for OpenAI-compatible APIs (the logprob channels that leak a model)."""

    max_top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_n: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    # logit_bias together with logprobs lets a client read the projection layer: refuse or strip.
    logit_bias_with_logprobs: Literal["allow", "strip", "refuse"] = "refuse"
    # Server-sent events are not protected chunk by chunk yet: refuse them, or pass them unprotected.
    stream: Literal["refuse", "pass"] = "refuse"


WINDOWS_S: dict[str, float] = {
    "second": 1.0,
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86_400.0,
    "month": 30 * 86_400.0,
}


class Limit(_Frozen):
    """``rate`` units per ``per`` for one key (scope), as GCRA with ``burst`` (core/limiter.py).

    Without ``burst`` the whole window's budget may be spent at once: a quota. ``unit``:
    requests (charged in Check), instances (charged when ext_proc has counted the body) or
    tokens (charged from an OpenAI-compatible answer's ``usage`` after it is served; the
    next request is refused once spent). ``scope``: the client, its address, or its subnet
    (``subnets`` sets the prefix), so one network cannot multiply its budget with keys.
    """

    name: str | None = None
    unit: Literal["requests", "instances", "tokens"] = "requests"
    rate: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    per: Literal["second", "minute", "hour", "day", "month"] = "second"
    burst: Annotated[int, Field(gt=0)] | None = None
    scope: Literal["client", "address", "subnet"] = "client"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError("must be 1-63 characters of a-z, 0-9, '_', '.', '-'")
        return value

    @property
    def id(self) -> str:
        """The limit's name: given, or ``<unit>-per-<per>[-<scope>]``."""
        if self.name:
            return self.name
        return f"{self.unit}-per-{self.per}" + ("" if self.scope == "client" else f"-{self.scope}")

    @property
    def window_s(self) -> float:
        return WINDOWS_S[self.per]

    @property
    def quota(self) -> int:
        """Units per window, as the RateLimit-Policy field states it."""
        return max(1, math.ceil(self.rate))

    @property
    def capacity(self) -> int:
        """Units that may be taken at once (GCRA's burst)."""
        return self.burst if self.burst is not None else self.quota

    @property
    def interval_s(self) -> float:
        return self.window_s / self.rate


class Watermark(_Frozen):
    """Marks on this tier's answers that a clone learns (protect/watermark.py).

    ``label_rate``: the keyed share of inputs whose served top-1 becomes a keyed other class
    (DAWN); nested, so a higher rate marks a superset. ``soft``: a keyed periodic signal in every
    probability answer (CosWM), worth ``soft_epsilon`` of probability mass.
    """

    label_rate: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    label_rate_by_level: dict[str, Annotated[float, Field(ge=0, le=0.5)]] = Field(
        default_factory=dict
    )
    soft: bool = False
    soft_epsilon: Annotated[float, Field(ge=0, le=0.5)] = 0.05

    @field_validator("label_rate_by_level")
    @classmethod
    def _levels(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - {level.label for level in RiskLevel})
        if unknown:
            raise ValueError(
                f"unknown risk level {unknown[0]!r} (expected normal, elevated, suspicious, abusive)"
            )
        return value

    def rate_for(self, level: RiskLevel) -> float:
        """The label-mark rate for a client at ``level``: the highest entry at or below it."""
        rate = self.label_rate
        for candidate in RiskLevel:
            if candidate <= level and candidate.label in self.label_rate_by_level:
                rate = self.label_rate_by_level[candidate.label]
        return rate


class Evidence(_Frozen):
    """The evidence ledger of marked answers."""

    max_records: Annotated[int, Field(ge=1)] = 1_000_000
    retention_s: Annotated[float, Field(gt=0)] = 365 * 86_400.0
    encrypt: bool = True


class Tier(_Frozen):
    max_instances: Annotated[int, Field(gt=0, description="instances one request may carry")] = 64
    output: OutputPolicy = PASSTHROUGH
    # Stricter pipelines for riskier clients: the entry of the highest level at or below the
    # client's level applies; without one, ``output``.
    output_by_level: dict[Literal["elevated", "suspicious", "abusive"], OutputPolicy] = Field(
        default_factory=dict
    )
    limits: tuple[Limit, ...] = ()
    llm: LlmRules = LlmRules()
    watermark: Watermark = Watermark()
    # Admit only clients that accepted the policy's terms (or the previous ones in the grace).
    require_terms: bool = False

    def output_for(self, level: RiskLevel) -> tuple[OutputStep, ...]:
        """The output pipeline for a client at ``level``."""
        for candidate in sorted(RiskLevel, reverse=True):
            if candidate <= level and candidate.label in self.output_by_level:
                return self.output_by_level[candidate.label]
        return self.output

    @model_validator(mode="after")
    def _limits(self) -> Tier:
        seen: set[str] = set()
        for index, limit in enumerate(self.limits):
            if limit.id in seen:
                raise ValueError(
                    f"limits[{index}].name: duplicate limit {limit.id!r} (give each a name)"
                )
            seen.add(limit.id)
            if limit.unit == "instances" and limit.capacity < self.max_instances:
                raise ValueError(
                    f"limits[{index}].burst: {limit.capacity} is below max_instances "
                    f"({self.max_instances}), so a full batch could never pass"
                )
        return self


class Subnets(_Frozen):
    """Prefix lengths that group addresses for ``scope: subnet`` limits."""

    ipv4_prefix: Annotated[int, Field(ge=8, le=32)] = 24
    ipv6_prefix: Annotated[int, Field(ge=16, le=128)] = 64


class Levels(_Frozen):
    """The action each risk level leads to."""

    normal: Action = Action.ALLOW
    elevated: Action = Action.ALLOW
    suspicious: Action = Action.CHALLENGE
    abusive: Action = Action.BLOCK

    @field_validator("normal", "elevated", "suspicious", "abusive", mode="before")
    @classmethod
    def _action(cls, value: object) -> object:
        return Action.parse(value) if isinstance(value, str) else value

    def action_for(self, level: RiskLevel) -> Action:
        action: Action = getattr(self, level.label)
        return action


class DenyList(_Frozen):
    clients: frozenset[str] = frozenset()
    key_sha256: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @field_validator("key_sha256")
    @classmethod
    def _digests(cls, values: frozenset[str]) -> frozenset[str]:
        lowered = frozenset(v.lower() for v in values)
        bad = sorted(v for v in lowered if not _SHA256_HEX.match(v))
        if bad:
            raise ValueError(f"not a SHA-256 hex digest: {bad[0]!r}")
        return lowered


class JsonPointers(_Frozen):
    """Where a generic JSON API keeps its inputs and outputs (RFC 6901 pointers)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @field_validator("inputs", "outputs")
    @classmethod
    def _pointers(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if value and not value.startswith("/"):
                raise ValueError(f"{value!r} is not a JSON pointer (it must start with '/')")
        return values


class Route(_Frozen):
    """A protected model route: requests under ``prefix`` are parsed by ``dialect``.

    ``binary``: what to do with Open Inference binary tensors (the
    ``Inference-Header-Content-Length`` extension), which the guard counts but cannot rewrite,
    and with gRPC inference (``application/grpc``), which it charges the tier's maximum batch.
    """

    prefix: str
    dialect: Literal["kserve_v1", "oip_v2", "openai", "jsonpointer", "auto"] = "auto"
    pointers: JsonPointers | None = None
    binary: Literal["refuse", "pass"] = "refuse"

    @model_validator(mode="after")
    def _pointers_for_jsonpointer(self) -> Route:
        if self.dialect == "jsonpointer" and self.pointers is None:
            raise ValueError("pointers: the jsonpointer dialect needs pointers {inputs, outputs}")
        return self

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value


class Captcha(_Frozen):
    """A CAPTCHA provider for browsers (the secret may be given here or in the keys file)."""

    provider: Literal["turnstile", "hcaptcha", "recaptcha"]
    site_key: str
    secret: str
    verify_url: str | None = None
    timeout_s: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 0.04
    # A provider that does not answer in time: let the client through, or challenge again.
    fail_mode: Literal["fail_open", "fail_closed"] = "fail_closed"


class Challenge(_Frozen):
    """Who solves what before a pass, and what a pass is worth.

    Proof-of-work difficulty (leading zero bits of SHA-256) is set per risk level and grows by
    ``bits_per_doubling`` for every doubling of the instances a request carries, so a batch of
    64 costs more work than a single query. A pass lasts ``pass_ttl_s`` and covers
    ``pass_budget`` instances, whichever ends first.
    """

    difficulty: dict[str, Annotated[int, Field(ge=1, le=32)]] = Field(
        default_factory=lambda: {"normal": 12, "elevated": 14, "suspicious": 16, "abusive": 20}
    )
    bits_per_doubling: Annotated[float, Field(ge=0, le=4)] = 1.0
    max_difficulty: Annotated[int, Field(ge=1, le=32)] = 24
    ttl_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    pass_ttl_s: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    pass_budget: Annotated[int, Field(ge=1)] = 200
    bind_address: bool = False
    captcha: Captcha | None = None

    @field_validator("difficulty")
    @classmethod
    def _levels(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - {level.label for level in RiskLevel})
        if unknown:
            raise ValueError(
                f"unknown risk level {unknown[0]!r} (expected normal, elevated, suspicious, abusive)"
            )
        return value

    def difficulty_for(self, level: RiskLevel, instances: int = 1) -> int:
        """Leading zero bits asked of a client at ``level`` whose request carries ``instances``."""
        base = self.difficulty.get(level.label, max(self.difficulty.values(), default=16))
        extra = math.ceil(self.bits_per_doubling * math.log2(max(1, instances)))
        return int(min(self.max_difficulty, base + extra))


class DetectorSettings(_Frozen):
    """One detector: its weight in the risk score, and whether it only scores and logs."""

    weight: Annotated[float, Field(ge=0, le=1)] = 1.0
    shadow: bool = False


class Detection(_Frozen):
    """Extraction detectors and how their verdicts become a risk level.

    Detectors run on protected routes after the answer (they need the predicted class and
    margin); their states live in the Store, so any replica continues them.
    """

    # Off until the detectors are calibrated on benign traffic (issue 6): on digits-like inputs
    # the fingerprint and PRADA defaults still flag natural clients.
    enabled: bool = False
    detectors: dict[
        Literal[
            "prada", "margin", "fingerprint", "cross_client", "volume", "coverage", "augmentation"
        ],
        DetectorSettings,
    ] = Field(default_factory=dict)
    elevated: Annotated[float, Field(gt=0, lt=1)] = 0.3
    suspicious: Annotated[float, Field(gt=0, lt=1)] = 0.6
    abusive: Annotated[float, Field(gt=0, le=1)] = 0.9
    hysteresis: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    half_life_s: Annotated[float, Field(gt=0)] = 3600.0
    # Share of answers with a top-2 margin under 0.1 in the model's normal traffic.
    margin_baseline: Annotated[float, Field(ge=0, le=1)] = 0.05
    # Instances per minute above which sustained volume counts (per tier limits still apply).
    sustained_per_min: Annotated[float, Field(gt=0)] = 600.0
    state_ttl_s: Annotated[float, Field(gt=0)] = 86_400.0
    # The inputs' full range, for Blacklight-style fingerprints (16 for 8x8 digits, 1 for [0, 1]).
    input_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    # A .npy file of normal traffic's projected vectors (R, 32): enables the coverage detector.
    coverage_reference: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Detection:
        if not self.elevated < self.suspicious < self.abusive:
            raise ValueError("thresholds must rise: elevated < suspicious < abusive")
        return self


class FailModes(_Frozen):
    """What happens when a part of the guard cannot answer."""

    # Store down or slower than the budget: allow (counted), refuse with 503, or decide limits
    # with a per-replica memory limiter whose budgets are divided by settings' replica count.
    store: Literal["fail_open", "fail_closed", "local"] = "fail_open"
    body: Literal["deny", "charge_max"] = "deny"


class Policy(_Frozen):
    """The whole policy; one immutable snapshot serves each request."""

    version: Literal[1] = 1
    mode: Literal["enforce", "shadow"] = "enforce"
    identity: Identity = Identity()
    tiers: dict[str, Tier] = Field(
        default_factory=lambda: {"anonymous": Tier(), "free": Tier(), "trusted": Tier()}
    )
    levels: Levels = Levels()
    deny: DenyList = DenyList()
    routes: tuple[Route, ...] = (
        Route(prefix="/v1/models/", dialect="kserve_v1"),
        Route(prefix="/v2/models/", dialect="oip_v2"),
        Route(prefix="/v1/chat/completions", dialect="openai"),
        Route(prefix="/v1/completions", dialect="openai"),
        Route(prefix="/v1/embeddings", dialect="openai"),
        Route(prefix="/inference.GRPCInferenceService/", dialect="auto", binary="refuse"),
    )
    fail_modes: FailModes = FailModes()
    retry_after_s: Annotated[int, Field(gt=0)] = 60
    subnets: Subnets = Subnets()
    challenge: Challenge = Challenge()
    detection: Detection = Detection()
    evidence: Evidence = Evidence()
    terms: Terms | None = None

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, value: dict[str, Tier]) -> dict[str, Tier]:
        if not value:
            raise ValueError("must declare at least one tier")
        for name in value:
            if not _NAME.match(name):
                raise ValueError(
                    f"tier name {name!r}: must be 1-63 characters of a-z, 0-9, '_', '.', '-'"
                )
        return value

    @model_validator(mode="after")
    def _references(self) -> Policy:
        tiers = self.tiers
        if self.identity.anonymous_tier not in tiers:
            raise ValueError(
                f"identity.anonymous_tier: unknown tier {self.identity.anonymous_tier!r}"
            )
        jwt = self.identity.jwt
        if jwt is not None and jwt.default_tier is not None and jwt.default_tier not in tiers:
            raise ValueError(f"identity.jwt.default_tier: unknown tier {jwt.default_tier!r}")
        seen: set[str] = set()
        for index, key in enumerate(self.identity.api_keys):
            if key.tier not in tiers:
                raise ValueError(f"identity.api_keys[{index}].tier: unknown tier {key.tier!r}")
            if key.sha256 in seen:
                raise ValueError(f"identity.api_keys[{index}].sha256: duplicate key")
            seen.add(key.sha256)
        if self.terms is None:
            for name, tier in tiers.items():
                if tier.require_terms:
                    raise ValueError(
                        f"tiers.{name}.require_terms: needs a top-level terms section "
                        "(url, version)"
                    )
        return self

    def tier(self, name: str) -> Tier:
        return self.tiers[name]

    def route_for(self, path: str) -> Route | None:
        """Return the first protected route whose prefix matches ``path``, ignoring case as
        Envoy's model routes do, so ``/V1/Models/`` cannot skip protection."""
        lowered = path.lower()
        for route in self.routes:
            if lowered.startswith(route.prefix.lower()):
                return route
        return None
