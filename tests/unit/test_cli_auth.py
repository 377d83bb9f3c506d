"""The serve command's API-key settings: which registry, and never an open server without keys."""

import pytest

from prefixserve.cli import authenticator, build_parser, check_exposure, env_settings
from prefixserve.errors import ConfigError


def serve_args(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_no_keys_means_no_auth_and_loopback_only():
    auth = authenticator(serve_args())
    assert not auth.enabled
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(host, auth.enabled)
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.com"):
        with pytest.raises(ConfigError, match="without API keys"):
            check_exposure(host, auth.enabled)
    check_exposure("0.0.0.0", True)


def test_admin_key_or_tenants_file_turns_auth_on(tmp_path):
    auth = authenticator(serve_args("--admin-key", "k", "--tenants-file", str(tmp_path / "t.json")))
    assert auth.enabled and auth.authenticate("Bearer k").is_admin
    assert (tmp_path / "t.json").exists()
    only_file = authenticator(serve_args("--tenants-file", str(tmp_path / "t.json")))
    assert only_file.enabled


def test_tenants_redis_needs_a_url():
    with pytest.raises(ConfigError, match="Redis URL"):
        authenticator(serve_args("--tenants-redis"))


def test_environment_variables_are_read_and_listed(monkeypatch):
    monkeypatch.setenv("PREFIXSERVE_ADMIN_KEY", "from-env")
    monkeypatch.setenv("PREFIXSERVE_PORT", "9123")
    args = serve_args()
    assert args.admin_key == "from-env" and args.port == 9123
    names = env_settings()
    assert {"PREFIXSERVE_ADMIN_KEY", "PREFIXSERVE_TENANTS_FILE", "REDIS_URL", "PREFIXSERVE_HOST"} <= set(names)
    assert all(doc for doc in names.values())


def test_metrics_key_guards_only_metrics(monkeypatch, tmp_path):
    from prefixserve.errors import ForbiddenError, UnauthorizedError

    monkeypatch.setenv("PREFIXSERVE_METRICS_KEY", "scrape-me")
    assert "PREFIXSERVE_METRICS_KEY" in env_settings()
    alone = authenticator(serve_args())
    assert not alone.enabled and alone.authenticate(None).tenant == "default"  # no API keys for the rest
    alone.authorize_metrics("Bearer scrape-me")
    with pytest.raises(UnauthorizedError):
        alone.authorize_metrics(None)
    with pytest.raises(ConfigError, match="without API keys"):
        check_exposure("0.0.0.0", alone.enabled)  # a metrics key does not make the server safe to expose

    keyed = authenticator(serve_args("--admin-key", "adm", "--tenants-file", str(tmp_path / "t.json"),
                                     "--metrics-key", "flag-wins"))
    keyed.registry.create("acme")
    _, tenant_key = keyed.registry.add_key("acme")
    keyed.authorize_metrics("Bearer flag-wins")
    keyed.authorize_metrics("Bearer adm")
    with pytest.raises(ForbiddenError):
        keyed.authorize_metrics(f"Bearer {tenant_key}")
    with pytest.raises(UnauthorizedError):
        keyed.authorize_metrics("Bearer scrape-me")  # the environment's key lost to the flag
    with pytest.raises(UnauthorizedError):
        keyed.authenticate("Bearer flag-wins")  # the metrics key is no tenant's and not the admin's


def test_without_any_key_metrics_stay_open(monkeypatch):
    monkeypatch.delenv("PREFIXSERVE_METRICS_KEY", raising=False)
    auth = authenticator(serve_args())
    assert not auth.guards_metrics
    auth.authorize_metrics(None)
