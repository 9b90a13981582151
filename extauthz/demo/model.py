"""Serve small real classifiers over KServe v1 and Open Inference v2, and a toy LLM over OpenAI.

The guard needs a model worth stealing to show what it does: this module trains a small MLP on
scikit-learn's bundled digits (8x8 images, 64 features in 0..16, 10 classes) in well under a
second and serves it with aiohttp on 127.0.0.1:8081, the upstream of the reference Envoy config.
``make demo``, the end-to-end tests and the red team all talk to it.

A second victim, a multinomial logistic regression on the same split (:class:`LinearModel`),
answers KServe v1 at ``/v1/models/{name}-linear:predict`` (``digits-linear`` by default) with
full-precision softmax probabilities: the victim of the equation-solving attack of Tramèr et al.
(2016), which recovers a logistic model's weights from that many exact answers.

Beside them, ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` answer in
OpenAI's shapes from a deterministic toy, so token quotas can be shown and tested without a real
LLM: a reply is the words of the prompt (the last user message) in reverse order, capped at
``max_tokens``; a token is a whitespace-separated word; an embedding is a unit vector seeded by a
hash of the text. It is honest about being a toy: nothing is learned and nothing streams.

Chat completions also answer ``logprobs: true`` with ``top_logprobs`` (0..20) and honour
``logit_bias``, so the red team can run the logprob / logit_bias probe of Carlini et al. (2024).
The toy has a public word vocabulary of ``TOY_VOCAB_SIZE`` tokens (:func:`toy_vocabulary`; token
id = index, id 0 is ``<unk>``), a fixed seeded output projection ``W`` (V x ``TOY_HIDDEN_DIM``)
and, per (prompt, position), a hidden state seeded by a hash of the prompt:
``logits = W @ hidden`` (:func:`toy_logits`) and ``logprobs = log_softmax(logits + bias)``. The
generated token at a position is the reply word (an out-of-vocabulary word is scored as
``<unk>``): the toy's text does not sample from its distribution; the distribution, not the
text, is what the probe reads.

Run it with ``python -m extauthz.demo.model [--host H] [--port P] [--name NAME] [--seed S]``.
It prints one line when ready and serves until SIGTERM or SIGINT.

scikit-learn is imported lazily (it is the ``demo`` extra), so importing this module is cheap and
works without it; only training needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import itertools
import json
import math
import signal
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt
import structlog
from aiohttp import web

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_NAME",
    "DEFAULT_PORT",
    "EMBEDDING_DIM",
    "LINEAR_SUFFIX",
    "LLM_NAME",
    "MAX_BODY_BYTES",
    "MAX_LOGIT_BIAS",
    "MAX_N",
    "MAX_TOP_LOGPROBS",
    "N_CLASSES",
    "N_FEATURES",
    "TOY_HIDDEN_DIM",
    "TOY_VOCAB_SIZE",
    "UNK_TOKEN",
    "BadInput",
    "DemoModel",
    "LinearModel",
    "V2Request",
    "build_app",
    "chat_completion",
    "check_instances",
    "count_tokens",
    "embed",
    "embeddings",
    "load_data",
    "main",
    "parse_json",
    "parse_v1",
    "parse_v2",
    "start",
    "text_completion",
    "token_id",
    "toy_logits",
    "toy_logprobs",
    "toy_vocabulary",
    "v2_outputs",
]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8081
DEFAULT_NAME: Final = "digits"
#: The logistic victim is served as ``{name}{LINEAR_SUFFIX}`` beside the MLP (``digits-linear``).
LINEAR_SUFFIX: Final = "-linear"
# aiohttp refuses bodies above 1 MiB by default; extraction-sized batches (20,000 rows) are ~2 MB.
MAX_BODY_BYTES: Final = 16 * 1024 * 1024

N_FEATURES: Final = 64
N_CLASSES: Final = 10
FEATURE_MAX: Final = 16.0

INPUT_NAME: Final = "input-0"
PROBA_NAME: Final = "probabilities"
LABEL_NAME: Final = "label"
OUTPUT_NAMES: Final = (PROBA_NAME, LABEL_NAME)
MODEL_VERSION: Final = "1"
# Open Inference numeric tensor types; BOOL and BYTES make no sense for pixel intensities.
NUMERIC_DATATYPES: Final = frozenset(
    {"FP16", "FP32", "FP64"}
    | {f"INT{bits}" for bits in (8, 16, 32, 64)}
    | {f"UINT{bits}" for bits in (8, 16, 32, 64)}
)

# The toy LLM: default and largest completion length (in words), most choices, embedding width.
DEFAULT_MAX_TOKENS: Final = 16
MAX_TOKENS_LIMIT: Final = 4096
MAX_N: Final = 128
EMBEDDING_DIM: Final = 16
STREAMING_REFUSED: Final = "streaming is not supported by the demo model"
#: The model name the toy LLM answers with when a request names none.
LLM_NAME: Final = "extauthz-demo-llm"
# The toy LLM's distribution: vocabulary size, hidden width, seed of the output projection, and
# the scale of the hidden state (logits come out with a standard deviation of about 3).
TOY_VOCAB_SIZE: Final = 512
TOY_HIDDEN_DIM: Final = 16
TOY_SEED: Final = 1729
HIDDEN_SCALE: Final = 3.0 / math.sqrt(TOY_HIDDEN_DIM)
UNK_TOKEN: Final = "<unk>"
#: OpenAI's limits: ``top_logprobs`` in 0..20, ``logit_bias`` values in [-100, 100].
MAX_TOP_LOGPROBS: Final = 20
MAX_LOGIT_BIAS: Final = 100.0

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger(__name__)


class BadInput(ValueError):
    """Mark a request the model cannot answer; the server turns it into a 400."""


def load_data(
    seed: int = 0, test_size: float = 0.25
) -> tuple[FloatArray, FloatArray, IntArray, IntArray]:
    """Return the digits as ``(X_train, X_test, y_train, y_test)``.

    Rows are raw pixel intensities (0..16) as float64, exactly what a client sends. The split is
    stratified and fixed by ``seed``, so the model, the demo traffic and the red team agree on
    which rows the model never saw.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        np.asarray(features, dtype=np.float64),
        np.asarray(labels, dtype=np.int64),
        test_size=test_size,
        random_state=seed,
        stratify=labels,
    )
    return x_train, x_test, y_train, y_test


