"""A real Prometheus (Debian's prometheus package) scraping the sidecars
of the namespace mesh (the demo's topology) with deploy/observability's
configuration and rules: PromQL through its HTTP API must count the
allowed and denied requests the test made from the apps' namespaces.

Each sidecar's admin listener is 127.0.0.1:15000 inside its namespace;
socat forwards a host port to each (as one would run a node-local agent).
Control's own /metrics is covered on loopback by
tests/integration/test_observability.py (the demo starts control without
--metrics-listen). Needs root, ip netns, iptables, prometheus and socat:
skipped with the reason otherwise."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from e2e_helpers import REPO, wait_for
from e2e_helpers import e2e_runnable, mesh, root_before  # noqa: F401  (fixtures)

OBS = REPO / "deploy" / "observability"
MISSING = [n for n in ("prometheus", "socat") if not shutil.which(n)]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"missing: {', '.join(MISSING)}")
SERVICES = ("frontend", "orders", "reports")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, tmp, proxies):
        self.dir = tmp / "prometheus"
        shutil.copytree(OBS, self.dir, ignore=shutil.ignore_patterns("grafana", "tests", "*.md"))
        cfg = yaml.safe_load((self.dir / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        (self.dir / "targets" / "meshlet-proxies.json").write_text(json.dumps(
            [{"targets": [addr], "labels": {"service": svc}} for svc, addr in proxies.items()]))
        (self.dir / "targets" / "meshlet-control.json").write_text("[]")
        self.port = free_port()
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def ready(self):
        assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def scalar(self, expr):
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               f"{urllib.parse.urlencode({'query': expr})}")
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        res = doc["data"]["result"]
        assert len(res) <= 1, res
        return float(res[0]["value"][1]) if res else None


@pytest.fixture
def forwards(mesh):
    """{service: "127.0.0.1:P"}: host ports forwarded to each sidecar's admin listener."""
    procs, out = [], {}
    for svc in SERVICES:
        port = free_port()
        procs.append(subprocess.Popen(
            ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
             f"EXEC:ip netns exec {mesh.ns[svc]} socat STDIO TCP\\:127.0.0.1\\:15000"],
            stderr=subprocess.DEVNULL))
        out[svc] = f"127.0.0.1:{port}"
    try:
        yield out
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_prometheus_counts_the_requests_made_in_the_namespaces(mesh, forwards, tmp_path):
    p = Prometheus(tmp_path, forwards)
    try:
        wait_for(p.ready, 30, interval=0.2, what="Prometheus to be ready")
        wait_for(lambda: p.scalar('count(up{job="meshlet-proxy"} == 1)') == 3, 30,
                 interval=0.3, what="the three sidecars up in Prometheus")
        allow = ('sum(meshlet_policy_decisions_total{service="orders",decision="allow",'
                 'rule="frontend-reads-orders"})')
        deny = ('sum(meshlet_policy_decisions_total{service="orders",decision="deny",'
                'rule="no-reports"})')
        forbidden = 'sum(meshlet_http_requests_total{service="orders",code="403"})'
        o = mesh.metrics("orders")
        base = {
            allow: o.get('meshlet_policy_decisions_total{decision="allow",'
                         'rule="frontend-reads-orders"}', 0),
            deny: o.get('meshlet_policy_decisions_total{decision="deny",rule="no-reports"}', 0),
            forbidden: o.get('meshlet_http_requests_total{code="403"}', 0),
        }
        allowed, denied = 6, 4
        for _ in range(allowed):
            assert mesh.curl("frontend", mesh.orders_url())[0] == 200
        for _ in range(denied):
            assert mesh.curl("reports", mesh.orders_url())[0] == 403
        want = {allow: base[allow] + allowed, deny: base[deny] + denied,
                forbidden: base[forbidden] + denied}
        t0 = time.monotonic()
        for expr, value in want.items():
            wait_for(lambda: p.scalar(expr) == value, 30, interval=0.3,
                     what=f"{expr} == {value} (is {p.scalar(expr)})")
        print(f"Prometheus counted {allowed} allowed and {denied} denied requests "
              f"({time.monotonic() - t0:.1f} s after the last one)")
        # The recording rules work on the same series.
        wait_for(lambda: p.scalar('sum(service:meshlet_policy_denials:rate5m{service="orders"})') or 0,
                 30, interval=0.5, what="the denial rate recording rule")
    finally:
        p.stop()
