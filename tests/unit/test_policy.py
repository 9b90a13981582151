"""The policy: the built-in default, validation errors with YAML paths, keys files, hot reload."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from extauthz.core.risk import Action, RiskLevel
from extauthz.policy.loader import (
    PolicyError,
    Snapshot,
    default_policy_text,
    load_default,
    load_policy,
)
from extauthz.policy.watch import PolicyHolder
from extauthz.telemetry.metrics import REGISTRY
from tests.store_contract import FakeClock

PolicyFromText = Callable[[str], Snapshot]
WriteFile = Callable[[str, str], Path]
KeyDigest = Callable[[str], str]

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


def _problems(build: PolicyFromText, text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        build(text)
    return caught.value.problems


def _metric(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, f"metric {name} is not registered"
    return value


def _bump_mtime(path: Path) -> None:
    """Move the file's mtime forward so a same-second rewrite still changes its stamp."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


class TestDefaultPolicy:
    """The built-in policy loads and matches what the docs promise for a public model API."""

    def test_default_has_the_three_documented_tiers_and_caps(self) -> None:
        """anonymous/free/trusted exist with caps 16/64/1024."""
        policy = load_default().policy
        assert set(policy.tiers) == {"anonymous", "free", "trusted"}
        caps = {name: tier.max_instances for name, tier in policy.tiers.items()}
        assert caps == {"anonymous": 16, "free": 64, "trusted": 1024}

    def test_default_outputs_reduce_detail_below_trusted(self) -> None:
        """anonymous gets keyed noise and 2 decimals, free noise and 3, trusted the answer itself;
        suspicious clients of the lower tiers get labels only."""
        tiers = load_default().policy.tiers
        anonymous, free = tiers["anonymous"].output, tiers["free"].output
        assert [s.policy for s in anonymous] == ["keyed_noise", "round"] and anonymous[
            -1
        ].decimals == 2
        assert [s.policy for s in free] == ["keyed_noise", "round"] and free[-1].decimals == 3
        assert tiers["trusted"].output == ()
        for name in ("anonymous", "free"):
            assert [s.policy for s in tiers[name].output_for(RiskLevel.SUSPICIOUS)] == [
                "label_only"
            ]

    def test_default_is_enforcing_and_denies_unknown_keys(self) -> None:
        """The default enforces, refuses unlisted keys and maps levels to the documented actions."""
        snapshot = load_default()
        policy = snapshot.policy
        assert policy.mode == "enforce"
        assert policy.identity.unknown_key == "deny"
        assert policy.identity.api_key_header == "x-api-key"
        assert policy.identity.anonymous_tier == "anonymous"
        assert snapshot.keys_by_sha256 == {}
        assert policy.levels.action_for(RiskLevel.NORMAL) is Action.ALLOW
        assert policy.levels.action_for(RiskLevel.SUSPICIOUS) is Action.CHALLENGE
        assert policy.levels.action_for(RiskLevel.ABUSIVE) is Action.BLOCK
        assert policy.fail_modes.store == "fail_open"
        assert policy.retry_after_s == 60

    def test_default_protects_both_model_dialects(self) -> None:
        """KServe v1, OIP v2 and OpenAI-compatible routes are protected by default."""
        policy = load_default().policy
        assert [(r.prefix, r.dialect) for r in policy.routes] == [
            ("/v1/models/", "kserve_v1"),
            ("/v2/models/", "oip_v2"),
            ("/v1/chat/completions", "openai"),
            ("/v1/completions", "openai"),
            ("/v1/embeddings", "openai"),
            ("/inference.GRPCInferenceService/", "auto"),
        ]

    def test_default_digest_is_stable(self) -> None:
        """Two loads of the same text give the same digest, so a reload of it is a no-op."""
        assert load_default().digest == load_default().digest
        assert default_policy_text().startswith("#")


