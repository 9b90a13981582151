"""A fake model server for end-to-end tests: KServe v1, OIP v2 and OpenAI-compatible answers
with many classes, logprobs and embeddings, gzip-encoded or chunked on request.

Run as ``python -m tests.e2e.fake_upstream PORT``. Request headers steer the answer:
``x-fake-gzip: 1`` gzips it whatever ``accept-encoding`` says (the guard strips that header, and
some servers compress anyway); ``x-fake-chunked: 1`` sends it chunked, without content-length.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from typing import Any

import numpy as np
import orjson
from aiohttp import web

CLASSES = 10


def _probabilities(rows: int, classes: int, seed: bytes) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "big"))
    logits = rng.normal(0.0, 2.0, size=(rows, classes))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


async def _answer(request: web.Request, document: Any) -> web.StreamResponse:
    body = orjson.dumps(document)
    headers = {"content-type": "application/json"}
    if request.headers.get("x-fake-gzip") == "1":
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    if request.headers.get("x-fake-chunked") == "1":
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 700):
            await response.write(body[start : start + 700])
        await response.write_eof()
        return response
    return web.Response(body=body, headers=headers)


async def kserve(request: web.Request) -> web.StreamResponse:
    payload = orjson.loads(await request.read())
    classes = int(request.headers.get("x-fake-classes", CLASSES))
    # Like a real model, near-identical inputs give (here: exactly) the same answer.
    seed = np.round(np.asarray(payload["instances"], dtype=np.float64), 3).tobytes()
    p = _probabilities(len(payload["instances"]), classes, seed)
    return await _answer(request, {"predictions": p.tolist()})


async def oip(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    payload = orjson.loads(raw)
    rows = int(payload["inputs"][0]["shape"][0])
    p = _probabilities(rows, CLASSES, raw)
    return await _answer(
        request,
        {
            "model_name": request.match_info["name"],
            "outputs": [
                {
                    "name": "probabilities",
                    "shape": [rows, CLASSES],
                    "datatype": "FP64",
                    "data": p.ravel().tolist(),
                },
                {
                    "name": "label",
                    "shape": [rows],
                    "datatype": "INT64",
                    "data": p.argmax(axis=1).tolist(),
                },
            ],
        },
    )


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    payload = orjson.loads(raw)
    tokens = ["The", " answer", " is", " 42", "."]
    top = int(payload.get("top_logprobs") or 0)
    p = _probabilities(len(tokens), max(top, 1) + 3, raw)
    logprobs = None
    if payload.get("logprobs"):
        logprobs = {
            "content": [
                {
                    "token": token,
                    "logprob": float(np.log(p[i].max())),
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": f"{token}#{j}", "logprob": float(np.log(v)), "bytes": None}
                        for j, v in enumerate(sorted(p[i], reverse=True)[:top])
                    ],
                }
                for i, token in enumerate(tokens)
            ]
        }
    return await _answer(
        request,
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": payload.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                    "logprobs": logprobs,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 7,
                "completion_tokens": len(tokens),
                "total_tokens": 7 + len(tokens),
            },
        },
    )


async def embeddings(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    payload = orjson.loads(raw)
    inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
    vectors = _probabilities(len(inputs), 16, raw) - 1.0 / 16
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return await _answer(
        request,
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v.tolist()}
                for i, v in enumerate(vectors)
            ],
            "model": payload.get("model", "fake"),
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        },
    )


async def ready(_: web.Request) -> web.Response:
    return web.json_response({"ready": True})


def main() -> None:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/models/{name:[^/:]+}:predict", kserve)
    app.router.add_post("/v2/models/{name:[^/]+}/infer", oip)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v2/health/ready", ready)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
