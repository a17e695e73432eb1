"""HTTP/2 through a sidecar pair: h2c prior knowledge from the app, h2 (ALPN)
between the sidecars, h2c to an app that speaks both HTTP/2 and HTTP/1.1;
per-stream policy, the HTTP/1.1 bypass table replayed as HTTP/2, the
translation-safety refusals, and the abuse limits (GOAWAY, other
connections served meanwhile, memory bounded)."""

import json
import subprocess

import pytest

from h2_helpers import DualApp, H2Client
from helpers import spiffe
from http_helpers import frontend_ctx, http_inbound, http_outbound

# How the sidecar words an upstream that went away: as it closed, as it reset
# the stream, or before it could be asked.
UPSTREAM_GONE = {"upstream unavailable", "upstream reset the stream", "upstream closed the stream"}

RULES = [
    {"name": "no-admin", "action": "deny", "from": ["*"], "paths": ["/admin", "/admin/*"]},
    {"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]},
]


@pytest.fixture
def pair(mesh):
    app = DualApp()
    mesh.apps.append(app)
    inb, in_port = http_inbound(mesh, app.port, RULES)
    outb, out_port = http_outbound(mesh, [in_port])
    return app, inb, in_port, outb, out_port


def curl(port, path, *args):
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code} %{http_version}",
                          "--max-time", "10", *args, f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=20)
    body, _, tail = out.stdout.rpartition("\n")
    code, version = tail.split()
    return int(code), version, body


def test_curl_h2_and_http11_through_one_listener(pair):
    app, _, _, _, port = pair
    code, version, body = curl(port, "/orders/1", "--http2-prior-knowledge")
    assert (code, version, body) == (200, "2", "ok /orders/1")
    code, version, body = curl(port, "/orders/2", "--http1.1")
    assert (code, version, body) == (200, "1.1", "ok /orders/2")
    protos = [(s.proto, s.path) for s in app.seen]
    assert protos == [("h2", "/orders/1"), ("http/1.1", "/orders/2")]
    h = app.seen[0]
    assert h.header("x-forwarded-client-cert") == [
        f"By={spiffe('orders')};URI={spiffe('frontend')}"]
    assert len(h.header("x-request-id")) == 1


# ---------------------------------------------------------------- policy per stream

def test_policy_per_stream_on_one_connection(pair, pki):
    app, inb, in_port, _, out_port = pair
    for port, ctx in ((out_port, None), (in_port, frontend_ctx(pki))):
        with H2Client(port, ctx) as c:
            ok = c.request("/orders/1")
            denied = c.request("/admin/x")
            posted = c.request("/orders/new", "POST", body=b"x" * 60000)
            st, h, body, reset, _ = c.response(ok)
            assert (st, body, reset) == (200, b"ok /orders/1", None)
            st, h, body, reset, _ = c.response(denied)
            assert (st, reset) == (403, None)
            assert json.loads(body) == {"error": "forbidden", "rule": "no-admin"}
            assert h["content-type"] == "application/json" and h["x-request-id"]
            st, h, body, reset, _ = c.response(posted)
            assert (st, len(body), reset) == (200, 60000, None)
    assert not [p for p in app.paths() if p.startswith("/admin")]
    m = inb.metrics()
    assert m.get("meshlet_http_requests_total", code="403") == 2
    assert m.get("meshlet_http_requests_total", code="200") == 4
    log = [json.loads(ln) for ln in inb.stdout().splitlines() if '"http_version":"2"' in ln]
    assert sorted(e["status"] for e in log) == [200, 200, 200, 200, 403, 403]
    assert {e["rule"] for e in log if e["status"] == 403} == {"no-admin"}


def test_caller_request_id_kept_and_xfcc_replaced(pair):
    app, _, _, _, port = pair
    with H2Client(port) as c:
        sid = c.request("/orders/rid", headers=[("x-request-id", "abc-123"),
                                                 ("x-forwarded-client-cert", "By=evil")])
        st, h, _, _, _ = c.response(sid)
    assert st == 200
    seen = app.seen[-1]
    assert seen.header("x-request-id") == ["abc-123"]
    assert seen.header("x-forwarded-client-cert") == [
        f"By={spiffe('orders')};URI={spiffe('frontend')}"]


