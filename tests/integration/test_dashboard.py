"""meshletctl dashboard in a real browser: headless Chromium driven by
selenium against a small mesh (control, orders' inbound and frontend's
outbound on 127.0.0.1) carrying real traffic, some of it denied.

Checks what the page shows (services, the edge with non-zero rates, a
recent denial with its rule, proxies and certificate expiry, CA phase),
that neither the page nor any response the browser received holds the
admin token, that the dashboard refuses writes, foreign Host headers and
non-loopback addresses, and that it says when control is unreachable and
recovers. Saves a screenshot in the test's directory
(MESHLET_SCREENSHOT_TO=docs/dashboard.png regenerates the README's)."""

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from control_helpers import control_factory, ctl_binary, sanitizer_report  # noqa: F401
from dynamic_helpers import dyn  # noqa: F401
from helpers import REPO, spiffe, wait_for
from stats_helpers import DENY_RULE, call, start_http_mesh

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover
    webdriver = None

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and webdriver),
    reason="chromium, chromium-driver and python3-selenium are needed (Debian packages)")


class Dashboard:
    """A meshletctl dashboard process against control c."""

    def __init__(self, c, *extra):
        argv = [str(ctl_binary()), "--control", c.url, "--ca", str(c.ca_file),
                "--token-file", str(c.token_file), "dashboard", "--listen", "127.0.0.1:0",
                *extra]
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=c.env)
        line = self.p.stdout.readline()
        assert line.startswith("dashboard on http://"), (line, self.p.stderr.read())
        self.url = line.split()[2]
        self.hostport = self.url[len("http://"):].rstrip("/")
        self.port = int(self.hostport.rsplit(":", 1)[1])

    def request(self, method, path, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def stop(self):
        self.p.terminate()
        try:
            _, err = self.p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            _, err = self.p.communicate()
        rep = sanitizer_report(err)
        assert rep is None, f"meshletctl dashboard: sanitizer report:\n{rep}"
        return self.p.returncode, err


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1500", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


class Traffic:
    """Allowed calls through the outbound in a thread, so that the proxy
    reports every 5 s."""

    def __init__(self, port):
        self.port, self.n = port, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join(10)

    def _run(self):
        while not self._stop.is_set():
            if call(self.port, "/ok/items") == 200:
                self.n += 1
            time.sleep(0.1)


def save_screenshot(d, path):
    """A PNG of the page as an artifact at path, and where
    MESHLET_SCREENSHOT_TO says (docs/dashboard.png is made that way)."""
    png = d.get_screenshot_as_png()
    path.write_bytes(png)
    print(f"screenshot: {path}")
    to = os.environ.get("MESHLET_SCREENSHOT_TO")
    if to:
        Path(to if os.path.isabs(to) else REPO / to).write_bytes(png)


def table_text(d, table_id):
    return d.find_element(By.ID, table_id).text


def responses_seen(d):
    """Every response body the browser received (from its network log)."""
    bodies = []
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") != "Network.responseReceived":
            continue
        rid = msg["params"]["requestId"]
        try:
            body = d.execute_cdp_cmd("Network.getResponseBody", {"requestId": rid})
        except Exception:  # the body of an old response may be gone
            continue
        bodies.append((msg["params"]["response"]["url"], body.get("body", "")))
    return bodies


# Long enough for the proxy to send its last summary (5 s poll) and go back
# to waiting 30 s with nothing to report.
QUIET_S = 12


def denial_reaches_page(d, port, path):
    """Seconds from a denied call on path to the page listing it."""
    t0 = time.monotonic()
    assert call(port, path) == 403
    wait_for(lambda: path in table_text(d, "denials"), 15, interval=0.1,
             what=f"the denial of {path} on the page")
    return time.monotonic() - t0


@needs_browser
def test_dashboard_shows_the_mesh_in_a_browser(dyn, browser, tmp_path):
    c, inb, outb, port = start_http_mesh(dyn)
    dash = Dashboard(c)
    try:
        with Traffic(port) as t:
            for _ in range(2):
                assert call(port, "/admin/keys") == 403
            browser.get(dash.url)
            browser.execute_cdp_cmd("Network.enable", {})
            # The first report of a proxy that was idle comes at the end of
            # its current poll (up to 30 s); then every 5 s.
            wait_for(lambda: "frontend" in table_text(browser, "edges") and
                     DENY_RULE in table_text(browser, "denials"), 60, interval=0.5,
                     what="the edge and the denial on the page")
            assert "control connected" in browser.find_element(By.ID, "status").text
            edges = table_text(browser, "edges")
            row = [ln for ln in edges.splitlines() if ln.startswith("frontend orders")]
            assert row, edges
            rates = row[0].split()[2:4]
            assert float(rates[0]) > 0 and float(rates[1]) > 0, row
            den = table_text(browser, "denials")
            assert "frontend orders no-admin GET /admin/keys" in den, den
            svcs = table_text(browser, "services")
            assert "orders" in svcs and "frontend" in svcs, svcs
            prox = table_text(browser, "proxies")
            assert prox.count("orders") >= 1 and "frontend" in prox, prox
            assert "certificate expires" in prox and "T" in prox, prox
            assert browser.find_element(By.ID, "ca-phase").text == "stable"
            assert "frontend" in table_text(browser, "certs")
            nodes = browser.find_elements(By.CSS_SELECTOR, "#graph .node text")
            assert {"orders", "frontend"} <= {n.text for n in nodes}
            assert browser.find_elements(By.CSS_SELECTOR, "#graph line.edge.denied")

            # While traffic flows, a new denial shows within 5 s: the proxy
            # reports it at once (a nudge interrupts its long poll).
            took = denial_reaches_page(browser, port, "/admin/late")
            print(f"a denial reached the page in {took:.1f} s while traffic flowed "
                  f"({t.n} allowed calls so far)")
            assert took < 5, took

            save_screenshot(browser, tmp_path / "dashboard.png")

            # No admin token anywhere the browser looked.
            token = c.token
            assert token not in browser.page_source
            seen = responses_seen(browser)
            assert any(u.endswith("/api/overview") for u, _ in seen), [u for u, _ in seen]
            assert any(u.endswith("/app.js") for u, _ in seen)
            for url, body in seen:
                assert token not in body, url

        # After a quiet spell (the proxy back on its 30 s poll, nothing to
        # report) a denial still reaches the page within 5 s.
        time.sleep(QUIET_S)
        took = denial_reaches_page(browser, port, "/admin/after-quiet")
        print(f"a denial after {QUIET_S} s of quiet reached the page in {took:.1f} s")
        assert took < 5, took

        # A certificate rotation shows new expiry times.
        def expiries():
            rows = table_text(browser, "proxies").splitlines()[1:]
            return sorted(r.split(" (")[0].split()[-1] for r in rows)
        before = expiries()
        time.sleep(1.1)     # expiry times have a resolution of one second
        c.ctl("certs", "rotate", "--all")
        wait_for(lambda: all(a > b for a, b in zip(expiries(), before)) and expiries(), 30,
                 interval=0.5, what=f"new expiry times on the page (before: {before})")
        print(f"certificate expiry on the page: {before} -> {expiries()}")

        # Control stops: the page says so; it comes back: so does the page.
        c.stop()
        wait_for(lambda: "control unreachable" in browser.find_element(By.ID, "status").text,
                 20, interval=0.3, what="the page to say control is unreachable")
        c.start()
        wait_for(lambda: "control connected" in browser.find_element(By.ID, "status").text,
                 20, interval=0.3, what="the page to recover")
    finally:
        rc, err = dash.stop()
    assert token not in err


def test_dashboard_refuses_writes_foreign_hosts_and_unknown_paths(dyn):
    c = dyn.start_control()
    dash = Dashboard(c)
    try:
        st, h, body = dash.request("GET", "/")
        assert st == 200 and b"<title>meshlet dashboard</title>" in body
        assert h["cache-control"] == "no-store"
        csp = h["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp, csp
        assert "unsafe-inline" not in csp and "http" not in csp, csp
        assert h["x-content-type-options"] == "nosniff"
        assert b"<script src=\"/app.js\"" in body and b"http" not in body.split(b"<body>")[0]
        for path, ctype in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
            st, h, _ = dash.request("GET", path)
            assert st == 200 and h["content-type"].startswith(ctype), (path, h)
        st, h, body = dash.request("HEAD", "/")
        assert st == 200 and body == b""
        st, h, body = dash.request("GET", "/api/overview")
        assert st == 200, body
        o = json.loads(body)
        assert o["control"]["reachable"] is True and o["ca"]["phase"] == "stable", o
        assert c.token not in body.decode()
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            st, h, body = dash.request(method, "/api/overview")
            assert st == 405 and h["allow"] == "GET, HEAD", (method, st, body)
        # Nothing of control's API but the overview's reads is relayed.
        for path in ("/v1/policies", "/api/v1/tokens", "/api/../v1/ca", "/admin.token"):
            st, _, _ = dash.request("GET", path)
            assert st == 404, path
        # A page on another origin (DNS rebinding) sends its own Host.
        st, _, body = dash.request("GET", "/api/overview", headers={"Host": "evil.example:80"})
        assert st == 421 and b"Host" in body
        st, _, _ = dash.request("GET", "/", headers={"Host": f"localhost:{dash.port}"})
        assert st == 200
    finally:
        rc, err = dash.stop()
    assert rc == 0, err
    assert c.token not in err

    # Non-loopback addresses need the explicit flag.
    p = c.ctl("dashboard", "--listen", "0.0.0.0:0", timeout=10)
    assert p.returncode == 2 and "not a loopback address" in p.stderr, p.stderr
    p = c.ctl("dashboard", "--listen", "localhost:80", timeout=10)
    assert p.returncode == 2 and "--listen" in p.stderr, p.stderr


def test_dashboard_says_when_control_is_unreachable_from_the_start(dyn):
    c = dyn.start_control()
    dash = Dashboard(c)
    try:
        c.stop()
        st, _, body = dash.request("GET", "/api/overview")
        o = json.loads(body)
        assert st == 200 and o["control"]["reachable"] is False, o
        assert o["errors"], o
    finally:
        dash.stop()


def proxy_of(c, service):
    r = c.api("GET", "/v1/proxies")
    assert r.status == 200, r
    mine = [p for p in r.json["proxies"] if p["service"] == service and p["connected"]]
    return mine[0] if mine else None


def row_of(d, table_id, first):
    rows = [ln for ln in table_text(d, table_id).splitlines()[1:] if ln.split()[0] == first]
    return rows[0] if rows else ""


@needs_browser
def test_dashboard_services_and_a_degraded_proxy(dyn, browser):
    """Services: traffic versions, registered instances, proxies and up to
    date. Proxies: one whose renewals control refuses is degraded, keeps
    polling (a policy change still reaches it), and the page says so."""
    c, inb, outb, port = start_http_mesh(dyn)
    r = c.api("PUT", "/v1/traffic/orders",
              body={"service": "orders", "timeouts": {"connect_seconds": 2}})
    assert r.status == 200, r
    tver = r.json["version"]
    dash = Dashboard(c)
    try:
        browser.get(dash.url)
        # orders: a traffic version, one registered instance, its proxy up
        # to date; frontend: no traffic document, no inbound instance.
        wait_for(lambda: row_of(browser, "services", "orders").split()[2:6] ==
                 [str(tver), "1", "1", "yes"], 30, interval=0.3,
                 what=f"orders' row (traffic v{tver}, 1 instance, 1 proxy, up to date): "
                      f"{row_of(browser, 'services', 'orders')!r}")
        assert row_of(browser, "services", "frontend").split()[4:8] == \
            ["none", "0", "1", "yes"], table_text(browser, "services")
        assert "degraded" not in table_text(browser, "proxies")

        # Each rotation makes orders' proxy renew at once; a lineage renews
        # at most 10 times per SVID lifetime, so control refuses one soon.
        for i in range(12):
            before = proxy_of(c, "orders")
            if before and before.get("degraded"):
                break
            c.ctl("certs", "rotate", "--service", "orders")
            wait_for(lambda: (p := proxy_of(c, "orders")) and
                     (p["cert_serial"] != (before or {}).get("cert_serial") or p["degraded"]),
                     20, interval=0.2, what=f"orders' proxy to renew (rotation {i + 1})")
        p = proxy_of(c, "orders")
        assert p and p["degraded"] == ["renewal"], p
        wait_for(lambda: "degraded: renewal refused" in row_of(browser, "proxies", "orders"),
                 10, interval=0.3, what="orders' proxy marked degraded on the page")
        assert "degraded" not in row_of(browser, "proxies", "frontend")
        assert "lineage_limit" in inb.stderr(), "the proxy's log names the refusal"
        st, body = inb.admin("/ready")
        ready = json.loads(body)
        assert st == 200 and ready["degraded"] and "renewal refused" in ready["control"], ready

        # It keeps polling: a policy change still reaches it.
        dyn.apply_policy({"service": "orders", "default": "deny",
                          "rules": [{"name": DENY_RULE, "action": "deny", "from": ["*"],
                                     "paths": ["/admin", "/admin/*", "/ok/closed"]},
                                    {"name": "frontend-reads", "action": "allow",
                                     "from": [spiffe("frontend")], "paths": ["/ok/*"]}]})
        wait_for(lambda: call(port, "/ok/closed") == 403, 15, interval=0.3,
                 what="the new policy applied by the degraded proxy")
        wait_for(lambda: (p := proxy_of(c, "orders")) and p["up_to_date"] and
                 p["degraded"] == ["renewal"], 10, interval=0.2,
                 what="orders' proxy polling again, up to date and still degraded")
    finally:
        dash.stop()