def check_instances(x: npt.ArrayLike) -> FloatArray:
    """Return ``x`` as a float64 ``(N, 64)`` batch, or raise BadInput saying what is wrong."""
    batch = np.asarray(x, dtype=np.float64)
    if batch.ndim != 2 or batch.shape[1] != N_FEATURES:
        raise BadInput(f"expected a batch of shape [N, {N_FEATURES}], got {list(batch.shape)}")
    if batch.shape[0] == 0:
        raise BadInput("empty batch: send at least one instance")
    finite = np.isfinite(batch).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise BadInput(f"instance {row} holds a NaN or infinite value")
    return batch


def _fit(classifier: Any, seed: int) -> float:
    """Fit an sklearn classifier on the split of ``seed`` (pixels / 16); return held-out accuracy.

    One BLAS thread: on a small, busy machine a threaded BLAS oversubscribes the cores and a
    0.03 s fit takes seconds; one thread also gives the same bits however many cores there are.
    """
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    x_train, x_test, y_train, y_test = load_data(seed)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # The MLP's 300 epochs stop short of sklearn's tolerance but well past 0.95 accuracy.
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train / FEATURE_MAX, y_train)
    predicted = np.asarray(classifier.predict(x_test / FEATURE_MAX))
    return float(np.mean(predicted == y_test))


def _predict_proba(classifier: Any, x: npt.ArrayLike) -> FloatArray:
    """Return ``classifier``'s probabilities ``(N, 10)`` for a raw-pixel batch ``(N, 64)``."""
    batch = check_instances(x)
    with np.errstate(over="ignore", invalid="ignore"):
        proba = np.asarray(classifier.predict_proba(batch / FEATURE_MAX), dtype=np.float64)
    if not np.isfinite(proba).all():
        raise BadInput("input values too large for the model")
    return proba