def test_method_override_decided_on_both_methods(mesh, pki):
    """x-http-method-override on a stream: the policy must allow both the
    :method and the override (an app may act on either)."""
    app = DualApp()
    mesh.apps.append(app)
    rules = [{"name": "no-delete", "action": "deny", "from": ["*"], "methods": ["DELETE"]},
             {"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]}]
    _, in_port = http_inbound(mesh, app.port, rules)
    with H2Client(in_port, frontend_ctx(pki)) as c:
        denied = c.request("/orders/1", headers=[("x-http-method-override", "delete")])
        ok = c.request("/orders/2", headers=[("x-http-method-override", "GET")])
        twice = c.request("/orders/3", headers=[("x-http-method", "GET"),
                                                ("x-http-method", "DELETE")])
        st, _, body, reset, _ = c.response(denied)
        assert (st, reset) == (403, None)
        assert json.loads(body) == {"error": "forbidden", "rule": "no-delete"}
        assert c.response(ok)[0] == 200
        assert c.response(twice)[0] == 400
    assert app.paths() == ["/orders/2"]


# ---------------------------------------------------------------- the bypass table as HTTP/2

def _parse_case(data):
    """(method, target, [(name, value)]) of a raw HTTP/1.1 case."""
    data = data.lstrip(b"\r\n")
    head = data.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target = rest.rsplit(b" ", 1)[0] if rest.rsplit(b" ", 1)[-1].startswith(b"HTTP/") else rest
    hdrs = [tuple(x.strip() for x in ln.split(b":", 1)) for ln in lines[1:] if b":" in ln]
    return method, target, hdrs


def _h2_attempt(port, ctx, method, target, hdrs):
    with H2Client(port, ctx, validate=False) as c:
        sid = c.conn.get_next_available_stream_id()
        host = [v for n, v in hdrs if n.lower() == b"host"]
        fields = [(b":method", method), (b":scheme", b"http"),
                  (b":authority", host[0] if host else b"orders"), (b":path", target)]
        fields += [(n.lower(), v) for n, v in hdrs if n.lower() != b"host"]
        if len(host) > 1:
            fields += [(b"host", h) for h in host]
        c.conn.send_headers(sid, fields, end_stream=True)
        c.flush()
        st, h, body, reset, _ = c.response(sid)
        return st, body, reset


@pytest.mark.parametrize("app_protocol", ["auto", "http1"])
@pytest.mark.parametrize("via", ["inbound-direct", "outbound"])
def test_bypass_table_as_http2(mesh, pki, via, app_protocol):
    """auto: the app gets h2c; http1: every stream reaches it as HTTP/1.1
    through the inbound pool, with the same decisions."""
    import test_http_bypass as bp
    from http_helpers import is_admin

    app = DualApp()
    mesh.apps.append(app)
    if app_protocol == "auto":
        inb, in_port = http_inbound(mesh, app.port, bp.RULES)
    else:
        in_port = free_port_()
        cfg = mesh.config("orders", policy=mesh.policy("orders", bp.RULES, "deny"),
                          inbound=[{"listen": f"127.0.0.1:{in_port}",
                                    "forward": f"127.0.0.1:{app.port}",
                                    "protocol": "http", "app_protocol": "http1"}])
        mesh.proxy("orders-in", cfg)
    port, ctx = in_port, frontend_ctx(pki)
    if via == "outbound":
        _, port = http_outbound(mesh, [in_port])
        ctx = None
    wrong = []
    for cid, data, want in bp.CASES:
        method, target, hdrs = _parse_case(data)
        want = set(want if isinstance(want, tuple) else (want,))
        # HTTP/2 has no request line: a target that is not "/..." (absolute
        # form, "*" without OPTIONS, ...) is malformed (a reset), and what was
        # 400/505/501 for the request line is a refusal or a denial here.
        if want & {400, 505, 501} or not target.startswith(b"/"):
            want |= {"refused", 403}
        n_before = len(app.seen)
        st, body, reset = _h2_attempt(port, ctx, method, target, hdrs)
        got = "refused" if reset is not None or st == 400 else st
        if got not in want:
            wrong.append(f"{cid:26} {target!r}: got {st} reset={reset}, expected {want}")
        elif got == 403 and json.loads(body) != {"error": "forbidden", "rule": "no-admin"}:
            wrong.append(f"{cid:26}: 403 body {body!r}")
        elif got == 200 and len(app.seen) != n_before + 1:
            wrong.append(f"{cid:26}: allowed but the app saw {app.paths()[n_before:]}")
    admin = [p for p in app.paths() if is_admin(p.split("?", 1)[0])]
    assert not admin, f"requests for /admin reached the app: {admin}"
    assert "/ADMIN/x" in app.paths() and "/Admin/x" in app.paths()
    assert not wrong, "\n" + "\n".join(wrong)
    if app_protocol == "http1":
        assert {s.proto for s in app.seen} == {"http/1.1"}


# ---------------------------------------------------------------- translation safety

BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"orders"),
        (b":path", b"/safe")]

