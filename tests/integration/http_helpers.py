"""Helpers for the HTTP integration tests (test_http*.py).

HttpApp is a small HTTP/1.1 origin server that records every request it
receives (request line, path, query, headers, body size and hash), so a test
can prove what reached the application and what did not. HttpClient speaks
raw bytes to a listener (plaintext to an outbound, mutual TLS to an inbound)
so that nothing on the client side normalises a request. http_mesh() starts
the proxies with "protocol": "http" on top of conftest's Mesh.

Only the standard library is used.
"""

import hashlib
import json
import os
import re
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from helpers import addr, client_context, free_port, tls_connect, wait_for

MiB = 1 << 20

# conftest's test defaults, with a shorter drain (teardown waits for it) and
# room for the HTTP timeouts that tests set (request_head_seconds,
# response_head_seconds).
BASE_TIMEOUTS = {"handshake_seconds": 10, "connect_seconds": 5, "idle_seconds": 300,
                 "drain_seconds": 1}


# ---------------------------------------------------------------- the app


@dataclass
class Seen:
    """One request as the application received it."""
    conn: int                      # the app's connection number (1, 2, ...)
    line: bytes                    # the raw request line
    method: str
    target: str                    # the raw request target
    path: str                      # target up to '?'
    query: str | None              # after '?', verbatim; None without '?'
    headers: list                  # [(name, value)] as received, in order
    body_len: int = 0
    body_sha: str = ""
    complete: bool = False         # the whole body arrived

    def header_values(self, name):
        """Values of every field whose name equals name case-insensitively,
        with '_' taken as '-' (what CGI-style frameworks do)."""
        want = name.lower().replace("_", "-")
        return [v for n, v in self.headers if n.lower().replace("_", "-") == want]


