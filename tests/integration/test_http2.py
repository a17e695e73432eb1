"""HTTP/2 through a sidecar pair: h2c prior knowledge from the app, h2 (ALPN)
between the sidecars, h2c to an app that speaks both HTTP/2 and HTTP/1.1;
per-stream policy, the HTTP/1.1 bypass table replayed as HTTP/2, the
translation-safety refusals, and the abuse limits (GOAWAY, other
connections served meanwhile, memory bounded)."""

import json
import subprocess

import pytest

from h2_helpers import DualApp, H2Client
from helpers import spiffe
from http_helpers import frontend_ctx, http_inbound, http_outbound

RULES = [
    {"name": "no-admin", "action": "deny", "from": ["*"], "paths": ["/admin", "/admin/*"]},
    {"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]},
]


@pytest.fixture
def pair(mesh):
    app = DualApp()
    mesh.apps.append(app)
    inb, in_port = http_inbound(mesh, app.port, RULES)
    outb, out_port = http_outbound(mesh, [in_port])
    return app, inb, in_port, outb, out_port


def curl(port, path, *args):
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code} %{http_version}",
                          "--max-time", "10", *args, f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=20)
    body, _, tail = out.stdout.rpartition("\n")
    code, version = tail.split()
    return int(code), version, body


def test_curl_h2_and_http11_through_one_listener(pair):
    app, _, _, _, port = pair
    code, version, body = curl(port, "/orders/1", "--http2-prior-knowledge")
    assert (code, version, body) == (200, "2", "ok /orders/1")
    code, version, body = curl(port, "/orders/2", "--http1.1")
    assert (code, version, body) == (200, "1.1", "ok /orders/2")
    protos = [(s.proto, s.path) for s in app.seen]
    assert protos == [("h2", "/orders/1"), ("http/1.1", "/orders/2")]
    h = app.seen[0]
    assert h.header("x-forwarded-client-cert") == [
        f"By={spiffe('orders')};URI={spiffe('frontend')}"]
    assert len(h.header("x-request-id")) == 1
