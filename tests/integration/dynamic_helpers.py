"""Helpers for the dynamic-proxy tests (test_dynamic*.py): real
meshlet-control, meshletctl and meshlet-proxy processes in control mode on
127.0.0.1.

The `dyn` fixture combines conftest's `mesh` (proxies and apps, stopped and
checked for sanitizer reports at teardown) with control_helpers'
`control_factory` (controls, likewise). Test modules import:

    from control_helpers import control_factory  # noqa: F401
    from dynamic_helpers import dyn  # noqa: F401
"""

import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from helpers import addr, free_port, spiffe, try_call, wait_for


def allow_policy(service, frm, name="allow-caller"):
    return {"service": service, "default": "deny",
            "rules": [{"name": name, "action": "allow", "from": [spiffe(frm)]}]}


def deny_policy(service, frm, name="deny-caller"):
    return {"service": service, "default": "deny",
            "rules": [{"name": name, "action": "deny", "from": [spiffe(frm)]}]}


class Dyn:
    """One control plane and the control-mode proxies of a test."""

    def __init__(self, mesh, factory, tmp):
        self.mesh, self.factory, self.tmp = mesh, factory, Path(tmp)
        self.control = None
        self._n = 0

    # -- control
    def start_control(self, name="control", svid_ttl=None, **kw):
        extra = ["--svid-ttl", svid_ttl] if svid_ttl else []
        c = self.factory.new(name=name, extra_args=extra, **kw)
        if self.control is None:
            self.control = c
        return c

    def ctl(self, *args, control=None, check=True):
        c = control or self.control
        p = c.ctl(*args)
        if check:
            assert p.returncode == 0, f"meshletctl {args} failed ({p.returncode}): {p.stderr}"
        return p

    def apply_policy(self, doc, control=None):
        self._n += 1
        f = self.tmp / f"policy-{doc['service']}-{self._n}.json"
        f.write_text(json.dumps(doc))
        return self.ctl("policy", "apply", "-f", str(f), control=control)

    def token_file(self, service, token=None, control=None, ttl=600, uses=1):
        """A 0600 file holding a join token for service (or token as given)."""
        self._n += 1
        c = control or self.control
        tok = token if token is not None else c.join_token(service, ttl=ttl, uses=uses)
        f = self.tmp / f"token-{service}-{self._n}"
        f.write_text(tok + "\n")
        os.chmod(f, 0o600)
        return f

    def certs(self, service=None):
        r = self.control.api("GET", "/v1/certs")
        assert r.status == 200, r
        return [c for c in r.json["certs"] if service is None or c["service"] == service]

    # -- proxies
    def config(self, service, token_file, inbound=(), outbound=(), control=None, state_dir=None):
        self._n += 1
        c = control or self.control
        return {
            "service": service,
            "trust_domain": "mesh.local",
            "state_dir": str(state_dir or self.tmp / f"pstate-{service}-{self._n}"),
            "control": {"url": c.url, "token_file": str(token_file)},
            "inbound": list(inbound),
            "outbound": list(outbound),
            "admin": {"listen": addr(free_port())},
            "workers": 1,
            "timeouts": {"handshake_seconds": 10, "connect_seconds": 5,
                         "idle_seconds": 300, "drain_seconds": 2},
            "log": {"level": "info", "access_log": True},
        }

    def proxy(self, name, cfg, wait_ready=True):
        return self.mesh.proxy(name, cfg, wait_ready=wait_ready)

    def inbound(self, app_port, service="orders", name=None, token_file=None, wait_ready=True,
                protocol="tcp"):
        """A control-mode inbound proxy of service in front of app_port.
        Returns (proxy, listen port)."""
        port = free_port()
        cfg = self.config(service, token_file or self.token_file(service),
                          inbound=[{"listen": addr(port), "forward": addr(app_port),
                                    "protocol": protocol}])
        return self.proxy(name or f"{service}-in", cfg, wait_ready), port

    def outbound(self, service="frontend", upstream="orders", name=None, token_file=None,
                 wait_ready=True, protocol="tcp"):
        """A control-mode outbound proxy of service to upstream, endpoints
        from control's registry. Returns (proxy, listen port)."""
        port = free_port()
        cfg = self.config(service, token_file or self.token_file(service),
                          outbound=[{"listen": addr(port), "service": upstream,
                                     "protocol": protocol}])
        return self.proxy(name or f"{service}-out", cfg, wait_ready), port

    def pair(self, app, allow=True):
        """orders' inbound (policy: frontend allowed, or denied) in front of
        app, and frontend's outbound to it; waits until a call goes through
        (or, when denied, until the outbound knows the endpoint).
        Returns (outbound, inbound, port the client connects to)."""
        self.apply_policy(allow_policy("orders", "frontend") if allow
                          else deny_policy("orders", "frontend"))
        inb, in_port = self.inbound(app.port)
        outb, out_port = self.outbound()
        if allow:
            wait_for(lambda: try_call(out_port, timeout=2)[0], 15,
                     what="a call through the dynamic pair")
        return outb, inb, out_port


def ready(proxy):
    """(status, JSON body) of /ready."""
    st, body = proxy.admin("/ready")
    return st, json.loads(body)


class Caller:
    """Sends one request (a new connection through the outbound, an echo
    round trip) after another in a thread, counting failures."""

    def __init__(self, port, interval=0.02):
        self.port, self.interval = port, interval
        self.ok = 0
        self.failures = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join(10)

    def _run(self):
        i = 0
        while not self._stop.is_set():
            i += 1
            payload = f"request {i}\n".encode()
            good, why = try_call(self.port, payload=payload, timeout=5)
            if good:
                self.ok += 1
            else:
                self.failures.append((time.strftime("%H:%M:%S"), why))
            time.sleep(self.interval)


class Stream:
    """One long-lived echo connection through the outbound: a thread sends
    numbered lines and checks every echo; records how it ended."""

    def __init__(self, port, interval=0.01):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sent = self.echoed = 0
        self.error = None
        self.interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join(10)
        self.sock.close()

    def _run(self):
        buf = b""
        try:
            while not self._stop.is_set():
                line = f"line {self.sent}\n".encode() * 64
                self.sock.sendall(line)
                self.sent += 1
                while len(buf) < len(line):
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("the stream was closed")
                    buf += chunk
                got, buf = buf[:len(line)], buf[len(line):]
                if got != line:
                    raise AssertionError(f"stream corrupted at line {self.sent - 1}")
                self.echoed += 1
                time.sleep(self.interval)
        except (OSError, AssertionError, ConnectionError) as e:
            self.error = repr(e)


@pytest.fixture
def dyn(mesh, control_factory, tmp_path):
    return Dyn(mesh, control_factory, tmp_path)


def client_with(ident, bundle):
    """A TLS client context presenting ident (control_helpers.Identity) and
    verifying the server against bundle, for talking straight to an inbound."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(bundle))
    ctx.load_cert_chain(str(ident.cert), str(ident.key))
    return ctx