class TestValidationErrors:
    """A bad policy raises PolicyError whose problems name the YAML path and the reason."""

    def test_bad_tier_cap_names_its_path(self, policy_from_text: PolicyFromText) -> None:
        problems = _problems(
            policy_from_text,
            """
            tiers:
              anonymous: {}
              free: {max_instances: 0}
            """,
        )
        assert len(problems) == 1
        assert problems[0].startswith("tiers.free.max_instances: ")
        assert "greater than 0" in problems[0]

    def test_bad_key_digest_names_its_index(self, policy_from_text: PolicyFromText) -> None:
        problems = _problems(
            policy_from_text,
            """
            identity:
              api_keys:
                - {name: alice, sha256: not-a-digest, tier: free}
            """,
        )
        assert problems == [
            "identity.api_keys[0].sha256: must be the 64-character hex SHA-256 of the key"
        ]

    def test_unknown_top_level_field(self, policy_from_text: PolicyFromText) -> None:
        problems = _problems(policy_from_text, "tierz: {}\n")
        assert problems == ["tierz: unknown field"]

    def test_unknown_nested_field(self, policy_from_text: PolicyFromText) -> None:
        problems = _problems(policy_from_text, "tiers: {free: {max_instance: 3}, anonymous: {}}\n")
        assert problems == ["tiers.free.max_instance: unknown field"]

    def test_api_key_with_unknown_tier(self, policy_from_text: PolicyFromText) -> None:
        problems = _problems(
            policy_from_text,
            f"""
            identity:
              api_keys:
                - {{name: alice, sha256: '{DIGEST_A}', tier: free}}
                - {{name: bob, sha256: '{DIGEST_B}', tier: gold}}
            """,
        )
        assert problems == ["identity.api_keys[1].tier: unknown tier 'gold'"]

    def test_duplicate_key_digest_is_refused_case_insensitively(
        self, policy_from_text: PolicyFromText
    ) -> None:
        """Two entries with the same digest (one upper-case) would make a key's name ambiguous."""
        problems = _problems(
            policy_from_text,
            f"""
            identity:
              api_keys:
                - {{name: alice, sha256: '{DIGEST_A}', tier: free}}
                - {{name: bob, sha256: '{DIGEST_A.upper()}', tier: free}}
            """,
        )
        assert problems == ["identity.api_keys[1].sha256: duplicate key"]

    def test_anonymous_tier_must_exist(self, policy_from_text: PolicyFromText) -> None:
        problems = _problems(policy_from_text, "identity: {anonymous_tier: ghost}\n")
        assert problems == ["identity.anonymous_tier: unknown tier 'ghost'"]

    def test_bad_yaml(self, policy_from_text: PolicyFromText) -> None:
        problems = _problems(policy_from_text, "tiers: [\n")
        assert len(problems) == 1
        assert problems[0].startswith("not valid YAML: ")

    @pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
    def test_document_must_be_a_mapping(self, policy_from_text: PolicyFromText, text: str) -> None:
        assert _problems(policy_from_text, text) == [
            "the document must be a mapping of policy sections"
        ]

    def test_bad_action_in_levels_lists_the_valid_ones(
        self, policy_from_text: PolicyFromText
    ) -> None:
        problems = _problems(policy_from_text, "levels: {elevated: smite}\n")
        assert len(problems) == 1
        assert problems[0].startswith("levels.elevated: unknown action 'smite'")
        for name in ("allow", "throttle", "challenge", "block"):
            assert name in problems[0]

    def test_every_problem_is_reported(self, policy_from_text: PolicyFromText) -> None:
        """Two independent mistakes give two problems, so one run fixes both."""
        problems = _problems(policy_from_text, "mode: loud\nretry_after_s: 0\n")
        paths = sorted(p.split(":", 1)[0] for p in problems)
        assert paths == ["mode", "retry_after_s"]

    def test_error_message_names_the_source(self, write_file: WriteFile) -> None:
        path = write_file("policy.yaml", "mode: loud\n")
        with pytest.raises(PolicyError) as caught:
            load_policy(path)
        assert caught.value.source == str(path)
        assert str(caught.value).startswith(f"{path}: mode: ")
        assert caught.value.code == "policy_invalid"

    def test_unreadable_file_is_a_policy_error(self, tmp_path: Path) -> None:
        with pytest.raises(PolicyError) as caught:
            load_policy(tmp_path / "absent.yaml")
        assert caught.value.problems[0].startswith("cannot read: ")

    def test_empty_document_is_the_model_defaults(self, policy_from_text: PolicyFromText) -> None:
        """An empty file is a valid policy: every section takes its default."""
        policy = policy_from_text("").policy
        assert policy.mode == "enforce"
        assert set(policy.tiers) == {"anonymous", "free", "trusted"}


