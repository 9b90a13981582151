"""Limits across replicas: three guard processes on one Redis (or a 3-node Redis Cluster)
admit exactly a client's quota, however its concurrent requests are spread over them."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc

from extauthz.demo import stack
from tests.integration.service_fixtures import (
    exchange,
    gzip_bytes,
    kserve_body,
    proc_request_body,
    proc_request_headers,
)

KEY = "replica-test-key"
QUOTA = 60


def _policy(tmp_path: Path) -> Path:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"""
identity:
  api_keys: [{{name: carol, tier: free, sha256: {digest}}}]
tiers:
  anonymous: {{max_instances: 4}}
  free:
    max_instances: 8
    limits:
      - {{name: daily, unit: instances, rate: {QUOTA}, per: day}}
"""
    )
    return path


def _start_replicas(
    tmp_path: Path, store_url: str, count: int = 3
) -> list[tuple[stack.Process, int]]:
    policy = _policy(tmp_path)
    replicas = []
    try:
        for index in range(count):
            grpc_port, http_port = stack.free_port(), stack.free_port()
            proc = stack.start_guard(
                policy=policy,
                grpc_port=grpc_port,
                http_port=http_port,
                workdir=tmp_path / f"guard-{index}",
                extra_args=["--store", store_url, "--drain-s", "0", "--budget-ms", "200"],
            )
            replicas.append((proc, grpc_port))
    except BaseException:
        for proc, _ in replicas:
            proc.stop()
        raise
    return replicas


@pytest.fixture(params=["redis", "cluster3"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return str(request.getfixturevalue("redis_cluster3").url)


@pytest.fixture
def replicas(tmp_path: Path, store_url: str) -> Iterator[list[int]]:
    started = _start_replicas(tmp_path, store_url)
    yield [port for _, port in started]
    for proc, _ in started:
        proc.stop()


async def _one_request(
    stub: proc_grpc.ExternalProcessorStub, body: bytes, *, encoding: str = ""
) -> str:
    headers = {"x-api-key": KEY}
    if encoding:
        headers["content-encoding"] = encoding
    result = await exchange(
        stub,
        [proc_request_headers(headers=headers, source="127.0.0.9:4000"), proc_request_body(body)],
    )
    assert result.code == grpc.StatusCode.OK
    last = result.responses[-1]
    if last.HasField("immediate_response"):
        return str(last.immediate_response.status.code)
    return "admitted" if len(result.responses) == 2 else "stopped"


class TestQuotaAcrossReplicas:
    """A daily instance quota holds exactly when three replicas share the store."""

    async def test_exactly_the_quota_is_admitted(self, replicas: list[int]) -> None:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in replicas]
        stubs = [proc_grpc.ExternalProcessorStub(channel) for channel in channels]
        body = kserve_body(1)
        gate = asyncio.Semaphore(24)

        async def send(index: int) -> str:
            async with gate:
                return await _one_request(stubs[index % 3], body)

        try:
            outcomes = await asyncio.gather(*(send(i) for i in range(150)))
        finally:
            for channel in channels:
                await channel.close()
        assert outcomes.count("admitted") == QUOTA
        assert outcomes.count("429") == 150 - QUOTA

    async def test_batches_cost_their_instances_and_gzip_counts(self, replicas: list[int]) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replicas[0]}") as channel:
            stub = proc_grpc.ExternalProcessorStub(channel)
            outcomes = [await _one_request(stub, kserve_body(8)) for _ in range(7)]  # 56 of 60
            gzipped = await _one_request(stub, gzip_bytes(kserve_body(4)), encoding="gzip")
            last = await _one_request(stub, kserve_body(1))
        assert outcomes == ["admitted"] * 7
        assert gzipped == "admitted"  # 56 + 4 = the quota, exactly
        assert last == "429"  # only because the gzipped batch was counted