RESET = "reset"   # RST_STREAM PROTOCOL_ERROR (or the connection refused the block)

SAFETY = [
    ("connection", BASE + [(b"connection", b"close")], RESET),
    ("keep-alive", BASE + [(b"keep-alive", b"timeout=5")], RESET),
    ("proxy-connection", BASE + [(b"proxy-connection", b"keep-alive")], RESET),
    ("upgrade", BASE + [(b"upgrade", b"websocket")], RESET),
    ("transfer-encoding", BASE + [(b"transfer-encoding", b"chunked")], RESET),
    ("te-gzip", BASE + [(b"te", b"gzip")], RESET),
    ("uppercase-name", BASE + [(b"X-Tenant", b"a")], RESET),
    ("space-in-name", BASE + [(b"x tenant", b"a")], RESET),
    ("cr-in-value", BASE + [(b"x-a", b"1\r\nx-b: 2")], RESET),
    ("lf-in-value", BASE + [(b"x-a", b"1\nx-b: 2")], RESET),
    ("nul-in-value", BASE + [(b"x-a", b"1\x00")], RESET),
    ("nul-in-name", BASE + [(b"x-\x00a", b"1")], RESET),
    ("path-no-slash", BASE[:3] + [(b":path", b"safe")], RESET),
    ("asterisk-get", BASE[:3] + [(b":path", b"*")], RESET),
    ("duplicate-path", BASE + [(b":path", b"/other")], RESET),
    ("duplicate-method", [(b":method", b"GET")] + BASE, RESET),
    ("pseudo-after-regular", BASE[:3] + [(b"x-a", b"1"), (b":path", b"/safe")], RESET),
    ("unknown-pseudo", BASE + [(b":evil", b"1")], RESET),
    ("authority-host-disagree", BASE + [(b"host", b"elsewhere")], 400),
    ("two-content-lengths", BASE + [(b"content-length", b"0"), (b"content-length", b"1")], RESET),
]


def _raw_request(port, ctx, fields, body=None, end=True):
    with H2Client(port, ctx, validate=False) as c:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, fields, end_stream=body is None and end)
        if body is not None:
            c.conn.send_data(sid, body, end_stream=True)
        c.flush()
        st, _, _, reset, _ = c.response(sid)
        return st, reset


