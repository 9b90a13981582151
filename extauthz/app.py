"""Wiring only: settings -> policy -> store -> decision core -> servers, and the shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from extauthz._proto.v1 import admin_pb2, admin_pb2_grpc
from extauthz.challenge.gate import CaptchaRegistry, ChallengeGate
from extauthz.core.decision import DecisionCore
from extauthz.detect.pipeline import DetectionPipeline
from extauthz.evidence.ledger import BufferedLedger, Cipher, Ledger, MemoryLedger, RedisLedger
from extauthz.keys import KeyRing
from extauthz.policy.model import Evidence
from extauthz.policy.watch import PolicyHolder
from extauthz.service.admin import AdminService
from extauthz.service.authz import AuthorizationService
from extauthz.service.extproc import ExternalProcessorService
from extauthz.settings import Settings
from extauthz.store.base import Store, StoreError
from extauthz.telemetry.health import Readiness, build_http_app

log = structlog.get_logger("extauthz.app")

SERVICE_NAMES = (
    external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
    external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


REDIS_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+cluster://",
    "rediss+cluster://",
    "redis+sentinel://",
    "rediss+sentinel://",
)


def check_store_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is ``memory`` or has a Redis scheme."""
    if url != "memory" and not url.startswith(REDIS_SCHEMES):
        schemes = ", ".join(REDIS_SCHEMES)
        raise ValueError(f"store_url: expected 'memory' or a URL starting {schemes}; got {url!r}")


def create_store(settings: Settings, clock: Callable[[], float]) -> Store:
    """Return the store named by ``settings.store_url``: ``memory`` or a Redis URL."""
    check_store_url(settings.store_url)
    if settings.store_url == "memory":
        from extauthz.store.memory import MemoryStore

        return MemoryStore(
            max_clients=settings.memory_max_clients, ttl_s=settings.client_ttl_s, clock=clock
        )
    from extauthz.store.redis import RedisStore

    return RedisStore.from_url(
        settings.store_url,
        timeout_s=settings.decision_budget_s,
        ttl_s=settings.client_ttl_s,
        clock=clock,
    )


def create_ledger(
    store: Store,
    settings: Evidence,
    keys: KeyRing,
    clock: Callable[[], float],
    *,
    timeout_s: float | None = None,
) -> Ledger:
    """The evidence ledger beside the store: a Redis stream written behind the answers (see
    ``BufferedLedger``), or memory for the memory store.

    ``timeout_s`` bounds each write of a batch to the Redis stream.
    """
    cipher = Cipher(keys) if settings.encrypt else None
    from extauthz.store.redis import RedisStore

    if isinstance(store, RedisStore):
        return BufferedLedger(
            RedisLedger(
                store.redis,
                max_records=settings.max_records,
                retention_s=settings.retention_s,
                clock=clock,
                cipher=cipher,
                timeout_s=timeout_s,
            )
        )
    return MemoryLedger(
        max_records=settings.max_records,
        retention_s=settings.retention_s,
        clock=clock,
        cipher=cipher,
    )


def key_ring(settings: Settings) -> KeyRing:
    """Keys for challenges and passes (with ids, so they rotate); random when none is given."""
    if settings.keys_file is not None:
        return KeyRing.from_file(settings.keys_file)
    log.warning(
        "keys_random",
        detail="no --keys-file: passes and challenges are valid on this process only, until it restarts",
    )
    return KeyRing.random()


def noise_key(settings: Settings) -> bytes:
    """The keyed-noise secret: the file's bytes, or a random key for this process alone."""
    if settings.noise_key_file is not None:
        key = settings.noise_key_file.read_bytes().strip()
        if len(key) < 16:
            raise ValueError(f"noise_key_file: {settings.noise_key_file} holds fewer than 16 bytes")
        return key
    log.warning(
        "noise_key_random",
        detail="no --noise-key-file: keyed noise differs between replicas and restarts",
    )
    return os.urandom(32)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port when a certificate is set; mTLS (client certificates required) with a CA.

    The port is shared, so with mTLS Envoy's ``extauthz`` cluster must present a client certificate too.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


@dataclass
class Guard:
    """A running guard: both servers, the policy watcher and what they share."""

    settings: Settings
    server: grpc.aio.Server
    grpc_port: int
    http_runner: web.AppRunner
    http_port: int
    policy: PolicyHolder
    store: Store
    readiness: Readiness
    health: health_aio.HealthServicer
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    captchas: CaptchaRegistry | None = None
    ledger: Ledger | None = None

    async def stop(self, grace_s: float = 10.0) -> None:
        """Drain: health NOT_SERVING first, wait ``drain_s``, let in-flight requests finish, close."""
        self.readiness.start_draining()
        await self.health.enter_graceful_shutdown()
        log.info("draining", drain_s=self.settings.drain_s)
        if self.settings.drain_s:
            await asyncio.sleep(self.settings.drain_s)
        for task in self.tasks:
            task.cancel()
        await self.server.stop(grace_s)
        await self.http_runner.cleanup()
        if self.ledger is not None:
            await self.ledger.close()  # evidence queued during the drain, before the store goes
        await self.store.close()
        if self.captchas is not None:
            await self.captchas.close()
        log.info("stopped")


