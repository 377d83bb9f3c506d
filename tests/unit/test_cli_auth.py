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