@pytest.mark.parametrize("via", ["inbound-direct", "outbound"])
def test_translation_safety_refusals(pair, pki, via):
    app, _, in_port, _, out_port = pair
    port, ctx = (in_port, frontend_ctx(pki)) if via == "inbound-direct" else (out_port, None)
    wrong = []
    for cid, fields, want in SAFETY:
        st, reset = _raw_request(port, ctx, fields)
        got = RESET if reset is not None else st
        if got != want:
            wrong.append(f"{cid}: got status {st} reset {reset}, expected {want}")
    # te: trailers is the one te allowed; OPTIONS * the one non-"/" path.
    assert _raw_request(port, ctx, BASE + [(b"te", b"trailers")]) == (200, None)
    assert _raw_request(port, ctx, [(b":method", b"OPTIONS")] + BASE[1:3] + [(b":path", b"*")]) \
        == (200, None)
    assert not wrong, "\n".join(wrong)
    assert sorted(app.paths()) == ["*", "/safe"], app.paths()


@pytest.mark.parametrize("sent,declared", [(5, b"10"), (20, b"10")])
def test_content_length_disagreeing_with_data_is_reset(pair, sent, declared):
    app, _, _, _, port = pair
    fields = [(b":method", b"POST")] + BASE[1:3] + [(b":path", b"/upload"),
                                                    (b"content-length", declared)]
    st, reset = _raw_request(port, None, fields, body=b"x" * sent)
    assert reset is not None and st is None
    assert [s for s in app.seen if s.path == "/upload" and s.body_len == sent] == []


# ---------------------------------------------------------------- abuse

import struct  # noqa: E402
import time  # noqa: E402

from h2_helpers import rss_kib  # noqa: E402

ENHANCE_YOUR_CALM, PROTOCOL_ERROR = 11, 1


def frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", sid) + payload


def hpack_literal(name, value):
    """A literal field without indexing, new name (RFC 7541 6.2.2)."""
    def s(b):
        assert len(b) < 127
        return bytes([len(b)]) + b
    return b"\x00" + s(name) + s(value)


def request_block(path=b"/slow"):
    return hpack_literal(b":method", b"GET") + hpack_literal(b":scheme", b"http") + \
        hpack_literal(b":authority", b"orders") + hpack_literal(b":path", path)


def rapid_reset(c):
    out = b""
    for i in range(1500):
        sid = 1 + 2 * i
        out += frame(1, 0x4 | 0x1, sid, request_block()) + frame(3, 0, sid, struct.pack(">I", 8))
    return out


def continuation_flood(c):
    out = frame(1, 0, 1, request_block())          # HEADERS without END_HEADERS
    for _ in range(200):
        out += frame(9, 0, 1, hpack_literal(b"x-a", b"b" * 50))
    return out


def hpack_bomb(c):
    # One 4000-byte field into the dynamic table, then a block that refers
    # to it 400 times: 30 bytes on the wire, 1.6 MB decoded.
    big = b"\x40" + bytes([3]) + b"x-b" + b"\x7f" + _hpack_int(4000 - 127) + b"v" * 4000
    block = request_block(b"/") + big + b"\xbe" * 400
    return frame(1, 0x4 | 0x1, 1, block)


def _hpack_int(n):
    out = b""
    while n >= 128:
        out += bytes([(n % 128) + 128])
        n //= 128
    return out + bytes([n])


def settings_flood(c):
    return frame(4, 0, 0) * 5000


def ping_flood(c):
    return frame(6, 0, 0, b"12345678") * 5000


def priority_flood(c):
    return b"".join(frame(2, 0, 1 + 2 * i, struct.pack(">IB", 0, 16)) for i in range(5000))


def too_many_streams(c):
    # 150 requests left open (no END_STREAM), against max_concurrent_streams 100.
    return b"".join(frame(1, 0x4, 1 + 2 * i, request_block(b"/orders/open"))
                    for i in range(150))


ABUSES = [
    ("rapid_reset", rapid_reset, ENHANCE_YOUR_CALM),
    ("continuation_flood", continuation_flood, ENHANCE_YOUR_CALM),
    ("header_list", hpack_bomb, ENHANCE_YOUR_CALM),
    ("control_flood", settings_flood, ENHANCE_YOUR_CALM),
    ("control_flood", ping_flood, ENHANCE_YOUR_CALM),
    ("control_flood", priority_flood, ENHANCE_YOUR_CALM),
    ("too_many_streams", too_many_streams, PROTOCOL_ERROR),
]


