"""Issue 9 item 8 in plain-text loopback mode: the bridge admits only its own
bank core (its `--bank-id`) and the clients its configuration names
(`--allow-client`); anyone else is refused with PERMISSION_DENIED before
anything is journaled or forwarded; every journal row records who called.
(Under mTLS the same holds with the certificate naming the caller:
tests/e2e/test_cert_matrix.py.)"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
import trustme

from bridge.serve import check_settings, parse
from bridge.settings import BridgeSettings
from mis_adapter.serve import parse as adapter_parse
from tests.bridge.conftest import BANK, BankCore, Utility, new_serial, pay_request
from tests.bridge.link import Link
from yindian.v1 import billing_pb2 as pb
from yindian_common.status import error_info

pytestmark = pytest.mark.timeout(120)


def _journal(core: BankCore) -> list[tuple[str, str, str]]:
    core.bridge.ctx.writer.flush(10)
    with core.bridge.ctx.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(  # type: ignore[misc]
            "SELECT serial, bank_id, caller FROM bridge_journal ORDER BY serial"))]


def test_only_its_own_bank_and_allowed_clients_get_in(utility: Utility, link: Link,
                                                      make_bridge: Callable[..., BankCore]) -> None:
    core = make_bridge(link.address, allow_client=["ICBC-TELLERS"])
    own, allowed, stranger, other_bank = (new_serial(t) for t in ("own", "allowed", "zzb", "abc"))
    core.stub.Pay(pay_request(own, next(utility.accounts), 100), timeout=10)  # loopback, no metadata: its own core
    core.stub.Pay(pay_request(allowed, next(utility.accounts), 100), metadata=[("x-yindian-bank-id", "ICBC-TELLERS")],
                  timeout=10)
    sent_before = link.requests
    for serial, who in ((stranger, "ZZB"), (other_bank, "ABC")):
        for call in (lambda s=serial, w=who: core.stub.Pay(pay_request(s, next(utility.accounts), 100),
                                                           metadata=[("x-yindian-bank-id", w)], timeout=10),
                     lambda s=serial, w=who: core.stub.Cancel(
                         pb.CancelRequest(cancel_serial=f"C{s}"[:32], original_serial=own, amount_fen=100),
                         metadata=[("x-yindian-bank-id", w)], timeout=10),
                     lambda w=who: core.stub.GetPayment(pb.GetPaymentRequest(bank_serial=own),
                                                        metadata=[("x-yindian-bank-id", w)], timeout=10)):
            with pytest.raises(grpc.RpcError) as exc:
                call()
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
            info = error_info(exc.value)
            assert info is not None and info.reason == "CLIENT_NOT_ALLOWED"
    assert link.requests == sent_before  # nothing crossed the link for them
    assert _journal(core) == sorted([(own, BANK, BANK), (allowed, BANK, "ICBC-TELLERS")])


def test_under_mtls_the_bank_id_is_the_certificates_and_must_agree(tmp_path: Path) -> None:
    """In TLS mode the journal and audit stored bank_id '' (the probe): the bridge now
    takes its own certificate's identity, and refuses to start when --bank-id says otherwise."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", common_name="ICBC")
    for name, blob in (("b.pem", leaf.cert_chain_pems[0]), ("b.key", leaf.private_key_pem), ("ca.pem", ca.cert_pem)):
        blob.write_to_path(str(tmp_path / name))
    tls = {"tls_cert": str(tmp_path / "b.pem"), "tls_key": str(tmp_path / "b.key"), "tls_ca": str(tmp_path / "ca.pem")}
    assert check_settings(BridgeSettings(**tls)).bank_id == "ICBC"  # type: ignore[arg-type]
    assert check_settings(BridgeSettings(bank_id="ICBC", **tls)).bank_id == "ICBC"  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match="differs"):
        check_settings(BridgeSettings(bank_id="ABC", **tls))  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match="allow-client"):
        check_settings(BridgeSettings(bank_id="ICBC", insecure=True, allow_client=["bad name"]))  # type: ignore[call-arg]


def test_name_lists_come_from_flags_env_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YINDIAN_ALLOW_CLIENT", "ICBC-TELLERS, ICBC-ATM")
    monkeypatch.setenv("YINDIAN_OPERATORS", "ops-a,ops-b")
    assert parse(["--bank-id", "ICBC", "--insecure"]).allow_client == ["ICBC-TELLERS", "ICBC-ATM"]
    assert adapter_parse([]).operators == ["ops-a", "ops-b"]
    assert adapter_parse(["--operator", "ops-c", "--operator", "ops-d"]).operators == ["ops-c", "ops-d"]
    monkeypatch.delenv("YINDIAN_OPERATORS")
    toml = tmp_path / "mis.toml"
    toml.write_text('operators = ["ops-e"]\ntls_revoked_serials = ["0x1f", "2a"]\n')
    got = adapter_parse(["--config", str(toml)])
    assert got.operators == ["ops-e"] and got.tls_revoked_serials == ["0x1f", "2a"]