@dataclass(frozen=True, slots=True)
class LinearModel:
    """A multinomial logistic regression on the digits: softmax(W x / 16 + b), exact on the wire.

    The victim of equation-solving extraction (Tramèr et al. 2016): each full-precision answer
    gives 9 linear equations in the 650 unknowns of ``W`` and ``b``.
    """

    # An sklearn LogisticRegression (lbfgs, multinomial); sklearn ships no type stubs.
    classifier: Any
    accuracy: float
    seed: int = 0

    n_features: ClassVar[int] = N_FEATURES
    n_classes: ClassVar[int] = N_CLASSES

    @classmethod
    def train(cls, seed: int = 0) -> LinearModel:
        """Train on the digits split of ``seed``, like :class:`DemoModel` (about 0.03 s)."""
        from sklearn.linear_model import LogisticRegression

        classifier = LogisticRegression(solver="lbfgs", max_iter=1000, random_state=seed)
        return cls(classifier=classifier, accuracy=_fit(classifier, seed), seed=seed)

    def logits(self, x: npt.ArrayLike) -> FloatArray:
        """Return the class scores ``W x / 16 + b`` ``(N, 10)``: the truth an attack recovers."""
        batch = check_instances(x)
        return np.asarray(self.classifier.decision_function(batch / FEATURE_MAX), dtype=np.float64)

    def predict_proba(self, x: npt.ArrayLike) -> FloatArray:
        """Return the softmax of :meth:`logits` ``(N, 10)`` for a batch ``(N, 64)``."""
        return _predict_proba(self.classifier, x)


@dataclass(frozen=True, slots=True)
class DemoModel:
    """A digits MLP trained at start, with its accuracy on the held-out split.

    ``linear`` is the logistic victim served beside it (None: serve the MLP alone).
    """

    # An sklearn MLPClassifier; sklearn ships no type stubs.
    classifier: Any
    accuracy: float
    seed: int = 0
    linear: LinearModel | None = None

    n_features: ClassVar[int] = N_FEATURES
    n_classes: ClassVar[int] = N_CLASSES

    @classmethod
    def train(cls, seed: int = 0) -> DemoModel:
        """Train the MLP and the logistic victim on the digits split of ``seed`` (< 1 s)."""
        from sklearn.neural_network import MLPClassifier

        classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
        return cls(
            classifier=classifier,
            accuracy=_fit(classifier, seed),
            seed=seed,
            linear=LinearModel.train(seed),
        )

    def predict_proba(self, x: npt.ArrayLike) -> FloatArray:
        """Return class probabilities ``(N, 10)`` for a batch ``(N, 64)`` in one vectorized call."""
        return _predict_proba(self.classifier, x)


@dataclass(frozen=True, slots=True)
class V2Request:
    """An Open Inference infer request reduced to what the model needs."""

    id: str | None
    instances: FloatArray
    outputs: tuple[str, ...]


def parse_json(body: bytes) -> Any:
    """Decode a request body, or raise BadInput."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadInput(f"body is not valid JSON: {exc}") from None


def _numbers(value: object, what: str) -> FloatArray:
    """Turn nested JSON lists into a float64 array, refusing ragged or non-numeric data."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError):
        raise BadInput(f"{what} is not a rectangular array of numbers") from None
    # Strings, null, objects and integers beyond int64 land in non-numeric dtypes.
    if array.dtype.kind not in "iuf":
        raise BadInput(f"{what} must hold only numbers")
    return array.astype(np.float64)


def parse_v1(payload: object) -> FloatArray:
    """Return the instances of a KServe v1 predict body ``{"instances": [[64 numbers], ...]}``."""
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadInput('expected a JSON object with "instances"')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise BadInput('"instances" must be a list')
    if not instances:
        raise BadInput("empty batch: send at least one instance")
    return check_instances(_numbers(instances, '"instances"'))


def _tensor_shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in value
    ):
        raise BadInput('"shape" must be a list of non-negative integers')
    return tuple(value)


def parse_v2(payload: object) -> V2Request:
    """Parse an Open Inference v2 infer body with one ``[N, 64]`` input tensor.

    ``data`` may be flat (row-major) or nested; ``outputs`` may name the outputs to return.
    """
    if not isinstance(payload, dict):
        raise BadInput("expected a JSON object")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInput('"id" must be a string')
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInput('"inputs" must be a list holding exactly one tensor')
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    if datatype not in NUMERIC_DATATYPES:
        raise BadInput(f'unsupported "datatype" {datatype!r}: use FP32 or another numeric type')
    shape = _tensor_shape(tensor.get("shape"))
    if len(shape) != 2 or shape[1] != N_FEATURES:
        raise BadInput(f'"shape" must be [N, {N_FEATURES}], got {list(shape)}')
    if "data" not in tensor:
        raise BadInput('the input tensor has no "data"')
    data = _numbers(tensor["data"], '"data"')
    if data.size != math.prod(shape):
        raise BadInput(
            f'"data" holds {data.size} values but "shape" {list(shape)} needs {math.prod(shape)}'
        )
    return V2Request(
        id=request_id,
        instances=check_instances(data.reshape(shape)),
        outputs=_requested_outputs(payload.get("outputs")),
    )


