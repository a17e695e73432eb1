"""Outbound listeners and the whole pair: app -> outbound -> mTLS -> inbound -> app."""

import socket
import threading
import time
from collections import namedtuple

import pytest

from helpers import spiffe, try_call, wait_for

FAILURES = "meshlet_tls_handshake_failures_total"


def check_access_fields(e):
    for field in ("time", "direction", "peer", "destination", "decision", "rule", "status",
                  "bytes_in", "bytes_out"):
        assert field in e, f"access log entry lacks {field}: {e}"
    assert any(k.startswith("duration") for k in e), f"access log entry lacks a duration: {e}"


def test_allowed_call_end_to_end(mesh):
    app = mesh.app("echo")
    outb, inb, port = mesh.pair(app, in_extra={"workers": 2}, out_extra={"workers": 2})

    ok, reply = try_call(port, None, b"hello orders\n")
    assert ok, reply
    assert app.connections == 1

    e = inb.wait_access(direction="inbound", peer=spiffe("frontend"), decision="allow")
    assert e.get("rule") == "frontend-to-orders", e
    check_access_fields(e)
    assert e["bytes_in"] == e["bytes_out"] == len(b"hello orders\n"), e
    o = outb.wait_access(direction="outbound", peer=spiffe("orders"))
    check_access_fields(o)

    mi, mo = inb.metrics(), outb.metrics()
    assert mi.get("meshlet_connections_total", direction="inbound") >= 1
    assert mo.get("meshlet_connections_total", direction="outbound") >= 1
    assert mi.get("meshlet_policy_decisions_total", decision="allow", rule="frontend-to-orders") >= 1
    assert mi.get("meshlet_bytes_total", direction="inbound") > 0

    # Many calls, some at once, over both workers of each proxy.
    results = []

    def call(i):
        results.append(try_call(port, None, f"call {i}\n".encode() * 100))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 24 and all(ok for ok, _ in results), [r for r in results if not r[0]]
    wait_for(lambda: inb.metrics().get("meshlet_connections_active", direction="inbound") == 0, 5,
             what="meshlet_connections_active to return to 0")


Upstream = namedtuple("Upstream", "id svid ok reasons")

UPSTREAMS = [
    Upstream("right-identity", ("payments", "valid"), True, None),
    Upstream("wrong-service", ("inventory", "valid"), False, {"wrong_identity"}),
    Upstream("other-ca", ("payments", "other-ca"), False, {"untrusted"}),
    Upstream("other-trust-domain", ("payments", "other-td"), False, {"wrong_trust_domain"}),
    Upstream("two-uri-sans", ("payments", "two-uris"), False, {"multiple_uri_sans"}),
    Upstream("expired", ("payments", "expired"), False, {"expired"}),
    Upstream("leaf-is-ca", ("payments", "leaf-ca"), False, {"leaf_is_ca"}),
    Upstream("eku-client-only", ("payments", "eku-client"), False, {"bad_ext_key_usage", "untrusted"}),
]


@pytest.mark.parametrize("up", UPSTREAMS, ids=[u.id for u in UPSTREAMS])
def test_outbound_verifies_upstream_identity(mesh, pki, up):
    """Secure naming: the upstream must present spiffe://mesh.local/svc/payments
    in a valid X.509-SVID. The upstream here is a Python TLS server that
    requires a client certificate from the mesh CA."""
    server = mesh.app("echo", tls_svid=pki.svid(*up.svid))
    outb, port = mesh.outbound([server.port], upstream="payments")
    before = outb.metrics().by_label(FAILURES, "reason")

    ok, why = try_call(port, None)
    if up.ok:
        assert ok, why
        assert server.peer_uris == [[spiffe("frontend")]], "outbound did not present its SVID"
        return
    assert not ok, f"{up.id}: the outbound relayed to an upstream with the wrong identity"
    assert server.app_bytes == 0, f"{up.id}: application bytes reached the wrong upstream"
    reasons = wait_for(lambda: {r for r, v in outb.metrics().by_label(FAILURES, "reason").items()
                                if v > before.get(r, 0)}, 5, what=f"{FAILURES} to count it")
    assert reasons & up.reasons, f"{up.id}: counted under {sorted(reasons)}, expected {sorted(up.reasons)}"


def first_line(port, timeout=5):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        buf = b""
        while not buf.endswith(b"\n"):
            c = s.recv(100)
            if not c:
                break
            buf += c
        return buf.decode().strip()


def test_round_robin_over_endpoints(mesh, pki):
    a = mesh.app("name", "alpha", tls_svid=pki.svid("payments"))
    b = mesh.app("name", "beta", tls_svid=pki.svid("payments"))
    outb, port = mesh.outbound([a.port, b.port], upstream="payments")
    names = [first_line(port) for _ in range(6)]
    assert sorted(set(names)) == ["alpha", "beta"], names
    assert names.count("alpha") == 3 and names.count("beta") == 3, f"not round robin: {names}"


def test_refused_endpoint_is_skipped(mesh, pki):
    from helpers import free_port
    dead = free_port()                      # nothing listens there: connect is refused
    a = mesh.app("name", "alpha", tls_svid=pki.svid("payments"))
    b = mesh.app("name", "beta", tls_svid=pki.svid("payments"))
    outb, port = mesh.outbound([dead, a.port, b.port], upstream="payments")
    names = [first_line(port) for _ in range(6)]
    assert all(n in ("alpha", "beta") for n in names), f"some calls failed: {names}"
    assert names.count("alpha") >= 2 and names.count("beta") >= 2, names


def test_all_endpoints_down_closes_quickly(mesh):
    from helpers import free_port
    outb, port = mesh.outbound([free_port(), free_port()], upstream="payments")
    t0 = time.monotonic()
    ok, why = try_call(port, None, timeout=10)
    assert not ok
    assert time.monotonic() - t0 < 6, "client kept waiting although every endpoint refused"
    assert outb.alive()
