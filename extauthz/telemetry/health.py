"""The HTTP port: ``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` (serving)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extauthz.telemetry import metrics


class Readiness:
    """Whether the guard should receive traffic: false while starting and once draining."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        metrics.READY.set(1 if ready and not self.draining else 0)

    def start_draining(self) -> None:
        self.draining = True
        metrics.READY.set(0)

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining


def build_http_app(
    readiness: Readiness, store_ping: Callable[[], Awaitable[bool]]
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if not readiness.serving:
            reason = "draining" if readiness.draining else "starting"
            return web.json_response({"status": reason}, status=503)
        try:
            store = "ok" if await store_ping() else "unavailable"
        except Exception:
            store = "unavailable"
        # Ready even when the store is down: its fail mode decides, and a restart would not help.
        return web.json_response({"status": "ready", "store": store})

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.exposition_registry()),
            headers={"content-type": CONTENT_TYPE_LATEST},
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app
