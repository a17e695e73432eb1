"""deploy/observability/ against the real thing (docs/observability.md):
promtool checks the configuration, the rules and their unit tests; the
Grafana dashboard names only metrics that a real proxy or control exports;
promtool check metrics finds both /metrics outputs clean; and a real
Prometheus, started here on loopback, scrapes a real control and a pair of
control-mode proxies and answers PromQL with the counts this test made.

Skipped (with the reason) when Debian's prometheus package is missing."""

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from control_helpers import control_factory  # noqa: F401
from dynamic_helpers import dyn, spiffe  # noqa: F401
from helpers import REPO, free_port, wait_for
from http_helpers import HttpApp, exchange, request
import prom_helpers as prom

OBS = REPO / "deploy" / "observability"
PROMETHEUS = shutil.which("prometheus")

needs_promtool = pytest.mark.skipif(not prom.promtool(),
                                    reason="promtool not installed (Debian package prometheus)")

# What a dashboard or rule expression may name besides metrics.
PROMQL_WORDS = {
    "sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "max", "min",
    "avg", "count", "time", "and", "or", "unless", "offset", "on", "ignoring", "abs",
    "max_over_time", "min_over_time", "avg_over_time", "label_values", "humanize",
}


def promtool(*args, cwd=OBS):
    p = subprocess.run([prom.promtool(), *args], cwd=cwd, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, f"promtool {' '.join(args)}:\n{out}"
    return out


def metric_names(expr):
    """The metric names an expression uses: identifiers outside label
    matchers, grouping clauses, ranges and strings that are not PromQL."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b\d+(ms|[smhdwy])\b", "", e)                        # offset 5m
    e = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", e)
    e = re.sub(r"\blabel_values\(([^,()]*),[^)]*\)", r"(\1)", e)   # Grafana: (metric, label)
    names = set()
    for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if word in PROMQL_WORDS or re.fullmatch(r"e\d*|Inf|NaN", word):
            continue
        names.add(word)
    return names


def dashboard_exprs():
    d = json.loads((OBS / "grafana" / "meshlet-dashboard.json").read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v.get("type") == "query":
            exprs.append(v["definition"])
    return exprs


def rule_exprs():
    recorded, exprs = set(), []
    for f in sorted((OBS / "rules").glob("*.yml")):
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                exprs.append(r["expr"])
                if "record" in r:
                    recorded.add(r["record"])
    return exprs, recorded


# ---------------------------------------------------------------- promtool

@needs_promtool
def test_promtool_config_rules_and_rule_unit_tests():
    out = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in out and "2 rule files found" in out, out
    promtool("check", "rules", *sorted(str(p.relative_to(OBS)) for p in (OBS / "rules").glob("*.yml")))
    tests = sorted((OBS / "tests").glob("*.yml"))
    assert tests, "no promtool rule tests in deploy/observability/tests"
    out = promtool("test", "rules", *[str(t.relative_to(OBS)) for t in tests])
    assert "SUCCESS" in out, out


def test_every_alert_has_a_unit_test():
    alerts = set()
    for f in (OBS / "rules").glob("*.yml"):
        for g in yaml.safe_load(f.read_text())["groups"]:
            alerts |= {r["alert"] for r in g["rules"] if "alert" in r}
    assert {"MeshletCertificateExpiringSoon", "MeshletControlDisconnected", "MeshletDenialSpike",
            "MeshletHigh5xxRatio"} <= alerts
    tested = set()
    for t in (OBS / "tests").glob("*.yml"):
        for case in yaml.safe_load(t.read_text())["tests"]:
            for a in case.get("alert_rule_test", []):
                if a.get("exp_alerts"):
                    tested.add(a["alertname"])
    assert alerts == tested, f"alerts never shown firing in a test: {alerts - tested}"


def test_metric_names_are_read_from_expressions():
    # The extraction the next test relies on, on known input.
    assert metric_names('sum by (service, code) (rate(meshlet_http_requests_total'
                        '{service=~"$service",code=~"5.."}[5m])) / sum(rate(x_total[1m]))') \
        == {"meshlet_http_requests_total", "x_total"}
    assert metric_names("meshlet_cert_expiry_timestamp_seconds - time() < 600") \
        == {"meshlet_cert_expiry_timestamp_seconds"}
    assert metric_names("rate(a_total[1h] offset 5m) > 0.2") == {"a_total"}
    assert metric_names("label_values(meshlet_http_requests_total, service)") \
        == {"meshlet_http_requests_total"}


# ---------------------------------------------------------------- a real mesh

POLICY_RULE = "frontend-reads"


def start_mesh(dyn):
    """Control (with --metrics-listen) and orders' inbound + frontend's
    outbound in control mode, HTTP, in front of an HTTP app. /ok/... is
    allowed for frontend, anything else denied by the default."""
    mport = free_port()
    c = dyn.factory.new(extra_args=["--metrics-listen", f"127.0.0.1:{mport}"])
    dyn.control = c
    c.metrics_addr = f"127.0.0.1:{mport}"
    dyn.apply_policy({"service": "orders", "default": "deny",
                      "rules": [{"name": POLICY_RULE, "action": "allow",
                                 "from": [spiffe("frontend")], "paths": ["/ok/*"]}]})
    app = HttpApp("ok")
    dyn.mesh.apps.append(app)
    inb, _ = dyn.inbound(app.port, protocol="http")
    outb, port = dyn.outbound(protocol="http")
    wait_for(lambda: call(port, "/ok/warmup") == 200, 15, what="a call through the pair")
    return c, inb, outb, port


def call(port, path):
    try:
        r = exchange(port, request("GET", path), timeout=5)
    except OSError:
        return None
    return r.status if r else None


def scrape_all(c, inb, outb):
    return {"control": prom.scrape(f"http://{c.metrics_addr}/metrics"),
            "orders-in": prom.scrape(f"http://127.0.0.1:{inb.admin_port}/metrics"),
            "frontend-out": prom.scrape(f"http://127.0.0.1:{outb.admin_port}/metrics")}


def test_dashboard_and_rules_name_only_exported_metrics(dyn):
    c, inb, outb, port = start_mesh(dyn)
    assert call(port, "/secret") == 403
    exported = set()
    for text in scrape_all(c, inb, outb).values():
        samples, types = prom.parse(text)
        exported |= set(types) | prom.names(samples)
    used = set()
    for e in dashboard_exprs():
        used |= metric_names(e)
    missing = used - exported
    assert not missing, f"the dashboard names metrics nobody exports: {sorted(missing)}"
    assert len(used) >= 10, used
    exprs, recorded = rule_exprs()
    used = set()
    for e in exprs:
        used |= metric_names(e)
    missing = used - exported - recorded
    assert not missing, f"the rules name metrics nobody exports: {sorted(missing)}"


@needs_promtool
def test_promtool_check_metrics_on_control_and_proxies(dyn):
    c, inb, outb, port = start_mesh(dyn)
    assert call(port, "/secret") == 403
    for name, text in scrape_all(c, inb, outb).items():
        assert prom.check_metrics(text) == "", f"{name}:\n{text}"


# ---------------------------------------------------------------- a real Prometheus

class Prometheus:
    def __init__(self, tmp, targets):
        self.dir = Path(tmp) / "prometheus"
        shutil.copytree(OBS, self.dir, ignore=shutil.ignore_patterns("grafana", "tests",
                                                                     "*.md"))
        cfg = yaml.safe_load((self.dir / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", scrape_timeout="1s",
                             evaluation_interval="1s")
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        for name, groups in targets.items():
            (self.dir / "targets" / name).write_text(json.dumps(groups))
        self.port = free_port()
        self.log = self.dir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr):
        """{frozenset(labels): value} of an instant query."""
        data = self.api("query", query=expr)
        return {frozenset(s["metric"].items()): float(s["value"][1]) for s in data["result"]}

    def scalar(self, expr):
        res = self.query(expr)
        assert len(res) <= 1, res
        return next(iter(res.values()), None)


@pytest.fixture
def prometheus(tmp_path):
    if not PROMETHEUS or not prom.promtool():
        pytest.skip("prometheus not installed (Debian package prometheus)")
    started = []

    def start(targets):
        p = Prometheus(tmp_path, targets)
        started.append(p)
        wait_for(lambda: _ready(p), 20, what="Prometheus to be ready")
        return p
    yield start
    for p in started:
        p.stop()
        if p.proc.returncode not in (0, -15):
            print(p.log.read_text(errors="replace")[-4000:])


def _ready(p):
    assert p.proc.poll() is None, p.log.read_text(errors="replace")[-4000:]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.port}/-/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def test_prometheus_scrapes_the_mesh_and_counts_what_was_done(dyn, prometheus):
    c, inb, outb, port = start_mesh(dyn)
    p = prometheus({
        "meshlet-proxies.json": [
            {"targets": [f"127.0.0.1:{inb.admin_port}"], "labels": {"service": "orders"}},
            {"targets": [f"127.0.0.1:{outb.admin_port}"], "labels": {"service": "frontend"}}],
        "meshlet-control.json": [{"targets": [c.metrics_addr]}],
    })
    # Every target up, with the labels the rules group by.
    wait_for(lambda: len(p.query('up == 1')) == 3, 20, interval=0.2, what="3 targets up")
    base = {k: prom.parse(v)[0] for k, v in scrape_all(c, inb, outb).items()}
    allowed, denied = 7, 4
    for i in range(allowed):
        assert call(port, f"/ok/{i}") == 200
    for i in range(denied):
        assert call(port, f"/secret/{i}") == 403

    def inb_total(name, **labels):
        return prom.total(base["orders-in"], name, **labels)

    want = {
        'sum(meshlet_policy_decisions_total{service="orders",decision="deny"})':
            inb_total("meshlet_policy_decisions_total", decision="deny") + denied,
        f'sum(meshlet_policy_decisions_total{{service="orders",decision="allow",rule="{POLICY_RULE}"}})':
            inb_total("meshlet_policy_decisions_total", decision="allow", rule=POLICY_RULE) + allowed,
        'sum(meshlet_http_requests_total{service="orders",code="200"})':
            inb_total("meshlet_http_requests_total", code="200") + allowed,
        'sum(meshlet_http_requests_total{service="orders",code="403"})':
            inb_total("meshlet_http_requests_total", code="403") + denied,
        'sum(meshlet_http_requests_total{service="frontend"})':
            prom.total(base["frontend-out"], "meshlet_http_requests_total") + allowed + denied,
    }
    # The denials are the ones this test made: the default rule denied them.
    assert inb_total("meshlet_policy_decisions_total", decision="deny") == 0

    def matches():
        got = {e: p.scalar(e) for e in want}
        return got if got == want else None
    try:
        wait_for(matches, 20, interval=0.3, what="Prometheus to see the counts")
    except AssertionError:
        raise AssertionError(f"want {want}, got {({e: p.scalar(e) for e in want})}")

    # Control's own metrics are in too: the proxies' long polls and joins.
    assert p.scalar('sum(meshlet_control_certificates_issued_total{kind="join"})') >= 2
    wait_for(lambda: p.scalar('meshlet_control_long_polls_waiting') == 2, 10, interval=0.3,
             what="two long polls (one per proxy) seen by Prometheus")
    assert p.scalar('meshlet_control_connected{service="orders"}') == 1
    # The rules load and evaluate: the recording rule for denials has a series.
    wait_for(lambda: p.query('service_rule:meshlet_policy_denials:rate5m{service="orders"}'), 15,
             interval=0.3, what="the recording rules to evaluate")
    groups = p.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"meshlet-proxy", "meshlet-control", "meshlet-alerts"}
    for g in groups:
        for r in g["rules"]:
            assert r["health"] in ("ok", "unknown"), r
