"""A linter for YinDian's Grafana dashboards, after grafana/dashboard-linter's
rules for Prometheus dashboards:

- template-datasource: one `datasource` variable of type datasource, query prometheus, labelled "Data source";
- template-job / template-instance: `job` and `instance` query variables on `$datasource`, multi-select,
  "All" = `.+`, labelled "Job" / "Instance";
- panel-datasource and target-datasource: every panel and every target uses `${datasource}`;
- panel-title-description, panel-units, panel-no-targets;
- target-rate-interval: every rate()/irate() range is `$__rate_interval`, and no other range
  is a fixed duration (`$__range` is allowed for increase over the dashboard's time range);
- target-job / target-instance: every selector has `job=~"$job"` and `instance=~"$instance"`;
- target-counter-agg: a counter (`_total`, `_count`, `_sum`, `_bucket`) is only read through a range function.

    .venv/bin/python dashboards/lint.py            # lint dashboards/*.json, exit 1 on findings

PromQL is scanned, not fully parsed (Prometheus parses every expression in
tests/e2e/test_prometheus.py); the scanner knows selectors, matchers, ranges,
function calls and `by`/`without`/`on`/`ignoring`/`group_*` label lists."""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parent
DATASOURCE_UIDS = {"$datasource", "${datasource}"}
RANGE_FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets",
                   "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
                   "last_over_time", "quantile_over_time", "stddev_over_time", "present_over_time"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATOR_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2"}
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
PANEL_TYPES_WITH_QUERIES = {"timeseries", "graph", "stat", "gauge", "bargauge", "table", "heatmap",
                            "singlestat", "piechart"}

_TOKEN = re.compile(r"""\s*(?:
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<brace>\{)
  | (?P<bracket>\[)
  | (?P<open>\()
  | (?P<close>\))
  | (?P<other>[^\s])
)""", re.VERBOSE)
_AGGREGATION_CLAUSE = re.compile(r"(by|without)\s*\(")
_MATCHER = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*,?""")


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]
    range: str | None
    function: str | None  # the function whose argument this selector is, if any


def _closing(text: str, start: int, open_ch: str, close_ch: str) -> int:
    depth, i, quote = 0, start, ""
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == open_ch:
            depth += 1
        elif ch == close_ch:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced {open_ch} in {text!r}")


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of a PromQL expression, with their matchers, range and enclosing function."""
    out: list[Selector] = []
    calls: list[str | None] = []  # the function (or None for plain parentheses) of each open parenthesis
    i, pending_call = 0, None
    while i < len(expr):
        m = _TOKEN.match(expr, i)
        if m is None:
            break
        i = m.end()
        if m.group("ident"):
            name = m.group("ident")
            rest = expr[i:].lstrip()
            if name in LABEL_LIST_KEYWORDS:
                if rest.startswith("("):
                    i = _closing(expr, expr.index("(", i), "(", ")") + 1
                continue
            if name in OPERATOR_KEYWORDS:
                continue
            if rest.startswith("(") or _AGGREGATION_CLAUSE.match(rest):  # f(...), or sum by (...) (...)
                pending_call = name
                continue
            i, sel = _selector(expr, i, name, calls[-1] if calls else None)
            out.append(sel)
        elif m.group("brace"):
            i, sel = _selector(expr, m.start("brace"), "", calls[-1] if calls else None)
            out.append(sel)
        elif m.group("open"):
            calls.append(pending_call)
            pending_call = None
        elif m.group("close"):
            if calls:
                calls.pop()
        elif m.group("bracket"):
            i = _closing(expr, m.start("bracket"), "[", "]") + 1  # a subquery range: not a selector
    return out


def _selector(expr: str, i: int, metric: str, function: str | None) -> tuple[int, Selector]:
    matchers: list[tuple[str, str, str]] = []
    j = len(expr) - len(expr[i:].lstrip())
    if j < len(expr) and expr[j] == "{":
        end = _closing(expr, j, "{", "}")
        body, pos = expr[j + 1:end], 0
        while pos < len(body.strip()) and body[pos:].strip():
            mm = _MATCHER.match(body, pos)
            if mm is None:
                raise ValueError(f"cannot read matchers {body!r}")
            matchers.append((mm.group(1), mm.group(2), json.loads(mm.group(3))))
            pos = mm.end()
        i = end + 1
    rng = None
    k = len(expr) - len(expr[i:].lstrip())
    if k < len(expr) and expr[k] == "[":
        end = _closing(expr, k, "[", "]")
        rng = expr[k + 1:end].strip()
        i = end + 1
    return i, Selector(metric, tuple(matchers), rng, function)


