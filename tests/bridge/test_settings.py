"""`python -m bridge serve` options: every setting has a documented flag, and
flags beat YINDIAN_* environment variables, which beat the TOML file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.serve import check_settings, parse
from bridge.settings import BridgeSettings
from tests.support.procs import REPO

pytestmark = pytest.mark.timeout(60)


def test_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "bridge", "serve", "--help"], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=30).stdout
    for name in BridgeSettings.model_fields:
        assert "--" + name.replace("_", "-") in out, name
    assert "journal" in out and "(default:" in out


def test_flags_override_environment_which_overrides_the_config_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('bank_id = "ABC"\nupstream = "127.0.0.1:1"\nresolver_batch_max = 7\n')
    monkeypatch.setenv("YINDIAN_UPSTREAM", "127.0.0.1:2")
    s = parse(["--config", str(config), "--resolver-batch-max", "9", "--insecure"])
    assert (s.bank_id, s.upstream, s.resolver_batch_max, s.insecure) == ("ABC", ["127.0.0.1:2"], 9, True)


def test_upstream_replicas_from_repeated_flags_commas_or_a_toml_array(tmp_path: Path) -> None:
    assert parse(["--upstream", "127.0.0.1:1", "--upstream", "127.0.0.1:2"]).upstream == ["127.0.0.1:1",
                                                                                       "127.0.0.1:2"]
    assert parse(["--upstream", "127.0.0.1:1,127.0.0.1:3"]).upstream == ["127.0.0.1:1", "127.0.0.1:3"]
    config = tmp_path / "bridge.toml"
    config.write_text('upstream = ["127.0.0.1:4", "127.0.0.1:5"]\n')
    assert parse(["--config", str(config)]).upstream == ["127.0.0.1:4", "127.0.0.1:5"]


def test_plain_text_needs_a_well_formed_bank_id() -> None:
    with pytest.raises(SystemExit):
        check_settings(BridgeSettings(insecure=True))
    with pytest.raises(SystemExit, match="bank_id"):
        check_settings(BridgeSettings(insecure=True, bank_id="no spaces allowed"))
    check_settings(BridgeSettings(insecure=True, bank_id="ICBC"))
