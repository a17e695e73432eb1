"""Kept-alive connections to meshlet-control, as proxies hold them (issue 14,
docs/benchmarks.md "Control plane at scale"): a long poll on a reused
connection waits its own wait, not the server's I/O timeout, and an idle
one is closed after that timeout; every request
on a reused connection re-checks the client certificate, so a proxy revoked
while it holds a connection is refused on its next request."""

import http.client
import threading
import time

from control_helpers import control, control_factory, new_svid, policy_doc, request  # noqa: F401

CONFIG = "/v1/services/orders/config"


def keep(control, svid):
    return http.client.HTTPSConnection("127.0.0.1", control.port,
                                       context=control.context(svid), timeout=60)


def get(control, conn, path):
    return request(control.port, None, "GET", path, conn=conn)


def test_long_poll_on_a_reused_connection_waits_its_wait(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    conn = keep(control, a)
    try:
        first = get(control, conn, CONFIG + "?after=0&wait=0")
        assert first.status == 200, first
        v = first.json["version"]
        # The second request on the same connection waits past the server's
        # 10 s I/O timeout, and is answered when its own wait is over.
        t0 = time.monotonic()
        r = get(control, conn, f"{CONFIG}?after={v}&wait=14")
        took = time.monotonic() - t0
        assert r.status in (200, 304), r
        assert 13 <= took < 20, took
        # Still the same connection: a third request rides it.
        assert get(control, conn, CONFIG + "?after=0&wait=0").status == 200
        # Idle between requests, it is closed after the I/O timeout (10 s).
        t0 = time.monotonic()
        conn.sock.settimeout(30)
        assert conn.sock.recv(1) == b""
        assert 8 <= time.monotonic() - t0 < 20
    finally:
        conn.close()


def test_revoked_proxy_is_refused_on_its_kept_connection(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    conn = keep(control, a)
    try:
        assert get(control, conn, CONFIG + "?after=0&wait=0").status == 200
        sock = conn.sock
        r = control.api("POST", "/v1/certs/revoke", {"serial": a.serial})
        assert r.status == 200, r
        r = get(control, conn, CONFIG + "?after=0&wait=0")
        assert r.status == 403 and "revoked" in r.body.decode(), r
        # The refusal came on the connection made before the revocation.
        assert conn.sock is sock
    finally:
        conn.close()


def test_push_reaches_a_long_poll_on_a_reused_connection(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    conn = keep(control, a)
    try:
        first = get(control, conn, CONFIG + "?after=0&wait=0")
        v = first.json["version"]
        sock = conn.sock
        for i in range(3):
            # The push comes while the long poll waits on the kept connection.
            doc = policy_doc("orders", [{"name": f"push-{i}", "action": "allow"}])
            push = threading.Timer(0.5, control.put_policy, (doc,))
            push.start()
            r = get(control, conn, f"{CONFIG}?after={v}&wait=20")
            push.join()
            assert r.status == 200 and r.json["version"] > v, r
            v = r.json["version"]
        assert conn.sock is sock
    finally:
        conn.close()
