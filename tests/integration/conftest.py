"""Fixtures for meshlet's integration tests.

The proxy under test is $MESHLET_PROXY, else $MESHLET_BUILD/proxy/meshlet-proxy
(MESHLET_BUILD defaults to build-test/ in the repository, the build that
tests/run makes). Every test gets its own proxies, apps, config files and
logs under its tmp_path; everything is stopped at teardown, also on failure,
and a sanitizer report in any proxy's stderr fails the test.
"""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (App, Pki, Proxy, REPO, addr, free_port, server_context,  # noqa: E402
                     spiffe)


def proxy_binary():
    if os.environ.get("MESHLET_PROXY"):
        return Path(os.environ["MESHLET_PROXY"])
    build = Path(os.environ.get("MESHLET_BUILD", REPO / "build-test"))
    if not build.is_absolute():
        build = REPO / build
    return build / "proxy" / "meshlet-proxy"


def proxy_env():
    """Environment for proxies: sanitizer options that keep RSS meaningful.

    ASan's quarantine holds up to 256 MiB of freed memory by default, which
    would swamp the RSS bounds the streaming tests check; 16 MiB keeps
    use-after-free detection useful without that."""
    env = dict(os.environ)
    asan = [o for o in env.get("ASAN_OPTIONS", "").split(":") if o]
    keys = {o.split("=", 1)[0] for o in asan}
    for k, v in (("detect_leaks", "1"), ("quarantine_size_mb", "16"),
                 ("thread_local_quarantine_size_kb", "256"), ("allocator_release_to_os_interval_ms", "500")):
        if k not in keys:
            asan.append(f"{k}={v}")
    env["ASAN_OPTIONS"] = ":".join(asan)
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="session")
def proxy_bin():
    b = proxy_binary()
    if not (b.is_file() and os.access(b, os.X_OK)):
        pytest.fail(f"meshlet-proxy not found at {b}: build it first (tests/run does), "
                    f"or set MESHLET_BUILD / MESHLET_PROXY")
    return b


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


# The inbound policy most tests use: frontend may call orders, intruder is
# explicitly denied, everyone else falls to the default (deny).
ORDERS_RULES = [
    {"name": "frontend-to-orders", "action": "allow", "from": [spiffe("frontend")]},
    {"name": "no-intruder", "action": "deny", "from": [spiffe("intruder")]},
]


class Mesh:
    """Starts apps and proxies for one test and stops them all afterwards."""

    def __init__(self, binary, pki, tmp):
        self.binary, self.pki, self.tmp = binary, pki, tmp
        self.env = proxy_env()
        self.proxies, self.apps = [], []
        self._n = 0

    # -- apps
    def app(self, mode="echo", name="app", tls_svid=None, require_client=True):
        ctx = server_context(tls_svid, require_client) if tls_svid else None
        a = App(mode, name, ctx)
        self.apps.append(a)
        return a

    # -- files
    def policy(self, service, rules, default=None, path=None):
        self._n += 1
        doc = {"service": service, "rules": rules}
        if default is not None:
            doc["default"] = default
        path = path or self.tmp / f"policy-{service}-{self._n}.json"
        path.write_text(json.dumps(doc, indent=2))
        return path

    def config(self, service, svid=None, policy=None, inbound=(), outbound=(), **extra):
        """A static-mode config dict with the test defaults (1 worker, short
        drain, free admin port); extra keys replace top-level fields."""
        self._n += 1
        svid = svid or self.pki.svid(service)
        if policy is None:
            policy = self.policy(service, [])
        state = self.tmp / f"state-{service}-{self._n}"
        state.mkdir()
        cfg = {
            "service": service,
            "trust_domain": "mesh.local",
            "state_dir": str(state),
            "tls": svid.tls(),
            "policy_file": str(policy),
            "inbound": list(inbound),
            "outbound": list(outbound),
            "admin": {"listen": addr(free_port())},
            "workers": 1,
            "timeouts": {"handshake_seconds": 10, "connect_seconds": 5,
                         "idle_seconds": 300, "drain_seconds": 3},
            "log": {"level": "info", "access_log": True},
        }
        cfg.update(extra)
        return cfg

    # -- proxies
    def proxy(self, name, cfg, wait_ready=True):
        p = Proxy(self.binary, name, cfg, self.tmp, self.env)
        self.proxies.append(p)
        p.start(wait_ready=wait_ready)
        return p

    def inbound(self, forward_port, service="orders", rules=None, default=None, svid=None,
                protocol="tcp", name=None, **extra):
        """An inbound-only proxy for service forwarding to 127.0.0.1:forward_port.
        Returns (proxy, listen port)."""
        port = free_port()
        pol = self.policy(service, ORDERS_RULES if rules is None else rules, default)
        cfg = self.config(service, svid=svid, policy=pol,
                          inbound=[{"listen": addr(port), "forward": addr(forward_port),
                                    "protocol": protocol}], **extra)
        return self.proxy(name or f"{service}-in", cfg), port

    def outbound(self, endpoints, service="frontend", upstream="orders", svid=None,
                 name=None, **extra):
        """An outbound-only proxy of service calling upstream at endpoints
        (ports). Returns (proxy, listen port)."""
        port = free_port()
        cfg = self.config(service, svid=svid,
                          outbound=[{"listen": addr(port), "service": upstream, "protocol": "tcp",
                                     "endpoints": [addr(e) for e in endpoints]}], **extra)
        return self.proxy(name or f"{service}-out", cfg), port

    def pair(self, app, in_extra=None, out_extra=None):
        """frontend's outbound -> orders' inbound -> app. Returns
        (outbound proxy, inbound proxy, port the client connects to)."""
        inb, in_port = self.inbound(app.port, **(in_extra or {}))
        outb, out_port = self.outbound([in_port], **(out_extra or {}))
        return outb, inb, out_port

    # -- teardown
    def close(self, failed):
        problems = []
        for p in self.proxies:
            drain = p.cfg.get("timeouts", {}).get("drain_seconds", 30)
            p.stop(grace=drain + 5)
            rep = p.sanitizer_report()
            if rep:
                problems.append(f"{p.name} (pid {p.proc.pid}): sanitizer report:\n{rep}")
        for a in self.apps:
            a.stop()
        if failed or problems:
            for p in self.proxies:
                print(f"\n===== {p.name}: {p.config_path}\n{p.config_path.read_text()}")
                print(f"----- {p.name} stderr (last 4000 chars)\n{p.stderr()[-4000:]}")
                print(f"----- {p.name} stdout (last 3000 chars)\n{p.stdout()[-3000:]}")
        return problems


@pytest.fixture
def mesh(request, proxy_bin, pki, tmp_path):
    m = Mesh(proxy_bin, pki, tmp_path)
    yield m
    rep = getattr(request.node, "rep_call", None)
    problems = m.close(failed=rep is not None and rep.failed)
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)
