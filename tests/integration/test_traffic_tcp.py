"""The callers' traffic rules on the connect step (docs/traffic.md), on
tcp listeners and the connect of http listeners: the upstream's connect
timeout, retries on connect failure to another endpoint (attempts, the
budget), passive outlier ejection (consecutive failures, doubling, the
cap), limits.max_connections; and fault aborts on tcp inbound listeners.

frontend's outbound proxy (static mode, traffic_file with payments'
document) in front of TLS test apps that answer their name."""

import json
import re
import socket
import time

from helpers import free_port, spiffe, try_call, wait_for
from http_helpers import HttpClient, request
from test_outbound import first_line

PAYMENTS = "payments"


def outbound(mesh, pki, endpoints, traffic, protocol="tcp"):
    f = mesh.tmp / f"traffic-{free_port()}.json"
    f.write_text(json.dumps({"service": PAYMENTS, **traffic}))
    port = free_port()
    cfg = mesh.config("frontend", outbound=[{
        "listen": f"127.0.0.1:{port}", "service": PAYMENTS, "protocol": protocol,
        "endpoints": [f"127.0.0.1:{e}" for e in endpoints]}], traffic_file=str(f))
    return mesh.proxy(f"frontend-out-{port}", cfg), port


def named(mesh, pki, name):
    return mesh.app("name", name, tls_svid=pki.svid(PAYMENTS))


def attempts(p, port, what="failed"):
    """Connects to 127.0.0.1:port the proxy logged as failed (or timed out)."""
    return len(re.findall(rf"connect to 127\.0\.0\.1:{port} {what}", p.stderr()))


def metric(p, name):
    return p.metrics().get(name)


def test_refusing_endpoint_ejected_then_back(mesh, pki):
    """One of three refuses: after 2 failures in a row it gets no connects
    for eject_seconds, then one more chance; failing again it is out for
    twice as long. Every call is served by the other two meanwhile."""
    a, b, dead = named(mesh, pki, "alpha"), named(mesh, pki, "beta"), free_port()
    p, port = outbound(mesh, pki, [dead, a.port, b.port], {
        "outlier": {"consecutive_failures": 2, "eject_seconds": 1, "max_ejected_percent": 50}})
    names = []
    while attempts(p, dead) < 2:
        names.append(first_line(port))
    t_eject = time.monotonic()
    assert set(names) <= {"alpha", "beta"}, names
    assert metric(p, "meshlet_outlier_ejections_total") == 1
    assert metric(p, "meshlet_endpoints_ejected") == 1
    # Ejected: calls for most of a second, none tries it.
    while time.monotonic() - t_eject < 0.8:
        assert first_line(port) in ("alpha", "beta")
    assert attempts(p, dead) == 2
    # Back after eject_seconds: the first call after it tries it again.
    while attempts(p, dead) == 2:
        assert first_line(port) in ("alpha", "beta")
        time.sleep(0.01)
    back = time.monotonic() - t_eject
    assert 1.0 <= back < 1.5, back
    assert metric(p, "meshlet_endpoints_ejected") == 0
    # A second failure in a row ejects it again, for 2 s now.
    while attempts(p, dead) < 4:
        first_line(port)
    t2 = time.monotonic()
    assert metric(p, "meshlet_outlier_ejections_total") == 2
    while attempts(p, dead) == 4:
        first_line(port)
        time.sleep(0.01)
    back2 = time.monotonic() - t2
    assert 2.0 <= back2 < 2.5, back2
    print(f"\nejected for {back:.3f} s, then (doubled) {back2:.3f} s")


def test_never_more_than_the_cap_ejected(mesh, pki):
    """Two of three refuse; max_ejected_percent 50 of 3 endpoints: one at most."""
    a, d1, d2 = named(mesh, pki, "alpha"), free_port(), free_port()
    p, port = outbound(mesh, pki, [d1, d2, a.port], {
        "outlier": {"consecutive_failures": 1, "eject_seconds": 30, "max_ejected_percent": 50}})
    gauge = []
    for _ in range(12):
        assert first_line(port) == "alpha"
        gauge.append(metric(p, "meshlet_endpoints_ejected"))
    assert max(gauge) == 1 and gauge[-1] == 1, gauge
    assert metric(p, "meshlet_outlier_ejections_total") == 1
    # The one not ejected keeps being tried (and failing over).
    assert attempts(p, d1) + attempts(p, d2) >= 6


