"""Builds YinDian's Grafana dashboards (operations.json, business.json) from
the panel lists below, so every panel follows the same rules: the templated
`$datasource` on the panel and on each target, `job`/`instance` matchers on
every selector, `$__rate_interval` in every rate, a unit and a description.

    .venv/bin/python dashboards/build.py           # rewrite the JSON files
    .venv/bin/python dashboards/build.py --check   # exit 1 if they are stale

tests/e2e/test_prometheus.py lints the JSON and evaluates every expression
against a real Prometheus scraping a running stack."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
# Every selector carries these; the variables' "All" is ".+".
SEL = 'job=~"$job", instance=~"$instance"'
RI = "$__rate_interval"
# gRPC codes that mean the server (not the caller's request) failed.
SERVER_FAULT_CODES = "UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|UNIMPLEMENTED"


@dataclass
class Target:
    expr: str
    legend: str = ""
    fmt: str = "time_series"


@dataclass
class Panel:
    title: str
    description: str
    unit: str
    targets: list[Target]
    kind: str = "timeseries"
    width: int = 12
    options: dict[str, Any] = field(default_factory=dict)


def _variable(name: str, query_metric: str, depends: str = "") -> dict[str, Any]:
    matcher = '{job=~"$job"}' if depends else ""
    query = f"label_values({query_metric}{matcher}, {name})"
    return {
        "name": name, "label": name.title(), "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
        "multi": True, "includeAll": True, "allValue": ".+", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def _templating(metric: str) -> dict[str, Any]:
    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": ""},
        _variable("job", metric),
        _variable("instance", metric, depends="job"),
    ]}


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = [{"datasource": DS, "expr": t.expr, "legendFormat": t.legend or "__auto", "format": t.fmt,
                "refId": chr(ord("A") + i), "range": True} for i, t in enumerate(p.targets)]
    out: dict[str, Any] = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description, "datasource": DS,
        "gridPos": {"h": 8, "w": p.width, "x": x, "y": y}, "targets": targets,
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "options": p.options,
    }
    if p.kind == "heatmap":
        out["options"] = {"calculate": False, "yAxis": {"unit": p.unit}, "cellGap": 1,
                          "color": {"mode": "scheme", "scheme": "Oranges"}, **p.options}
    return out


def dashboard(uid: str, title: str, description: str, panels: list[Panel], var_metric: str) -> dict[str, Any]:
    laid_out: list[dict[str, Any]] = []
    x = y = 0
    for i, p in enumerate(panels, start=1):
        if x + p.width > 24:
            x, y = 0, y + 8
        laid_out.append(_panel_json(p, i, x, y))
        x += p.width
    return {
        "uid": uid, "title": title, "description": description, "tags": ["yindian"], "editable": False,
        "schemaVersion": 39, "version": 1, "timezone": "browser", "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "graphTooltip": 1,
        "templating": _templating(var_metric), "annotations": {"list": []}, "panels": laid_out,
    }


def _quantile(q: str, side: str = "server") -> Target:
    return Target(f"histogram_quantile({q}, sum by (le, grpc_method) "
                  f"(rate(grpc_{side}_handling_seconds_bucket{{{SEL}}}[{RI}])))", f"p{round(float(q) * 100)} {{{{grpc_method}}}}")


def operations() -> dict[str, Any]:
    handled = f"grpc_server_handled_total{{{SEL}}}"
    panels = [
        Panel("Requests per second by method", "RPCs completed per second on each server, by method.", "reqps",
              [Target(f"sum by (job, grpc_method) (rate({handled}[{RI}]))", "{{job}} {{grpc_method}}")]),
        Panel("Server error ratio by method",
              "Share of RPCs that failed for the server's own reasons (UNKNOWN, INTERNAL, UNAVAILABLE, "
              "DEADLINE_EXCEEDED, DATA_LOSS, UNIMPLEMENTED); 0 when none failed.", "percentunit",
              [Target(f'(sum by (job, grpc_method) (rate(grpc_server_handled_total{{{SEL}, '
                      f'grpc_code=~"{SERVER_FAULT_CODES}"}}[{RI}])) '
                      f"or sum by (job, grpc_method) (rate({handled}[{RI}])) * 0) "
                      f"/ sum by (job, grpc_method) (rate({handled}[{RI}]))", "{{job}} {{grpc_method}}")]),
        Panel("Answers other than OK by code",
              "Per-second rate of non-OK statuses by method and code (NOT_FOUND, INVALID_ARGUMENT... are the "
              "callers' mistakes; watch UNAVAILABLE and RESOURCE_EXHAUSTED).", "reqps",
              [Target(f'sum by (job, grpc_method, grpc_code) (rate(grpc_server_handled_total{{{SEL}, '
                      f'grpc_code!="OK"}}[{RI}]))', "{{job}} {{grpc_method}} {{grpc_code}}")]),
        Panel("Unary latency percentiles by method",
              "p50, p90 and p99 of unary RPC handling time on the servers (streams are not latencies).", "s",
              [_quantile("0.5"), _quantile("0.9"), _quantile("0.99")]),
        Panel("Unary latency heatmap", "Distribution of unary RPC handling time, all methods.", "s",
              [Target(f"sum by (le) (rate(grpc_server_handling_seconds_bucket{{{SEL}}}[{RI}]))", "{{le}}",
                      "heatmap")], kind="heatmap"),
        Panel("Link latency p99 (bridge to utility)",
              "p99 of the bridge's upstream unary calls to mis_adapter, by method.", "s",
              [_quantile("0.99", "client")]),
        Panel("Link calls by code (bridge to utility)", "The bridge's upstream calls per second, by status code.",
              "reqps", [Target(f"sum by (grpc_method, grpc_code) (rate(grpc_client_handled_total{{{SEL}}}[{RI}]))",
                               "{{grpc_method}} {{grpc_code}}")]),
        Panel("Stream and call messages", "Messages per second received and sent by the servers, by method.",
              "short",
              [Target(f"sum by (grpc_method) (rate(grpc_server_msg_received_total{{{SEL}}}[{RI}]))",
                      "in {{grpc_method}}"),
               Target(f"sum by (grpc_method) (rate(grpc_server_msg_sent_total{{{SEL}}}[{RI}]))",
                      "out {{grpc_method}}")]),
        Panel("Bill feed lag by bank", "Age of the oldest bill notice the bank has not acknowledged.", "s",
              [Target(f"max by (bank) (yindian_feed_lag_seconds{{{SEL}}})", "{{bank}}")]),
        Panel("Bill feed backlog and window by bank",
              "Notices above the bank's cursor (backlog) and sent but unacknowledged on the open stream.", "short",
              [Target(f"sum by (bank) (yindian_feed_backlog_notices{{{SEL}}})", "backlog {{bank}}"),
               Target(f"sum by (bank) (yindian_feed_unacknowledged_notices{{{SEL}}})", "in flight {{bank}}")]),
        Panel("Bill feed throughput by bank", "Notices sent and acknowledged per second.", "short",
              [Target(f"sum by (bank) (rate(yindian_feed_notices_sent_total{{{SEL}}}[{RI}]))", "sent {{bank}}"),
               Target(f"sum by (bank) (rate(yindian_feed_notices_acknowledged_total{{{SEL}}}[{RI}]))",
                      "acknowledged {{bank}}")]),
        Panel("Bank link state", "1 for each bank's state on the link: open, signed_on (签到), signed_off "
              "(签退: pays settle next day) or suspended (停工, overrides sign-on).", "short",
              [Target(f"max by (bank, state) (yindian_bank_link_state{{{SEL}}})", "{{bank}} {{state}}")]),
        Panel("Reversal queue (bridge)",
              "Reversals awaiting delivery to the utility and pays in doubt (SUSPECT), by bank.", "short",
              [Target(f"sum by (bank) (yindian_reversal_queue_depth{{{SEL}}})", "reversals {{bank}}"),
               Target(f"sum by (bank) (yindian_suspect_payments{{{SEL}}})", "suspect {{bank}}")]),
        Panel("Oldest in-doubt work (bridge)", "Age of the oldest queued reversal and of the oldest SUSPECT pay.",
              "s",
              [Target(f"max by (bank) (yindian_reversal_queue_oldest_age_seconds{{{SEL}}})", "reversal {{bank}}"),
               Target(f"max by (bank) (yindian_suspect_payments_oldest_age_seconds{{{SEL}}})", "suspect {{bank}}")]),
        Panel("Control totals divergence (continuous reconciliation)",
              "Fen by which the bridge's and the utility's control totals of the open settlement date differ, "
              "once the difference has persisted past the in-doubt window; 0 in agreement. Both servers report "
              "it: non-zero means a payment changed on one side only (see the logs for the serials).", "short",
              [Target(f"max by (job, bank) (yindian_control_total_divergence_fen{{{SEL}}})", "{{job}} {{bank}}")]),
        Panel("Database pool use", "Checked-out connections as a share of each pool.", "percentunit",
              [Target(f"sum by (job, db) (yindian_db_pool_checked_out_connections{{{SEL}}}) "
                      f"/ sum by (job, db) (yindian_db_pool_size_connections{{{SEL}}})", "{{job}} {{db}}")]),
        Panel("Database errors", "Database errors per second by database; 0 when there are none.", "short",
              [Target(f"sum by (job, db) (rate(yindian_db_errors_total{{{SEL}}}[{RI}])) "
                      f"or sum by (job, db) (yindian_db_pool_size_connections{{{SEL}}}) * 0", "{{job}} {{db}}")]),
        Panel("Process CPU", "CPU seconds per second used by each process.", "percentunit",
              [Target(f"rate(process_cpu_seconds_total{{{SEL}}}[{RI}])", "{{job}} {{instance}}")]),
        Panel("Process memory", "Resident memory of each process.", "bytes",
              [Target(f"process_resident_memory_bytes{{{SEL}}}", "{{job}} {{instance}}")]),
        Panel("Targets up", "1 when Prometheus scraped the process successfully.", "short",
              [Target(f"up{{{SEL}}}", "{{job}} {{instance}}")]),
    ]
    return dashboard("yindian-operations", "YinDian / Operations",
                     "Rates, errors and latency per RPC, the bill feed, the bridge's in-doubt work, databases.",
                     panels, "grpc_server_started_total")


def business() -> dict[str, Any]:
    panels = [
        Panel("Payments per second by bank and channel", "Payments newly posted in the MIS (replays excluded).",
              "reqps",
              [Target(f"sum by (bank, channel) (rate(yindian_payments_total{{{SEL}}}[{RI}]))",
                      "{{bank}} {{channel}}")]),
        Panel("Collections by bank and channel (yuan per second)", "Money posted per second, in yuan.",
              "currencyCNY",
              [Target(f"sum by (bank, channel) (rate(yindian_payments_fen_total{{{SEL}}}[{RI}])) / 100",
                      "{{bank}} {{channel}}")]),
        Panel("Collected in the time range by bank (yuan)", "Money posted over the dashboard's time range.",
              "currencyCNY",
              [Target(f"sum by (bank) (increase(yindian_payments_fen_total{{{SEL}}}[$__range])) / 100", "{{bank}}")],
              kind="stat", options={"reduceOptions": {"calcs": ["lastNotNull"]}}),
        Panel("Cancels by outcome", "Cancels (冲正) per second by bank and outcome.", "reqps",
              [Target(f"sum by (bank, outcome) (rate(yindian_cancels_total{{{SEL}}}[{RI}]))",
                      "{{bank}} {{outcome}}")]),
        Panel("Bridge reversals by outcome", "How the bridge settled pays in doubt, per second.", "reqps",
              [Target(f"sum by (bank, outcome) (rate(yindian_reversals_total{{{SEL}}}[{RI}]))",
                      "{{bank}} {{outcome}}")]),
        Panel("Arrears by branch (yuan)", "Unpaid principal of all bills, by branch.", "currencyCNY",
              [Target(f"sum by (branch) (yindian_arrears_fen{{{SEL}}}) / 100", "{{branch}}")]),
        Panel("Households in arrears by branch", "Accounts with at least one unpaid bill, by branch.", "short",
              [Target(f"sum by (branch) (yindian_arrears_households{{{SEL}}})", "{{branch}}")]),
        Panel("Auto-debit results by outcome", "Debit results the banks returned on the bill feed, per second.",
              "reqps",
              [Target(f"sum by (bank, outcome) (rate(yindian_feed_debit_results_total{{{SEL}}}[{RI}]))",
                      "{{bank}} {{outcome}}")]),
        Panel("Reconciled records by outcome", "Records reconciled over the time range, by bank and outcome.",
              "short",
              [Target(f"sum by (bank, outcome) (increase(yindian_reconcile_records_total{{{SEL}}}[$__range]))",
                      "{{bank}} {{outcome}}")]),
    ]
    return dashboard("yindian-business", "YinDian / Business",
                     "Collections by bank and channel, cancels and reversals, arrears by branch, auto-debit "
                     "and reconciliation.", panels, "up")


DASHBOARDS = {"operations.json": operations, "business.json": business}


def render(build: Any) -> str:
    return json.dumps(build(), ensure_ascii=False, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON files differ from the build")
    args = parser.parse_args()
    stale = []
    for name, build in DASHBOARDS.items():
        path, text = HERE / name, render(build)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("stale: " + ", ".join(stale) + " (run dashboards/build.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
