"""HTTP listeners: bodies stream (bounded memory), upgrades become tunnels
only after 101, and upstream failures become 502 / 504."""

import hashlib
import os
import socket
import ssl
import time

import pytest

from helpers import RssSampler, free_port, pattern_chunks, spiffe, App
from http_helpers import (MiB, HttpApp, HttpClient, cpu_seconds, exchange, frontend_ctx,
                          http_inbound, http_mesh, http_outbound, request)

FRONTEND = spiffe("frontend")
RULES = [
    {"name": "no-admin", "action": "deny", "from": ["*"], "paths": ["/admin", "/admin/*"]},
    {"name": "no-connect", "action": "deny", "from": ["*"], "methods": ["CONNECT"]},
    {"name": "frontend-all", "action": "allow", "from": [FRONTEND]},
]

# 1 GiB by default. Measured on this 2-core machine with the ASan build:
# about 300 MiB/s through the pair, so 1 GiB takes ~4 s when the machine is
# otherwise idle. MESHLET_HTTP_UPLOAD_MIB makes it smaller on slow machines.
UPLOAD_MIB = int(os.environ.get("MESHLET_HTTP_UPLOAD_MIB", "1024"))


def test_chunked_upload_streams_with_bounded_rss(mesh, pki):
    """A 1 GiB chunked upload through the pair, default timeouts: the app
    counts and hashes exactly what was sent, and neither proxy's RSS grows
    by 64 MiB or more (so the body is never buffered whole)."""
    hm = http_mesh(mesh, RULES)
    total = UPLOAD_MIB * MiB
    with HttpClient(hm.out_port, timeout=120) as c:
        c.send(request("GET", "/warm-up"))
        assert c.read_response().status == 200
        base = {p.name: p.rss_kb() for p in (hm.outb, hm.inb)}
        h = hashlib.sha256()
        t0 = time.monotonic()
        with RssSampler([hm.outb, hm.inb]) as rss:
            c.send(b"POST /upload HTTP/1.1\r\nhost: orders\r\ntransfer-encoding: chunked\r\n"
                   b"x-request-id: big-upload\r\n\r\n")
            for chunk in pattern_chunks(total):
                h.update(chunk)
                c.sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            c.send(b"0\r\n\r\n")
            r = c.read_response()
        elapsed = time.monotonic() - t0
        assert r is not None and r.status == 200, r
        doc = r.json()
        assert doc["body_len"] == total and doc["body_sha"] == h.hexdigest(), doc
        # The connection is still good for the next request.
        c.send(request("GET", "/after"))
        assert c.read_response().status == 200
    seen = [s for s in hm.app.requests if s.path == "/upload"]
    assert len(seen) == 1 and seen[0].complete and seen[0].body_len == total
    for p in (hm.outb, hm.inb):
        growth = (rss.max[p.name] - base[p.name]) // 1024
        print(f"{p.name}: RSS {base[p.name] // 1024} MiB -> max {rss.max[p.name] // 1024} MiB "
              f"(+{growth} MiB); {total / MiB / elapsed:.0f} MiB/s")
        assert growth < 64, f"{p.name}: RSS grew by {growth} MiB during the upload"
    e = hm.inb.wait_access(request_id="big-upload")
    assert e["status"] == 200 and e["bytes_in"] >= total, e


def slow_body(port, ctx, seconds, parts=8):
    """POST /slow-body with a Content-Length body sent in parts over
    `seconds`. Returns (response or None, what the sender saw)."""
    with HttpClient(port, ctx, timeout=seconds + 4) as c:
        c.send(b"POST /slow-body HTTP/1.1\r\nhost: orders\r\ncontent-length: %d\r\n\r\n" % parts)
        note = "sent"
        for _ in range(parts):
            time.sleep(seconds / parts)
            try:
                c.send(b"x")
            except OSError as e:
                note = f"send failed: {e!r}"
                break
        try:
            return c.read_response(), note
        except (socket.timeout, ssl.SSLError, OSError) as e:
            return None, f"{note}; read: {e!r}"


def test_slow_body_is_not_a_slow_head(mesh, pki):
    """request_head_seconds bounds the head; a body that keeps arriving
    (here 8 bytes over 1.6 s, head limit 0.5 s) is the idle timer's business."""
    hm = http_mesh(mesh, RULES, outbound=False,
                   in_tmo={"request_head_seconds": 0.5, "response_head_seconds": 2.5})
    r, note = slow_body(hm.in_port, frontend_ctx(pki), 1.6)
    assert r is not None and r.status == 200, f"{r and (r.status, r.body)} ({note})"
    assert hm.app.requests[0].complete