class TestKeysFile:
    """identity.keys_file adds API keys from a second file (a k8s Secret)."""

    def test_keys_file_is_merged_relative_to_the_policy(
        self, write_file: WriteFile, key_digest: KeyDigest
    ) -> None:
        """Keys from both files are indexed; the relative path resolves next to the policy."""
        keys = write_file(
            "conf/secret/keys.yaml",
            f"""
            api_keys:
              - {{name: bob, sha256: '{key_digest("bob-key")}', tier: trusted}}
            """,
        )
        policy_path = write_file(
            "conf/policy.yaml",
            f"""
            identity:
              keys_file: secret/keys.yaml
              api_keys:
                - {{name: alice, sha256: '{key_digest("alice-key")}', tier: free}}
            """,
        )
        snapshot = load_policy(policy_path)
        names = {key.name: key.tier for key in snapshot.keys_by_sha256.values()}
        assert names == {"alice": "free", "bob": "trusted"}
        assert snapshot.keys_by_sha256[key_digest("bob-key")].name == "bob"
        assert snapshot.watched_files == (policy_path, keys)

    def test_missing_keys_file_is_a_policy_error(self, write_file: WriteFile) -> None:
        policy_path = write_file("policy.yaml", "identity: {keys_file: nowhere.yaml}\n")
        with pytest.raises(PolicyError) as caught:
            load_policy(policy_path)
        assert len(caught.value.problems) == 1
        assert caught.value.problems[0].startswith("identity.keys_file: cannot read ")
        assert "nowhere.yaml" in caught.value.problems[0]

    def test_keys_file_without_a_list_is_a_policy_error(self, write_file: WriteFile) -> None:
        write_file("keys.yaml", "api_keys: {bob: x}\n")
        policy_path = write_file("policy.yaml", "identity: {keys_file: keys.yaml}\n")
        with pytest.raises(PolicyError) as caught:
            load_policy(policy_path)
        assert "must hold a list under 'api_keys'" in caught.value.problems[0]

    def test_bad_key_in_keys_file_names_its_merged_index(self, write_file: WriteFile) -> None:
        write_file("keys.yaml", "api_keys:\n  - {name: bob, sha256: short, tier: free}\n")
        policy_path = write_file(
            "policy.yaml",
            f"identity:\n  keys_file: keys.yaml\n  api_keys:\n    - {{name: al, sha256: '{DIGEST_A}', tier: free}}\n",
        )
        with pytest.raises(PolicyError) as caught:
            load_policy(policy_path)
        assert caught.value.problems[0].startswith("identity.api_keys[1].sha256: ")

    def test_keys_file_changes_the_digest(self, write_file: WriteFile) -> None:
        """The digest covers the keys file, so a key rotation is seen as a new policy."""
        keys = write_file("keys.yaml", "api_keys: []\n")
        policy_path = write_file("policy.yaml", "identity: {keys_file: keys.yaml}\n")
        before = load_policy(policy_path).digest
        keys.write_text(
            f"api_keys:\n  - {{name: bob, sha256: '{DIGEST_B}', tier: free}}\n", "utf-8"
        )
        assert load_policy(policy_path).digest != before


class TestCoverageReference:
    """detection.coverage_reference must exist (next to the policy) when detection is on."""

    def test_missing_reference_is_a_policy_error(self, write_file: WriteFile) -> None:
        policy_path = write_file(
            "policy.yaml", "detection: {enabled: true, coverage_reference: ref.npy}\n"
        )
        with pytest.raises(PolicyError) as caught:
            load_policy(policy_path)
        assert caught.value.problems[0].startswith("detection.coverage_reference: no such file")

    def test_reference_next_to_the_policy_loads(self, write_file: WriteFile) -> None:
        write_file("conf/ref.npy", "placeholder")
        policy_path = write_file(
            "conf/policy.yaml", "detection: {enabled: true, coverage_reference: ref.npy}\n"
        )
        assert load_policy(policy_path).policy.detection.coverage_reference == "ref.npy"

    def test_disabled_detection_does_not_need_it(self, write_file: WriteFile) -> None:
        policy_path = write_file(
            "policy.yaml", "detection: {enabled: false, coverage_reference: ref.npy}\n"
        )
        assert not load_policy(policy_path).policy.detection.enabled