def _requested_outputs(value: object) -> tuple[str, ...]:
    if value is None:
        return OUTPUT_NAMES
    if not isinstance(value, list) or not value:
        raise BadInput('"outputs" must be a non-empty list of {"name": ...}')
    names = tuple(item.get("name") if isinstance(item, dict) else None for item in value)
    unknown = [name for name in names if name not in OUTPUT_NAMES]
    if unknown:
        raise BadInput(f"unknown outputs {unknown!r}: the model has {list(OUTPUT_NAMES)}")
    return tuple(name for name in OUTPUT_NAMES if name in names)


def v2_outputs(proba: FloatArray, names: Sequence[str]) -> list[dict[str, object]]:
    """Build the Open Inference output tensors for a probability batch.

    Values keep float64 precision although the tensor says FP32: JSON numbers have no width, and
    the red team's clones and the guard's rounding are measured against the exact answer.
    """
    tensors: dict[str, dict[str, object]] = {
        PROBA_NAME: {
            "name": PROBA_NAME,
            "shape": list(proba.shape),
            "datatype": "FP32",
            "data": proba.ravel().tolist(),
        },
        LABEL_NAME: {
            "name": LABEL_NAME,
            "shape": [proba.shape[0]],
            "datatype": "INT64",
            "data": np.argmax(proba, axis=1).tolist(),
        },
    }
    return [tensors[name] for name in names]


# --- the toy LLM (OpenAI-compatible) -------------------------------------------------------


def count_tokens(text: str) -> int:
    """Count the tokens of ``text`` as the toy LLM does: its whitespace-separated words."""
    return len(text.split())


def _reply_words(prompt: str, max_tokens: int) -> tuple[list[str], str]:
    """Return the reply's words (the prompt's words reversed, at most ``max_tokens``) and its
    finish reason; ``length`` says ``max_tokens`` cut it short."""
    words = prompt.split()[::-1]
    finish = "length" if len(words) > max_tokens else "stop"
    return words[:max_tokens], finish


def _reply(prompt: str, max_tokens: int) -> tuple[str, int, str]:
    """Return the reply to ``prompt``, its token count and its finish reason."""
    words, finish = _reply_words(prompt, max_tokens)
    return " ".join(words), len(words), finish


def _text_seed(text: str) -> int:
    """Return a 64-bit seed from SHA-256 of ``text``.

    SHA-256 rather than ``hash()``: Python salts string hashes per process, and the toy must
    answer the same in every process and run. ``surrogatepass``: JSON may carry lone surrogates.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


@functools.cache
def toy_vocabulary() -> tuple[str, ...]:
    """Return the toy LLM's public vocabulary: token id ``i`` is ``toy_vocabulary()[i]``.

    Id 0 is ``<unk>``; the others are two-syllable words (``baba``, ``babe``...), fixed for
    ever, so a client maps the token strings of ``top_logprobs`` back to the ids that
    ``logit_bias`` takes.
    """
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ("".join(pair) for pair in itertools.product(syllables, repeat=2))
    return (UNK_TOKEN, *itertools.islice(words, TOY_VOCAB_SIZE - 1))


@functools.cache
def _token_ids() -> Mapping[str, int]:
    return {token: i for i, token in enumerate(toy_vocabulary())}


def token_id(word: str) -> int:
    """Return the id of ``word`` in the toy vocabulary; 0 (``<unk>``) for any other word."""
    return _token_ids().get(word, 0)


@functools.cache
def _projection() -> FloatArray:
    """Return the toy's output projection ``W`` (V x h), standard normal from ``TOY_SEED``."""
    w = np.random.default_rng(TOY_SEED).standard_normal((TOY_VOCAB_SIZE, TOY_HIDDEN_DIM))
    w.setflags(write=False)
    return w