def test_response_clock_starts_after_the_body(mesh, pki):
    hm = http_mesh(mesh, RULES, outbound=False,
                   in_tmo={"request_head_seconds": 60, "response_head_seconds": 0.7})
    r, note = slow_body(hm.in_port, frontend_ctx(pki), 2)
    assert r is not None and r.status == 200, f"{r and (r.status, r.body)} ({note})"
    assert hm.app.requests[0].complete


# ---------------------------------------------------------------- upgrades

WS = [("upgrade", "websocket"), ("connection", "Upgrade"),
      ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="), ("sec-websocket-version", "13")]


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_allowed_upgrade_becomes_a_tunnel(mesh, pki, via):
    hm = http_mesh(mesh, RULES, app_mode="upgrade", outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx, timeout=5) as c:
        c.send(request("GET", "/ws", headers=WS))
        r = c.read_response()
        assert r is not None and r.status == 101, r
        assert (r.header("upgrade") or "").lower() == "websocket", r.headers
        # Raw bytes both ways, including bytes that look like HTTP: no longer parsed.
        for payload in (b"\x81\x05hello", b"GET /admin/x HTTP/1.1\r\nhost: orders\r\n\r\n",
                        os.urandom(200_000)):
            c.send(payload)
            got = c.buf
            c.buf = b""
            while len(got) < len(payload):
                chunk = c.sock.recv(65536)
                assert chunk, "tunnel closed"
                got += chunk
            assert got == payload
    assert hm.app.paths() == ["/ws"]
    e = (hm.inb if via == "inbound-direct" else hm.outb).wait_access(path="/ws")
    assert e["status"] == 101, e


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_upgrade_answered_200_stays_http(mesh, pki, via):
    """Only a 101 turns the connection into a tunnel: when the app ignores
    the Upgrade, the next request on the connection is parsed and decided."""
    hm = http_mesh(mesh, RULES, app_mode="ok", outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx, timeout=5) as c:
        c.send(request("GET", "/ws", headers=WS))
        assert c.read_response().status == 200
        c.send(request("GET", "/admin/x"))
        r = c.read_response()
        assert r is not None and r.status == 403, r
        c.send(request("GET", "/next"))
        assert c.read_response().status == 200
    assert hm.app.paths() == ["/ws", "/next"]


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_pending_upgrade_does_not_stall_the_worker(mesh, pki, via):
    """While an Upgrade waits for the app's answer (here 1.5 s), the single
    worker goes on serving other connections and does not spin."""
    app = HttpApp("upgrade")
    app.upgrade_delay = 1.5
    mesh.apps.append(app)
    hm = http_mesh(mesh, RULES, app=app, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    procs = [hm.inb] + ([hm.outb] if hm.outb else [])
    with HttpClient(port, ctx, timeout=5) as up:
        up.send(request("GET", "/ws", headers=WS))
        time.sleep(0.2)
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        t0 = time.monotonic()
        r = exchange(port, request("GET", "/meanwhile"), ctx, timeout=5)
        assert r is not None and r.status == 200, r
        assert time.monotonic() - t0 < 1.0, "another connection waited for the pending upgrade"
        time.sleep(0.8)
        burnt = [cpu_seconds(p.pid) - c for p, c in zip(procs, cpu0)]
        r = up.read_response()
        assert r is not None and r.status == 101, r
    assert max(burnt) < 0.5, f"CPU seconds used while the upgrade waited ~1 s: {burnt}"


def refused_cases(port, ctx, cases):
    wrong = []
    for cid, data, status, rule in cases:
        with HttpClient(port, ctx, timeout=2) as c:
            c.send(data + b"\x81\x05hello")
            try:
                r = c.read_response()
            except (socket.timeout, ssl.SSLError, OSError) as e:
                wrong.append(f"{cid}: {e!r}")
                continue
            if r is None or r.status != status:
                wrong.append(f"{cid}: {r and (r.status, r.body)}")
                continue
            if rule and r.json().get("rule") != rule:
                wrong.append(f"{cid}: body {r.body!r}")
            if (r.header("connection") or "").lower() != "close" or not c.closed_within(5):
                wrong.append(f"{cid}: {r.status} without connection: close / the connection stayed open")
    return wrong


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_denied_upgrade_and_connect(mesh, pki, via):
    """Decided as requests first: a denied Upgrade or CONNECT gets 403 (and
    the connection closes); the app never sees it. Through the pair the
    outbound forwards them and the inbound decides."""
    hm = http_mesh(mesh, RULES, app_mode="upgrade", outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    wrong = refused_cases(port, ctx, [
        ("denied-upgrade", request("GET", "/admin/ws", headers=WS), 403, "no-admin"),
        # The first matching deny decides: no-admin names paths, so it
        # refuses a CONNECT too (its tunnel could reach /admin).
        ("denied-connect", b"CONNECT orders:443 HTTP/1.1\r\nhost: orders:443\r\n\r\n", 403, "no-admin"),
    ])
    assert not wrong, "\n" + "\n".join(wrong)
    assert hm.app.requests == [] and hm.app.tunnel_bytes == 0


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_h2c_upgrade_refused(mesh, pki, via):
    hm = http_mesh(mesh, RULES, app_mode="upgrade", outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    wrong = refused_cases(port, ctx, [
        ("h2c", request("GET", "/h2", headers=[("upgrade", "h2c"), ("connection", "Upgrade, HTTP2-Settings"),
                                                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")]), 400, None),
        ("h2c-no-settings", request("GET", "/h2", headers=[("upgrade", "h2c"), ("connection", "upgrade")]),
         400, None),
        ("h2c-case", request("GET", "/h2", headers=[("upgrade", "H2C"), ("connection", "upgrade")]),
         400, None),
        ("h2c-among-others", request("GET", "/h2", headers=[("upgrade", "websocket, h2c"),
                                                            ("connection", "upgrade")]), 400, None),
        ("settings-only", request("GET", "/h2", headers=[("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")]),
         400, None),
    ])
    assert not wrong, "\n" + "\n".join(wrong)
    assert hm.app.requests == [] and hm.app.tunnel_bytes == 0


# ---------------------------------------------------------------- upstream failures


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_app_port_closed_gives_502(mesh, pki, via):
    closed = free_port()
    inb, in_port = http_inbound(mesh, closed, RULES)
    if via == "outbound":
        outb, port = http_outbound(mesh, [in_port])
        ctx = None
    else:
        port, ctx = in_port, frontend_ctx(pki)
    with HttpClient(port, ctx) as c:
        c.send(request("GET", "/x", headers=[("x-request-id", "refused-1")]))
        r = c.read_response()
        assert r is not None and r.status == 502, r
        assert b'"error"' in r.body
        # Through the outbound, the client's connection is its own: the pool
        # between the sidecars carries its requests, and it stays usable.
        assert c.closed_within(5) if via != "outbound" else not c.closed_within(0.5)
    e = inb.wait_access(status=502)
    assert e["protocol"] == "http", e


def test_outbound_endpoint_closed_gives_502(mesh, pki):
    outb, port = http_outbound(mesh, [free_port()])
    r = exchange(port, request("GET", "/x"))
    assert r is not None and r.status == 502, r
    outb.wait_access(status=502)


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_silent_app_gives_504_after_response_head_seconds(mesh, pki, via):
    limit = 1.5
    hm = http_mesh(mesh, RULES, app_mode="silent", outbound=via == "outbound",
                   in_tmo={"response_head_seconds": limit})
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx, timeout=20) as c:
        c.send(request("GET", "/wait"))
        t0 = time.monotonic()
        r = c.read_response()
        elapsed = time.monotonic() - t0
        assert r is not None and r.status == 504, r
        # Through the outbound, the client's connection is its own: the pool
        # between the sidecars carries its requests, and it stays usable.
        assert c.closed_within(5) if via != "outbound" else not c.closed_within(0.5)
    assert limit - 0.1 <= elapsed <= limit + 1.5, f"504 after {elapsed:.2f} s, limit {limit} s"
    hm.inb.wait_access(path="/wait", status=504)


def test_silent_tcp_app_gives_504(mesh, pki):
    """An app that accepts and never even reads."""
    app = App("silent")
    mesh.apps.append(app)
    hm = http_mesh(mesh, RULES, app=app, outbound=False, in_tmo={"response_head_seconds": 1})
    with HttpClient(hm.in_port, frontend_ctx(pki), timeout=20) as c:
        c.send(request("GET", "/wait"))
        t0 = time.monotonic()
        r = c.read_response()
        assert r is not None and r.status == 504, r
        assert time.monotonic() - t0 <= 2.5


@pytest.mark.parametrize("mode", ["garbage", "close", "reset"])
@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_broken_app_gives_502(mesh, pki, via, mode):
    hm = http_mesh(mesh, RULES, app_mode=mode, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx) as c:
        c.send(request("GET", "/broken"))
        r = c.read_response()
        assert r is not None and r.status == 502, r
        assert b"not HTTP" not in r.body
        # Through the outbound, the client's connection is its own: the pool
        # between the sidecars carries its requests, and it stays usable.
        assert c.closed_within(5) if via != "outbound" else not c.closed_within(0.5)
    hm.inb.wait_access(timeout=2, path="/broken", status=502)


RAW_RESPONSES = {
    # (path): (raw response, acceptable statuses at the client)
    "/cl-te": (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
               b"0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSMUGGLED", {502}),
    "/two-cl": (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 50\r\n\r\nhello", {502}),
    "/extra-response": (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
                        b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSMUGGLED", {200}),
    "/bad-status": (b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n", {502}),
    "/obs-fold": (b"HTTP/1.1 200 OK\r\nx-a: a\r\n b\r\ncontent-length: 0\r\n\r\n", {502}),
    "/interim": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", {100, 200}),
    "/until-close": (b"HTTP/1.1 200 OK\r\n\r\nbody until close", {200}),
}


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_bad_responses_from_the_app(mesh, pki, via):
    """The response side is framed too: an app's ambiguous response becomes
    502, and bytes after a complete response (an answer to no request) never
    reach the client as the answer to its next request."""
    app = HttpApp("raw")
    app.raw_responses = {p: r for p, (r, _) in RAW_RESPONSES.items()}
    mesh.apps.append(app)
    hm = http_mesh(mesh, RULES, app=app, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    wrong = []
    for path, (_, statuses) in RAW_RESPONSES.items():
        with HttpClient(port, ctx, timeout=5) as c:
            c.send(request("GET", path))
            got = []
            try:
                # Bounded: through the pool between sidecars, the client's
                # connection outlives a broken upstream one, and every next
                # request gets an answer of its own.
                while len(got) < 4 and (r := c.read_response()) is not None:
                    got.append((r.status, r.body))
                    if r.status >= 200:
                        c.send(request("GET", path + "/next"))
            except (AssertionError, OSError) as e:
                got.append(repr(e))
        if not got or not isinstance(got[0], tuple) or got[0][0] not in statuses:
            wrong.append(f"{path}: {got}")
        if any(b"SMUGGLED" in g[1] for g in got if isinstance(g, tuple)):
            wrong.append(f"{path}: the client received the smuggled response: {got}")
    assert not wrong, "\n" + "\n".join(wrong)



class HalfCloseApp:
    """Answers one request with an HTTP/1.0 close-delimited response, then
    half-closes and waits for the proxy to close its side (as a server
    doing a bidirectional TLS or TCP shutdown would). Records whether and
    how fast the proxy closed."""

    def __init__(self):
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.closed_after = None
        self.answered = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        # The connection that brings the request is served; an inbound
        # sidecar also opens one of its own per mesh connection that stays
        # idle while its pool to the app carries HTTP/2 callers' requests.
        import threading
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        conn.settimeout(10)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
        except OSError:
            return
        conn.sendall(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nold-style body\n")
        conn.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        try:
            while conn.recv(4096):
                pass
            self.closed_after = time.monotonic() - t0
        except OSError:
            self.closed_after = time.monotonic() - t0
        conn.close()
        self.answered.set()

    def stop(self):
        self.sock.close()


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_close_delimited_response_closes_both_sides(mesh, pki, via):
    """An HTTP/1.0 answer without a length ends at the app's EOF. The proxy
    reads no more requests on that connection, so it must close both
    sides then, not hold the app's connection until the idle timer."""
    from http_helpers import HttpClient, frontend_ctx, http_mesh
    app = HalfCloseApp()
    mesh.apps.append(app)
    hm = http_mesh(mesh, RULES, app=app, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx, timeout=5) as c:
        c.send(b"GET /old HTTP/1.1\r\nhost: orders\r\n\r\n")
        r = c.read_response()
        assert r is not None and r.status == 200 and r.body == b"old-style body\n", r
        if via != "outbound":    # through the pool, the client's connection is its own
            assert c.closed_within(3), "the client's connection stays open"
        app.answered.wait(5)
        assert app.closed_after is not None and app.closed_after < 3, \
            f"the app's connection was not closed by the proxy ({app.closed_after})"

