"""CONNECT on http listeners (issue 9, defect 15): decided like any request,
and once the app answers 2xx the connection is a tunnel carrying raw bytes
both ways until either side closes; the request is logged once."""

import os
import socket
import time

import pytest

from helpers import spiffe
from http_helpers import HttpClient, frontend_ctx, http_mesh

# A tunnel is allowed only by a rule naming CONNECT, and a deny rule naming
# paths refuses it unless its methods leave CONNECT out.
RULES = [
    {"name": "no-admin", "action": "deny", "from": ["*"], "paths": ["/admin", "/admin/*"],
     "methods": ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]},
    {"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]},
    {"name": "frontend-tunnel", "action": "allow", "from": [spiffe("frontend")],
     "methods": ["CONNECT"]},
]
# The review's bypass: an allow rule without methods next to a path deny.
# A tunnel here would carry `GET /admin/x` (and a forged
# x-forwarded-client-cert) past both.
BYPASS_RULES = [
    {"name": "no-admin", "action": "deny", "from": ["*"], "paths": ["/admin", "/admin/*"]},
    {"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]},
]
CONNECT = b"CONNECT orders:443 HTTP/1.1\r\nhost: orders:443\r\nx-request-id: tun-1\r\n\r\n"


def roundtrip(c, payload):
    c.send(payload)
    got, c.buf = c.buf, b""
    while len(got) < len(payload):
        chunk = c.sock.recv(65536)
        assert chunk, f"tunnel closed after {len(got)} of {len(payload)} bytes"
        got += chunk
    assert got == payload


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_connect_becomes_a_tunnel(mesh, pki, via):
    hm = http_mesh(mesh, RULES, app_mode="upgrade", outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx, timeout=5) as c:
        c.send(CONNECT)
        r = c.read_response(head_request=True)    # a 2xx to CONNECT has no body
        assert r is not None and r.status == 200, r
        # Raw bytes both ways, several times, including bytes that look like HTTP.
        time.sleep(0.3)
        for payload in (b"\x16\x03\x01hello", b"GET /admin/x HTTP/1.1\r\nhost: orders\r\n\r\n",
                        os.urandom(300_000), b"last"):
            roundtrip(c, payload)
        # The client ends the tunnel: the close reaches the app and comes back.
        if ctx is None:
            c.sock.shutdown(socket.SHUT_WR)
        else:
            # close_notify out; returns once the proxy's close_notify came back.
            c.sock = c.sock.unwrap()
        assert c.closed_within(5), "the tunnel did not close after the client's EOF"
        assert c.buf == b"", c.buf[:100]
    assert [r.method for r in hm.app.requests] == ["CONNECT"]
    assert hm.app.tunnel_bytes >= 300_000
    for proxy in [hm.inb] + ([hm.outb] if hm.outb else []):
        e = proxy.wait_access(request_id="tun-1")
        assert e["status"] == 200 and e["method"] == "CONNECT", e
        time.sleep(0.3)
        lines = [x for x in proxy.access_log() if x.get("conn") == e["conn"]]
        assert len(lines) == 1, f"{proxy.name} logged the tunnel {len(lines)} times: {lines}"


@pytest.mark.parametrize("rules, rule", [
    (BYPASS_RULES, "no-admin"),
    (BYPASS_RULES[1:], "default"),
])
def test_connect_needs_a_rule_that_names_it(mesh, pki, rules, rule):
    """An allow rule without methods does not open a tunnel, and a deny rule
    naming paths refuses one: the proxy never sees what the tunnel carries."""
    hm = http_mesh(mesh, rules, app_mode="upgrade", outbound=False)
    with HttpClient(hm.in_port, frontend_ctx(pki), timeout=5) as c:
        c.send(CONNECT)
        r = c.read_response()
        assert r is not None and r.status == 403, r
        assert rule in r.body.decode(), r.body
    assert hm.app.requests == []
