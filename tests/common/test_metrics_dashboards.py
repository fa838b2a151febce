"""The Grafana dashboards and the Prometheus configuration as shipped: built
from dashboards/build.py (the JSON is not stale), clean under the
dashboard-linter rules, and the linter itself catches each kind of mistake.
(tests/e2e/test_prometheus.py evaluates every expression on a real Prometheus.)"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from dashboards import build
from dashboards.lint import DASHBOARDS_DIR, lint_dashboard, load_dashboards, selectors
from tests.support.procs import REPO

pytestmark = pytest.mark.timeout(60)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def test_dashboard_json_is_what_build_py_makes() -> None:
    for name, make in build.DASHBOARDS.items():
        assert (DASHBOARDS_DIR / name).read_text(encoding="utf-8") == build.render(make), \
            f"{name} is stale: run .venv/bin/python dashboards/build.py"


def test_operations_and_business_dashboards_are_lint_clean() -> None:
    dashboards = load_dashboards()
    assert set(dashboards) == {"operations.json", "business.json"}
    for name, d in dashboards.items():
        assert lint_dashboard(d, name) == []
    assert len({d["uid"] for d in dashboards.values()}) == 2


def test_operations_dashboard_covers_what_operators_watch() -> None:
    ops = load_dashboards()["operations.json"]
    exprs = " ".join(t["expr"] for p in ops["panels"] for t in p["targets"])
    for needle in ("grpc_server_handled_total", "histogram_quantile(0.99", "grpc_client_handling_seconds_bucket",
                   "yindian_feed_lag_seconds", "yindian_reversal_queue_depth", "yindian_db_pool_checked_out"):
        assert needle in exprs
    assert any(p["type"] == "heatmap" for p in ops["panels"])
    biz = " ".join(t["expr"] for p in load_dashboards()["business.json"]["panels"] for t in p["targets"])
    for needle in ("yindian_payments_fen_total", "by (bank, channel)", "yindian_arrears_fen", "by (branch)"):
        assert needle in biz


def _set_expr(expr: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        d["panels"][0]["targets"][0]["expr"] = expr
    return mutate


def _drop_variable(name: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        d["templating"]["list"] = [v for v in d["templating"]["list"] if v["name"] != name]
    return mutate


def _set_panel(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        d["panels"][0][key] = value
    return mutate


def _set_target_datasource(d: dict[str, Any]) -> None:
    d["panels"][0]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}


def _no_unit(d: dict[str, Any]) -> None:
    d["panels"][0]["fieldConfig"]["defaults"].pop("unit")


def _single_job(d: dict[str, Any]) -> None:
    for v in d["templating"]["list"]:
        if v["name"] == "job":
            v["multi"] = False


MISTAKES = [
    ("no job matcher", _set_expr('sum(rate(grpc_server_handled_total{instance=~"$instance"}[$__rate_interval]))'),
     "target-job"),
    ("no instance matcher", _set_expr('sum(rate(grpc_server_handled_total{job=~"$job"}[$__rate_interval]))'),
     "target-instance"),
    ("fixed rate window", _set_expr('sum(rate(grpc_server_handled_total{job=~"$job", instance=~"$instance"}[5m]))'),
     "target-rate-interval"),
    ("raw counter", _set_expr('sum(grpc_server_handled_total{job=~"$job", instance=~"$instance"})'),
     "target-counter-agg"),
    ("bare selector", _set_expr("sum by (bank) (yindian_feed_lag_seconds)"), "target-job"),
    ("hard-coded panel datasource", _set_panel("datasource", {"type": "prometheus", "uid": "prom1"}),
     "panel-datasource"),
    ("hard-coded target datasource", _set_target_datasource, "target-datasource"),
    ("no description", _set_panel("description", ""), "panel-title-description"),
    ("no unit", _no_unit, "panel-units"),
    ("no datasource variable", _drop_variable("datasource"), "template-datasource"),
    ("no instance variable", _drop_variable("instance"), "template-instance"),
    ("single-select job", _single_job, "template-job"),
]


@pytest.mark.parametrize("what,mutate,rule", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_linter_catches(what: str, mutate: Callable[[dict[str, Any]], None], rule: str) -> None:
    d = copy.deepcopy(load_dashboards()["operations.json"])
    mutate(d)
    findings = lint_dashboard(d, "operations.json")
    assert any(f": {rule}:" in f for f in findings), (what, findings)


def test_selector_scanner_reads_aggregations_functions_and_matchers() -> None:
    sels = selectors('histogram_quantile(0.9, sum by (le) (rate(a_bucket{job=~"$job", x="y,z"}[$__rate_interval]))) '
                     "/ on (job) group_left max without (i) (b{})")
    assert [(s.metric, s.function, s.range) for s in sels] == [("a_bucket", "rate", "$__rate_interval"),
                                                               ("b", "max", None)]
    assert sels[0].matchers == (("job", "=~", "$job"), ("x", "=", "y,z"))


def test_deploy_prometheus_yml_scrapes_every_process() -> None:
    text = (REPO / "deploy" / "prometheus.yml").read_text(encoding="utf-8")
    for job, port in (("mis_adapter", 9101), ("bridge", 9102)):
        assert f"job_name: {job}" in text and f"127.0.0.1:{port}" in text
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool not installed and CI=true requires it")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    out = subprocess.run([promtool, "check", "config", str(REPO / "deploy" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning_points_at_the_dashboards_and_a_datasource() -> None:
    prov = DASHBOARDS_DIR / "provisioning"
    ds = (prov / "datasources" / "yindian.yaml").read_text(encoding="utf-8")
    assert "type: prometheus" in ds and "timeInterval: 15s" in ds
    scrape = (REPO / "deploy" / "prometheus.yml").read_text(encoding="utf-8")
    assert "scrape_interval: 15s" in scrape  # Grafana's $__rate_interval assumes the same interval
    dash = (prov / "dashboards" / "yindian.yaml").read_text(encoding="utf-8")
    assert "type: file" in dash and "path:" in dash


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool not installed and CI=true requires it")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return promtool


def test_alert_rules_are_valid_and_loaded_by_the_deploy_config() -> None:
    assert "alerts.yml" in (REPO / "deploy" / "prometheus.yml").read_text(encoding="utf-8")
    out = subprocess.run([_promtool(), "check", "rules", str(REPO / "deploy" / "alerts.yml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 rules found" in out.stdout


def test_alert_rules_fire_on_a_divergence_and_on_silence_only() -> None:
    """deploy/alerts_test.yml: a flagged divergence (fen, or count only) alerts on both servers at once and
    stops with agreement; a bridge that stops exchanging alerts after its 5-minute `for`."""
    out = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=REPO / "deploy",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
