from __future__ import annotations

import pytest

from hydraserve.settings import Settings, SettingsError


def test_defaults_point_at_local_services(monkeypatch):
    for var in ("HYDRA_DATABASE_URL", "HYDRA_BROKER_URL", "HYDRA_ADMIN_KEY", "HYDRA_API_PORT"):
        monkeypatch.delenv(var, raising=False)
    s = Settings.from_env()
    assert s.database_url == "postgresql+psycopg://postgres@127.0.0.1:5432/hydraserve"
    assert s.broker_url == "amqp://guest:guest@127.0.0.1:5672//"
    assert s.admin_key is None and s.api_port == 8000


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("HYDRA_DATABASE_URL", "postgresql+psycopg://u@db:5432/x")
    monkeypatch.setenv("HYDRA_ADMIN_KEY", "k" * 20)
    monkeypatch.setenv("HYDRA_STORE_ROOT", str(tmp_path))
    monkeypatch.setenv("HYDRA_API_PORT", "9001")
    s = Settings.from_env()
    assert (s.database_url, s.admin_key, s.api_port) == ("postgresql+psycopg://u@db:5432/x",
                                                         "k" * 20, 9001)
    assert s.allowed_model_roots == (tmp_path.resolve(),)


@pytest.mark.parametrize("var,value,fragment", [
    ("HYDRA_API_PORT", "eighty", "not an integer"),
    ("HYDRA_API_PORT", "70000", "out of range"),
    ("HYDRA_DATABASE_URL", "mysql://x", "not a PostgreSQL URL"),
    ("HYDRA_BROKER_URL", "redis://x", "not an AMQP URL"),
    ("HYDRA_ADMIN_KEY", "short", "at least 16"),
    ("HYDRA_SCHEDULER_POLICY", "fastest", "allowed: hydra, pp1, sequential"),
])
def test_bad_values_are_named(monkeypatch, var, value, fragment):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=fragment) as info:
        Settings.from_env()
    assert var in str(info.value) or var == "HYDRA_ADMIN_KEY"