class HttpApp:
    """A threaded HTTP/1.1 origin server on 127.0.0.1.

    It frames requests leniently, the way many application servers do (bare
    LF accepted, Content-Length honoured, chunked bodies read), so that a
    request the proxy should have stopped shows up in .requests.

    modes:
      ok        answers every request 200 with a JSON body naming the
                method, path and query; keep-alive unless the request says
                close
      upgrade   like ok, but a request with an Upgrade field gets 101 (a
                CONNECT gets 200) and the connection then echoes raw bytes
      silent    reads requests, never answers
      garbage   answers every request with bytes that are not HTTP
      close     closes the connection after reading a request, no answer
      reset     resets the connection (RST) after reading a request
      raw       answers with .raw_responses[path] (bytes) as they are, then
                closes the connection
    """

    def __init__(self, mode="ok"):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[Seen] = []
        self.raw = {}                  # connection number -> first 256 KiB received
        self.errors = []
        self.tunnel_bytes = 0
        self.raw_responses = {}
        self.upgrade_delay = 0.0       # upgrade mode: seconds before the 101
        self._conns = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def addr(self):
        return addr(self.port)

    def paths(self):
        with self.lock:
            return [r.path for r in self.requests]

    def wait_requests(self, n, timeout=10):
        return wait_for(lambda: len(self.requests) >= n and self.requests, timeout,
                        what=f"the app to receive {n} request(s) (has {len(self.requests)})")

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                n = self.connections
                self._conns.append(conn)
                self.raw[n] = b""
            threading.Thread(target=self._handle, args=(conn, n), daemon=True).start()

    def _recv(self, conn, n):
        data = conn.recv(262144)
        if data:
            with self.lock:
                if len(self.raw[n]) < 262144:
                    self.raw[n] += data[: 262144 - len(self.raw[n])]
        return data

    def _handle(self, conn, n):
        buf = b""
        try:
            conn.settimeout(120)
            while True:
                # --- head (lenient: LF or CRLF line ends)
                while True:
                    m = re.search(rb"\r?\n\r?\n", buf)
                    if m:
                        break
                    data = self._recv(conn, n)
                    if not data:
                        return
                    buf += data
                head, buf = buf[: m.start()], buf[m.end():]
                lines = re.split(rb"\r?\n", head)
                while lines and not lines[0]:
                    lines.pop(0)
                line = lines[0]
                parts = line.split(b" ")
                method = parts[0].decode("latin-1")
                target = parts[1].decode("latin-1") if len(parts) > 1 else ""
                headers = []
                for h in lines[1:]:
                    name, _, value = h.partition(b":")
                    headers.append((name.strip().decode("latin-1"), value.strip().decode("latin-1")))
                path, q, query = target.partition("?")
                seen = Seen(n, line, method, target, path, query if q else None, headers)
                with self.lock:
                    self.requests.append(seen)
                # --- body
                lower = {k.lower(): v for k, v in headers}
                h = hashlib.sha256()
                if "chunked" in lower.get("transfer-encoding", "").lower():
                    buf = self._read_chunked(conn, n, buf, seen, h)
                    if buf is None:
                        return
                elif "content-length" in lower:
                    want = int(lower["content-length"])
                    while seen.body_len < want:
                        if not buf:
                            buf = self._recv(conn, n)
                            if not buf:
                                return
                        take = buf[: want - seen.body_len]
                        buf = buf[len(take):]
                        h.update(take)
                        seen.body_len += len(take)
                seen.body_sha = h.hexdigest()
                seen.complete = True
                # --- answer
                if self.mode == "silent":
                    continue
                if self.mode == "close":
                    return
                if self.mode == "raw":
                    conn.sendall(self.raw_responses.get(path, b"HTTP/1.1 404 Not Found\r\n"
                                                                b"content-length: 0\r\n\r\n"))
                    time.sleep(0.5)
                    return
                if self.mode == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if self.mode == "garbage":
                    conn.sendall(b"this is not HTTP at all\r\n\r\n")
                    continue
                if self.mode == "upgrade" and method == "CONNECT":
                    conn.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    self._echo(conn, buf)
                    return
                if self.mode == "upgrade" and "upgrade" in lower:
                    time.sleep(self.upgrade_delay)
                    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: "
                                 + lower["upgrade"].encode() + b"\r\nconnection: upgrade\r\n\r\n")
                    self._echo(conn, buf)
                    return
                body = json.dumps({"method": method, "path": path,
                                   "query": seen.query, "body_len": seen.body_len,
                                   "body_sha": seen.body_sha}).encode()
                close = "close" in lower.get("connection", "").lower()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n"
                             + (b"connection: close\r\n" if close else b"") + b"\r\n"
                             + (b"" if method == "HEAD" else body))
                if close:
                    return
        except (OSError, ValueError, IndexError) as e:
            with self.lock:
                self.errors.append(repr(e))
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _read_chunked(self, conn, n, buf, seen, h):
        """Reads a chunked body from buf + conn, hashing the payload. Returns
        what follows the body, or None on EOF."""
        while True:
            while b"\n" not in buf:
                data = self._recv(conn, n)
                if not data:
                    return None
                buf += data
            line, _, buf = buf.partition(b"\n")
            size = int(line.strip().split(b";")[0], 16)
            if size == 0:
                # trailers up to an empty line
                while True:
                    while b"\n" not in buf:
                        data = self._recv(conn, n)
                        if not data:
                            return None
                        buf += data
                    t, _, buf = buf.partition(b"\n")
                    if not t.strip():
                        return buf
            left = size
            while left:
                if not buf:
                    buf = self._recv(conn, n)
                    if not buf:
                        return None
                take = buf[:left]
                buf = buf[len(take):]
                h.update(take)
                seen.body_len += len(take)
                left -= len(take)
            while len(buf) < 2:
                data = self._recv(conn, n)
                if not data:
                    return None
                buf += data
            if buf.startswith(b"\r\n"):
                buf = buf[2:]
            elif buf.startswith(b"\n"):
                buf = buf[1:]

    def _echo(self, conn, buf):
        if buf:
            conn.sendall(buf)
        while True:
            data = conn.recv(65536)
            if not data:
                return
            with self.lock:
                self.tunnel_bytes += len(data)
            conn.sendall(data)

    def stop(self):
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            for c in self._conns:
                try:
                    c.close()
                except OSError:
                    pass
        self._thread.join(2)


# ---------------------------------------------------------------- the client


@dataclass
class Response:
    status: int
    reason: str
    headers: list
    body: bytes
    raw_head: bytes = b""

    def header(self, name):
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def json(self):
        return json.loads(self.body)


