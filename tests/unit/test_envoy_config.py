"""The reference Envoy config and the renderer that moves it to other ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.demo.stack import (
    ENVOY_SINGLE_HOP_YAML,
    ENVOY_YAML,
    Ports,
    StackError,
    envoy_binary,
    render_envoy_config,
    validate_envoy_config,
)

PORTS = Ports(listener=18080, admin=19901, guard=19191, model=18081)
HCM = "envoy.filters.network.http_connection_manager"


def _load(text: str) -> dict[str, Any]:
    tree = yaml.safe_load(text)
    assert isinstance(tree, dict)
    return tree


def _without_ports(node: Any) -> Any:
    """Return a copy of a YAML tree with every ``port_value`` set to 0."""
    if isinstance(node, dict):
        return {k: 0 if k == "port_value" else _without_ports(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_ports(v) for v in node]
    return node


def _port_values(node: Any) -> Iterator[int]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "port_value":
                yield value
            else:
                yield from _port_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from _port_values(value)


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = [f for f in chain["filters"] if f["name"] == HCM]
    return hcm["typed_config"]  # type: ignore[no-any-return]


def _cluster_port(config: dict[str, Any], name: str) -> int:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb,) = locality["lb_endpoints"]
    return lb["endpoint"]["address"]["socket_address"]["port_value"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return _load(ENVOY_YAML.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    return _load(render_envoy_config(PORTS))


class TestRenderEnvoyConfig:
    """render_envoy_config moves the reference config to other ports and changes nothing else."""

    def test_only_ports_differ(self, reference: dict[str, Any], rendered: dict[str, Any]) -> None:
        assert rendered != reference
        assert _without_ports(rendered) == _without_ports(reference)

    def test_every_port_is_moved(self, reference: dict[str, Any], rendered: dict[str, Any]) -> None:
        assert sorted(_port_values(reference)) == [8080, 8081, 9191, 9901]
        assert sorted(_port_values(rendered)) == sorted(
            [PORTS.listener, PORTS.admin, PORTS.guard, PORTS.model]
        )

    def test_each_port_lands_in_its_place(self, rendered: dict[str, Any]) -> None:
        assert rendered["admin"]["address"]["socket_address"]["port_value"] == PORTS.admin
        (listener,) = rendered["static_resources"]["listeners"]
        assert listener["address"]["socket_address"]["port_value"] == PORTS.listener
        assert _cluster_port(rendered, "extauthz") == PORTS.guard
        assert _cluster_port(rendered, "model") == PORTS.model

    def test_transform_sees_moved_ports_and_its_edits_are_kept(self) -> None:
        seen: list[int] = []

        def transform(config: dict[str, Any]) -> None:
            seen.append(_cluster_port(config, "extauthz"))
            _hcm(config)["stat_prefix"] = "bench"

        out = _load(render_envoy_config(PORTS, transform=transform))
        assert seen == [PORTS.guard]
        assert _hcm(out)["stat_prefix"] == "bench"

    def test_config_without_the_guard_cluster_is_refused(
        self, reference: dict[str, Any], tmp_path: Path
    ) -> None:
        broken = dict(reference)
        broken["static_resources"] = {
            **reference["static_resources"],
            "clusters": [
                c for c in reference["static_resources"]["clusters"] if c["name"] != "extauthz"
            ],
        }
        source = tmp_path / "envoy.yaml"
        source.write_text(yaml.safe_dump(broken), encoding="utf-8")
        with pytest.raises(ValueError, match="extauthz"):
            render_envoy_config(PORTS, source=source)


class TestReferenceConfig:
    """The reference config strips forged headers first, fails closed and scopes ext_proc."""

    def test_filter_order(self, reference: dict[str, Any]) -> None:
        names = [f["name"] for f in _hcm(reference)["http_filters"]]
        assert names == [
            "envoy.filters.http.header_mutation",
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.ext_proc",
            "envoy.filters.http.router",
        ]

    def test_header_mutation_strips_guard_headers_but_not_challenge_answers(
        self, reference: dict[str, Any]
    ) -> None:
        first = _hcm(reference)["http_filters"][0]
        removed = {m["remove"] for m in first["typed_config"]["mutations"]["request_mutations"]}
        assert {"x-extauthz-tier", "x-extauthz-client", "x-extauthz-risk"} <= removed
        assert not removed & {"x-extauthz-pow", "x-extauthz-pass"}

    def test_ext_proc_is_disabled_off_model_routes_only(self, reference: dict[str, Any]) -> None:
        (vhost,) = _hcm(reference)["route_config"]["virtual_hosts"]
        by_name = {r["name"]: r for r in vhost["routes"]}
        other = by_name["other"]["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
        assert other["disabled"] is True
        for name in ("model_v1", "model_v2", "openai", "oip_grpc"):
            per_filter = by_name[name].get("typed_per_filter_config", {})
            assert "envoy.filters.http.ext_proc" not in per_filter
        # The catch-all comes last, or it would shadow the model routes.
        assert vhost["routes"][-1]["match"] == {"prefix": "/"}

    def test_challenge_headers_never_reach_the_model(self, reference: dict[str, Any]) -> None:
        (vhost,) = _hcm(reference)["route_config"]["virtual_hosts"]
        for route in vhost["routes"]:
            assert {"x-extauthz-pow", "x-extauthz-pass"} <= set(route["request_headers_to_remove"])

    def test_both_hooks_fail_closed_within_budget(self, reference: dict[str, Any]) -> None:
        filters = {f["name"]: f["typed_config"] for f in _hcm(reference)["http_filters"]}
        authz = filters["envoy.filters.http.ext_authz"]
        proc = filters["envoy.filters.http.ext_proc"]
        assert authz["failure_mode_allow"] is False
        assert proc["failure_mode_allow"] is False
        assert "with_request_body" not in authz
        # Both timeouts sit above the guard's 50 ms decision budget.
        assert float(authz["grpc_service"]["timeout"].rstrip("s")) > 0.05
        assert float(proc["message_timeout"].rstrip("s")) > 0.05
        assert proc["metadata_options"]["receiving_namespaces"]["untyped"] == ["extauthz"]

    def test_client_address_is_the_tcp_peer(self, reference: dict[str, Any]) -> None:
        hcm = _hcm(reference)
        assert hcm["use_remote_address"] is True
        assert hcm["xff_num_trusted_hops"] == 0

    def test_buffers_hold_an_8_mib_batch(self, reference: dict[str, Any]) -> None:
        (listener,) = reference["static_resources"]["listeners"]
        assert listener["per_connection_buffer_limit_bytes"] > 8 * 1024 * 1024
        for cluster in reference["static_resources"]["clusters"]:
            assert cluster["per_connection_buffer_limit_bytes"] > 8 * 1024 * 1024


def _require_envoy() -> Path:
    """Return Envoy's path; a missing binary fails under CI=true and skips elsewhere."""
    try:
        return envoy_binary()
    except FileNotFoundError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(str(err))
        pytest.skip(str(err))