@pytest.mark.parametrize("kind,build,code", ABUSES, ids=[a[1].__name__ for a in ABUSES])
def test_abuse_ends_in_goaway(pair, kind, build, code):
    from http_helpers import cpu_seconds

    app, inb, _, outb, port = pair
    rss0, cpu0 = rss_kib(outb.pid), cpu_seconds(outb.pid)
    with H2Client(port, timeout=10) as c:
        try:
            c.send_raw(build(c))
        except OSError:
            pass                       # closed while we were still sending: fine
        t0 = time.monotonic()
        goaway, closed = c.wait_goaway(10)
        elapsed = time.monotonic() - t0
    assert goaway is not None, "no GOAWAY"
    assert goaway.error_code == code
    assert closed and elapsed < 5
    assert cpu_seconds(outb.pid) - cpu0 < 2.0      # bounded work, even under ASan
    # Others are served meanwhile, and the sidecar holds no more than it did.
    with H2Client(port) as other:
        st, _, body, _, _ = other.response(other.request("/orders/after"))
    assert (st, body) == (200, b"ok /orders/after")
    m = outb.metrics()
    assert m.get("meshlet_http2_abuse_total", kind=kind) == 1
    assert rss_kib(outb.pid) - rss0 < 16 * 1024


def test_alpn_between_sidecars(pair, pki):
    """The inbound selects h2 when offered, else http/1.1; a client that
    offers nothing (a tcp outbound) gets no ALPN and is served as before."""
    import socket

    _, _, in_port, _, _ = pair
    for offer, want in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1"), (None, None)):
        ctx = frontend_ctx(pki)
        if offer:
            ctx.set_alpn_protocols(offer)
        with socket.create_connection(("127.0.0.1", in_port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="localhost") as t:
                assert t.selected_alpn_protocol() == want
                t.sendall(b"GET /orders/alpn HTTP/1.1\r\nhost: orders\r\n\r\n")
                assert t.recv(100).startswith(b"HTTP/1.1 200")


def test_h2load_multiplexed(pair):
    """Many streams at once on few connections (h2load, nghttp2-client):
    every one answered 200, none lost, the log and counters agree."""
    app, inb, _, _, port = pair
    out = subprocess.run(["h2load", "-n", "4000", "-c", "4", "-m", "32",
                          f"http://127.0.0.1:{port}/orders/load"],
                         capture_output=True, text=True, timeout=120).stdout
    assert "4000 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 4000 2xx" in out, out
    assert inb.metrics().get("meshlet_http_requests_total", code="200") == 4000


def test_upstream_down_is_502_for_http2(mesh):
    from helpers import free_port

    inb, in_port = http_inbound(mesh, free_port(), RULES)
    _, port = http_outbound(mesh, [in_port])
    code, version, body = curl(port, "/orders/1", "--http2-prior-knowledge")
    assert (code, version) == (502, "2")
    doc = json.loads(body)
    assert doc["status"] == 502 and doc["error"] in UPSTREAM_GONE, doc


def test_grpc_timeout_is_the_proxys_deadline(pair):
    """The proxy itself ends a gRPC call at its grpc-timeout (the app would
    answer /slow after 3 s): DEADLINE_EXCEEDED, trailers-only."""
    import time

    app, _, _, _, port = pair
    with H2Client(port) as c:
        t0 = time.monotonic()
        sid = c.request("/slow/call", "POST", headers=[("content-type", "application/grpc"),
                                                       ("te", "trailers"),
                                                       ("grpc-timeout", "300m")],
                        body=b"\x00\x00\x00\x00\x00")
        st, h, body, reset, _ = c.response(sid)
        elapsed = time.monotonic() - t0
    assert (st, reset, body) == (200, None, b"")
    assert h["grpc-status"] == "4" and h["grpc-message"] == "deadline exceeded"
    assert 0.25 < elapsed < 2.0


def test_app_protocol_http1_carries_http2_callers(mesh, pki):
    """An app that must be spoken HTTP/1.1 to gets HTTP/2 callers' streams as
    HTTP/1.1 requests (the inbound pool; more in test_http2_to_http1.py)."""
    app = DualApp()
    mesh.apps.append(app)
    port = free_port_()
    cfg = mesh.config("orders", policy=mesh.policy("orders", RULES),
                      inbound=[{"listen": f"127.0.0.1:{port}", "forward": f"127.0.0.1:{app.port}",
                                "protocol": "http", "app_protocol": "http1"}])
    mesh.proxy("orders-in", cfg)
    with H2Client(port, frontend_ctx(pki)) as c:
        # DualApp reads content-length bodies only (chunked ones: test_http2_to_http1.py).
        post = c.request("/orders/new", "POST", headers=[("content-type", "text/plain"),
                                                         ("content-length", "5")], body=b"hello")
        plain = c.request("/orders/1")
        st, _, body, _, _ = c.response(post)
        assert (st, body) == (200, b"hello")
        st, _, body, _, _ = c.response(plain)
        assert (st, body) == (200, b"ok /orders/1")
    seen = {s.path: s for s in app.seen}
    assert seen["/orders/1"].proto == "http/1.1" and seen["/orders/new"].proto == "http/1.1"
    assert seen["/orders/new"].body_len == 5
    assert seen["/orders/1"].header("host") == ["orders"]


def free_port_():
    from helpers import free_port
    return free_port()


@pytest.mark.parametrize("split", [24, 1, 7])
def test_preface_starts_http2_even_cut_short(pair, split):
    """The preface alone (or cut into pieces) is HTTP/2: the proxy answers
    with its SETTINGS, not an HTTP/1.1 error; a request then works."""
    import socket
    import time

    app, _, _, _, port = pair
    from h2_helpers import PREFACE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for i in range(0, len(PREFACE), split):
            s.sendall(PREFACE[i:i + split])
            time.sleep(0.02)
        head = s.recv(9)
        assert len(head) == 9 and head[3] == 4 and head[4] == 0    # SETTINGS, not an ACK
    with H2Client(port) as c:
        st, _, body, _, _ = c.response(c.request("/orders/after-preface"))
    assert (st, body) == (200, b"ok /orders/after-preface")


def test_drain_sends_goaway_and_finishes_open_streams(mesh, pair):
    """Draining (POST /drain): an HTTP/2 connection gets GOAWAY NO_ERROR at
    once (curl takes it gracefully, python3-h2 would not), its open stream
    (3 s, within drain_seconds) still completes, then the connection
    closes and new connections are refused."""
    import threading

    _, _, in_port, _, _ = pair
    outb, port = http_outbound(mesh, [in_port], name="frontend-out-drain",
                               tmo={"drain_seconds": 10})
    got = {}
    t = threading.Thread(target=lambda: got.update(r=curl(port, "/slow/drain",
                                                          "--http2-prior-knowledge")))
    t.start()
    idle = H2Client(port)
    st, _, _, _, _ = idle.response(idle.request("/orders/before"))
    assert st == 200
    time.sleep(0.5)                          # the slow stream reached the app
    assert outb.admin("/drain", "POST")[0] == 200
    goaway, closed = idle.wait_goaway(5)     # idle: GOAWAY NO_ERROR, then closed
    idle.close()
    assert goaway is not None and goaway.error_code == 0 and closed
    t.join(15)
    assert got["r"] == (200, "2", "ok /slow/drain")
    assert '"status":200' in outb.stdout() and '"/slow/drain"' in outb.stdout()


def test_denied_head_gets_length_not_body(pair):
    _, _, _, _, port = pair
    with H2Client(port) as c:
        st, h, body, reset, _ = c.response(c.request("/admin/x", "HEAD"))
    assert (st, body, reset) == (403, b"", None)
    assert int(h["content-length"]) == len(b'{"error":"forbidden","rule":"no-admin"}\n')
