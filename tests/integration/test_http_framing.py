"""Request framing on HTTP listeners: smuggling attempts, limits, slow
request heads.

Each smuggling case carries a second request (GET /smuggled) hidden where
one reading of the framing would find it. The policy allows everything, so
the only thing between that request and the app is the proxy's framing: the
app's request log proves it never arrives as a request of its own.
"""

import socket
import ssl
import time

import pytest

from helpers import spiffe
from http_helpers import HttpClient, frontend_ctx, http_mesh, request, sendall_slowly

ALLOW_ALL = [{"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]}]
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nhost: orders\r\n\r\n"


def post(fields, body=b"", version=b"HTTP/1.1", target=b"/upload"):
    """POST with the given raw field lines (bytes, CRLF added) and body."""
    out = b"POST " + target + b" " + version + b"\r\nhost: orders\r\n"
    for f in fields:
        out += f + b"\r\n"
    return out + b"\r\n" + body


CHUNKED_THEN_SMUGGLED = b"0\r\n\r\n" + SMUGGLED
CL = str(len(CHUNKED_THEN_SMUGGLED)).encode()

# (id, raw bytes, acceptable statuses). Every case is refused at the head:
# nothing of it may reach the app.
HEAD_CASES = [
    ("cl-then-te", post([b"content-length: " + CL, b"transfer-encoding: chunked"],
                        CHUNKED_THEN_SMUGGLED), {400}),
    ("te-then-cl", post([b"transfer-encoding: chunked", b"content-length: " + CL],
                        CHUNKED_THEN_SMUGGLED), {400}),
    ("cl-te-http10", post([b"content-length: 5", b"transfer-encoding: chunked"],
                          CHUNKED_THEN_SMUGGLED, version=b"HTTP/1.0"), {400}),
    ("two-cl-differ", post([b"content-length: 5", b"content-length: " + CL], b"0\r\n\r\n" + SMUGGLED),
     {400}),
    ("two-cl-same", post([b"content-length: 5", b"content-length: 5"], b"hello" + SMUGGLED), {400}),
    ("cl-list", post([b"content-length: 5, " + CL], b"hello" + SMUGGLED), {400}),
    ("cl-plus", post([b"content-length: +5"], b"hello" + SMUGGLED), {400}),
    ("cl-hex", post([b"content-length: 0x5"], b"hello" + SMUGGLED), {400}),
    ("cl-negative", post([b"content-length: -1"], SMUGGLED), {400}),
    ("cl-huge", post([b"content-length: 99999999999999999999999"], SMUGGLED), {400, 413}),
    ("cl-underscore", post([b"content_length: " + CL], SMUGGLED), {400}),
    ("te-chunked-identity", post([b"transfer-encoding: chunked, identity"], CHUNKED_THEN_SMUGGLED),
     {400}),
    ("te-identity-chunked", post([b"transfer-encoding: identity, chunked"], CHUNKED_THEN_SMUGGLED),
     {501}),
    ("te-gzip", post([b"transfer-encoding: gzip"], CHUNKED_THEN_SMUGGLED), {501}),
    ("te-gzip-chunked", post([b"transfer-encoding: gzip, chunked"], CHUNKED_THEN_SMUGGLED), {501}),
    ("te-xchunked", post([b"transfer-encoding: xchunked"], CHUNKED_THEN_SMUGGLED), {400, 501}),
    ("te-two-fields", post([b"transfer-encoding: chunked", b"transfer-encoding: chunked"],
                           CHUNKED_THEN_SMUGGLED), {400, 501}),
    ("te-chunked-twice", post([b"transfer-encoding: chunked, chunked"], CHUNKED_THEN_SMUGGLED),
     {400}),
    ("te-http10", post([b"transfer-encoding: chunked"], CHUNKED_THEN_SMUGGLED, version=b"HTTP/1.0"),
     {400}),
    ("te-underscore-with-cl", post([b"transfer_encoding: chunked", b"content-length: " + CL],
                                   CHUNKED_THEN_SMUGGLED), {400}),
    ("te-space-before-colon", post([b"transfer-encoding : chunked", b"content-length: " + CL],
                                   CHUNKED_THEN_SMUGGLED), {400}),
    ("te-obs-fold", post([b"transfer-encoding: identity", b" chunked"], CHUNKED_THEN_SMUGGLED), {400}),
    ("te-obs-fold-empty", post([b"transfer-encoding:", b" chunked", b"content-length: " + CL],
                               CHUNKED_THEN_SMUGGLED), {400}),
    ("obs-fold", post([b"x-a: one", b"\ttwo"], b""), {400}),
    ("space-before-colon", post([b"x-a : one"], b""), {400}),
    ("leading-space-first-field", b"POST /upload HTTP/1.1\r\n host: orders\r\ncontent-length: 0"
     b"\r\n\r\n" + SMUGGLED, {400}),
    ("bare-lf", b"POST /upload HTTP/1.1\nhost: orders\ncontent-length: 0\n\n" + SMUGGLED, {400}),
    ("bare-lf-hides-te", post([b"x-a: one\ntransfer-encoding: chunked", b"content-length: " + CL],
                              CHUNKED_THEN_SMUGGLED), {400}),
    ("bare-cr", post([b"x-a: one\rtransfer-encoding: chunked", b"content-length: " + CL],
                     CHUNKED_THEN_SMUGGLED), {400}),
    ("nul-in-value", post([b"x-a: o\x00ne"], b""), {400}),
    ("bad-field-name", post([b"x(a): one"], b""), {400}),
    ("empty-field-name", post([b": one"], b""), {400}),
    ("no-host-http11", b"GET / HTTP/1.1\r\n\r\n" + SMUGGLED, {400}),
    ("two-hosts", post([b"host: other", b"content-length: 0"], SMUGGLED), {400}),
    ("connection-names-cl", post([b"connection: content-length", b"content-length: " + CL],
                                 b"0\r\n\r\n" + SMUGGLED), {400}),
    ("request-line-too-long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nhost: orders\r\n\r\n", {414}),
    ("too-many-fields", post([b"x-f%d: v" % i for i in range(101)], b""), {431}),
    ("header-block-too-big", post([b"x-big%d: " % i + b"v" * 4000 for i in range(17)], b""), {431}),
    ("one-huge-field", post([b"x-big: " + b"v" * 70000], b""), {431}),
    # The HTTP/2 preface starts HTTP/2 (h2c prior knowledge): test_http2.py.
]

# The head is fine and is forwarded; the chunked body then breaks the
# framing. The app may see that one request (cut short), never the
# smuggled one, and the connection must end.
BODY_CASES = [
    ("chunk-size-junk", post([b"transfer-encoding: chunked"], b"5\r\nhello\r\nzz\r\n" + CHUNKED_THEN_SMUGGLED)),
    ("chunk-size-bare-lf", post([b"transfer-encoding: chunked"], b"5\nhello\r\n" + CHUNKED_THEN_SMUGGLED)),
    ("chunk-data-overrun", post([b"transfer-encoding: chunked"], b"3\r\nhello\r\n" + CHUNKED_THEN_SMUGGLED)),
    ("chunk-size-overflow", post([b"transfer-encoding: chunked"],
                                 b"10000000000000000005\r\nhello\r\n" + CHUNKED_THEN_SMUGGLED)),
    ("chunk-size-space", post([b"transfer-encoding: chunked"], b"5 \r\nhello\r\n" + CHUNKED_THEN_SMUGGLED)),
    ("last-chunk-bare-lf", post([b"transfer-encoding: chunked"], b"0\n\n" + SMUGGLED)),
    ("trailer-cl", post([b"transfer-encoding: chunked"], b"0\r\ncontent-length: 5\r\n\r\n" + SMUGGLED)),
    ("trailer-obs-fold", post([b"transfer-encoding: chunked"], b"0\r\nx-t: a\r\n b\r\n\r\n" + SMUGGLED)),
]


@pytest.mark.parametrize("via", ["inbound-direct", "outbound"])
def test_smuggling_refused_at_the_head(mesh, pki, via):
    hm = http_mesh(mesh, ALLOW_ALL, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    wrong = []
    for cid, data, statuses in HEAD_CASES:
        before = len(hm.app.requests)
        with HttpClient(port, ctx) as c:
            c.send(data)
            r = c.read_response()
            if r is None or r.status not in statuses:
                wrong.append(f"{cid}: answered {r and r.status} ({r and r.body[:100]!r}), "
                             f"expected {sorted(statuses)}")
                continue
            if (r.header("connection") or "").lower() != "close":
                wrong.append(f"{cid}: {r.status} without connection: close")
            if r.header("content-type") != "application/json" or b'"error"' not in r.body:
                wrong.append(f"{cid}: {r.status} without a JSON body: {r.body[:100]!r}")
            if c.read_response() is not None or not c.closed_within(5):
                wrong.append(f"{cid}: the connection went on after {r.status}")
        seen = hm.app.requests[before:]
        if seen:
            wrong.append(f"{cid}: the app received {[s.line for s in seen]}")
    assert not wrong, "\n" + "\n".join(wrong)
    assert hm.app.requests == []
    # The listener is still fine.
    with HttpClient(port, ctx) as c:
        c.send(request("GET", "/still-fine"))
        assert c.read_response().status == 200


@pytest.mark.parametrize("via", ["inbound-direct", "outbound"])
def test_smuggling_in_a_chunked_body(mesh, pki, via):
    """The head was forwarded, the body's framing breaks: the app sees that
    one request, cut short, never the request hidden behind it, and the
    client gets an error and the connection ends. (response_head_seconds is
    short so that a proxy that waits for the app would still finish.)"""
    tmo = {"response_head_seconds": 1.5}
    hm = http_mesh(mesh, ALLOW_ALL, outbound=via == "outbound", in_tmo=tmo, out_tmo=tmo)
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    wrong = []
    clients = []
    for cid, data in BODY_CASES:          # all at once: each may wait for a timeout
        c = HttpClient(port, ctx, timeout=15)
        c.send(data.replace(b"POST /upload ", b"POST /upload/" + cid.encode() + b" "))
        clients.append((cid, c))
    for cid, c in clients:
        with c:
            statuses = []
            try:
                while (r := c.read_response()) is not None:
                    statuses.append(r.status)
            except (AssertionError, OSError):
                statuses.append("cut")    # cut off: acceptable, the head was forwarded
            if any(isinstance(s, int) and s < 400 for s in statuses) or not statuses:
                wrong.append(f"{cid}: answered {statuses}")
            if not c.closed_within(5):
                wrong.append(f"{cid}: the connection stays open after a broken chunked body")
        seen = [s for s in hm.app.requests if s.path.endswith("/" + cid)]
        if len(seen) > 1 or any(s.complete for s in seen):
            wrong.append(f"{cid}: the app received {[(s.line, s.complete, s.body_len) for s in seen]}")
    assert "/smuggled" not in hm.app.paths(), [r.line for r in hm.app.requests]
    assert len(hm.app.requests) <= len(BODY_CASES)
    assert not wrong, "\n" + "\n".join(wrong)


def test_broken_chunked_body_answered_promptly(mesh, pki):
    """The forwarded request whose body breaks gets the 400 at once (default
    timeouts), not a 504 after response_head_seconds; the connection ends."""
    hm = http_mesh(mesh, ALLOW_ALL, outbound=False)
    with HttpClient(hm.in_port, frontend_ctx(pki), timeout=3) as c:
        c.send(BODY_CASES[0][1])
        t0 = time.monotonic()
        try:
            r = c.read_response()
        except (socket.timeout, ssl.SSLError, OSError):
            r = None
        assert r is not None and r.status == 400, f"after {time.monotonic() - t0:.1f} s: {r}"
        assert c.closed_within(2)


def header_block(size):
    """GET /g whose header block (fields and the final CRLF) is size bytes."""
    start, fields, i = b"GET /g HTTP/1.1\r\n", b"host: orders\r\n", 0
    while len(fields) + 1010 + 40 < size:
        fields += b"x-big%d: " % i + b"v" * 1000 + b"\r\n"
        i += 1
    pad = size - len(fields) - 2 - len(b"x-pad: \r\n")
    return start + fields + b"x-pad: " + b"p" * pad + b"\r\n\r\n"


@pytest.mark.parametrize("via", [
    "inbound-direct",
    "outbound"])
def test_limits_are_inclusive(mesh, pki, via):
    """Requests right at the limits pass end to end (8 KiB request line,
    100 fields, 64 KiB of header block); a proxy must not push a request it
    accepted over the next proxy's limit by adding its own fields."""
    hm = http_mesh(mesh, ALLOW_ALL, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    # The request line limit counts the line without its CRLF.
    line = b"GET /" + b"a" * (8192 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    cases = {
        "line-8k": line + b"\r\nhost: orders\r\n\r\n",
        "fields-100": b"GET /f HTTP/1.1\r\nhost: orders\r\n"
                      + b"".join(b"x-f%d: v\r\n" % i for i in range(99)) + b"\r\n",
        "block-64k": header_block(65536),
    }
    over = {
        "line-8k+1": b"GET /" + b"a" * (8193 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1\r\nhost: orders\r\n\r\n",
        "fields-101": b"GET /f HTTP/1.1\r\nhost: orders\r\n"
                      + b"".join(b"x-f%d: v\r\n" % i for i in range(100)) + b"\r\n",
        "block-64k+1": header_block(65537),
    }
    wrong = []
    for cid, data in list(cases.items()) + list(over.items()):
        want = 200 if cid in cases else (414 if cid.startswith("line") else 431)
        with HttpClient(port, ctx) as c:
            c.send(data)
            r = c.read_response()
            if r is None or r.status != want:
                wrong.append(f"{cid}: answered {r and r.status} {r and r.body[:100]!r}, expected {want}")
    assert not wrong, "\n" + "\n".join(wrong)


# ---------------------------------------------------------------- slow heads

HEAD_SECONDS = 1.5


@pytest.mark.parametrize("via", ["inbound-direct", "outbound"])
def test_slowloris_gets_408_and_close(mesh, pki, via):
    """A head sent one byte per second never completes within
    request_head_seconds: 408, connection closed, nothing reaches the app."""
    tmo = {"request_head_seconds": HEAD_SECONDS}
    hm = http_mesh(mesh, ALLOW_ALL, outbound=via == "outbound", in_tmo=tmo, out_tmo=tmo)
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx) as c:
        # A keep-alive request first: the clock restarts with each head.
        c.send(request("GET", "/first"))
        assert c.read_response().status == 200
        t0 = time.monotonic()
        sent = sendall_slowly(c.sock, request("GET", "/slow", headers=[("x-pad", "p" * 40)]), 1.0)
        r = c.read_response()
        elapsed = time.monotonic() - t0
        assert r is not None and r.status == 408, r
        assert (r.header("connection") or "").lower() == "close"
        assert c.closed_within(3)
    assert sent <= 4, f"{sent} bytes were accepted at 1 byte/s"
    assert HEAD_SECONDS - 0.2 <= elapsed <= HEAD_SECONDS + 2.5, elapsed
    assert hm.app.paths() == ["/first"]
    (hm.outb if via == "outbound" else hm.inb).wait_access(status=408)


@pytest.mark.parametrize("via", ["inbound-direct", "outbound"])
def test_slowloris_first_request_and_silent_connection(mesh, pki, via):
    """request_head_seconds also bounds the time before the first request:
    a slow first head gets 408; a connection that sends nothing is closed."""
    tmo = {"request_head_seconds": HEAD_SECONDS}
    hm = http_mesh(mesh, ALLOW_ALL, outbound=via == "outbound", in_tmo=tmo, out_tmo=tmo)
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx) as slow, HttpClient(port, ctx) as silent:
        t0 = time.monotonic()
        sendall_slowly(slow.sock, request("GET", "/slow"), 1.0)
        r = slow.read_response()
        assert r is not None and r.status == 408, r
        assert slow.closed_within(3)
        assert silent.closed_within(HEAD_SECONDS + 3), "a silent connection is never closed"
        elapsed = time.monotonic() - t0
        assert silent.buf == b"" or silent.buf.startswith(b"HTTP/1.1 408"), silent.buf[:200]
    assert elapsed <= HEAD_SECONDS + 3
    assert hm.app.requests == []
