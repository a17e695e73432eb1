"""Helpers for the network-namespace end-to-end tests (tests/e2e).

The topology is the demo's: `deploy/local/demo --setup-only` builds it
(namespaces for control, frontend, orders and reports on a bridge of their
own, meshlet-control, join tokens, the first policies, each app with its
sidecar in control + transparent mode behind meshlet-iptables) and prints
KEY=VALUE lines describing it; `deploy/local/demo down ID` removes it. This
module wraps both and runs commands inside the namespaces.

The binaries are $MESHLET_BUILD's (default build-test/, the ASan+UBSan build
tests/run makes), used as they are (--no-build).

The fixtures live here, not in a conftest.py: tests/integration's modules
import names from their own `conftest`, and a second conftest.py in a
package-less directory would take that module name over when both
directories are collected together. Test modules import them:

    from e2e_helpers import mesh, root_before  # noqa: F401  (fixtures)

They need root, `ip netns` and iptables; elsewhere every test is skipped
with the reason. The mesh is made once per test module and always removed
at teardown.
"""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "deploy" / "local" / "demo"
IPTABLES_HELPER = REPO / "proxy" / "meshlet-iptables"
TRUST_DOMAIN = "mesh.local"
SERVICES = ("frontend", "orders", "reports")
APP_PORT = 8080

SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "WARNING: ThreadSanitizer",
)


def spiffe(service):
    return f"spiffe://{TRUST_DOMAIN}/svc/{service}"


def build_dir():
    b = Path(os.environ.get("MESHLET_BUILD", REPO / "build-test"))
    return b if b.is_absolute() else REPO / b


def demo_env():
    """Environment for the demo and everything it starts: the build to use,
    the work directory kept after cleanup (for the sanitizer check), and
    sanitizer options as the integration tests use them."""
    env = dict(os.environ)
    env["MESHLET_DEMO_BUILD"] = str(build_dir())
    env["MESHLET_DEMO_KEEP_DIR"] = "1"
    asan = [o for o in env.get("ASAN_OPTIONS", "").split(":") if o]
    keys = {o.split("=", 1)[0] for o in asan}
    for k, v in (("detect_leaks", "1"), ("quarantine_size_mb", "16")):
        if k not in keys:
            asan.append(f"{k}={v}")
    env["ASAN_OPTIONS"] = ":".join(asan)
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    env.pop("MESHLET_CONTROL", None)
    return env


def why_not_runnable():
    """None when the namespace tests can run here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables): run tests/run as root"
    for tool in ("ip", "setpriv", "curl", "iptables", "setsid"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            return f"{tool} is not installed"
    probe = f"ml-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns is unavailable here: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-w", "-t", "nat", "-S"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"iptables (nat) does not work in a network namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    for b in ("proxy/meshlet-proxy", "control/meshlet-control", "control/meshletctl"):
        if not os.access(build_dir() / b, os.X_OK):
            return f"{build_dir() / b} is missing: build first (tests/run does)"
    return None


def netns_list():
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def root_links():
    r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return [line.split(":")[1].strip().split("@")[0] for line in r.stdout.splitlines()]


def root_iptables():
    """The root namespace's nat and filter rules, IPv4 and IPv6."""
    out = []
    for tool in ("iptables", "ip6tables"):
        for table in ("nat", "filter"):
            r = subprocess.run([tool, "-w", "-t", table, "-S"], capture_output=True, text=True)
            out += [f"{tool} {table}: {line}" for line in r.stdout.splitlines()]
    return out


def parse_metrics(text):
    """{'name{labels}': value} of a Prometheus text page."""
    m = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            m[key] = float(val)
        except ValueError:
            pass
    return m