def _logit_rows(prompt: str, positions: int) -> FloatArray:
    """Return the logits ``(positions, V)`` of positions 0.. of the reply to ``prompt``."""
    seed = _text_seed(prompt)
    hidden = np.asarray(
        [
            np.random.default_rng([seed, position]).standard_normal(TOY_HIDDEN_DIM)
            for position in range(positions)
        ],
        dtype=np.float64,
    ).reshape(positions, TOY_HIDDEN_DIM)
    rows: FloatArray = (HIDDEN_SCALE * hidden) @ _projection().T
    return rows


def _log_softmax(logits: FloatArray) -> FloatArray:
    """Return ``logits - logsumexp(logits)`` along the last axis, stably."""
    top = logits.max(axis=-1, keepdims=True)
    shifted = logits - top
    result: FloatArray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def toy_logits(prompt: str, position: int) -> FloatArray:
    """Return the toy LLM's logits ``(V,)`` at reply ``position`` for ``prompt``: ``W @ hidden``.

    ``prompt`` is the last user message; earlier messages do not change the hidden state.
    """
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    row: FloatArray = _logit_rows(prompt, position + 1)[position].copy()
    return row


def toy_logprobs(prompt: str, position: int, bias: Mapping[int, float] | None = None) -> FloatArray:
    """Return ``log_softmax(toy_logits(prompt, position) + bias)`` ``(V,)``: what chat answers."""
    logits = toy_logits(prompt, position)
    for token, value in (bias or {}).items():
        logits[token] += value
    return _log_softmax(logits)


def _logit_bias(value: object) -> FloatArray:
    """Return the bias vector ``(V,)`` of a ``logit_bias`` object, or raise BadInput."""
    bias = np.zeros(TOY_VOCAB_SIZE, dtype=np.float64)
    if value is None:
        return bias
    if not isinstance(value, dict):
        raise BadInput('"logit_bias" must be an object mapping token ids to biases')
    for key, amount in value.items():
        # isdecimal alone accepts other scripts' digits; the length check keeps int() cheap.
        if not (isinstance(key, str) and key.isascii() and key.isdecimal() and len(key) <= 6):
            raise BadInput(f"logit_bias key {key!r} is not a token id")
        if int(key) >= TOY_VOCAB_SIZE:
            raise BadInput(
                f"logit_bias key {key!r} is not a token id from 0 to {TOY_VOCAB_SIZE - 1}"
            )
        if (
            isinstance(amount, bool)
            or not isinstance(amount, int | float)
            or not -MAX_LOGIT_BIAS <= amount <= MAX_LOGIT_BIAS
        ):
            raise BadInput(
                f"logit_bias[{key!r}] must be a number from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}"
            )
        bias[int(key)] = float(amount)
    return bias


@dataclass(frozen=True, slots=True, eq=False)  # an array field: no elementwise ==
class _LogprobRequest:
    """What a chat request asks of the toy's distribution."""

    logprobs: bool
    top: int
    bias: FloatArray


def _logprob_request(request: dict[str, Any]) -> _LogprobRequest:
    """Read ``logprobs``, ``top_logprobs`` and ``logit_bias`` as OpenAI does, or raise BadInput."""
    logprobs = request.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadInput('"logprobs" must be a boolean')
    if request.get("top_logprobs") is not None and logprobs is not True:
        raise BadInput('"logprobs" must be set to true when "top_logprobs" is used')
    top = _int_field(request, "top_logprobs", default=0, low=0, high=MAX_TOP_LOGPROBS)
    return _LogprobRequest(bool(logprobs), top, _logit_bias(request.get("logit_bias")))


def _logprobs_content(
    prompt: str, words: Sequence[str], asked: _LogprobRequest
) -> list[dict[str, Any]]:
    """Return OpenAI's ``logprobs.content``: one entry per reply word, with its top tokens."""
    if not words:
        return []
    logprobs = _log_softmax(_logit_rows(prompt, len(words)) + asked.bias)
    chosen = logprobs[np.arange(len(words)), [token_id(word) for word in words]]
    # Highest first; a stable sort breaks ties by token id.
    top = np.argsort(-logprobs, axis=1, kind="stable")[:, : asked.top]
    vocabulary = toy_vocabulary()
    return [
        {
            "token": word,
            "logprob": float(chosen[i]),
            "bytes": _utf8(word),
            "top_logprobs": [
                {
                    "token": vocabulary[j],
                    "logprob": float(logprobs[i, j]),
                    "bytes": _utf8(vocabulary[j]),
                }
                for j in top[i].tolist()
            ],
        }
        for i, word in enumerate(words)
    ]


