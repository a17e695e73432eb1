"""Requests between sidecars over a pool of long-lived mutual-TLS HTTP/2
connections (issue 12, docs/http.md "Pooled connections between sidecars"):
an app that opens a connection per request costs no handshake between the
sidecars; HTTP/1.1 and h2c apps share the pool; HTTP/1.1 semantics (keep-alive,
pipelining, chunked bodies, HEAD, 100-continue, Upgrade tunnels) still hold;
failures map to 502 / 503 / gRPC UNAVAILABLE; a rotated certificate drains
the pooled connections."""

import json
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from h2_helpers import DualApp, H2Client
from helpers import free_port, server_context, spiffe, wait_for
from http_helpers import (HttpApp, HttpClient, addr, http_inbound, request, timeouts)

RULES = [{"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]}]


def outbound(mesh, endpoints, pool=None, tmo=None, svid=None):
    port = free_port()
    item = {"listen": addr(port), "service": "orders", "protocol": "http",
            "endpoints": [addr(e) for e in endpoints]}
    if pool:
        item["pool"] = pool
    cfg = mesh.config("frontend", svid=svid, policy=mesh.policy("frontend", []),
                      outbound=[item], timeouts=timeouts(**(tmo or {})))
    return mesh.proxy("frontend-out", cfg), port


def pooled(mesh, app=None, pool=None, tmo=None, in_tmo=None, svid=None):
    if app is None:
        app = HttpApp("ok")
    mesh.apps.append(app)
    inb, in_port = http_inbound(mesh, app.port, RULES, tmo=in_tmo)
    outb, port = outbound(mesh, [in_port], pool, tmo, svid)
    return app, inb, outb, port


def handshakes(inb):
    """mTLS connections the inbound sidecar accepted: one handshake each."""
    return inb.metrics().get("meshlet_connections_total", direction="inbound")


def one_request(port, path):
    with HttpClient(port, timeout=20) as c:
        c.send(request("GET", path, headers=[("Connection", "close")]))
        r = c.read_response()
        return r.status if r else None


def test_a_thousand_connections_cost_at_most_max_connections_handshakes(mesh):
    app, inb, outb, port = pooled(mesh, pool={"max_connections": 2, "max_streams": 100})
    with ThreadPoolExecutor(32) as ex:
        statuses = list(ex.map(lambda i: one_request(port, f"/orders/{i}"), range(1000)))
    assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}
    assert len(app.requests) == 1000
    assert 1 <= handshakes(inb) <= 2, handshakes(inb)
    active = outb.metrics().get("meshlet_upstream_connections_active")
    assert 1 <= active <= 2
    # The app got every request as HTTP/1.1 (it speaks nothing else), each
    # with the caller's identity and without the sidecars' own field.
    seen = app.requests[0]
    assert seen.line.endswith(b"HTTP/1.1")
    names = [n.lower() for n, _ in seen.headers]
    assert "x-meshlet-app-protocol" not in names
    assert dict((n.lower(), v) for n, v in seen.headers)["x-forwarded-client-cert"] == \
        f"By={spiffe('orders')};URI={spiffe('frontend')}"


def curl(port, path, *args):
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code} %{http_version}",
                          "--max-time", "10", *args, f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=20)
    body, _, tail = out.stdout.rpartition("\n")
    code, version = tail.split()
    return int(code), version, body


def test_curl_http11_and_h2c_share_one_pooled_connection(mesh):
    app, inb, outb, port = pooled(mesh, app=DualApp())
    assert curl(port, "/orders/1", "--http1.1") == (200, "1.1", "ok /orders/1")
    assert curl(port, "/orders/2", "--http2-prior-knowledge") == (200, "2", "ok /orders/2")
    assert curl(port, "/orders/3", "--http1.1") == (200, "1.1", "ok /orders/3")
    assert handshakes(inb) == 1
    # app_protocol auto: each reaches the app in the protocol its caller spoke.
    assert [(s.proto, s.path) for s in app.seen] == [
        ("http/1.1", "/orders/1"), ("h2", "/orders/2"), ("http/1.1", "/orders/3")]


