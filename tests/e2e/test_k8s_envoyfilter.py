"""Envoy itself accepts the filter and cluster configs that the k8s manifests hand to Envoy.

Istio and the plain-Envoy snippet carry raw Envoy config; a typo there only shows up when a proxy
rejects it in a cluster. Here the real Envoy (``--mode validate``) checks them: the ext_proc filter
from the rendered EnvoyFilter, with its listener and cluster buffer patches, in a minimal
bootstrap; the ext_authz filter Istio builds from mesh-values.yaml; and envoy/envoy.yaml with its
guard cluster swapped for k8s/overlays/plain-envoy/envoy-cluster.yaml.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.demo.stack import StackError, validate_envoy_config
from tests.e2e.conftest import require_envoy

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
Doc = dict[str, Any]

pytestmark = pytest.mark.envoy


def _render_istio() -> list[Doc]:
    """Render the Istio overlay with ``kubectl kustomize`` (a missing kubectl fails under CI)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and kubectl (with kustomize) is missing")
        pytest.skip("kubectl is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / "istio")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def envoy_filter() -> Doc:
    """The rendered EnvoyFilter of the Istio overlay."""
    hits = [d for d in _render_istio() if d["kind"] == "EnvoyFilter"]
    assert len(hits) == 1
    return hits[0]


def _patch(envoy_filter: Doc, apply_to: str) -> Doc:
    patch: Doc = next(p for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == apply_to)
    return patch


def _ext_proc(envoy_filter: Doc) -> Doc:
    return copy.deepcopy(_patch(envoy_filter, "HTTP_FILTER")["patch"]["value"])


def _mesh_ext_authz() -> tuple[Doc, str]:
    """The ext_authz filter Istio generates from the mesh provider (and its cluster's name)."""
    values = yaml.safe_load((K8S / "overlays" / "istio" / "mesh-values.yaml").read_text())
    grpc = values["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]
    cluster = f"outbound|{grpc['port']}||{grpc['service']}"
    ext_authz = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": grpc["timeout"]},
            "transport_api_version": "V3",
            "failure_mode_allow": grpc["failOpen"],
            "status_on_error": {"code": int(grpc["statusOnError"])},
        },
    }
    return ext_authz, cluster


def _guard_cluster(name: str) -> Doc:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": 9191}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def _bootstrap(envoy_filter: Doc, ext_proc: Doc, *, with_ext_authz: bool) -> str:
    """A minimal Envoy: one listener (ext_authz?, ext_proc, router) and the guard's cluster,
    both with the EnvoyFilter's MERGE patches applied as Istio would."""
    cluster_name = ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    filters = [ext_proc]
    if with_ext_authz:
        ext_authz, authz_cluster = _mesh_ext_authz()
        assert authz_cluster == cluster_name, "Check and Process must reach the same Service"
        filters.insert(0, ext_authz)
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        }
    )
    listener: Doc = {
        "name": "inbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15006}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "inbound",
                            "http_filters": filters,
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "route": {"cluster": "model"},
                                            }
                                        ],
                                    }
                                ]
                            },
                        },
                    }
                ]
            }
        ],
    }
    listener.update(_patch(envoy_filter, "LISTENER")["patch"]["value"])
    guard = _guard_cluster(cluster_name)
    guard.update(_patch(envoy_filter, "CLUSTER")["patch"]["value"])
    model = _guard_cluster("model")
    del model["typed_extension_protocol_options"]
    config = {"static_resources": {"listeners": [listener], "clusters": [guard, model]}}
    return yaml.safe_dump(config, sort_keys=False)


class TestIstioEnvoyFilter:
    """The EnvoyFilter's ext_proc filter and buffer patches are config Envoy 1.40 accepts."""

    def test_ext_proc_filter_validates(self, envoy_filter: Doc, tmp_path: Path) -> None:
        require_envoy()
        config = _bootstrap(envoy_filter, _ext_proc(envoy_filter), with_ext_authz=False)
        validate_envoy_config(config, workdir=tmp_path)

    def test_mesh_ext_authz_then_ext_proc_validates(
        self, envoy_filter: Doc, tmp_path: Path
    ) -> None:
        require_envoy()
        config = _bootstrap(envoy_filter, _ext_proc(envoy_filter), with_ext_authz=True)
        validate_envoy_config(config, workdir=tmp_path)

    def test_a_broken_ext_proc_filter_is_rejected(self, envoy_filter: Doc, tmp_path: Path) -> None:
        require_envoy()
        broken = _ext_proc(envoy_filter)
        broken["typed_config"]["processing_mode"]["request_body_mode"] = "BUFFERD"
        with pytest.raises(StackError, match="BUFFERD"):
            validate_envoy_config(
                _bootstrap(envoy_filter, broken, with_ext_authz=False), workdir=tmp_path
            )


class TestPlainEnvoyCluster:
    """envoy-cluster.yaml drops into envoy/envoy.yaml in place of the STATIC guard cluster."""

    def test_reference_config_with_k8s_cluster_validates(self, tmp_path: Path) -> None:
        require_envoy()
        config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
        snippet = yaml.safe_load(
            (K8S / "overlays" / "plain-envoy" / "envoy-cluster.yaml").read_text()
        )
        clusters = config["static_resources"]["clusters"]
        index = next(i for i, c in enumerate(clusters) if c["name"] == snippet["name"])
        clusters[index] = snippet
        validate_envoy_config(yaml.safe_dump(config, sort_keys=False), workdir=tmp_path)

    def test_a_broken_cluster_is_rejected(self, tmp_path: Path) -> None:
        require_envoy()
        config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
        snippet = yaml.safe_load(
            (K8S / "overlays" / "plain-envoy" / "envoy-cluster.yaml").read_text()
        )
        snippet["type"] = "STRICT_DSN"
        clusters = config["static_resources"]["clusters"]
        index = next(i for i, c in enumerate(clusters) if c["name"] == snippet["name"])
        clusters[index] = snippet
        with pytest.raises(StackError, match="STRICT_DSN"):
            validate_envoy_config(yaml.safe_dump(config, sort_keys=False), workdir=tmp_path)