def _int_field(payload: dict[str, Any], key: str, *, default: int, low: int, high: int) -> int:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadInput(f'"{key}" must be an integer from {low} to {high}')
    return value


def _llm_request(payload: object, text_key: str) -> dict[str, Any]:
    """Check what every toy LLM request shares: an object, no streaming, a string model."""
    if not isinstance(payload, dict):
        raise BadInput("expected a JSON object")
    if payload.get("stream") is True:
        raise BadInput(STREAMING_REFUSED)
    if text_key not in payload:
        raise BadInput(f'expected a JSON object with "{text_key}"')
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadInput('"model" must be a string')
    return payload


def _max_tokens(payload: dict[str, Any]) -> int:
    """Return the completion cap: ``max_completion_tokens`` (newer name) or ``max_tokens``."""
    newer = payload.get("max_completion_tokens") is not None
    key = "max_completion_tokens" if newer else "max_tokens"
    return _int_field(payload, key, default=DEFAULT_MAX_TOKENS, low=1, high=MAX_TOKENS_LIMIT)


def _usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict[str, int]:
    if completion_tokens is None:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _message_text(message: object, index: int) -> tuple[str, str]:
    """Return ``(role, text)`` of a chat message; content is a string, null or text parts."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadInput(f'messages[{index}] must be an object with a string "role"')
    content = message.get("content")
    if content is None or isinstance(content, str):
        return message["role"], content or ""
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return message["role"], " ".join(part["text"] for part in content)
    raise BadInput(f"messages[{index}].content must be a string or a list of text parts")


def chat_completion(
    payload: object, *, completion_id: str, created: int, default_model: str
) -> dict[str, Any]:
    """Answer a chat completions request: ``n`` equal replies to the last user message.

    ``usage`` counts the words of every message once as the prompt and the words of every
    choice as the completion, as OpenAI counts ``n`` choices. With ``logprobs: true`` each
    choice carries ``logprobs.content`` (``top_logprobs`` tokens per position, under
    ``logit_bias``); without it, choices carry no ``logprobs`` key.
    """
    request = _llm_request(payload, "messages")
    messages = request["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadInput('"messages" must be a non-empty list')
    texts = [_message_text(message, i) for i, message in enumerate(messages)]
    user = [text for role, text in texts if role == "user"]
    if not user:
        raise BadInput('"messages" must hold a message with role "user"')
    n = _int_field(request, "n", default=1, low=1, high=MAX_N)
    asked = _logprob_request(request)
    words, finish = _reply_words(user[-1], _max_tokens(request))
    tokens = len(words)
    choice: dict[str, Any] = {"message": {"role": "assistant", "content": " ".join(words)}}
    if asked.logprobs:
        # The same distribution for every choice: the toy does not sample.
        choice["logprobs"] = {"content": _logprobs_content(user[-1], words, asked)}
    choice["finish_reason"] = finish
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": request.get("model") or default_model,
        "choices": [{"index": i, **choice} for i in range(n)],
        "usage": _usage(sum(count_tokens(text) for _, text in texts), n * tokens),
    }


def _texts(value: object, key: str) -> list[str]:
    """Return the prompts (or inputs) of a string or a non-empty list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    raise BadInput(
        f'"{key}" must be a string or a non-empty list of strings '
        "(the demo model reads text, not token ids)"
    )


def text_completion(
    payload: object, *, completion_id: str, created: int, default_model: str
) -> dict[str, Any]:
    """Answer a completions request: ``n`` replies per prompt, indexed prompt by prompt."""
    request = _llm_request(payload, "prompt")
    prompts = _texts(request["prompt"], "prompt")
    n = _int_field(request, "n", default=1, low=1, high=MAX_N)
    max_tokens = _max_tokens(request)
    choices: list[dict[str, Any]] = []
    completion_tokens = 0
    for p, prompt in enumerate(prompts):
        text, tokens, finish = _reply(prompt, max_tokens)
        completion_tokens += n * tokens
        choices.extend(
            {"index": p * n + i, "text": text, "logprobs": None, "finish_reason": finish}
            for i in range(n)
        )
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": request.get("model") or default_model,
        "choices": choices,
        "usage": _usage(sum(map(count_tokens, prompts)), completion_tokens),
    }