def test_keepalive_pipelining_chunked_head_and_continue(mesh):
    app, inb, outb, port = pooled(mesh)
    with HttpClient(port) as c:
        # Pipelined: answered in order, one at a time.
        c.send(request("GET", "/a") + request("GET", "/b") + request("HEAD", "/c"))
        a, b = c.read_response(), c.read_response()
        head = c.read_response(head_request=True)
        assert (a.status, a.json()["path"]) == (200, "/a")
        assert (b.status, b.json()["path"]) == (200, "/b")
        assert head.status == 200 and head.body == b"" and int(head.header("content-length")) > 0
        # A chunked body arrives whole.
        body = b"x" * 100000
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p)
                           for p in (body[:1], body[1:70000], body[70000:])) + b"0\r\n\r\n"
        c.send(b"POST /up HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        r = c.read_response()
        assert r.status == 200 and r.json()["body_len"] == len(body), r
        # 100-continue: the interim answer first, then the body, then the final one.
        c.send(b"POST /cont HTTP/1.1\r\nHost: orders\r\nContent-Length: 5\r\n"
               b"Expect: 100-continue\r\n\r\n")
        interim = c.read_response()
        assert interim.status == 100
        c.send(b"hello")
        r = c.read_response()
        assert r.status == 200 and r.json()["body_len"] == 5
        # The app's copy of the sidecars' field never passes.
        c.send(request("GET", "/d", headers=[("X-Meshlet-App-Protocol", "h2c")]))
        assert c.read_response().status == 200
    assert app.paths() == ["/a", "/b", "/c", "/up", "/cont", "/d"]
    assert all(n.lower() != "x-meshlet-app-protocol" for n, _ in app.requests[-1].headers)
    assert handshakes(inb) == 1


def test_websocket_upgrade_keeps_a_tunnel_of_its_own(mesh):
    app, inb, outb, port = pooled(mesh, app=HttpApp("upgrade"))
    with HttpClient(port) as c:
        c.send(request("GET", "/plain"))
        assert c.read_response().status == 200
        c.send(request("GET", "/ws", headers=[("Connection", "Upgrade"),
                                               ("Upgrade", "websocket")]))
        r = c.read_response()
        assert r.status == 101, r
        c.send(b"raw bytes both ways")
        got = b""
        deadline = time.monotonic() + 5
        while len(got) < 19 and time.monotonic() < deadline:
            got += c.sock.recv(100)
        assert got == b"raw bytes both ways"
    # One pooled connection for /plain, one of its own for the tunnel.
    assert handshakes(inb) == 2


def test_upstream_down_is_502_and_grpc_unavailable(mesh):
    outb, port = outbound(mesh, [free_port()])
    with HttpClient(port) as c:
        c.send(request("GET", "/orders/1"))
        r = c.read_response()
        assert r.status == 502 and r.json()["error"] == "upstream unavailable", r
        # The client's connection outlives the failed upstream one.
        c.send(request("GET", "/orders/2"))
        assert c.read_response().status == 502
    with H2Client(port) as c:
        sid = c.request("/shop.Orders/Get", "POST",
                        headers=[("content-type", "application/grpc"), ("te", "trailers")],
                        body=b"\x00\x00\x00\x00\x00")
        st, h, body, reset, _ = c.response(sid)
    assert (st, h.get("grpc-status"), reset) == (200, "14", None)


def test_no_stream_free_in_time_is_503(mesh):
    """One connection of one stream, held by a request the app never
    answers: the next request waits for a stream for connect_seconds, then 503."""
    app, inb, outb, port = pooled(mesh, app=HttpApp("silent"),
                                  pool={"max_connections": 1, "max_streams": 1},
                                  tmo={"connect_seconds": 1, "response_head_seconds": 10},
                                  in_tmo={"response_head_seconds": 10})
    with HttpClient(port, timeout=20) as held, HttpClient(port, timeout=20) as c:
        held.send(request("GET", "/held"))
        app.wait_requests(1)
        t0 = time.monotonic()
        c.send(request("GET", "/waits"))
        r = c.read_response()
        elapsed = time.monotonic() - t0
        assert r.status == 503, r
        assert 0.8 <= elapsed <= 3.0, elapsed
    assert app.paths() == ["/held"]
    assert handshakes(inb) == 1


def test_pool_limits_are_validated(mesh):
    cfg = mesh.config("frontend", outbound=[{
        "listen": addr(free_port()), "service": "orders", "protocol": "http",
        "endpoints": ["127.0.0.1:1"], "pool": {"max_connections": 0}}])
    path = mesh.tmp / "bad-pool.json"
    path.write_text(json.dumps(cfg))
    from conftest import proxy_binary
    out = subprocess.run([str(proxy_binary()), "-c", str(path), "--check-config"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "outbound[0].pool.max_connections: must be 1..64" in out.stderr + out.stdout


def test_rotated_certificate_drains_pooled_connections(mesh, pki, tmp_path):
    svid = pki.reissue("frontend", tmp_path / "frontend-svid")
    app, inb, outb, port = pooled(mesh, svid=svid)
    assert one_request(port, "/before") == 200
    assert handshakes(inb) == 1
    before = outb.metrics().get("meshlet_config_version")
    pki.reissue("frontend", tmp_path / "frontend-svid")
    outb.signal(signal.SIGHUP)
    wait_for(lambda: outb.metrics().get("meshlet_config_version") > before, 10,
             what="the outbound to reload")
    assert one_request(port, "/after") == 200
    # A new connection with the new certificate; the old one drained and closed.
    assert handshakes(inb) == 2
    wait_for(lambda: "drains: new certificate or bundle" in outb.stderr(), 5,
             what="the old pooled connection to drain")
    wait_for(lambda: outb.metrics().get("meshlet_upstream_connections_active") == 1, 5,
             what="the drained connection to close")


def test_http11_caller_reaches_an_h2c_app_as_h2c(mesh):
    """app_protocol h2c: an HTTP/1.1 caller's request arrives as a stream and
    goes on as one (the 1:1 path answered it 502)."""
    app = DualApp()
    mesh.apps.append(app)
    in_port = free_port()
    cfg = mesh.config("orders", policy=mesh.policy("orders", RULES),
                      inbound=[{"listen": addr(in_port), "forward": addr(app.port),
                                "protocol": "http", "app_protocol": "h2c"}],
                      timeouts=timeouts())
    mesh.proxy("orders-in", cfg)
    _, port = outbound(mesh, [in_port])
    assert curl(port, "/orders/1", "--http1.1") == (200, "1.1", "ok /orders/1")
    assert [(s.proto, s.path) for s in app.seen] == [("h2", "/orders/1")]
    assert not app.seen[0].header("x-meshlet-app-protocol")


class HostilePeer:
    """A sidecar that verifies like one (orders' SVID, mutual TLS, ALPN h2)
    and answers each stream by its path: /ok 200 "ok"; /bad-name a response
    header with an upper-case name; /bad-length a content-length its DATA
    contradicts; /reset RST_STREAM after the head. Counts connections."""

    def __init__(self, svid):
        import threading
        self.ctx = server_context(svid)
        self.ctx.set_alpn_protocols(["h2"])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import threading
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _answer(self, conn, sid, path):
        import h2.errors
        if path == "/bad-name":
            conn.send_headers(sid, [(":status", "200"), ("X-Upper", "1")], end_stream=True)
        elif path == "/bad-length":
            conn.send_headers(sid, [(":status", "200"), ("content-length", "100")])
            conn.send_data(sid, b"short", end_stream=True)
        elif path == "/reset":
            conn.send_headers(sid, [(":status", "200")])
            conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        else:
            conn.send_headers(sid, [(":status", "200"), ("content-length", "2")])
            conn.send_data(sid, b"ok", end_stream=True)

    def _one(self, raw):
        import h2.config
        import h2.connection
        import h2.events
        try:
            s = self.ctx.wrap_socket(raw, server_side=True)
            cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8",
                                            validate_outbound_headers=False,
                                            normalize_outbound_headers=False)
            conn = h2.connection.H2Connection(cfg)
            conn.initiate_connection()
            s.sendall(conn.data_to_send())
            paths = {}
            while True:
                data = s.recv(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        paths[ev.stream_id] = dict(ev.headers)[":path"]
                    if isinstance(ev, h2.events.StreamEnded):
                        self._answer(conn, ev.stream_id, paths.get(ev.stream_id))
                s.sendall(conn.data_to_send())
        except Exception:
            return

    def stop(self):
        self.sock.close()


def test_hostile_peer_responses_fail_their_stream_only(mesh, pki):
    """A peer's malformed answers end their own stream (502), never the
    pooled connection: the good requests around them ride the same one."""
    peer = HostilePeer(pki.svid("orders"))
    mesh.apps.append(peer)
    outb, port = outbound(mesh, [peer.port])
    with HttpClient(port) as c:
        for path, want in [("/ok", 200), ("/bad-name", 502), ("/ok", 200)]:
            c.send(request("GET", path))
            r = c.read_response()
            assert r is not None and r.status == want, (path, r)
            if want == 200:
                assert r.body == b"ok"
    # Cut short after the head went out (a content-length its DATA
    # contradicts, a reset): only closing tells the client; never a
    # complete-looking answer.
    for path in ("/bad-length", "/reset"):
        with HttpClient(port) as c:
            c.send(request("GET", path))
            try:
                r = c.read_response()
            except AssertionError as e:
                assert "connection ended inside a" in str(e), e
            else:
                assert r is None or r.status == 502, (path, r)
            assert c.closed_within(5)
    with HttpClient(port) as c:
        c.send(request("GET", "/ok"))
        assert c.read_response().status == 200
    assert peer.conns == 1
