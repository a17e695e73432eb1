"""HTTP/2 callers reaching an HTTP/1.1-only app (inbound app_protocol http1):
each stream becomes an HTTP/1.1 request on the inbound sidecar's pool of
connections to the app (proxy/apppool.c, heads by proxy/h2to1.c). The app
here is a plain socket server that speaks HTTP/1.1 only, keeps connections
alive and counts them."""

import gzip
import hashlib
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from h2_helpers import H2Client
from helpers import addr, free_port, spiffe
from http_helpers import frontend_ctx, http_outbound, timeouts

RULES = [
    {"name": "no-admin", "action": "deny", "from": ["*"], "paths": ["/admin", "/admin/*"]},
    {"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]},
]


def big_body(n):
    """n bytes that differ along their length (a lost or repeated piece shows)."""
    block = hashlib.sha256(str(n).encode()).digest() * 4096
    out = bytearray()
    i = 0
    while len(out) < n:
        out += i.to_bytes(4, "big") + block[:8188]
        i += 1
    return bytes(out[:n])


class H1App:
    """HTTP/1.1 only (an HTTP/2 preface is answered 400 and closed). Routes:
    /echo (body back, with its sha256), /chunked (a chunked answer), /204,
    /304, /cut (a head promising more than is sent, then close), /slow (100 ms),
    anything else: JSON of what arrived."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.accepted = 0
        self.open = 0
        self.busy = 0
        self.max_busy = 0
        self.seen = []          # (method, target, headers list)
        self.socks = []
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.stopped:
                c.close()
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
                self.socks.append(c)
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ")
                hdrs = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:]]
                h = {k.lower(): v for k, v in hdrs}
                if target == "/early":
                    # Refuses the body without reading it, as apps with a size limit do.
                    with self.lock:
                        self.seen.append((method, target, hdrs))
                    c.sendall(b"HTTP/1.1 413 X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno")
                    return
                body, buf = self._body(c, h, buf)
                with self.lock:
                    self.seen.append((method, target, hdrs))
                    self.busy += 1
                    self.max_busy = max(self.max_busy, self.busy)
                try:
                    if not self._answer(c, method, target, h, body):
                        return
                finally:
                    with self.lock:
                        self.busy -= 1
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1
            c.close()

    def _recv_more(self, c, buf):
        d = c.recv(1 << 20)
        if not d:
            raise OSError("eof")
        return buf + d

    def _body(self, c, h, buf):
        if "content-length" in h:
            n = int(h["content-length"])
            while len(buf) < n:
                buf = self._recv_more(c, buf)
            return buf[:n], buf[n:]
        if h.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in buf:
                    buf = self._recv_more(c, buf)
                line, _, buf = buf.partition(b"\r\n")
                n = int(line.split(b";")[0], 16)
                while len(buf) < n + 2:
                    buf = self._recv_more(c, buf)
                body, buf = body + buf[:n], buf[n + 2:]
                if n == 0:
                    return body, buf
        return b"", buf

    def _answer(self, c, method, target, h, body):
        path = target.split("?")[0]
        if path == "/echo":
            extra = f"x-sha256: {hashlib.sha256(body).hexdigest()}\r\n"
            c.sendall(f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}"
                      "Connection: keep-alive, x-hop\r\nx-hop: secret\r\n\r\n".encode() + body)
        elif path == "/chunked":
            c.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(20):
                part = (b"%02d" % i) * 1000
                c.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            c.sendall(b"0\r\nx-trailer: t\r\n\r\n")
        elif path in ("/big", "/bigchunked"):
            n = int(target.split("=")[1])
            data = big_body(n)
            if path == "/big":
                c.sendall(f"HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n".encode() + data)
            else:
                c.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(0, n, 40000):
                    part = data[i:i + 40000]
                    c.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                c.sendall(b"0\r\n\r\n")
        elif path == "/gzipped":
            # A transfer coding HTTP/2 cannot carry (RFC 9113 8.2.2).
            data = gzip.compress(b"plain text " * 50)
            c.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
                      b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        elif path in ("/204", "/304"):
            c.sendall(f"HTTP/1.1 {path[1:]} X\r\n\r\n".encode())
        elif path == "/oversend":
            # A HEAD answered with a body, in a second write: bytes after the
            # framed response that must never become another request's answer.
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 38\r\n\r\n")
            time.sleep(0.005)
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged")
        elif path == "/overlong":
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                      b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged")
        elif path == "/cut":
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 10)
            return False
        else:
            if path == "/slow":
                time.sleep(0.1)
            out = json.dumps({"method": method, "target": target, "headers": h}).encode()
            c.sendall(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                      f"content-length: {len(out)}\r\n\r\n".encode()
                      + (b"" if method == "HEAD" else out))
        return True

    def stop(self):
        """Down: no more connections, and the open ones closed."""
        self.stopped = True
        # close() alone does not wake an accept() blocked in another thread,
        # which may then still take a connection: shutdown() does.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            for c in self.socks:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def h1(mesh):
    """(app, inbound port, outbound port): app_protocol http1, idle 2 s."""
    app = H1App()
    mesh.apps.append(app)
    in_port = free_port()
    cfg = mesh.config("orders", policy=mesh.policy("orders", RULES),
                      inbound=[{"listen": addr(in_port), "forward": addr(app.port),
                                "protocol": "http", "app_protocol": "http1"}],
                      timeouts=timeouts(idle_seconds=2))
    mesh.proxy("orders-in", cfg)
    _, out_port = http_outbound(mesh, [in_port])
    return app, in_port, out_port


def curl(port, path, *args):
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code} %{http_version}",
                          "--http2-prior-knowledge", "--max-time", "20", *args,
                          f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, timeout=30)
    body, _, tail = out.stdout.rpartition(b"\n")
    code, version = tail.decode().split()
    return int(code), version, body


def test_get_head_204_304(h1):
    app, _, out = h1
    code, version, body = curl(out, "/orders/1?x=1")
    assert (code, version) == (200, "2")
    seen = json.loads(body)
    assert seen["method"] == "GET" and seen["target"] == "/orders/1?x=1"
    assert seen["headers"]["host"] == f"127.0.0.1:{out}"
    assert seen["headers"]["x-forwarded-client-cert"].startswith("By=")
    assert "connection" not in seen["headers"] and "te" not in seen["headers"]
    code, _, body = curl(out, "/orders/1", "-I")
    assert code == 200 and b"content-length" in body.lower()
    assert app.seen[-1][0] == "HEAD"
    assert curl(out, "/204")[0] == 204
    assert curl(out, "/304")[0] == 304


def test_large_post_and_chunked_answer(h1, tmp_path):
    app, _, out = h1
    data = os.urandom(5 * 1024 * 1024 + 17)
    f = tmp_path / "body"
    f.write_bytes(data)
    code, _, body = curl(out, "/echo", "--data-binary", f"@{f}", "-D", str(tmp_path / "h"))
    assert code == 200 and body == data
    hdrs = (tmp_path / "h").read_text().lower()
    assert hashlib.sha256(data).hexdigest() in hdrs
    assert "x-hop" not in hdrs and "keep-alive" not in hdrs
    code, _, body = curl(out, "/chunked")
    assert code == 200 and body == b"".join((b"%02d" % i) * 1000 for i in range(20))


@pytest.mark.parametrize("path", ["/big", "/bigchunked"])
def test_large_response_through_small_windows(h1, path):
    """24 MiB against 64 KiB windows: the pool pauses and resumes reading the
    app hundreds of times; every byte arrives once, in order."""
    n = 24 * 1024 * 1024 + 5
    code, _, body = curl(h1[2], f"{path}?n={n}")
    assert code == 200 and len(body) == n and body == big_body(n)


def test_app_answers_before_the_body_is_sent(h1, pki):
    """The app answers 413 without reading a 2 MiB body: the caller gets the
    413, the rest of its body is dropped as it comes (no stalled window), and
    the connection serves the next stream."""
    _, in_port, _ = h1
    with H2Client(in_port, frontend_ctx(pki)) as c:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                  (":authority", "orders"), (":path", "/early"),
                                  ("content-length", str(2 << 20))])
        c.flush()
        sent = 0
        st = None
        deadline = time.time() + 10
        while sent < (2 << 20) and time.time() < deadline:
            n = min(c.conn.local_flow_control_window(sid), 16384, (2 << 20) - sent)
            if n == 0:
                c.pump(0.2)
                continue
            try:
                c.conn.send_data(sid, b"z" * n, end_stream=sent + n == 2 << 20)
            except Exception:
                break    # the stream is closed on our side: fine
            c.flush()
            sent += n
        assert sent == 2 << 20, f"window stalled after {sent} bytes"
        st, _, body, _, _ = c.response(sid)
        assert (st, body) == (413, b"no")
        nxt = c.request("/orders/3")
        assert c.response(nxt)[0] == 200


def test_many_streams_few_app_connections(h1, pki):
    app, in_port, _ = h1
    with H2Client(in_port, frontend_ctx(pki)) as c:
        sids = [c.request(f"/slow?i={i}") for i in range(50)]
        for sid in sids:
            st, _, body, reset, _ = c.response(sid, timeout=20)
            assert (st, reset) == (200, None)
            assert json.loads(body)["target"].startswith("/slow?i=")
    # One connection the sidecar opened when the caller connected (1:1 model)
    # and the pool's, never more than its cap (16), reused for 50 requests.
    assert len([s for s in app.seen if s[1].startswith("/slow")]) == 50
    assert 1 < app.accepted <= 17
    assert app.max_busy <= 16


def test_policy_decides_before_the_app(h1, pki):
    app, in_port, out = h1
    code, _, body = curl(out, "/admin/x")
    assert code == 403 and json.loads(body)["rule"] == "no-admin"
    code, _, _ = curl(out, "/orders/%2e%2e/admin")
    assert code in (400, 403)
    with H2Client(in_port, frontend_ctx(pki)) as c:
        sid = c.request("/shop.Orders/Get", "POST",
                        headers=[("content-type", "application/grpc")], body=b"")
        c.request("/admin", "GET")
        st, h, _, _, _ = c.response(sid)
    assert not any("admin" in s[1] for s in app.seen)


def test_app_closes_mid_response_and_app_down(h1, mesh, pki):
    app, in_port, out = h1
    with H2Client(in_port, frontend_ctx(pki)) as c:
        sid = c.request("/cut")
        st, _, body, reset, _ = c.response(sid)
        # The head may not have left before the reset: either way a reset, never
        # a short body that looks whole.
        assert reset is not None and len(body) < 100000
        # The pool is still usable afterwards.
        sid = c.request("/orders/2")
        assert c.response(sid)[0] == 200
    # The app goes away with the caller's connection open (its own app
    # connection made): the pool cannot connect -> 502, gRPC 14.
    before = app.accepted
    with H2Client(in_port, frontend_ctx(pki)) as c:
        # The sidecar's own connection to the app (made when a caller
        # connects) must be up before the app goes: otherwise the whole
        # caller connection is refused instead of each stream.
        deadline = time.time() + 5
        while app.accepted == before and time.time() < deadline:
            time.sleep(0.02)
        assert app.accepted > before, "the inbound sidecar never connected to the app"
        app.stop()
        time.sleep(0.5)
        results = []
        for _ in range(3):
            plain = c.request("/orders/1")
            grpc_call = c.request("/shop.Orders/Get", "POST",
                                  headers=[("content-type", "application/grpc")], body=b"")
            results.append((c.response(plain), c.response(grpc_call)))
        (st, _, _, _, _), (gst, gh, _, _, _) = results[-1]
        assert st == 502
        assert (gst, gh.get("grpc-status")) == (200, "14")


def test_bytes_after_a_response_never_answer_another_request(h1, pki):
    """An app that sends more than the response it owes must not have those
    bytes read as the next request's response: that request gets its own
    answer or a 502, never the forged one. A HEAD answered with a body (the
    body in a second write, a moment later); a GET whose answer runs past
    its content-length (in the same burst)."""
    app, in_port, _ = h1
    forged = 0
    with H2Client(in_port, frontend_ctx(pki)) as c:
        for i in range(30):
            st, _, _, _, _ = c.response(c.request("/oversend", "HEAD"))
            assert st in (200, 502)
            st, _, body, _, _ = c.response(c.request(f"/orders/{i}"))
            forged += body == b"forged"
            assert st in (200, 502) and (st == 502 or body.startswith(b"{")), (st, body)
            st, _, body, _, _ = c.response(c.request("/overlong"))
            assert (st, body) == (200, b"ok")
            st, _, body, _, _ = c.response(c.request(f"/orders/{i}"))
            forged += body == b"forged"
            assert st in (200, 502) and (st == 502 or body.startswith(b"{")), (st, body)
    assert forged == 0


def test_transfer_coded_answer_is_not_passed_as_plain(h1, pki):
    """An app answering `Transfer-Encoding: gzip, chunked`: HTTP/2 has no
    transfer codings, so the stream gets a 502, never the gzip bytes as if
    they were the content; the next stream is served."""
    app, in_port, _ = h1
    with H2Client(in_port, frontend_ctx(pki)) as c:
        st, _, body, reset, _ = c.response(c.request("/gzipped"))
        assert st == 502 or reset is not None, (st, body[:40])
        assert b"plain text" not in body and not body.startswith(b"\x1f\x8b")
        assert c.response(c.request("/orders/1"))[0] == 200


def test_idle_pool_connections_close(h1, pki):
    app, in_port, _ = h1
    with H2Client(in_port, frontend_ctx(pki)) as c:
        sid = c.request("/orders/1")
        assert c.response(sid)[0] == 200
    deadline = time.time() + 8
    while time.time() < deadline and app.open:
        time.sleep(0.1)
    assert app.open == 0


def test_hostile_values_never_reach_the_app(h1, pki):
    app, in_port, _ = h1
    with H2Client(in_port, frontend_ctx(pki), validate=False) as c:
        sid = c.request("/orders/1", headers=[("x-a", "b\r\nx-injected: 1")])
        st, _, _, reset, _ = c.response(sid)
    assert st != 200 or reset is not None
    assert not any(k.lower() == "x-injected" for s in app.seen for k, _ in s[2])