class TestRoutesAndDenyList:
    """route_for picks protected routes ignoring case; deny networks parse CIDRs."""

    @pytest.mark.parametrize(
        ("path", "dialect"),
        [
            ("/v1/models/iris:predict", "kserve_v1"),
            ("/V1/Models/iris:predict", "kserve_v1"),
            ("/v2/MODELS/iris/infer", "oip_v2"),
        ],
    )
    def test_model_routes_match_ignoring_case(self, path: str, dialect: str) -> None:
        route = load_default().policy.route_for(path)
        assert route is not None
        assert route.dialect == dialect

    @pytest.mark.parametrize(
        "path", ["/", "/healthz", "/v1/model/iris", "/api/v1/models/iris", "/v3/models/x"]
    )
    def test_other_paths_are_not_protected(self, path: str) -> None:
        assert load_default().policy.route_for(path) is None

    def test_first_matching_route_wins(self, policy_from_text: PolicyFromText) -> None:
        policy = policy_from_text(
            """
            routes:
              - {prefix: /v1/models/special/, dialect: oip_v2}
              - {prefix: /v1/models/, dialect: kserve_v1}
            """
        ).policy
        special = policy.route_for("/v1/models/special/x")
        plain = policy.route_for("/v1/models/other")
        assert special is not None and special.dialect == "oip_v2"
        assert plain is not None and plain.dialect == "kserve_v1"

    def test_route_prefix_must_be_absolute(self, policy_from_text: PolicyFromText) -> None:
        assert _problems(policy_from_text, "routes: [{prefix: v1/models/}]\n") == [
            "routes[0].prefix: must start with '/'"
        ]

    def test_deny_networks_parse_v4_and_v6_cidrs(self, policy_from_text: PolicyFromText) -> None:
        deny = policy_from_text(
            "deny: {networks: ['10.0.0.0/8', '2001:db8::/32', '192.0.2.7']}\n"
        ).policy.deny
        assert deny.networks == (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8::/32"),
            ipaddress.ip_network("192.0.2.7/32"),
        )

    def test_deny_network_that_is_not_a_cidr_is_refused(
        self, policy_from_text: PolicyFromText
    ) -> None:
        problems = _problems(policy_from_text, "deny: {networks: ['not-a-net']}\n")
        assert problems
        assert all(p.startswith("deny.networks[0]: ") for p in problems)

    def test_deny_key_digests_are_lowered_and_checked(
        self, policy_from_text: PolicyFromText
    ) -> None:
        deny = policy_from_text(f"deny: {{key_sha256: ['{DIGEST_A.upper()}']}}\n").policy.deny
        assert deny.key_sha256 == frozenset({DIGEST_A})
        problems = _problems(policy_from_text, "deny: {key_sha256: ['abc']}\n")
        assert problems == ["deny.key_sha256: not a SHA-256 hex digest: 'abc'"]


_POLICY_V1 = "retry_after_s: 30\n"
_POLICY_V2 = "retry_after_s: 45\n"


