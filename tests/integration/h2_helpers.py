"""Helpers for the HTTP/2 and gRPC integration tests.

DualApp is an origin server that answers HTTP/2 with prior knowledge (h2c,
told apart by the client preface) and HTTP/1.1 on the same port, and
records what reached it: protocol, method, path, headers. H2Client speaks
HTTP/2 through python3-h2 over a plain socket (to an outbound) or mutual TLS
(straight to an inbound), with raw access to frames for the hostile cases.
"""

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from http_helpers import HttpClient

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Seen2:
    proto: str                     # "h2" or "http/1.1"
    method: str
    path: str
    headers: list = field(default_factory=list)
    body_len: int = 0

    def header(self, name):
        return [v for n, v in self.headers if n == name]


class DualApp:
    """h2c and HTTP/1.1 on one port. GET answers 200 "ok <path>"; POST echoes
    the body; /slow waits 3 s first."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.seen = []
        self.lock = threading.Lock()
        self.conns = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def paths(self):
        with self.lock:
            return [s.path for s in self.seen]

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        try:
            first = b""
            while len(first) < len(PREFACE):
                d = c.recv(len(PREFACE) - len(first))
                if not d:
                    return
                first += d
                if not PREFACE.startswith(first):
                    break
            if first == PREFACE:
                self._h2(c, first)
            else:
                self._h1(c, first)
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            c.close()

    def _record(self, s):
        with self.lock:
            self.seen.append(s)

    def _h1(self, c, buf):
        while True:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            hdrs = [(k.strip().lower(), v.strip()) for k, v in
                    (ln.split(":", 1) for ln in lines[1:])]
            n = int(dict(hdrs).get("content-length", "0"))
            while len(buf) < n:
                buf += c.recv(65536)
            body, buf = buf[:n], buf[n:]
            self._record(Seen2("http/1.1", method, target, hdrs, len(body)))
            out = body if method == "POST" else f"ok {target}".encode()
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(out) + out)

    def _h2(self, c, first):
        # Bytes as they arrive (latin-1 below): a header the proxy should have
        # refused must still be recorded, not lost to a decoding error.
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False))
        conn.initiate_connection()
        c.sendall(conn.data_to_send())
        streams = {}
        events = conn.receive_data(first)
        while True:
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    hl = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in ev.headers]
                    streams[ev.stream_id] = [dict(hl), hl, b""]
                elif isinstance(ev, h2.events.DataReceived):
                    streams[ev.stream_id][2] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self._answer(conn, c, ev.stream_id, streams.pop(ev.stream_id))
            c.sendall(conn.data_to_send())
            d = c.recv(65536)
            if not d:
                return
            events = conn.receive_data(d)

    def _answer(self, conn, c, sid, st):
        h, hl, body = st
        path = h[":path"]
        self._record(Seen2("h2", h[":method"], path, hl, len(body)))
        if path.startswith("/slow"):
            time.sleep(3)
        out = body if h[":method"] == "POST" else f"ok {path}".encode()
        conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(out)))])
        while out:
            n = min(len(out), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if n == 0:
                c.sendall(conn.data_to_send())
                for ev in conn.receive_data(c.recv(65536)):
                    pass
                continue
            conn.send_data(sid, out[:n])
            out = out[n:]
        conn.end_stream(sid)

    def stop(self):
        try:
            self.sock.close()
        except OSError:
            pass


class H2Client(HttpClient):
    """An HTTP/2 client on one connection (h2c, or h2 over mutual TLS with
    ALPN); HttpClient's socket set-up and closing."""

    def __init__(self, port, ctx=None, timeout=10.0, validate=True):
        if ctx is not None:
            ctx.set_alpn_protocols(["h2"])
        super().__init__(port, ctx, timeout)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                        validate_outbound_headers=validate,
                                        normalize_outbound_headers=validate,
                                        validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(cfg)
        self.conn.initiate_connection()
        self.flush()
        self.events = []
        self.goaway = None

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data):
        self.sock.sendall(data)

    def request(self, path, method="GET", headers=(), body=None, authority="orders"):
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":scheme", "http"), (":authority", authority),
                (":path", path)] + list(headers)
        self.conn.send_headers(sid, hdrs, end_stream=body is None)
        while body is not None:
            n = min(len(body), self.conn.max_outbound_frame_size,
                    self.conn.local_flow_control_window(sid))
            self.conn.send_data(sid, body[:n], end_stream=n == len(body))
            body = body[n:] if n < len(body) else None
        self.flush()
        return sid

    def pump(self, timeout=5.0):
        """Reads once; returns False on EOF."""
        self.sock.settimeout(timeout)
        try:
            d = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLError, ConnectionResetError):
            return False
        if not d:
            return False
        try:
            evs = self.conn.receive_data(d)
        except h2.exceptions.ProtocolError:
            return False
        for ev in evs:
            if isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
        self.events += evs
        try:
            self.flush()
        except OSError:
            return False
        return True

    def response(self, sid, timeout=10.0):
        """(status, headers dict, body, reset_code or None, trailers dict)."""
        end = time.time() + timeout
        status, hdrs, body, reset, trailers = None, {}, b"", None, {}
        while time.time() < end:
            for ev in self.events:
                if getattr(ev, "stream_id", None) != sid:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    hdrs = dict(ev.headers)
                    status = int(hdrs[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamReset):
                    reset = ev.error_code
                    return status, hdrs, body, reset, trailers
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, hdrs, body, reset, trailers
            self.events = [e for e in self.events if getattr(e, "stream_id", None) != sid]
            if self.goaway is not None and sid > self.goaway.last_stream_id:
                return status, hdrs, body, "goaway", trailers
            if not self.pump(max(0.05, end - time.time())):
                return status, hdrs, body, "closed", trailers
        raise TimeoutError(f"no response on stream {sid}")

    def wait_goaway(self, timeout=10.0):
        """Reads until GOAWAY or EOF. Returns (goaway event or None, closed)."""
        end = time.time() + timeout
        while time.time() < end:
            if not self.pump(max(0.05, end - time.time())):
                return self.goaway, True
        return self.goaway, False


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
