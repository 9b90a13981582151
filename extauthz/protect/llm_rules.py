"""Request rules for OpenAI-compatible LLM APIs: close the channels that leak a model's logits.

Applied to a parsed request before it reaches the model (pure: a document in, an outcome out):

- caps, by clamping: ``top_logprobs`` (chat) or ``logprobs`` (completions, an int there) to
  ``max_top_logprobs``; ``n`` to ``max_n``; ``max_tokens`` and ``max_completion_tokens`` to
  ``max_tokens``, which is also set (as ``max_completion_tokens`` on chat, ``max_tokens`` on
  completions) when the request gives neither, since the server's default may be unbounded;
- ``logit_bias`` together with logprobs (Carlini et al. 2024 read the output projection through
  it): ``refuse`` with a 400, ``strip`` the bias, or ``allow``;
- ``stream: true`` is refused with a 400 when the tier may not stream (answers streamed as
  server-sent events are not protected).

A capped field that is present but not a JSON integer is refused (400): lax servers read
``"20"`` or ``20.0`` as 20, so such a value would slip past the cap. Refusals carry OpenAI's
error shape so that client libraries show the message. Other APIs (embeddings, other paths) and
bodies that are not JSON objects are left unchanged: the dialect refuses what it cannot read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from extauthz.policy.model import LlmRules

__all__ = ["RuleOutcome", "apply_llm_rules", "openai_error"]

_CHAT: Final = "chat"
_COMPLETIONS: Final = "completions"
_TOKEN_FIELDS: Final = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """What the rules did to one request."""

    body: bytes | None
    """The rewritten request body (compact JSON), or None when unchanged or refused."""
    refusal: tuple[int, bytes] | None
    """``(status, body in OpenAI's error shape)`` when the request is refused."""
    changes: tuple[str, ...]
    """What was changed or refused (``top_logprobs_capped``, ``logit_bias_stripped``...): the
    reason labels of the rule metric, from a fixed set."""


_UNCHANGED: Final = RuleOutcome(None, None, ())


def openai_error(status: int, message: str, *, param: str | None, code: str) -> bytes:
    """Return an error body in OpenAI's shape, ``{"error": {message, type, param, code}}``.

    The type is ``invalid_request_error`` for client errors and ``server_error`` otherwise.
    """
    kind = "invalid_request_error" if status < 500 else "server_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def apply_llm_rules(doc: object, rules: LlmRules, *, path: str) -> RuleOutcome:
    """Apply a tier's LLM rules to a parsed request for ``path``; never raise.

    ``doc`` is not modified. Refusals come first (stream, then logit_bias, then a capped field
    of the wrong type), then the caps and the stripping, which rewrite the body.
    """
    api = _api(path)
    if api is None or not isinstance(doc, dict):
        return _UNCHANGED
    refusal = _refusal(doc, rules, api)
    if refusal is not None:
        return refusal
    new = dict(doc)
    changes: list[str] = []
    if rules.logit_bias_with_logprobs == "strip" and _has_bias(doc) and _asks_logprobs(doc, api):
        del new["logit_bias"]
        changes.append("logit_bias_stripped")
    top_field = "top_logprobs" if api == _CHAT else "logprobs"
    _clamp(new, top_field, rules.max_top_logprobs, changes)
    _clamp(new, "n", rules.max_n, changes)
    for name in _TOKEN_FIELDS:
        _clamp(new, name, rules.max_tokens, changes)
    if rules.max_tokens is not None and all(new.get(name) is None for name in _TOKEN_FIELDS):
        new["max_completion_tokens" if api == _CHAT else "max_tokens"] = rules.max_tokens
        changes.append("max_tokens_set")
    if not changes:
        return _UNCHANGED
    try:
        body = orjson.dumps(new)
    except orjson.JSONEncodeError:
        # orjson writes at most 255 levels of nesting but reads 1024: refuse what it cannot write.
        return _refuse(
            "the request nests too deeply to be rewritten",
            param=None,
            code="nesting_too_deep",
            change="rewrite_failed",
        )
    return RuleOutcome(body, None, tuple(changes))


def _api(path: str) -> str | None:
    """Tell chat from completions by the path's end (servers mount them under any prefix)."""
    route = path.partition("?")[0].rstrip("/").lower()
    if route.endswith("/chat/completions"):
        return _CHAT
    if route.endswith("/completions"):
        return _COMPLETIONS
    return None


def _refusal(doc: dict[str, Any], rules: LlmRules, api: str) -> RuleOutcome | None:
    stream = doc.get("stream")
    if rules.stream == "refuse" and stream is not None and stream is not False:
        return _refuse(
            "this tier cannot stream: answers sent as server-sent events are not protected; "
            "send the request with stream false",
            param="stream",
            code="stream_not_allowed",
            change="stream_refused",
        )
    if rules.logit_bias_with_logprobs == "refuse" and _has_bias(doc) and _asks_logprobs(doc, api):
        return _refuse(
            "logit_bias cannot be combined with logprobs or top_logprobs on this tier: together "
            "they let a client read the model's output layer; drop one of them",
            param="logit_bias",
            code="logit_bias_with_logprobs",
            change="logit_bias_refused",
        )
    capped = (
        ("top_logprobs" if api == _CHAT else "logprobs", rules.max_top_logprobs),
        ("n", rules.max_n),
        *((name, rules.max_tokens) for name in _TOKEN_FIELDS),
    )
    for name, cap in capped:
        value = doc.get(name)
        if cap is not None and value is not None and type(value) is not int:
            return _refuse(
                f"{name} must be an integer",
                param=name,
                code="invalid_type",
                change=f"{name}_invalid",
            )
    return None


def _refuse(message: str, *, param: str | None, code: str, change: str) -> RuleOutcome:
    return RuleOutcome(None, (400, openai_error(400, message, param=param, code=code)), (change,))


def _has_bias(doc: dict[str, Any]) -> bool:
    bias = doc.get("logit_bias")
    return bias is not None and bias != {}


def _asks_logprobs(doc: dict[str, Any], api: str) -> bool:
    """Tell whether the request asks for logprobs, reading lax values the way a server might.

    Chat: ``logprobs`` other than absent/null/false, or ``top_logprobs`` other than
    absent/null/0. Completions: ``logprobs`` other than absent/null/false (servers return the
    sampled tokens' logprobs even for 0).
    """
    logprobs = doc.get("logprobs")
    if logprobs is not None and logprobs is not False:
        return True
    if api == _CHAT:
        top = doc.get("top_logprobs")
        return top is not None and top is not False and top != 0
    return False


def _clamp(doc: dict[str, Any], name: str, cap: int | None, changes: list[str]) -> None:
    value = doc.get(name)
    # bool is an int subclass; _refusal has already refused every non-int value.
    if cap is not None and type(value) is int and value > cap:
        doc[name] = cap
        changes.append(f"{name}_capped")