class HttpClient:
    """One connection that sends raw bytes and parses responses.

    ctx None: plaintext (an outbound listener); else mutual TLS with ctx
    (an inbound listener)."""

    def __init__(self, port, ctx=None, timeout=10.0):
        if ctx is None:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        else:
            self.sock = tls_connect(port, ctx, timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.eof = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        if self.eof:
            return False
        try:
            data = self.sock.recv(262144)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_response(self, head_request=False):
        """The next response; None when the connection ended before one.
        Skips nothing: a 1xx comes back as it is."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                if self.buf:
                    raise AssertionError(f"connection ended inside a response head: {self.buf[:300]!r}")
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        m = re.match(rb"HTTP/1\.[01] (\d{3}) ?(.*)", lines[0])
        assert m, f"not an HTTP status line: {lines[0][:200]!r}"
        status = int(m.group(1))
        headers = []
        for h in lines[1:]:
            n, _, v = h.partition(b":")
            headers.append((n.strip().decode("latin-1"), v.strip().decode("latin-1")))
        resp = Response(status, m.group(2).decode("latin-1"), headers, b"", head)
        if head_request or status in (204, 304) or 100 <= status < 200:
            return resp
        te, cl = resp.header("transfer-encoding"), resp.header("content-length")
        if te and "chunked" in te.lower():
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    assert self._fill(), "connection ended inside a chunked response"
                line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    assert self._fill(), "connection ended inside a chunk"
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    break
            resp.body = body
        elif cl is not None:
            n = int(cl)
            while len(self.buf) < n:
                assert self._fill(), f"connection ended inside a body ({len(self.buf)} of {n})"
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def closed_within(self, timeout):
        """True when the peer ends the connection (EOF or reset) within
        timeout seconds; whatever arrives meanwhile is kept in .buf."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                self._fill()
            except socket.timeout:
                return False
            except OSError:
                self.eof = True
        return True


def request(method, target, host="orders", headers=(), body=None, version="HTTP/1.1"):
    """Bytes of one request. headers: [(name, value)]; body bytes add a
    Content-Length."""
    out = f"{method} {target} {version}\r\n".encode()
    if host is not None:
        out += f"host: {host}\r\n".encode()
    for n, v in headers:
        out += f"{n}: {v}\r\n".encode()
    if body is not None:
        out += f"content-length: {len(body)}\r\n".encode()
    out += b"\r\n"
    if body is not None:
        out += body
    return out


def exchange(port, data, ctx=None, timeout=10.0):
    """Sends data on a new connection and returns the first response (or
    None when the connection ended without one)."""
    with HttpClient(port, ctx, timeout) as c:
        c.send(data)
        return c.read_response()


# ---------------------------------------------------------------- paths


def lenient_path(path):
    """What a forgiving application might make of a request path: every
    escape decoded (repeatedly), backslashes as slashes, NULs dropped,
    ';' path parameters cut, empty and dot segments resolved. Used to prove
    that no request that *could* mean /admin reached the app."""
    p = path.encode("latin-1")
    for _ in range(3):
        p2 = unquote_to_bytes(p)
        if p2 == p:
            break
        p = p2
    s = p.decode("latin-1").replace("\\", "/").replace("\x00", "")
    s = s.split("#", 1)[0]
    if "://" in s:                       # absolute form: keep the path
        s = "/" + s.split("://", 1)[1].partition("/")[2]
    out = []
    for seg in s.split("/"):
        seg = seg.split(";", 1)[0]
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return "/" + "/".join(out)


def is_admin(path):
    p = lenient_path(path)
    return p == "/admin" or p.startswith("/admin/")


# ---------------------------------------------------------------- proxies


@dataclass
class HttpMesh:
    app: object
    inb: object
    in_port: int
    outb: object = None
    out_port: int = None
    extra: dict = field(default_factory=dict)


def timeouts(**kw):
    t = dict(BASE_TIMEOUTS)
    t.update(kw)
    return t


def http_inbound(mesh, forward_port, rules, default="deny", service="orders", name=None,
                 svid=None, tmo=None):
    """An inbound proxy with an http listener. Returns (proxy, port)."""
    port = free_port()
    pol = mesh.policy(service, rules, default)
    cfg = mesh.config(service, svid=svid, policy=pol,
                      inbound=[{"listen": addr(port), "forward": addr(forward_port),
                                "protocol": "http"}],
                      timeouts=timeouts(**(tmo or {})))
    return mesh.proxy(name or f"{service}-in", cfg), port


def http_outbound(mesh, endpoints, service="frontend", upstream="orders", name=None, tmo=None):
    """An outbound proxy with an http listener to upstream at endpoints
    (ports). Its own policy admits nobody (it has no inbound). Returns
    (proxy, port)."""
    port = free_port()
    cfg = mesh.config(service, policy=mesh.policy(service, []),
                      outbound=[{"listen": addr(port), "service": upstream, "protocol": "http",
                                 "endpoints": [addr(e) for e in endpoints]}],
                      timeouts=timeouts(**(tmo or {})))
    return mesh.proxy(name or f"{service}-out", cfg), port


def http_mesh(mesh, rules, default="deny", app_mode="ok", outbound=True, in_tmo=None,
              out_tmo=None, app=None):
    """app (HttpApp) <- orders' inbound (http) <- frontend's outbound (http)."""
    if app is None:
        app = HttpApp(app_mode)
        mesh.apps.append(app)
    inb, in_port = http_inbound(mesh, app.port, rules, default, tmo=in_tmo)
    hm = HttpMesh(app, inb, in_port)
    if outbound:
        hm.outb, hm.out_port = http_outbound(mesh, [in_port], tmo=out_tmo)
    return hm


def cpu_seconds(pid):
    """user + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def frontend_ctx(pki, service="frontend"):
    return client_context(pki.svid(service))


def sendall_slowly(sock, data, interval):
    """Sends data one byte at a time, interval seconds apart, until done or
    the peer ends the connection. Returns the number of bytes sent."""
    sent = 0
    for b in data:
        try:
            sock.sendall(bytes([b]))
        except OSError:
            break
        sent += 1
        r, _, _ = select.select([sock], [], [], interval)
        if r:
            break                       # the proxy answered or closed
    return sent