async def start(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    keys: KeyRing | None = None,
    noise: bytes | None = None,
) -> Guard:
    """Start the gRPC and HTTP servers; ports 0 pick free ones (see ``Guard.grpc_port``).

    ``keys`` and ``noise`` replace the ring and noise key read from ``settings``: the worker
    supervisor (workers.py) draws random ones once, so every worker accepts the others' passes.
    With ``settings.workers`` above 1 both ports are bound with SO_REUSEPORT, shared by the workers.
    """
    shared_ports = settings.workers > 1
    policy = PolicyHolder(settings.policy_path, clock=clock)
    store = create_store(settings, clock)
    # fail_modes.store: local decides limits here when the shared store is down.
    from extauthz.store.memory import MemoryStore

    local = MemoryStore(
        max_clients=settings.memory_max_clients, ttl_s=settings.client_ttl_s, clock=clock
    )
    core = DecisionCore(
        lambda: policy.current,
        store,
        clock=clock,
        budget_s=settings.decision_budget_s,
        local_store=local,
        # Each worker keeps its own local store: a worker is a replica for fail_modes.store: local.
        replicas=settings.replicas * settings.workers,
    )
    readiness = Readiness()

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
            ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
            # Off for one process, so a second guard on a taken port fails instead of sharing it.
            ("grpc.so_reuseport", 1 if shared_ports else 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    keys = key_ring(settings) if keys is None else keys
    captchas = CaptchaRegistry()
    gate = ChallengeGate(core, keys, clock=clock, captcha=captchas.for_snapshot)
    ledger = create_ledger(
        store, policy.current.policy.evidence, keys, clock, timeout_s=_LEDGER_WRITE_TIMEOUT_S
    )
    fingerprint_keys = keys.derive("fingerprint")
    detection = DetectionPipeline(
        store, key=fingerprint_keys.keys[fingerprint_keys.current_id], clock=clock
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationService(core, gate), server
    )
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessorService(
            core,
            gate,
            max_body_bytes=settings.max_message_bytes,
            noise_key=noise_key(settings) if noise is None else noise,
            detection=detection,
            watermark_keys=keys,
            ledger=ledger,
            clock=clock,
        ),
        server,
    )
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminService(core, token_file=settings.admin_token_file, clock=clock, ledger=ledger), server
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.host}:{settings.grpc_port}"
    credentials = server_credentials(settings)
    if credentials is None:
        grpc_port = server.add_insecure_port(address)
    else:
        grpc_port = server.add_secure_port(address, credentials)
    if grpc_port == 0:
        raise OSError(f"cannot bind the gRPC port {settings.host}:{settings.grpc_port}")

    http_runner = web.AppRunner(build_http_app(readiness, store.ping), access_log=None)
    await http_runner.setup()
    site = web.TCPSite(http_runner, settings.host, settings.http_port, reuse_port=shared_ports)
    await site.start()
    http_port = _bound_port(http_runner, settings.http_port)

    await _warm(store)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    readiness.set_ready(True)
    guard = Guard(
        settings,
        server,
        grpc_port,
        http_runner,
        http_port,
        policy,
        store,
        readiness,
        health,
        ledger=ledger,
    )
    guard.tasks.append(asyncio.create_task(policy.watch(settings.reload_interval_s)))
    log.info(
        "serving",
        grpc=f"{settings.host}:{grpc_port}",
        http=f"{settings.host}:{http_port}",
        policy=policy.current.source,
        store=settings.store_url.split("@")[-1],
        budget_ms=settings.decision_budget_ms,
    )
    return guard


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return requested


# A batch of evidence is written behind the answers: no request waits for it.
_LEDGER_WRITE_TIMEOUT_S = 1.0


async def _warm(store: Store) -> None:
    """Connect to the store and load its scripts before serving: a cold first decision (connect,
    NOSCRIPT, SCRIPT LOAD) can overrun its 50 ms. A store that is down is not fatal: its fail
    mode applies, as for any later outage."""
    try:
        await store.warm()
    except StoreError as exc:
        log.warning("store_warmup_failed", detail=str(exc)[:200])


async def serve(
    settings: Settings, *, keys: KeyRing | None = None, noise: bytes | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop (``keys``, ``noise``: see ``start``)."""
    # One BLAS thread: the detectors' small matrix products run on the event loop, and a
    # threaded BLAS on a busy node spins for milliseconds (a 64-row product: 0.02 ms or 3 ms).
    threadpool_limits(limits=1)
    guard = await start(settings, keys=keys, noise=noise)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # What exists now (modules, policy, servers) lives as long as the process: out of the
    # collector's sight, a full collection walks only what requests create. After the signal
    # handlers: a SIGTERM during the collection still drains.
    gc.collect()
    gc.freeze()
    await stop.wait()
    log.info("signal_received")
    await guard.stop()