def embed(texts: Sequence[str]) -> FloatArray:
    """Return one unit vector of ``EMBEDDING_DIM`` floats per text, seeded by a hash of the text
    (the same in every process and run)."""
    rows = [
        np.random.default_rng(_text_seed(text)).standard_normal(EMBEDDING_DIM) for text in texts
    ]
    vectors = np.asarray(rows, dtype=np.float64).reshape(len(texts), EMBEDDING_DIM)
    norms: FloatArray = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / norms


def embeddings(payload: object, *, default_model: str) -> dict[str, Any]:
    """Answer an embeddings request: one vector per input, float lists only."""
    request = _llm_request(payload, "input")
    texts = _texts(request["input"], "input")
    if request.get("encoding_format") not in (None, "float"):
        raise BadInput('"encoding_format" must be "float": the demo model sends no base64')
    vectors = embed(texts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": row}
            for i, row in enumerate(vectors.tolist())
        ],
        "model": request.get("model") or default_model,
        "usage": _usage(sum(map(count_tokens, texts))),
    }


def _json(payload: object, status: int = 200) -> web.Response:
    return web.json_response(payload, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure as JSON ``{"error": ...}``: 400 for bad input, never a crash."""
    try:
        return await handler(request)
    except BadInput as exc:
        return _json({"error": str(exc)}, status=400)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json({"error": exc.text or exc.reason}, status=exc.status)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("demo_model_error", path=request.path)
        return _json({"error": "internal error"}, status=500)


GUARD_HEADERS = ("x-extauthz-client", "x-extauthz-tier", "x-extauthz-risk")


@web.middleware
async def _log_callers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log each request with the caller the guard named, as a model server behind extauthz would."""
    response = await handler(request)
    log.info(
        "served",
        method=request.method,
        path=request.path,
        status=response.status,
        request_id=request.headers.get("x-request-id", ""),
        **{
            name.removeprefix("x-extauthz-"): request.headers.get(name, "")
            for name in GUARD_HEADERS
        },
    )
    return response


class _Routes:
    """The HTTP handlers of one served model."""

    def __init__(self, model: DemoModel, name: str) -> None:
        self._model = model
        self._name = name
        # Completion ids: unique per server, and the same sequence on every run.
        self._ids = itertools.count(1)

    def _check_name(self, request: web.Request) -> None:
        name = request.match_info["name"]
        if name != self._name:
            raise web.HTTPNotFound(text=f"model {name!r} not found")

    def _v1_model(self, request: web.Request) -> DemoModel | LinearModel:
        """Return the model KServe v1 names: the MLP, or the logistic victim beside it."""
        name = request.match_info["name"]
        if name == self._name:
            return self._model
        if name == self._name + LINEAR_SUFFIX and self._model.linear is not None:
            return self._model.linear
        raise web.HTTPNotFound(text=f"model {name!r} not found")

    async def v1_model(self, request: web.Request) -> web.Response:
        self._v1_model(request)
        return _json({"name": request.match_info["name"], "ready": True})

    async def v1_predict(self, request: web.Request) -> web.Response:
        model = self._v1_model(request)
        instances = parse_v1(parse_json(await request.read()))
        return _json({"predictions": model.predict_proba(instances).tolist()})

    async def debug_headers(self, request: web.Request) -> web.Response:
        """Show the request headers the model received (what the guard and Envoy passed on)."""
        return _json({"headers": {k.lower(): v for k, v in request.headers.items()}})

    async def v2_server(self, request: web.Request) -> web.Response:
        return _json({"name": "extauthz-demo-model", "version": MODEL_VERSION, "extensions": []})

    async def v2_live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def v2_ready(self, request: web.Request) -> web.Response:
        return _json({"ready": True})

    async def v2_model_ready(self, request: web.Request) -> web.Response:
        self._check_name(request)
        return _json({"name": self._name, "ready": True})

    async def v2_model(self, request: web.Request) -> web.Response:
        self._check_name(request)
        return _json(
            {
                "name": self._name,
                "versions": [MODEL_VERSION],
                "platform": "sklearn_mlp",
                "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, N_FEATURES]}],
                "outputs": [
                    {"name": PROBA_NAME, "datatype": "FP32", "shape": [-1, N_CLASSES]},
                    {"name": LABEL_NAME, "datatype": "INT64", "shape": [-1]},
                ],
                "accuracy": self._model.accuracy,
            }
        )

    async def v2_infer(self, request: web.Request) -> web.Response:
        self._check_name(request)
        infer = parse_v2(parse_json(await request.read()))
        proba = self._model.predict_proba(infer.instances)
        answer: dict[str, object] = {"model_name": self._name, "model_version": MODEL_VERSION}
        if infer.id is not None:
            answer["id"] = infer.id
        answer["outputs"] = v2_outputs(proba, infer.outputs)
        return _json(answer)

    async def openai_chat(self, request: web.Request) -> web.Response:
        payload = parse_json(await request.read())
        return _json(
            chat_completion(
                payload,
                completion_id=f"chatcmpl-demo-{next(self._ids)}",
                created=int(time.time()),
                default_model=LLM_NAME,
            )
        )

    async def openai_completions(self, request: web.Request) -> web.Response:
        payload = parse_json(await request.read())
        return _json(
            text_completion(
                payload,
                completion_id=f"cmpl-demo-{next(self._ids)}",
                created=int(time.time()),
                default_model=LLM_NAME,
            )
        )

    async def openai_embeddings(self, request: web.Request) -> web.Response:
        return _json(embeddings(parse_json(await request.read()), default_model=LLM_NAME))


def build_app(model: DemoModel, *, name: str = DEFAULT_NAME) -> web.Application:
    """Return the aiohttp application serving ``model`` as ``name`` (its logistic victim, if
    any, as ``name-linear`` over KServe v1), and the toy LLM beside them."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_log_callers, _json_errors])
    routes = _Routes(model, name)
    model_path = "/models/{name:[^/:]+}"
    app.add_routes(
        [
            web.get(f"/v1{model_path}", routes.v1_model),
            web.post(f"/v1{model_path}:predict", routes.v1_predict),
            web.get("/debug/headers", routes.debug_headers),
            web.get("/v2", routes.v2_server),
            web.get("/v2/health/live", routes.v2_live),
            web.get("/v2/health/ready", routes.v2_ready),
            web.get(f"/v2{model_path}", routes.v2_model),
            web.get(f"/v2{model_path}/ready", routes.v2_model_ready),
            web.post(f"/v2{model_path}/infer", routes.v2_infer),
            web.post("/v1/chat/completions", routes.openai_chat),
            web.post("/v1/completions", routes.openai_completions),
            web.post("/v1/embeddings", routes.openai_embeddings),
        ]
    )
    return app


async def start(
    model: DemoModel,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    name: str = DEFAULT_NAME,
) -> tuple[web.AppRunner, int]:
    """Start serving ``model``; return the runner (``await runner.cleanup()`` stops) and the port.

    Pass ``port=0`` to bind a free port, as tests and the local stack do.
    """
    runner = web.AppRunner(build_app(model, name=name), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound: int = runner.addresses[0][1]
    return runner, bound


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _serve(model: DemoModel, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        runner, port = await start(model, host=args.host, port=args.port, name=args.name)
    except OSError as exc:
        print(f"demo model cannot listen on {_url(args.host, args.port)}: {exc}", file=sys.stderr)
        return 1
    print(
        f"demo model ready on {_url(args.host, port)} "
        f"(model {args.name!r}, accuracy {model.accuracy:.3f})",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m extauthz.demo.model",
        description=(
            "Serve a digits classifier over KServe v1 and Open Inference v2, a logistic one "
            "over KServe v1 as NAME-linear, and a toy LLM over OpenAI's chat, completions "
            "and embeddings APIs."
        ),
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--name", default=DEFAULT_NAME, help="model name in the URLs")
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the models, serve them until SIGTERM or SIGINT, and return the exit code."""
    args = _parse_args(argv)
    model = DemoModel.train(seed=args.seed)
    return asyncio.run(_serve(model, args))


if __name__ == "__main__":
    raise SystemExit(main())