@pytest.mark.envoy
class TestEnvoyValidate:
    """Envoy itself accepts the rendered config and the bench's variants, and rejects a bad one."""

    def test_rendered_config_validates(self, tmp_path: Path) -> None:
        _require_envoy()
        validate_envoy_config(render_envoy_config(PORTS), workdir=tmp_path)

    def test_bench_variants_validate(self, tmp_path: Path) -> None:
        _require_envoy()
        from tests.bench.run_bench import bench_transform

        for authz, proc in ((True, False), (False, False), (False, True), (True, True)):
            transform = bench_transform(authz=authz, proc=proc)
            config = render_envoy_config(PORTS, transform=transform)
            names = [f["name"] for f in _hcm(yaml.safe_load(config))["http_filters"]]
            assert ("envoy.filters.http.ext_authz" in names) is authz
            assert ("envoy.filters.http.ext_proc" in names) is proc
            validate_envoy_config(config, workdir=tmp_path)

    def test_bench_single_hop_variant_validates(self, tmp_path: Path) -> None:
        _require_envoy()
        from tests.bench.run_bench import _ANSWER, bench_transform

        transform = bench_transform(authz=False, proc=True, body=_ANSWER)
        config = render_envoy_config(PORTS, source=ENVOY_SINGLE_HOP_YAML, transform=transform)
        names = [f["name"] for f in _hcm(yaml.safe_load(config))["http_filters"]]
        assert "envoy.filters.http.ext_authz" not in names
        assert "envoy.filters.http.ext_proc" in names
        validate_envoy_config(config, workdir=tmp_path)

    def test_invalid_config_is_rejected(self, tmp_path: Path) -> None:
        _require_envoy()

        def break_it(config: dict[str, Any]) -> None:
            _hcm(config)["http_filters"][1]["typed_config"]["no_such_field"] = True

        with pytest.raises(StackError, match="no_such_field"):
            validate_envoy_config(render_envoy_config(PORTS, transform=break_it), workdir=tmp_path)
