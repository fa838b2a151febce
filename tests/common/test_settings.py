"""Both servers' settings: one shared base (the time zone default in one
place), and every numeric setting range-checked whichever source it comes
from (flag, YINDIAN_* environment, TOML file), refused like a bad flag with a
message naming the setting, its flag and its environment variable."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge import serve as bridge_serve
from bridge.settings import BridgeSettings
from mis_adapter import serve as adapter_serve
from mis_adapter.settings import AdapterSettings
from tests.support.procs import REPO
from yindian_common.clock import DEFAULT_TZ
from yindian_common.settings import ServerSettings

pytestmark = pytest.mark.timeout(60)

Parse = Callable[[list[str]], ServerSettings]
SERVERS: dict[str, tuple[type[ServerSettings], Parse]] = {
    "mis_adapter": (AdapterSettings, adapter_serve.parse),
    "bridge": (BridgeSettings, bridge_serve.parse),
}


def _refusal(parse: Parse, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _numeric(cls: type[ServerSettings]) -> list[str]:
    return [n for n, f in cls.model_fields.items() if f.annotation in (int, float)]


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_every_numeric_setting_has_both_bounds(server: str) -> None:
    cls, _parse = SERVERS[server]
    for name in _numeric(cls):
        kinds = {type(m).__name__ for m in cls.model_fields[name].metadata}
        assert kinds & {"Ge", "Gt"} and "Le" in kinds, f"{server} {name} has no range: {kinds}"


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_an_out_of_range_flag_is_refused_naming_the_setting(server: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cls, parse = SERVERS[server]
    err = _refusal(parse, ["--max-workers", "0"], capsys)
    assert "invalid setting max_workers (--max-workers, YINDIAN_MAX_WORKERS)" in err
    assert "greater than or equal to 1" in err
    err = _refusal(parse, ["--max-message-bytes", str(2**40)], capsys)
    assert "max_message_bytes" in err and "less than or equal" in err
    # every numeric setting refuses a negative value
    for name in _numeric(cls):
        err = _refusal(parse, ["--" + name.replace("_", "-"), "-1"], capsys)
        assert f"invalid setting {name} " in err, (name, err)


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_an_out_of_range_environment_variable_is_refused(server: str, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _cls, parse = SERVERS[server]
    monkeypatch.setenv("YINDIAN_GRACE_S", "-1")
    err = _refusal(parse, [], capsys)
    assert "invalid setting grace_s (--grace-s, YINDIAN_GRACE_S)" in err


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_an_out_of_range_config_file_value_is_refused(server: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _cls, parse = SERVERS[server]
    config = tmp_path / "server.toml"
    config.write_text("db_pool_size = 100000\nmetrics_port = 70000\n")
    err = _refusal(parse, ["--config", str(config)], capsys)
    assert "invalid setting db_pool_size (--db-pool-size, YINDIAN_DB_POOL_SIZE)" in err
    assert "invalid setting metrics_port (--metrics-port, YINDIAN_METRICS_PORT)" in err


def test_values_in_range_are_taken_and_the_time_zone_default_is_shared() -> None:
    s = adapter_serve.parse(["--max-workers", "1", "--feed-window-max", "1", "--bank-status-ttl-s", "0"])
    assert (s.max_workers, s.feed_window_max, s.bank_status_ttl_s) == (1, 1, 0.0)
    assert AdapterSettings.model_fields["timezone"].default == DEFAULT_TZ
    assert BridgeSettings.model_fields["timezone"].default == DEFAULT_TZ
    shared = set(ServerSettings.model_fields)
    # the shared settings are declared once: neither server redeclares them
    for cls in (AdapterSettings, BridgeSettings):
        assert not shared & set(vars(cls).get("__annotations__", {})), cls.__name__


def test_rules_across_settings_are_refused_naming_them(capsys: pytest.CaptureFixture[str]) -> None:
    err = _refusal(adapter_serve.parse, ["--feed-heartbeat-s", "20", "--feed-lease-ttl-s", "10"], capsys)
    assert "feed_lease_ttl_s must be longer than feed_heartbeat_s" in err
    err = _refusal(bridge_serve.parse, ["--resolver-backoff-initial-s", "5", "--resolver-backoff-cap-s", "1"],
                   capsys)
    assert "resolver_backoff_initial_s must not exceed resolver_backoff_cap_s" in err


def test_the_server_process_refuses_before_serving() -> None:
    done = subprocess.run([sys.executable, "-m", "mis_adapter", "serve", "--insecure", "--listen", "127.0.0.1:0",
                           "--max-concurrent-rpcs", "0"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "READY" not in done.stdout
    assert "invalid setting max_concurrent_rpcs (--max-concurrent-rpcs, YINDIAN_MAX_CONCURRENT_RPCS)" in done.stderr
