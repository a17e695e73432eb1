"""meshletctl dashboard on the namespace mesh (the demo's topology), in
headless Chromium: the dashboard runs in control's namespace, reached from
the host through socat as the demo's --keep hint says; frontend's app calls
orders (allowed), reports' app calls orders (denied by the rule
no-reports). The page must show the three services, both edges with
non-zero rates, reports' denial with its rule within 5 s while traffic
flows and after a quiet spell, and every proxy with its certificate expiry. Saves a screenshot.

Needs root, ip netns, iptables, chromium, chromium-driver, python3-selenium
and socat: skipped with the reason otherwise."""

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from e2e_helpers import REPO, wait_for
from e2e_helpers import e2e_runnable, mesh, root_before  # noqa: F401  (fixtures)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover
    webdriver = None

MISSING = [n for n in ("chromium", "chromedriver", "socat") if not shutil.which(n)]
if webdriver is None:
    MISSING.append("python3-selenium")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"missing: {', '.join(MISSING)}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Traffic:
    """frontend -> orders (allowed) and reports -> orders (denied) from the
    apps' namespaces, in a thread."""

    def __init__(self, mesh):
        self.mesh, self.codes = mesh, {"frontend": [], "reports": []}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join(20)

    def _run(self):
        i = 0
        while not self._stop.is_set():
            node = "reports" if i % 5 == 4 else "frontend"
            code, _, _ = self.mesh.curl(node, self.mesh.orders_url())
            self.codes[node].append(code)
            i += 1
            time.sleep(0.1)


def table(d, table_id):
    return d.find_element(By.ID, table_id).text


@pytest.fixture
def dashboard(mesh):
    """The dashboard in control's namespace on 127.0.0.1:P, and socat on the
    host's 127.0.0.1:P forwarding to it. Yields the URL."""
    port = free_port()
    ns = mesh.ns["control"]
    dash = subprocess.Popen(["ip", "netns", "exec", ns, mesh.ctl_bin, "--control",
                             "https://127.0.0.1:7443", "--state-dir", str(mesh.dir / "control"),
                             "dashboard", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = dash.stdout.readline()
    fwd = subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                            f"EXEC:ip netns exec {ns} socat STDIO TCP\\:127.0.0.1\\:{port}"],
                           stderr=subprocess.PIPE, text=True)
    try:
        assert line.startswith("dashboard on http://"), (line, dash.stderr.read())
        wait_for(lambda: subprocess.run(["curl", "-sf", "-o", "/dev/null",
                                         f"http://127.0.0.1:{port}/"]).returncode == 0,
                 10, interval=0.2, what="the dashboard through socat")
        yield f"http://127.0.0.1:{port}/"
    finally:
        fwd.terminate()
        fwd.wait(10)
        dash.terminate()
        _, err = dash.communicate(timeout=10)
        assert "ERROR: AddressSanitizer" not in err and "runtime error:" not in err, err


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1500", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    yield d
    d.quit()


# Long enough for the proxy to send its last summary (5 s poll) and go back
# to waiting 30 s with nothing to report.
QUIET_S = 12


def denial_reaches_page(mesh, d, path):
    """Seconds from reports' denied call on path to the page listing it."""
    t0 = time.monotonic()
    code, _, _ = mesh.curl("reports", mesh.orders_url(path))
    assert code == 403
    wait_for(lambda: path in table(d, "denials"), 15, interval=0.1,
             what=f"the denial of {path} on the page")
    return time.monotonic() - t0


def test_dashboard_shows_the_namespace_mesh(mesh, dashboard, browser, tmp_path):
    token = (mesh.dir / "control" / "admin.token").read_text().strip()
    with Traffic(mesh) as t:
        browser.get(dashboard)
        wait_for(lambda: "frontend orders" in table(browser, "edges") and
                 "reports orders" in table(browser, "edges") and
                 "no-reports" in table(browser, "denials"), 60, interval=0.5,
                 what="both edges and reports' denial on the page")
        edges = {ln.split()[0]: ln.split() for ln in table(browser, "edges").splitlines()[1:]}
        assert float(edges["frontend"][2]) > 0, edges     # req/s
        assert float(edges["reports"][3]) > 0, edges      # denied/s
        assert "no-reports" in " ".join(edges["reports"]), edges
        den = table(browser, "denials")
        assert "reports orders no-reports GET /orders" in den, den
        # While traffic flows, a new denial reaches the page within 5 s.
        took = denial_reaches_page(mesh, browser, "/orders/e2e-late")
        print(f"a denial reached the page in {took:.1f} s while traffic flowed")
        assert took < 5, took
        prox = table(browser, "proxies")
        for svc in ("frontend", "orders", "reports"):
            assert svc in prox, prox
        assert prox.count("min)") + prox.count(" h)") >= 3, prox     # certificate expiry
        nodes = {n.text for n in browser.find_elements(By.CSS_SELECTOR, "#graph .node text")}
        assert {"frontend", "orders", "reports"} <= nodes, nodes
        assert token not in browser.page_source
        png = browser.get_screenshot_as_png()
        (tmp_path / "dashboard-e2e.png").write_bytes(png)
        to = os.environ.get("MESHLET_SCREENSHOT_TO")
        if to:
            Path(to if os.path.isabs(to) else REPO / to).write_bytes(png)
    assert 200 in t.codes["frontend"] and 403 in t.codes["reports"], t.codes
    # After a quiet spell (orders' proxy back on its 30 s poll with nothing
    # to report), a denial still reaches the page within 5 s.
    time.sleep(QUIET_S)
    took = denial_reaches_page(mesh, browser, "/orders/after-quiet")
    print(f"a denial after {QUIET_S} s of quiet reached the page in {took:.1f} s")
    assert took < 5, took


def test_dashboard_follows_rotation_and_a_stopped_control(mesh, dashboard, browser):
    """On the namespace mesh: `certs rotate --all` shows new expiry times;
    control stopped (SIGSTOP: it holds its sockets but answers nothing) makes
    the page say so, and the page recovers when it runs again."""
    def expiries():
        rows = table(browser, "proxies").splitlines()[1:]
        return sorted(r.split(" (")[0].split()[-1] for r in rows)

    browser.get(dashboard)
    wait_for(lambda: len(expiries()) == 3, 60, interval=0.5, what="three proxies on the page")
    before = expiries()
    time.sleep(1.1)     # expiry times have a resolution of one second
    mesh.ctl("certs", "rotate", "--all")
    wait_for(lambda: all(a > b for a, b in zip(expiries(), before)), 60, interval=0.5,
             what=f"new expiry times on the page (before: {before})")
    print(f"certificate expiry on the page: {before} -> {expiries()}")

    pid, _ = mesh.pids()["control"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: "control unreachable" in browser.find_element(By.ID, "status").text,
                 20, interval=0.3, what="the page to say control is unreachable")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: "control connected" in browser.find_element(By.ID, "status").text,
             30, interval=0.3, what="the page to recover")
