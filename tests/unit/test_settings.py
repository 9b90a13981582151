"""Process settings: contract defaults, EXTAUTHZ_* variables, flags over variables, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from extauthz.settings import MIB, Settings, from_env


class TestDefaults:
    """With no flags and no variables the settings are the documented contract."""

    def test_contract_values(self) -> None:
        settings = from_env({}, {})
        assert settings.grpc_port == 9191
        assert settings.http_port == 9192
        assert settings.decision_budget_ms == 50.0
        assert settings.decision_budget_s == pytest.approx(0.05)
        assert settings.max_message_bytes == 8 * 1024 * 1024
        assert settings.store_url == "memory"
        assert settings.policy_path is None
        assert settings.host == "127.0.0.1"
        assert settings == Settings()

    def test_grpc_limit_leaves_room_above_the_largest_body(self) -> None:
        settings = from_env({"max_message_bytes": 2048}, {})
        assert settings.grpc_max_message_bytes > settings.max_message_bytes
        # Above Envoy's 10 MiB buffer (envoy/envoy.yaml), so every body Envoy passes reaches the guard.
        assert Settings().grpc_max_message_bytes > 10 * MIB

    def test_settings_are_frozen(self) -> None:
        settings = Settings()
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.grpc_port = 1  # type: ignore[misc]


class TestSources:
    """EXTAUTHZ_<NAME> variables are read and typed; flags given explicitly win."""

    def test_environment_variables_are_read_and_typed(self, tmp_path: Path) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_text("{}\n", "utf-8")
        settings = from_env(
            {},
            {
                "EXTAUTHZ_GRPC_PORT": "7000",
                "EXTAUTHZ_HTTP_PORT": "7001",
                "EXTAUTHZ_DECISION_BUDGET_MS": "20.5",
                "EXTAUTHZ_MAX_MESSAGE_BYTES": "4096",
                "EXTAUTHZ_STORE_URL": "redis://cache:6379/0",
                "EXTAUTHZ_POLICY_PATH": str(policy),
                "EXTAUTHZ_LOG_FORMAT": "console",
            },
        )
        assert (settings.grpc_port, settings.http_port) == (7000, 7001)
        assert settings.decision_budget_ms == 20.5
        assert settings.max_message_bytes == 4096
        assert settings.store_url == "redis://cache:6379/0"
        assert settings.policy_path == policy
        assert isinstance(settings.policy_path, Path)
        assert settings.log_format == "console"

    def test_process_environment_is_the_default_source(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("EXTAUTHZ_HTTP_PORT", "9300")
        assert from_env({}).http_port == 9300

    def test_flags_override_variables(self) -> None:
        environ = {"EXTAUTHZ_GRPC_PORT": "7000", "EXTAUTHZ_DECISION_BUDGET_MS": "20"}
        settings = from_env({"grpc_port": 7100, "decision_budget_ms": None}, environ)
        assert settings.grpc_port == 7100
        assert (
            settings.decision_budget_ms == 20.0
        )  # a flag left unset (None) defers to the variable

    def test_empty_variable_is_ignored(self) -> None:
        assert from_env({}, {"EXTAUTHZ_GRPC_PORT": ""}).grpc_port == 9191

    def test_unrelated_variables_are_ignored(self) -> None:
        assert from_env({}, {"GRPC_PORT": "1", "EXTAUTHZ_NOT_A_SETTING": "x"}) == Settings()


class TestValidation:
    """A setting that cannot work raises ValueError naming it."""

    @pytest.mark.parametrize(
        ("variable", "value", "name"),
        [
            ("GRPC_PORT", "abc", "grpc_port"),
            ("GRPC_PORT", "70000", "grpc_port"),
            ("HTTP_PORT", "-1", "http_port"),
            ("DECISION_BUDGET_MS", "0", "decision_budget_ms"),
            ("DECISION_BUDGET_MS", "fast", "decision_budget_ms"),
            ("MAX_MESSAGE_BYTES", "100", "max_message_bytes"),
            ("MAX_MESSAGE_BYTES", "8MiB", "max_message_bytes"),
            ("LOG_FORMAT", "xml", "log_format"),
            ("RELOAD_INTERVAL_S", "0", "reload_interval_s"),
            ("DRAIN_S", "-1", "drain_s"),
            ("MEMORY_MAX_CLIENTS", "0", "memory_max_clients"),
            ("CLIENT_TTL_S", "0", "client_ttl_s"),
        ],
    )
    def test_bad_variable_names_its_setting(self, variable: str, value: str, name: str) -> None:
        with pytest.raises(ValueError, match=name):
            from_env({}, {f"EXTAUTHZ_{variable}": value})

    @pytest.mark.parametrize(
        ("variable", "value", "name"),
        [
            ("DECISION_BUDGET_MS", "nan", "decision_budget_ms"),
            ("DECISION_BUDGET_MS", "inf", "decision_budget_ms"),
            ("RELOAD_INTERVAL_S", "nan", "reload_interval_s"),
            ("CLIENT_TTL_S", "nan", "client_ttl_s"),
        ],
    )
    def test_non_finite_numbers_are_refused(self, variable: str, value: str, name: str) -> None:
        """NaN passes every ``<= 0`` check; a NaN or infinite budget would not bound store calls."""
        with pytest.raises(ValueError, match=name):
            from_env({}, {f"EXTAUTHZ_{variable}": value})

    def test_bad_flag_names_its_setting(self) -> None:
        with pytest.raises(ValueError, match="http_port"):
            from_env({"http_port": 99999}, {})

    def test_port_zero_is_allowed(self) -> None:
        """Tests bind port 0 and read the port the kernel chose."""
        settings = from_env({"grpc_port": 0, "http_port": 0}, {})
        assert (settings.grpc_port, settings.http_port) == (0, 0)

    def test_missing_policy_file(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="policy_path: no such file"):
            from_env({"policy_path": tmp_path / "absent.yaml"}, {})

    def test_policy_path_that_is_a_directory(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="policy_path"):
            from_env({}, {"EXTAUTHZ_POLICY_PATH": str(tmp_path)})

    def test_missing_admin_token_file(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="admin_token_file"):
            from_env({}, {"EXTAUTHZ_ADMIN_TOKEN_FILE": str(tmp_path / "token")})

    def test_validate_on_a_hand_built_value(self) -> None:
        with pytest.raises(ValueError, match="max_message_bytes"):
            Settings(max_message_bytes=10).validate()
        Settings().validate()


class TestWorkers:
    """``--workers``/EXTAUTHZ_WORKERS: one process by default; more need a shared store and fixed ports."""

    _REDIS = "redis://cache:6379/0"

    def test_one_worker_by_default(self) -> None:
        assert from_env({}, {}).workers == 1

    def test_flag_and_variable_are_read(self) -> None:
        environ = {"EXTAUTHZ_WORKERS": "3", "EXTAUTHZ_STORE_URL": self._REDIS}
        assert from_env({}, environ).workers == 3
        assert from_env({"workers": 2}, environ).workers == 2  # the flag wins

    @pytest.mark.parametrize("value", ["0", "-2"])
    def test_zero_or_negative_is_refused(self, value: str) -> None:
        with pytest.raises(ValueError, match="workers: must be at least 1"):
            from_env({}, {"EXTAUTHZ_WORKERS": value, "EXTAUTHZ_STORE_URL": self._REDIS})

    def test_not_a_number_names_the_setting(self) -> None:
        with pytest.raises(ValueError, match="workers: cannot read"):
            from_env({}, {"EXTAUTHZ_WORKERS": "two"})

    def test_several_workers_refuse_the_memory_store(self) -> None:
        """Each worker would keep its own counters: N workers would grant N times every limit."""
        with pytest.raises(ValueError, match=r"--workers needs a shared store \(redis://\.\.\.\)"):
            from_env({"workers": 2}, {})

    def test_one_worker_keeps_the_memory_store(self) -> None:
        assert from_env({"workers": 1}, {}).store_url == "memory"

    @pytest.mark.parametrize("port", ["grpc_port", "http_port"])
    def test_several_workers_refuse_port_zero(self, port: str) -> None:
        """Port 0 picks a port per bind: the workers would not share one port."""
        with pytest.raises(ValueError, match="fixed ports"):
            from_env({"workers": 2, "store_url": self._REDIS, port: 0}, {})
