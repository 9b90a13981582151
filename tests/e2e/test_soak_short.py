"""A short soak through the real Envoy, guard and demo model (``make soak`` runs ten minutes).

The same code as ``tests/bench/soak.py``: hundreds of anonymous clients, each from its own
loopback address, at a steady rate, with a hot client over its limit and malformed bodies.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.soak import SoakOptions, SoakReport, run_soak
from tests.e2e.conftest import require_envoy

OPTIONS = SoakOptions(duration_s=20.0, rate=40.0, clients=400, progress_s=3600.0)
# Generous: the short run's state (400 clients' records and detection states, the evidence
# ledger) is a few MiB.
MAX_RSS_GROWTH = 64 * 2**20


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> SoakReport:
    require_envoy()
    workdir: Path = tmp_path_factory.mktemp("soak")
    return run_soak(OPTIONS, workdir=workdir)


class TestShortSoak:
    """Twenty seconds of many distinct clients: every request answered, no 5xx, no error
    logged, the guard alive and its memory flat."""

    def test_every_request_is_answered_without_5xx(self, report: SoakReport) -> None:
        assert report.requests_sent == report.requests_planned == 800
        assert report.transport_errors == {}
        assert report.server_errors == 0, report.status_counts
        assert sum(report.status_counts.values()) == report.requests_sent
        assert report.status_counts["200"] > report.requests_sent // 2
        # The refusals the mix asks for: malformed bodies and the hot client over its limit.
        assert report.status_counts["400"] > 0
        assert report.status_counts["429"] > 0

    def test_many_distinct_client_ids_reach_the_guard(self, report: SoakReport) -> None:
        assert report.planned_clients > 300
        assert report.distinct_clients >= report.planned_clients - 5

    def test_guard_logs_no_error_and_stays_up(self, report: SoakReport) -> None:
        assert report.guard_alive
        assert report.errors_logged == 0, report.error_samples

    def test_guard_memory_stays_flat(self, report: SoakReport) -> None:
        assert report.rss_start > 0
        assert report.rss_end > 0
        assert report.rss_growth < MAX_RSS_GROWTH