class TestHotReload:
    """PolicyHolder swaps the snapshot on a valid change and keeps the old one on a bad one."""

    def test_valid_edit_applies_and_is_counted(
        self, write_file: WriteFile, clock: FakeClock
    ) -> None:
        path = write_file("policy.yaml", _POLICY_V1)
        holder = PolicyHolder(path, clock=clock)
        assert holder.current.policy.retry_after_s == 30
        reloads = _metric("extauthz_policy_reloads_total")
        path.write_text(_POLICY_V2, "utf-8")
        _bump_mtime(path)
        assert holder.reload_if_changed() is True
        assert holder.current.policy.retry_after_s == 45
        assert _metric("extauthz_policy_reloads_total") == reloads + 1

    def test_invalid_edit_keeps_the_old_snapshot(
        self, write_file: WriteFile, clock: FakeClock
    ) -> None:
        path = write_file("policy.yaml", _POLICY_V1)
        holder = PolicyHolder(path, clock=clock)
        before = holder.current
        errors = _metric("extauthz_policy_reload_errors_total")
        reloads = _metric("extauthz_policy_reloads_total")
        path.write_text("retry_after_s: -1\n", "utf-8")
        _bump_mtime(path)
        assert holder.reload_if_changed() is False
        assert holder.current is before
        assert _metric("extauthz_policy_reload_errors_total") == errors + 1
        assert _metric("extauthz_policy_reloads_total") == reloads

    def test_bad_file_is_counted_once_then_a_fix_applies(
        self, write_file: WriteFile, clock: FakeClock
    ) -> None:
        """A bad file is not re-parsed (and re-counted) every poll; the next good edit applies."""
        path = write_file("policy.yaml", _POLICY_V1)
        holder = PolicyHolder(path, clock=clock)
        errors = _metric("extauthz_policy_reload_errors_total")
        path.write_text("tiers: [\n", "utf-8")
        _bump_mtime(path)
        assert holder.reload_if_changed() is False
        assert holder.reload_if_changed() is False
        assert _metric("extauthz_policy_reload_errors_total") == errors + 1
        path.write_text(_POLICY_V2, "utf-8")
        _bump_mtime(path)
        assert holder.reload_if_changed() is True
        assert holder.current.policy.retry_after_s == 45

    def test_unchanged_file_is_not_reloaded(self, write_file: WriteFile, clock: FakeClock) -> None:
        """No change, or a touch that leaves the content equal, keeps the same snapshot object."""
        path = write_file("policy.yaml", _POLICY_V1)
        holder = PolicyHolder(path, clock=clock)
        before = holder.current
        reloads = _metric("extauthz_policy_reloads_total")
        assert holder.reload_if_changed() is False
        path.write_text(_POLICY_V1, "utf-8")
        _bump_mtime(path)
        assert holder.reload_if_changed() is False
        assert holder.current is before
        assert _metric("extauthz_policy_reloads_total") == reloads

    def test_kubernetes_symlink_swap_applies(self, tmp_path: Path, clock: FakeClock) -> None:
        """A ConfigMap update re-points ``..data`` atomically; the new target is loaded."""
        mount = tmp_path / "mount"
        (mount / "..2026_a").mkdir(parents=True)
        (mount / "..2026_a" / "policy.yaml").write_text(_POLICY_V1, "utf-8")
        os.symlink("..2026_a", mount / "..data")
        os.symlink("..data/policy.yaml", mount / "policy.yaml")
        holder = PolicyHolder(mount / "policy.yaml", clock=clock)
        assert holder.current.policy.retry_after_s == 30

        (mount / "..2026_b").mkdir()
        (mount / "..2026_b" / "policy.yaml").write_text(_POLICY_V2, "utf-8")
        os.symlink("..2026_b", mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")
        assert holder.reload_if_changed() is True
        assert holder.current.policy.retry_after_s == 45
        assert holder.current.source == str(mount / "policy.yaml")

    def test_keys_file_change_alone_is_picked_up(
        self, write_file: WriteFile, clock: FakeClock, key_digest: KeyDigest
    ) -> None:
        keys = write_file("keys.yaml", "api_keys: []\n")
        path = write_file("policy.yaml", "identity: {keys_file: keys.yaml}\n")
        holder = PolicyHolder(path, clock=clock)
        assert holder.current.keys_by_sha256 == {}
        keys.write_text(
            f"api_keys:\n  - {{name: bob, sha256: '{key_digest('bob-key')}', tier: trusted}}\n",
            "utf-8",
        )
        _bump_mtime(keys)
        assert holder.reload_if_changed() is True
        assert holder.current.keys_by_sha256[key_digest("bob-key")].name == "bob"

    def test_deleted_file_keeps_the_old_snapshot(
        self, write_file: WriteFile, clock: FakeClock
    ) -> None:
        path = write_file("policy.yaml", _POLICY_V1)
        holder = PolicyHolder(path, clock=clock)
        before = holder.current
        path.unlink()
        assert holder.reload_if_changed() is False
        assert holder.current is before

    def test_without_a_path_the_default_serves_and_never_reloads(self, clock: FakeClock) -> None:
        holder = PolicyHolder(None, clock=clock)
        assert holder.path is None
        assert holder.current.digest == load_default().digest
        assert holder.reload_if_changed() is False

    def test_bad_initial_file_raises(self, write_file: WriteFile, clock: FakeClock) -> None:
        """At start there is no old snapshot to keep: a bad file is an error, not a default."""
        path = write_file("policy.yaml", "mode: loud\n")
        with pytest.raises(PolicyError):
            PolicyHolder(path, clock=clock)

    def test_load_time_gauge_follows_the_injected_clock(
        self, write_file: WriteFile, clock: FakeClock
    ) -> None:
        path = write_file("policy.yaml", _POLICY_V1)
        holder = PolicyHolder(path, clock=clock)
        assert _metric("extauthz_policy_loaded_timestamp_seconds") == clock()
        clock.advance(100.0)
        path.write_text(_POLICY_V2, "utf-8")
        _bump_mtime(path)
        assert holder.reload_if_changed() is True
        assert _metric("extauthz_policy_loaded_timestamp_seconds") == clock()
