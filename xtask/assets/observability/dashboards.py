"""Evaluates Istio's dashboard panels and Kiali's graph queries against a Prometheus.

usage: dashboards.py PROMETHEUS_URL QUERIES_JSON VIEWS_JSON

QUERIES_JSON is `istio-queries.json` (the upstream queries). VIEWS_JSON names what a user
would look at: for each dashboard a list of variable choices (`{"service": ..., "qrep":
...}`; variables left out take their dashboard default, multi-value ones "All"), and for
Kiali a list of graphs (`{"namespace", "workload", "app", "version", "service",
"cluster"}`). Variables are filled in as Grafana fills them: a `query_result(...)` variable
runs its query and applies its regex to each printed series, "All" is the alternation of
every value found, `$__rate_interval` is one minute (twelve of the suite's scrapes).

Prints one JSON line per query and view:
  {"kind": "panel"|"kiali", "name": ..., "view": {...}, "query": <as sent>, "series": N,
   "values": [...], "problems": [...]}
then a last line {"variables": {...}} with what each variable offered. `problems` lists what
is implausible in the answer: NaN or negative values, a success rate above 1, a latency of
zero or over 10 s, and for Kiali's graph a series without a label Kiali needs (it drops such
series) or with `source_cluster="unknown"` (Kiali's "bad telemetry"). A NaN (0/0: `irate`
saw no request between the last two scrapes) is no data, as the dashboard shows it.
"""

import json
import math
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

RATE_INTERVAL = "1m"
# Labels without which Kiali's graph drops a series (graph/telemetry/istio/istio.go).
KIALI_REQUIRED = [
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
]


def query(url, promql):
    data = urllib.parse.urlencode({"query": promql}).encode()
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query", data=data, timeout=30) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"Prometheus refused {promql!r}: {e.read().decode(errors='replace')}") from None
    if body.get("status") != "success":
        raise RuntimeError(f"{promql}: {body}")
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [({}, float(result[1]))]
    return [(r.get("metric", {}), float(r["value"][1])) for r in result]


def printed(metric):
    """A series as Grafana's `query_result` prints it, for the variable's regex."""
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()))
    return "{" + labels + "}"


def regex_escape(value):
    """A value as Grafana writes it into a PromQL regex: escaped for the regex, and that
    backslash escaped again for the PromQL string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def fill(text, values):
    # Longest names first: `$service` must not eat `$srcwl`'s prefix, nor the reverse.
    for name in sorted(values, key=len, reverse=True):
        text = text.replace("$" + name, values[name])
    return text


def resolve(url, variables, choice, offered):
    """The value of every variable of a dashboard for one view."""
    values = {"__rate_interval": RATE_INTERVAL}
    for var in variables:
        name = var["name"]
        if var["type"] == "custom":
            options = var["query"].split(",")
        else:
            inner = fill(var["query"], values)
            inner = re.fullmatch(r"query_result\((.*)\)", inner.strip(), re.S).group(1)
            pattern = re.compile(var["regex"].strip("/"))
            options = []
            for metric, _ in query(url, inner):
                found = pattern.fullmatch(printed(metric))
                if found and found.group(1) not in options:
                    options.append(found.group(1))
        offered.setdefault(name, set()).update(options)
        wanted = choice.get(name, var.get("current"))
        if wanted in (None, "$__all"):
            picked = options if var.get("includeAll") else options[:1]
        else:
            picked = wanted if isinstance(wanted, list) else [wanted]
        if var.get("multi") or var.get("includeAll"):
            escaped = [regex_escape(v) for v in picked]
            values[name] = escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        else:
            values[name] = picked[0] if picked else ""
    return values


def answered(answer):
    """Series with a value (NaN is 0/0: no data)."""
    return sum(1 for _, v in answer if not math.isnan(v))


def shown(value):
    """A value JSON can carry (NaN and infinities as text)."""
    return value if math.isfinite(value) else str(value)


def problems_of(name, promql, answer, kiali):
    problems = []
    for metric, value in answer:
        if math.isnan(value):
            # 0/0: no request between the two scrapes `irate` reads. A live dashboard shows
            # the same gap; the view counts as without data (see `answered`).
            continue
        if value < 0:
            problems.append(f"value {value} for {printed(metric)}")
        elif "Success Rate" in name and value > 1.0 + 1e-9:
            problems.append(f"success rate {value} for {printed(metric)}")
        elif ("Duration" in name or "histogram_quantile" in promql and "duration" in promql) and not 0 < value <= 10_000:
            problems.append(f"latency {value} for {printed(metric)}")
        grouped = re.search(r" by \(([^)]*)\)", promql)
        if kiali and grouped:
            # Of the labels a graph query groups by, those Kiali needs to place the edge.
            by = {label.strip() for label in grouped.group(1).split(",")}
            needed = KIALI_REQUIRED + [
                "request_protocol",
                "response_code",
                "response_flags",
                "source_principal",
                "destination_principal",
            ]
            missing = [label for label in needed if label in by and not metric.get(label)]
            if missing:
                problems.append(f"Kiali drops {printed(metric)}: no {', '.join(missing)}")
            if metric.get("source_cluster") == "unknown":
                problems.append(f"Kiali drops {printed(metric)}: source_cluster=\"unknown\"")
    return problems


def report(url, kind, name, view, promql, title):
    """Evaluates one query for one view and prints its line."""
    answer = query(url, promql)
    print(json.dumps({
        "kind": kind,
        "name": name,
        "view": view,
        "query": promql,
        "series": answered(answer),
        "values": [shown(v) for _, v in answer][:20],
        "problems": problems_of(title, promql, answer, kind == "kiali"),
    }), flush=True)


def main():
    url, queries_file, views_file = sys.argv[1:4]
    queries = json.load(open(queries_file))
    views = json.load(open(views_file))
    offered = {}
    for dashboard, spec in queries["dashboards"].items():
        for choice in views.get(dashboard, [{}]):
            values = resolve(url, spec["variables"], choice, offered.setdefault(dashboard, {}))
            for panel in spec["panels"]:
                name = f"{dashboard} / {panel['row']} / {panel['panel']} / {panel['refId']}"
                report(url, "panel", name, choice, fill(panel["expr"], values), panel["panel"])
    for graph in views.get("kiali", []):
        for entry in queries["kiali"]:
            report(url, "kiali", entry["name"], graph, fill(entry["query"], graph), entry["name"])
    print(json.dumps({"variables": {d: {k: sorted(v) for k, v in o.items()} for d, o in offered.items()}}))


if __name__ == "__main__":
    main()
