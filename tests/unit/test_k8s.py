"""The Kubernetes manifests in k8s/: every overlay renders with kustomize, every core object
passes Kubernetes' own schemas offline, and the mesh objects (Istio, Envoy Gateway: no schema
here) carry the ports, timeouts, buffers and fail modes the guard relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from extauthz.cli import build_parser
from extauthz.policy.loader import parse_policy
from extauthz.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("plain-envoy", "istio", "envoy-gateway")
# The oldest Kubernetes the manifests target; strict: unknown fields are errors.
K8S_VERSION = "1.30"
# Kinds with no schema in kubernetes-validate: checked field by field below.
CRD_KINDS = {
    "AuthorizationPolicy",
    "EnvoyFilter",
    "SecurityPolicy",
    "EnvoyExtensionPolicy",
    "ClientTrafficPolicy",
    "BackendTrafficPolicy",
    "ReferenceGrant",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
}
CLUSTER_SCOPED = {"Namespace"}
MIB = 1024 * 1024
# A protobuf JSON Duration (Envoy config, Istio mesh config): seconds with an "s" suffix.
PROTO_DURATION = r"\d+(\.\d+)?s"
DEFAULTS = Settings()
Doc = dict[str, Any]


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and kubectl (with kustomize) is missing")
        pytest.skip("kubectl is not installed")
    return found


def _kustomize(directory: Path) -> list[Doc]:
    """Render ``directory`` with ``kubectl kustomize``; raise with kustomize's message on error."""
    done = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"kustomize {directory} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _compose(tmp: Path, resources: list[Path], components: list[Path]) -> list[Doc]:
    """Render a throwaway kustomization of ``resources`` + ``components`` (relative paths:
    kustomize refuses absolute ones)."""
    tmp.mkdir(parents=True, exist_ok=True)
    rel = [os.path.relpath(p, tmp) for p in resources]
    comp = [os.path.relpath(p, tmp) for p in components]
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": rel, "components": comp}), encoding="utf-8"
    )
    return _kustomize(tmp)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    """Every overlay, rendered once for the module."""
    return {name: _kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def _find(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    hits = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def _all(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _container(docs: list[Doc], name: str = "extauthz") -> Doc:
    deployment = _find(docs, "Deployment", "extauthz")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _args(docs: list[Doc]) -> dict[str, str]:
    """The container's ``--flag=value`` arguments after ``serve``."""
    args = _container(docs)["args"]
    assert args[0] == "serve"
    out: dict[str, str] = {}
    for arg in args[1:]:
        flag, _, value = arg.partition("=")
        out[flag] = value
    return out


def _seconds(duration: str) -> float:
    """Parse an Envoy/Istio/Gateway API duration: ``250ms``, ``1s``, ``0.25s``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", duration)
    assert match, f"not a duration: {duration!r}"
    value = float(match.group(1))
    return value / 1000.0 if match.group(2) == "ms" else value


def _bytes(quantity: str | int) -> int:
    """Parse a Kubernetes quantity of bytes: ``10Mi``, ``512Ki``, ``10485760``."""
    if isinstance(quantity, int):
        return quantity
    units = {"Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB, "": 1}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|)", quantity)
    assert match, f"not a byte quantity: {quantity!r}"
    return int(match.group(1)) * units[match.group(2)]


def _reference_envoy() -> Doc:
    config: Doc = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    return config


def _reference_filter(name: str) -> Doc:
    hcm = _reference_envoy()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    config: Doc = next(f for f in filters if f["name"] == name)["typed_config"]
    return config


def _max_body_bytes(docs: list[Doc]) -> int:
    """The guard's largest model body: ``--max-message-bytes`` if set, else the default."""
    raw = _args(docs).get("--max-message-bytes")
    return int(raw) if raw else DEFAULTS.max_message_bytes


def _grpc_limit(docs: list[Doc]) -> int:
    return Settings(max_message_bytes=_max_body_bytes(docs)).grpc_max_message_bytes


def _budget_s(docs: list[Doc]) -> float:
    raw = _args(docs).get("--budget-ms")
    return (float(raw) if raw else DEFAULTS.decision_budget_ms) / 1000.0


class TestRender:
    """Each overlay renders and holds the guard, its Redis and no generated Secret."""

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_overlay_holds_guard_and_redis(
        self, rendered: dict[str, list[Doc]], overlay: str
    ) -> None:
        docs = rendered[overlay]
        for kind, name in [
            ("Namespace", "extauthz"),
            ("Deployment", "extauthz"),
            ("Service", "extauthz"),
            ("Service", "extauthz-headless"),
            ("ConfigMap", "extauthz-policy"),
            ("ServiceAccount", "extauthz"),
            ("PodDisruptionBudget", "extauthz"),
            ("HorizontalPodAutoscaler", "extauthz"),
            ("NetworkPolicy", "extauthz"),
            ("StatefulSet", "extauthz-redis"),
            ("Service", "extauthz-redis"),
        ]:
            _find(docs, kind, name)

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_no_secret_is_generated(self, rendered: dict[str, list[Doc]], overlay: str) -> None:
        assert _all(rendered[overlay], "Secret") == []

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_every_namespaced_object_has_a_namespace(
        self, rendered: dict[str, list[Doc]], overlay: str
    ) -> None:
        missing = [
            (d["kind"], d["metadata"]["name"])
            for d in rendered[overlay]
            if d["kind"] not in CLUSTER_SCOPED and not d["metadata"].get("namespace")
        ]
        assert missing == []

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_guard_and_redis_share_the_namespace(
        self, rendered: dict[str, list[Doc]], overlay: str
    ) -> None:
        docs = rendered[overlay]
        names = {
            d["metadata"].get("namespace")
            for d in docs
            if d["metadata"]["name"].startswith("extauthz") and d["kind"] not in CRD_KINDS
        }
        assert names == {None, "extauthz"}  # None: the Namespace itself

    def test_doc_files_are_not_resources(self) -> None:
        for overlay, doc_file in [
            ("plain-envoy", "envoy-cluster.yaml"),
            ("istio", "mesh-values.yaml"),
        ]:
            kustomization = yaml.safe_load(
                (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
            )
            listed = [*kustomization.get("resources", []), *kustomization.get("components", [])]
            listed += [p.get("path", "") for p in kustomization.get("patches", [])]
            assert doc_file not in listed
            assert (K8S / "overlays" / overlay / doc_file).is_file()


class TestSchemas:
    """Core objects pass Kubernetes' schemas offline (strict); only known CRDs lack a schema."""

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_core_objects_validate(self, rendered: dict[str, list[Doc]], overlay: str) -> None:
        checked = 0
        for doc in rendered[overlay]:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                checked += 1
            except kubernetes_validate.SchemaNotFoundError:
                assert doc["kind"] in CRD_KINDS, f"no schema for {doc['kind']} {doc['apiVersion']}"
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
        assert checked >= 12

    def test_validator_rejects_an_unknown_field(self, rendered: dict[str, list[Doc]]) -> None:
        deployment = _find(rendered["istio"], "Deployment", "extauthz")
        broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


class TestDeployment:
    """The guard's pod: ports, probes, hardening, mounts and args that the CLI accepts."""

    def test_args_parse_with_the_real_cli(self, rendered: dict[str, list[Doc]]) -> None:
        args = build_parser().parse_args(_container(rendered["istio"])["args"])
        assert args.host == "0.0.0.0"
        assert (args.grpc_port, args.http_port) == (9191, 9192)

    def test_ports(self, rendered: dict[str, list[Doc]]) -> None:
        ports = {p["name"]: p["containerPort"] for p in _container(rendered["istio"])["ports"]}
        assert ports == {"grpc": 9191, "http": 9192}

    def test_probes(self, rendered: dict[str, list[Doc]]) -> None:
        container = _container(rendered["istio"])
        assert container["startupProbe"]["grpc"]["port"] == 9191
        assert container["livenessProbe"]["grpc"]["port"] == 9191
        readiness = container["readinessProbe"]["httpGet"]
        assert (readiness["path"], readiness["port"]) == ("/readyz", "http")
        # Liveness must not kill a pod that is merely busy for less than the drain.
        live = container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > float(
            _args(rendered["istio"])["--drain-s"]
        )

    def test_security_context(self, rendered: dict[str, list[Doc]]) -> None:
        pod = _find(rendered["istio"], "Deployment", "extauthz")["spec"]["template"]["spec"]
        container = _container(rendered["istio"])["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert container["runAsNonRoot"] is True
        assert container["runAsUser"] == 10001
        assert container["readOnlyRootFilesystem"] is True
        assert container["allowPrivilegeEscalation"] is False
        assert container["capabilities"]["drop"] == ["ALL"]
        assert container["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        account = _find(rendered["istio"], "ServiceAccount", "extauthz")
        assert account["automountServiceAccountToken"] is False

    def test_tmp_is_a_writable_empty_dir(self, rendered: dict[str, list[Doc]]) -> None:
        pod = _find(rendered["istio"], "Deployment", "extauthz")["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in _container(rendered["istio"])["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]

    def test_resources(self, rendered: dict[str, list[Doc]]) -> None:
        resources = _container(rendered["istio"])["resources"]
        assert resources["requests"]["cpu"] == "500m"
        assert resources["limits"]["cpu"] == "1"
        assert resources["limits"]["memory"] == "512Mi"

    @pytest.mark.parametrize(
        ("flag", "kind", "source", "key"),
        [
            ("--policy", "configMap", "extauthz-policy", "policy.yaml"),
            ("--keys-file", "secret", "extauthz-keys", "keys.yaml"),
            ("--noise-key-file", "secret", "extauthz-noise-key", "noise.key"),
            ("--admin-token-file", "secret", "extauthz-admin-token", "token"),
        ],
    )
    def test_file_flags_point_into_their_mounts(
        self, rendered: dict[str, list[Doc]], flag: str, kind: str, source: str, key: str
    ) -> None:
        docs = rendered["istio"]
        path = Path(_args(docs)[flag])
        pod = _find(docs, "Deployment", "extauthz")["spec"]["template"]["spec"]
        mount = next(
            m for m in _container(docs)["volumeMounts"] if m["mountPath"] == str(path.parent)
        )
        # A subPath mount would never see ConfigMap or Secret updates.
        assert "subPath" not in mount
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        name_field = "name" if kind == "configMap" else "secretName"
        assert volume[kind][name_field] == source
        items = volume[kind].get("items")
        assert path.name == key and (items is None or {"key": key, "path": key} in items)

    def test_secret_files_are_readable_by_the_guard(self, rendered: dict[str, list[Doc]]) -> None:
        pod = _find(rendered["istio"], "Deployment", "extauthz")["spec"]["template"]["spec"]
        assert pod["securityContext"]["fsGroup"] == 10001
        for volume in pod["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] & 0o040, volume["name"]

    def test_replicas_flag_matches_the_hpa_floor(self, rendered: dict[str, list[Doc]]) -> None:
        docs = rendered["istio"]
        deployment = _find(docs, "Deployment", "extauthz")
        hpa = _find(docs, "HorizontalPodAutoscaler", "extauthz")
        assert int(_args(docs)["--replicas"]) == deployment["spec"]["replicas"] == 2
        assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 10
        assert hpa["spec"]["scaleTargetRef"]["name"] == "extauthz"
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"

    def test_grace_period_covers_the_drain(self, rendered: dict[str, list[Doc]]) -> None:
        docs = rendered["istio"]
        pod = _find(docs, "Deployment", "extauthz")["spec"]["template"]["spec"]
        # drain, then up to 10 s (Guard.stop's grace) for in-flight streams.
        assert pod["terminationGracePeriodSeconds"] > float(_args(docs)["--drain-s"]) + 10

    def test_spread_over_zones_and_nodes(self, rendered: dict[str, list[Doc]]) -> None:
        pod = _find(rendered["istio"], "Deployment", "extauthz")["spec"]["template"]
        keys = {c["topologyKey"] for c in pod["spec"]["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for constraint in pod["spec"]["topologySpreadConstraints"]:
            selector = constraint["labelSelector"]["matchLabels"]
            assert selector.items() <= pod["metadata"]["labels"].items()

    def test_pdb_keeps_one_guard(self, rendered: dict[str, list[Doc]]) -> None:
        pdb = _find(rendered["istio"], "PodDisruptionBudget", "extauthz")
        assert pdb["spec"]["minAvailable"] == 1


class TestPolicyConfigMap:
    """The mounted policy is the file in k8s/base, valid, under a name that never changes."""

    def test_name_has_no_hash_so_it_reloads_in_place(self, rendered: dict[str, list[Doc]]) -> None:
        config_map = _find(rendered["istio"], "ConfigMap", "extauthz-policy")
        assert config_map["data"]["policy.yaml"] == (K8S / "base" / "policy.yaml").read_text()

    def test_policy_is_valid(self) -> None:
        snapshot = parse_policy((K8S / "base" / "policy.yaml").read_text(), source="k8s")
        assert snapshot is not None

    def test_policy_matches_the_built_in_default(self) -> None:
        default = yaml.safe_load((ROOT / "extauthz" / "policy" / "default.yaml").read_text())
        shipped = yaml.safe_load((K8S / "base" / "policy.yaml").read_text())
        assert shipped == default


class TestServices:
    """The ClusterIP Service serves both ports; the headless one lists pods for STRICT_DNS."""

    def test_cluster_ip_service(self, rendered: dict[str, list[Doc]]) -> None:
        docs = rendered["istio"]
        service = _find(docs, "Service", "extauthz")
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == 9191 and ports["grpc"]["appProtocol"] == "grpc"
        assert ports["http"]["port"] == 9192
        assert service["spec"].get("clusterIP") != "None"
        labels = _find(docs, "Deployment", "extauthz")["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()

    def test_headless_service(self, rendered: dict[str, list[Doc]]) -> None:
        service = _find(rendered["istio"], "Service", "extauthz-headless")
        assert service["spec"]["clusterIP"] == "None"
        assert [p["port"] for p in service["spec"]["ports"]] == [9191]
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": "extauthz"}


class TestNetworkPolicy:
    """Only labelled proxies reach 9191, only Prometheus reaches 9192, and egress is Redis + DNS."""

    def _policy(self, rendered: dict[str, list[Doc]]) -> Doc:
        spec: Doc = _find(rendered["istio"], "NetworkPolicy", "extauthz")["spec"]
        return spec

    def test_selects_the_guard_both_ways(self, rendered: dict[str, list[Doc]]) -> None:
        spec = self._policy(rendered)
        assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "extauthz"}
        assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]

    def test_ingress_ports_and_peers(self, rendered: dict[str, list[Doc]]) -> None:
        by_port = {r["ports"][0]["port"]: r["from"] for r in self._policy(rendered)["ingress"]}
        assert set(by_port) == {9191, 9192}
        assert all(len(r["ports"]) == 1 for r in self._policy(rendered)["ingress"])
        grpc_peers = by_port[9191]
        assert {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"extauthz.io/client": "true"}},
        } in grpc_peers
        assert {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": "envoy-gateway-system"}
            }
        } in grpc_peers
        assert by_port[9192] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]

    def test_egress_is_redis_and_dns(self, rendered: dict[str, list[Doc]]) -> None:
        ports = {
            (p["port"], p["protocol"]) for r in self._policy(rendered)["egress"] for p in r["ports"]
        }
        assert ports == {(6379, "TCP"), (53, "UDP"), (53, "TCP")}

    def test_redis_admits_only_the_guard(self, rendered: dict[str, list[Doc]]) -> None:
        spec = _find(rendered["istio"], "NetworkPolicy", "extauthz-redis")["spec"]
        assert spec["ingress"] == [
            {
                "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "extauthz"}}}],
                "ports": [{"port": 6379, "protocol": "TCP"}],
            }
        ]


def _store_source(docs: list[Doc]) -> Doc:
    env = [e for e in _container(docs)["env"] if e["name"] == "EXTAUTHZ_STORE_URL"]
    assert len(env) == 1 and "value" not in env[0]
    source: Doc = env[0]["valueFrom"]
    assert len(source) == 1, f"an env var takes one source, got {sorted(source)}"
    return source


class TestStore:
    """Overlays point every guard at the shared Redis; external-redis reads a Secret instead."""

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_store_is_the_redis_component(
        self, rendered: dict[str, list[Doc]], overlay: str
    ) -> None:
        docs = rendered[overlay]
        ref = _store_source(docs)["configMapKeyRef"]
        config_map = _find(docs, "ConfigMap", ref["name"])
        url = config_map["data"][ref["key"]]
        assert url == "redis://extauthz-redis:6379/0"
        service = _find(docs, "Service", "extauthz-redis")
        assert [p["port"] for p in service["spec"]["ports"]] == [6379]
        # The ConfigMap name carries a hash, so a store change rolls the pods.
        assert re.fullmatch(r"extauthz-settings-[a-z0-9]{10}", ref["name"])

    def test_redis_persists_and_is_probed(self, rendered: dict[str, list[Doc]]) -> None:
        sts = _find(rendered["istio"], "StatefulSet", "extauthz-redis")
        pod = sts["spec"]["template"]["spec"]
        redis = pod["containers"][0]
        args = " ".join(redis["args"])
        assert "--appendonly yes" in args and "--appendfsync everysec" in args
        assert sts["spec"]["replicas"] == 1
        claim = sts["spec"]["volumeClaimTemplates"][0]
        assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
        assert {m["name"] for m in redis["volumeMounts"]} == {claim["metadata"]["name"]}
        for probe in ("readinessProbe", "livenessProbe"):
            assert redis[probe]["exec"]["command"] == ["redis-cli", "ping"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert redis["securityContext"]["allowPrivilegeEscalation"] is False
        headless = _find(rendered["istio"], "Service", "extauthz-redis")
        assert headless["spec"]["clusterIP"] == "None"
        assert sts["spec"]["serviceName"] == "extauthz-redis"

    def test_external_redis_reads_the_secret(self, tmp_path: Path) -> None:
        docs = _compose(tmp_path, [K8S / "base"], [K8S / "components" / "external-redis"])
        assert _store_source(docs) == {"secretKeyRef": {"name": "extauthz-redis-url", "key": "url"}}
        assert _all(docs, "Secret") == []
        deployment = _find(docs, "Deployment", "extauthz")
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


class TestIstio:
    """Check via the mesh's extauthz-grpc provider, Process via an EnvoyFilter before the router."""

    @pytest.fixture
    def mesh(self) -> Doc:
        values: Doc = yaml.safe_load((K8S / "overlays" / "istio" / "mesh-values.yaml").read_text())
        return values

    @pytest.fixture
    def ext_proc_patch(self, rendered: dict[str, list[Doc]]) -> Doc:
        envoy_filter = _find(rendered["istio"], "EnvoyFilter", "extauthz-ext-proc")
        patches = [
            p for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"
        ]
        assert len(patches) == 1
        patch: Doc = patches[0]
        return patch

    def test_provider_name_matches_mesh_config(
        self, rendered: dict[str, list[Doc]], mesh: Doc
    ) -> None:
        policy = _find(rendered["istio"], "AuthorizationPolicy", "extauthz-model-routes")
        assert policy["apiVersion"] == "security.istio.io/v1"
        assert policy["spec"]["action"] == "CUSTOM"
        providers = {p["name"]: p for p in mesh["meshConfig"]["extensionProviders"]}
        assert policy["spec"]["provider"]["name"] == "extauthz-grpc"
        assert "extauthz-grpc" in providers

    def test_mesh_provider_points_at_the_service(
        self, rendered: dict[str, list[Doc]], mesh: Doc
    ) -> None:
        grpc = mesh["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]
        service = _find(rendered["istio"], "Service", "extauthz")
        namespace = service["metadata"]["namespace"]
        assert grpc["service"] == f"extauthz.{namespace}.svc.cluster.local"
        assert grpc["port"] == 9191
        assert grpc["failOpen"] is False

    def test_mesh_timeout_is_explicit_and_within_bounds(
        self, rendered: dict[str, list[Doc]], mesh: Doc
    ) -> None:
        grpc = mesh["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]
        # Istio's default is 600 s: it must be set, above the guard's budget.
        # Mesh config is protobuf JSON: a Duration is seconds with an "s" suffix ("250ms" fails).
        assert re.fullmatch(PROTO_DURATION, grpc["timeout"]), grpc["timeout"]
        timeout = _seconds(grpc["timeout"])
        assert _budget_s(rendered["istio"]) < timeout <= 0.25
        reference = _reference_filter("envoy.filters.http.ext_authz")["grpc_service"]["timeout"]
        assert timeout == _seconds(reference)

    def test_model_routes_are_covered(self, rendered: dict[str, list[Doc]]) -> None:
        policy = _find(rendered["istio"], "AuthorizationPolicy", "extauthz-model-routes")
        paths = policy["spec"]["rules"][0]["to"][0]["operation"]["paths"]
        assert set(paths) == {
            "/v1/models/*",
            "/v2/models/*",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
        }

    def test_policy_and_filter_select_the_same_workload(
        self, rendered: dict[str, list[Doc]]
    ) -> None:
        docs = rendered["istio"]
        policy = _find(docs, "AuthorizationPolicy", "extauthz-model-routes")
        envoy_filter = _find(docs, "EnvoyFilter", "extauthz-ext-proc")
        assert (
            policy["spec"]["selector"]["matchLabels"]
            == envoy_filter["spec"]["workloadSelector"]["labels"]
        )
        assert policy["metadata"]["namespace"] == envoy_filter["metadata"]["namespace"]

    def test_ext_proc_goes_before_the_router(self, ext_proc_patch: Doc) -> None:
        assert ext_proc_patch["patch"]["operation"] == "INSERT_BEFORE"
        match = ext_proc_patch["match"]
        assert match["context"] == "SIDECAR_INBOUND"
        assert match["listener"]["filterChain"]["filter"]["subFilter"]["name"] == (
            "envoy.filters.http.router"
        )
        assert ext_proc_patch["patch"]["value"]["name"] == "envoy.filters.http.ext_proc"

    def test_ext_proc_calls_the_guard_service(
        self, rendered: dict[str, list[Doc]], ext_proc_patch: Doc
    ) -> None:
        config = ext_proc_patch["patch"]["value"]["typed_config"]
        service = _find(rendered["istio"], "Service", "extauthz")
        grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
        host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
        assert (
            config["grpc_service"]["envoy_grpc"]["cluster_name"] == f"outbound|{grpc_port}||{host}"
        )

    def test_ext_proc_settings(self, rendered: dict[str, list[Doc]], ext_proc_patch: Doc) -> None:
        config = ext_proc_patch["patch"]["value"]["typed_config"]
        reference = _reference_filter("envoy.filters.http.ext_proc")
        # Above the guard's decision budget, and the same as the tested reference Envoy.
        assert re.fullmatch(PROTO_DURATION, config["message_timeout"])
        timeout = _seconds(config["message_timeout"])
        assert timeout > _budget_s(rendered["istio"])
        assert timeout == _seconds(reference["message_timeout"])
        assert config["failure_mode_allow"] is False
        assert config["processing_mode"] == reference["processing_mode"]
        assert config["processing_mode"]["request_body_mode"] == "BUFFERED"
        assert config["processing_mode"]["response_body_mode"] == "BUFFERED"
        assert config["allow_mode_override"] is True
        assert "source.address" in config["request_attributes"]
        options = config["metadata_options"]
        assert options["receiving_namespaces"]["untyped"] == ["extauthz"]
        assert "envoy.filters.http.ext_authz" in options["forwarding_namespaces"]["untyped"]

    def test_buffers_hold_a_batch_below_the_grpc_limit(
        self, rendered: dict[str, list[Doc]]
    ) -> None:
        docs = rendered["istio"]
        envoy_filter = _find(docs, "EnvoyFilter", "extauthz-ext-proc")
        merges = {
            p["applyTo"]: p
            for p in envoy_filter["spec"]["configPatches"]
            if p["applyTo"] != "HTTP_FILTER"
        }
        assert set(merges) == {"LISTENER", "CLUSTER"}
        for patch in merges.values():
            assert patch["patch"]["operation"] == "MERGE"
            limit = patch["patch"]["value"]["per_connection_buffer_limit_bytes"]
            assert _max_body_bytes(docs) < limit <= _grpc_limit(docs)
        assert merges["CLUSTER"]["match"]["cluster"]["portNumber"] == 9191

    def test_guard_runs_without_a_sidecar(self, rendered: dict[str, list[Doc]]) -> None:
        labels = _find(rendered["istio"], "Deployment", "extauthz")["spec"]["template"]["metadata"][
            "labels"
        ]
        assert labels["sidecar.istio.io/inject"] == "false"


class TestEnvoyGateway:
    """SecurityPolicy and EnvoyExtensionPolicy reach extauthz:9191 across namespaces, with buffers
    raised above Envoy Gateway's 32 KiB for model batches."""

    def _backend_refs(self, docs: list[Doc]) -> list[tuple[str, Doc]]:
        security = _find(docs, "SecurityPolicy", "extauthz-check")
        extension = _find(docs, "EnvoyExtensionPolicy", "extauthz-process")
        refs = [("SecurityPolicy", r) for r in security["spec"]["extAuth"]["grpc"]["backendRefs"]]
        for proc in extension["spec"]["extProc"]:
            refs += [("EnvoyExtensionPolicy", r) for r in proc["backendRefs"]]
        return refs

    def test_policies_point_at_the_guard(self, rendered: dict[str, list[Doc]]) -> None:
        docs = rendered["envoy-gateway"]
        service = _find(docs, "Service", "extauthz")
        ports = [p["port"] for p in service["spec"]["ports"]]
        refs = self._backend_refs(docs)
        assert len(refs) == 2
        for _, ref in refs:
            assert ref["name"] == service["metadata"]["name"]
            assert ref["namespace"] == service["metadata"]["namespace"]
            assert ref["port"] == 9191 and ref["port"] in ports
            assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""

    def test_reference_grant_admits_both_policies(self, rendered: dict[str, list[Doc]]) -> None:
        docs = rendered["envoy-gateway"]
        grant = _find(docs, "ReferenceGrant", "extauthz-policies")
        assert grant["apiVersion"] == "gateway.networking.k8s.io/v1beta1"
        assert grant["metadata"]["namespace"] == "extauthz"
        allowed = {(f["group"], f["kind"], f["namespace"]) for f in grant["spec"]["from"]}
        for kind, ref in self._backend_refs(docs):
            policy = next(d for d in docs if d["kind"] == kind)
            assert ("gateway.envoyproxy.io", kind, policy["metadata"]["namespace"]) in allowed
            assert {"group": "", "kind": "Service", "name": ref["name"]} in grant["spec"]["to"]

    def test_policies_target_the_model_route(self, rendered: dict[str, list[Doc]]) -> None:
        docs = rendered["envoy-gateway"]
        for kind in ("SecurityPolicy", "EnvoyExtensionPolicy", "BackendTrafficPolicy"):
            targets = _find(docs, kind)["spec"]["targetRefs"]
            assert targets == [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "model"}
            ]
        client = _find(docs, "ClientTrafficPolicy")["spec"]["targetRefs"]
        assert [t["kind"] for t in client] == ["Gateway"]

    def test_both_hooks_fail_closed(self, rendered: dict[str, list[Doc]]) -> None:
        docs = rendered["envoy-gateway"]
        assert _find(docs, "SecurityPolicy")["spec"]["extAuth"]["failOpen"] is False
        assert _find(docs, "EnvoyExtensionPolicy")["spec"]["extProc"][0]["failOpen"] is False

    def test_ext_proc_settings(self, rendered: dict[str, list[Doc]]) -> None:
        docs = rendered["envoy-gateway"]
        proc = _find(docs, "EnvoyExtensionPolicy")["spec"]["extProc"][0]
        mode = proc["processingMode"]
        assert mode["request"]["body"] == "Buffered"
        assert mode["response"]["body"] == "Buffered"
        assert mode["allowModeOverride"] is True
        assert "source.address" in mode["request"]["attributes"]
        # Gateway API durations (GEP-2257): integers with h/m/s/ms units, no decimals.
        assert re.fullmatch(r"([0-9]{1,5}(h|m|s|ms)){1,4}", proc["messageTimeout"])
        timeout = _seconds(proc["messageTimeout"])
        assert timeout > _budget_s(docs)
        assert timeout == _seconds(
            _reference_filter("envoy.filters.http.ext_proc")["message_timeout"]
        )
        assert proc["metadata"]["writableNamespaces"] == ["extauthz"]
        assert "envoy.filters.http.ext_authz" in proc["metadata"]["accessibleNamespaces"]

    def test_buffer_limits_hold_a_batch_below_the_grpc_limit(
        self, rendered: dict[str, list[Doc]]
    ) -> None:
        docs = rendered["envoy-gateway"]
        limits = {
            "ClientTrafficPolicy": _find(docs, "ClientTrafficPolicy")["spec"]["connection"][
                "bufferLimit"
            ],
            "BackendTrafficPolicy": _find(docs, "BackendTrafficPolicy")["spec"]["connection"][
                "bufferLimit"
            ],
            "extProc": _find(docs, "EnvoyExtensionPolicy")["spec"]["extProc"][0]["backendSettings"][
                "connection"
            ]["bufferLimit"],
        }
        for where, limit in limits.items():
            # Above the guard's largest body (8 MiB), and not above its gRPC message limit, or
            # an oversized body would end in a stream error instead of the guard's 413.
            assert _max_body_bytes(docs) < _bytes(limit) <= _grpc_limit(docs), where
            assert _bytes(limit) >= 8 * MIB


class TestPlainEnvoy:
    """The documented Envoy cluster reaches every pod through the headless Service over HTTP/2."""

    def test_cluster_snippet(self, rendered: dict[str, list[Doc]]) -> None:
        docs = rendered["plain-envoy"]
        cluster = yaml.safe_load(
            (K8S / "overlays" / "plain-envoy" / "envoy-cluster.yaml").read_text()
        )
        headless = _find(docs, "Service", "extauthz-headless")
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
            "address"
        ]
        host = (
            f"{headless['metadata']['name']}.{headless['metadata']['namespace']}.svc.cluster.local"
        )
        assert cluster["type"] == "STRICT_DNS"
        assert address["socket_address"] == {"address": host, "port_value": 9191}
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert "http2_protocol_options" in options["explicit_http_config"]
        # Same name as the reference config's cluster, so its filters need no change.
        reference = [c["name"] for c in _reference_envoy()["static_resources"]["clusters"]]
        assert cluster["name"] in reference


def _monitoring_overlays() -> Iterator[str]:
    if (K8S / "components" / "monitoring" / "kustomization.yaml").is_file():
        yield from OVERLAYS


class TestMonitoringComponent:
    """Each overlay composes with the opt-in monitoring component (when it exists)."""

    @pytest.mark.parametrize("overlay", list(_monitoring_overlays()) or ["absent"])
    def test_overlay_with_monitoring_renders_and_validates(
        self, tmp_path: Path, overlay: str
    ) -> None:
        if overlay == "absent":
            pytest.skip("k8s/components/monitoring does not exist yet")
        docs = _compose(tmp_path, [K8S / "overlays" / overlay], [K8S / "components" / "monitoring"])
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert doc["kind"] in CRD_KINDS, doc["kind"]