def blackhole():
    """A listening socket whose accept queue is full: a further SYN is
    dropped, so a connect to it neither succeeds nor fails (on loopback,
    deterministically, without privileges)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    fillers = []
    for _ in range(2):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(s.getsockname())
        fillers.append(c)
    time.sleep(0.1)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(s.getsockname())
        raise AssertionError("the backlog did not fill: cannot black-hole on this kernel")
    except socket.timeout:
        pass
    finally:
        probe.close()
    return s, fillers


def test_connect_timeout_moves_to_another_endpoint(mesh, pki):
    hole, fillers = blackhole()
    a = named(mesh, pki, "alpha")
    try:
        p, port = outbound(mesh, pki, [hole.getsockname()[1], a.port], {
            "timeouts": {"connect_seconds": 0.3},
            "retries": {"attempts": 1, "budget_percent": 100}})
        took = []
        for _ in range(4):
            t0 = time.monotonic()
            assert first_line(port) == "alpha"
            took.append(time.monotonic() - t0)
        # Round robin: half the calls went to the hole first, waited the
        # connect timeout (not the proxy's 5 s), and were retried on alpha.
        slow = [t for t in took if t >= 0.3]
        assert len(slow) == 2 and max(took) < 1.0, took
        assert attempts(p, hole.getsockname()[1], "timed out") == 2
        assert metric(p, "meshlet_retries_total") == 2
    finally:
        hole.close()
        for f in fillers:
            f.close()


def test_retries_bounded_by_attempts_and_budget(mesh, pki):
    """Every endpoint refuses. attempts 1: a call tries 2 endpoints, no more.
    attempts 3 with budget_percent 50: over 4 calls, retries stay within
    half the first attempts (2 of them); budget 0: none."""
    dead = [free_port() for _ in range(4)]
    p, port = outbound(mesh, pki, dead, {"retries": {"attempts": 1, "budget_percent": 100}})
    for calls in range(1, 4):
        assert not try_call(port, None, timeout=5)[0]
        assert sum(attempts(p, d) for d in dead) == 2 * calls
    assert metric(p, "meshlet_retries_total") == 3
    p.stop()
    p2, port2 = outbound(mesh, pki, dead, {"retries": {"attempts": 3, "budget_percent": 50}})
    for _ in range(4):
        assert not try_call(port2, None, timeout=5)[0]
    assert metric(p2, "meshlet_retries_total") == 2
    assert sum(attempts(p2, d) for d in dead) == 4 + 2
    p2.stop()
    p3, port3 = outbound(mesh, pki, dead, {"retries": {"attempts": 3, "budget_percent": 0}})
    for _ in range(3):
        assert not try_call(port3, None, timeout=5)[0]
    assert sum(attempts(p3, d) for d in dead) == 3
    assert metric(p3, "meshlet_retries_total") == 0


def test_max_connections_tcp_and_http(mesh, pki):
    a = mesh.app("echo", tls_svid=pki.svid(PAYMENTS))
    p, port = outbound(mesh, pki, [a.port], {"limits": {"max_connections": 2}})
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    for h in held:
        h.sendall(b"x\n")
        assert h.recv(10) == b"x\n"
    # The third is closed at once, before any byte.
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.recv(10) == b""
    assert time.monotonic() - t0 < 1
    assert metric(p, "meshlet_overloaded_total") == 1
    held[0].close()
    wait_for(lambda: try_call(port, None)[0], 5, what="a place free again")
    held[1].close()

    app = mesh.app("echo", tls_svid=pki.svid(PAYMENTS))
    h, hport = outbound(mesh, pki, [app.port], {"limits": {"max_connections": 1}},
                        protocol="http")
    first = socket.create_connection(("127.0.0.1", hport), timeout=5)
    wait_for(lambda: h.metrics().get("meshlet_connections_active", direction="outbound") == 1,
             5, what="the first connection up")
    with HttpClient(hport, None) as c:
        c.send(request("GET", "/x", host=PAYMENTS))
        r = c.read_response()
        assert r.status == 503, r.status
        assert r.header("x-meshlet-overloaded") == "1"
        assert json.loads(r.body) == {"error": "overloaded", "limit": "max_connections"}
    first.close()
    assert metric(h, "meshlet_overloaded_total") == 1


def test_tcp_inbound_fault_abort(mesh, pki):
    """A fault with abort_status and no HTTP fields closes a tcp connection;
    one naming paths never selects one."""
    app = mesh.app("echo")
    f = mesh.tmp / "orders-traffic.json"
    f.write_text(json.dumps({"service": "orders", "faults": [
        {"name": "by-path", "paths": ["/x/*"], "percent": 100, "abort_status": 503},
        {"name": "cut", "from": [spiffe("ops")], "percent": 100, "abort_status": 503}]}))
    outb, inb, port = mesh.pair(app, in_extra={"traffic_file": str(f)})
    assert try_call(port, None)[0]    # frontend: neither selects it
    m = inb.metrics()
    assert m.get("meshlet_faults_injected_total", fault="cut") == 0
    assert m.get("meshlet_faults_injected_total", fault="by-path") == 0
    f.write_text(json.dumps({"service": "orders", "faults": [
        {"name": "cut", "percent": 100, "abort_status": 503}]}))
    v0 = inb.metrics().get("meshlet_config_version")
    inb.signal(1)
    wait_for(lambda: inb.metrics().get("meshlet_config_version") > v0, 10, what="reload")
    ok, why = try_call(port, None)
    assert not ok, why
    assert inb.metrics().get("meshlet_faults_injected_total", fault="cut") == 1
    inb.wait_access(direction="inbound", status="fault_injected")