class Mesh:
    """One namespace mesh made by the demo's --setup-only."""

    def __init__(self, info):
        self.info = info
        self.id = info["ML_ID"]
        self.state = Path(info["ML_STATE"])
        self.dir = Path(info["DIR"])
        self.ctl_bin = info["CTL"]
        self.proxy_uid = int(info["PROXY_UID"])
        self.ns = {n: info[f"NS_{n.upper()}"] for n in ("control", "net") + SERVICES}
        self.ip = {n: info[f"IP_{n.upper()}"] for n in ("control",) + SERVICES}
        # (canonical, as the proxies print them: fd6d:6c12:345::b, not ...:0345::b)
        self.ip6 = {n: str(ipaddress.ip_address(info[f"IP6_{n.upper()}"]))
                    if info.get(f"IP6_{n.upper()}") else "" for n in ("control",) + SERVICES}
        self.down_done = False
        self._n = 0

    @classmethod
    def up(cls):
        p = subprocess.run([str(DEMO), "--setup-only", "--no-build", "--no-install"],
                           capture_output=True, text=True, env=demo_env(), timeout=120)
        if p.returncode != 0:
            raise AssertionError(f"demo --setup-only failed ({p.returncode}):\n"
                                 f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        info = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", p.stdout, re.M))
        return cls(info)

    def pids(self):
        """{name: (pid, starttime)} of the processes the demo recorded."""
        out = {}
        if self.state.exists():
            for line in self.state.read_text().splitlines():
                f = line.split()
                if f and f[0] == "pid":
                    out[f[3]] = (int(f[1]), f[2])
        return out

    def down(self):
        """deploy/local/demo down ID; returns the CompletedProcess."""
        self.down_done = True
        return subprocess.run([str(DEMO), "down", self.id], capture_output=True, text=True,
                              env=demo_env(), timeout=60)

    def sanitizer_reports(self):
        """Sanitizer reports found in the logs of the processes (after down)."""
        found = []
        for f in sorted((self.dir / "logs").glob("*.err")):
            text = f.read_text(errors="replace")
            if any(m in text for m in SANITIZER_MARKERS):
                found.append(f"----- {f.name}\n{text[-4000:]}")
        return found

    def remove_dir(self):
        if self.dir.name.startswith("meshlet-demo.") and self.dir.is_dir():
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- running things in the namespaces
    def run(self, node, *cmd, uid=None, timeout=15, check=False):
        argv = ["ip", "netns", "exec", self.ns[node]]
        if uid is not None:
            argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        p = subprocess.run(argv + [str(c) for c in cmd], capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert p.returncode == 0, f"{cmd} in {node} failed ({p.returncode}): {p.stderr}"
        return p

    def curl(self, node, url, uid=None, method="GET"):
        """(HTTP status or 0, body, curl's stderr) of one request made in node."""
        p = self.run(node, "curl", "-sS", "--max-time", "5", "-X", method,
                     "-w", "\n%{http_code}", url, uid=uid)
        body, _, code = p.stdout.rpartition("\n")
        return int(code or 0), body.strip(), p.stderr.strip()

    def orders_url(self, path="/orders"):
        return f"http://{self.ip['orders']}:{APP_PORT}{path}"

    def metrics(self, node):
        p = self.run(node, "curl", "-sS", "--max-time", "3", "http://127.0.0.1:15000/metrics",
                     check=True)
        return parse_metrics(p.stdout)

    def ctl(self, *args, check=True):
        p = self.run("control", self.ctl_bin, "--control", "https://127.0.0.1:7443",
                     "--state-dir", self.dir / "control", *args)
        if check:
            assert p.returncode == 0, f"meshletctl {args} failed ({p.returncode}): {p.stderr}"
        return p

    def apply_policy(self, doc):
        self._n += 1
        f = self.dir / f"e2e-policy-{self._n}.json"
        f.write_text(json.dumps(doc))
        return self.ctl("policy", "apply", "-f", f)

    def access_log(self, node):
        """The JSON access-log lines of node's sidecar."""
        f = self.dir / "logs" / f"{node}-proxy.out"
        out = []
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stderr(self, node):
        return (self.dir / "logs" / f"{node}.err").read_text(errors="replace")


def orders_policy(reports_allowed=False):
    """orders' policy as the demo applies it (v1), or flipped (v2)."""
    rules = [{"name": "frontend-reads-orders", "action": "allow", "from": [spiffe("frontend")],
              "ports": [APP_PORT], "methods": ["GET", "HEAD"], "paths": ["/orders", "/orders/*"]}]
    if reports_allowed:
        rules.append({"name": "reports-reads-orders", "action": "allow",
                      "from": [spiffe("reports")], "ports": [APP_PORT], "methods": ["GET"],
                      "paths": ["/orders", "/orders/*"]})
    else:
        rules.append({"name": "no-reports", "action": "deny", "from": [spiffe("reports")]})
    return {"service": "orders", "default": "deny", "rules": rules}


def wait_for(pred, timeout, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def alive(pid, starttime):
    """The process pid (started at starttime) still runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] == starttime and fields[0] != "Z"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def e2e_runnable():
    why = why_not_runnable()
    if why:
        pytest.skip(f"namespace e2e tests skipped: {why}")


@pytest.fixture(scope="module")
def root_before(e2e_runnable):
    """The root namespace as it was before the mesh: namespaces, links, rules."""
    return {"netns": set(netns_list()), "links": set(root_links()), "iptables": root_iptables()}


@pytest.fixture(scope="module")
def mesh(root_before):
    """The demo's mesh (--setup-only), removed at teardown (down)."""
    m = Mesh.up()
    try:
        yield m
    finally:
        if not m.down_done:
            m.down()
        m.remove_dir()