def _uid(obj: Any) -> str:
    ds = obj.get("datasource") if isinstance(obj, dict) else None
    if isinstance(ds, dict):
        return str(ds.get("uid", ""))
    return str(ds or "")


def _lint_templates(d: dict[str, Any]) -> Iterator[str]:
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds_vars = [v for v in variables.values() if v.get("type") == "datasource"]
    if len(ds_vars) != 1 or ds_vars[0].get("name") != "datasource" or ds_vars[0].get("query") != "prometheus":
        yield "template-datasource: needs exactly one prometheus datasource variable named 'datasource'"
    elif ds_vars[0].get("label") != "Data source":
        yield "template-datasource: the datasource variable should be labelled 'Data source'"
    for name in ("job", "instance"):
        v = variables.get(name)
        if v is None:
            yield f"template-{name}: missing the {name} variable"
            continue
        if _uid(v) not in DATASOURCE_UIDS:
            yield f"template-{name}: should use datasource $datasource, uses {_uid(v)!r}"
        if v.get("type") != "query":
            yield f"template-{name}: should be a query variable"
        if not v.get("multi") or v.get("allValue") != ".+":
            yield f"template-{name}: should be multi-select with allValue '.+'"
        if v.get("label") != name.title():
            yield f"template-{name}: should be labelled {name.title()!r}"


def _lint_expr(where: str, expr: str) -> Iterator[str]:
    try:
        found = selectors(expr)
    except ValueError as exc:
        yield f"{where}: target-promql: {exc}"
        return
    if not found:
        yield f"{where}: target-promql: no selector in {expr!r}"
    for sel in found:
        labels = {(name, op, value) for name, op, value in sel.matchers}
        for var in ("job", "instance"):
            if (var, "=~", f"${var}") not in labels:
                yield f"{where}: target-{var}: selector {sel.metric or '{}'} lacks {var}=~\"${var}\""
        if sel.range is not None:
            if sel.function in ("rate", "irate") and sel.range != "$__rate_interval":
                yield f"{where}: target-rate-interval: {sel.function}() of {sel.metric} uses [{sel.range}]"
            elif sel.range not in ("$__rate_interval", "$__range", "$__interval"):
                yield f"{where}: target-rate-interval: {sel.metric} uses a fixed range [{sel.range}]"
        if sel.metric.endswith(COUNTER_SUFFIXES) and (sel.range is None or sel.function not in RANGE_FUNCTIONS):
            yield f"{where}: target-counter-agg: counter {sel.metric} is not read through rate()/increase()"


def lint_dashboard(d: dict[str, Any], name: str = "dashboard") -> list[str]:
    """Every finding, as `<dashboard>/<panel>: <rule>: <what>`; empty when the dashboard is clean."""
    findings = [f"{name}: {f}" for f in _lint_templates(d)]
    for panel in d.get("panels", []):
        where = f"{name}/{panel.get('title', panel.get('id'))}"
        if panel.get("type") == "row":
            continue
        if not panel.get("title") or not panel.get("description"):
            findings.append(f"{where}: panel-title-description: needs a title and a description")
        if _uid(panel) not in DATASOURCE_UIDS:
            findings.append(f"{where}: panel-datasource: uses {_uid(panel)!r}, not $datasource")
        if panel.get("type") in PANEL_TYPES_WITH_QUERIES:
            if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
                findings.append(f"{where}: panel-units: no unit")
            if not panel.get("targets"):
                findings.append(f"{where}: panel-no-targets: no targets")
        for t in panel.get("targets", []):
            twhere = f"{where}/{t.get('refId', '?')}"
            if _uid(t) not in DATASOURCE_UIDS:
                findings.append(f"{twhere}: target-datasource: uses {_uid(t)!r}, not $datasource")
            findings.extend(_lint_expr(twhere, str(t.get("expr", ""))))
    return findings


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.json"))}


def dashboard_expressions(directory: Path = DASHBOARDS_DIR) -> list[tuple[str, str]]:
    """(where, expr) of every target of every panel, and of the query variables."""
    out = []
    for name, d in load_dashboards(directory).items():
        for panel in d.get("panels", []):
            for t in panel.get("targets", []):
                out.append((f"{name}/{panel.get('title')}/{t.get('refId')}", str(t["expr"])))
    return out


def main() -> int:
    findings = [f for name, d in load_dashboards().items() for f in lint_dashboard(d, name)]
    for f in findings:
        print(f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
