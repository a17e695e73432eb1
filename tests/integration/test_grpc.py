"""Real gRPC (python3-grpcio, hand-written generic handlers: bytes in, bytes
out, no protoc) behind a sidecar pair: the four call kinds, a method the
policy denies (PERMISSION_DENIED naming the rule), the upstream down
(UNAVAILABLE), a deadline shorter than a slow method (DEADLINE_EXCEEDED),
and a large streamed transfer with the pair's memory bounded."""

import hashlib
import time
from concurrent import futures

import grpc
import pytest

from h2_helpers import rss_kib
from helpers import free_port, spiffe
from http_helpers import http_inbound, http_outbound

RULES = [
    {"name": "no-admin-rpc", "action": "deny", "from": ["*"], "paths": ["/shop.Admin/*"]},
    {"name": "frontend-shop", "action": "allow", "from": [spiffe("frontend")],
     "paths": ["/shop.Orders/*"]},
]

CHUNK = 1 << 20


def _unary(req, ctx):
    return b"echo:" + req


def _slow(req, ctx):
    time.sleep(3)
    return b"late"


def _server_stream(req, ctx):
    n = int(req.decode())
    for i in range(n):
        yield b"item-%d" % i


def _client_stream(it, ctx):
    h = hashlib.sha256()
    n = 0
    for m in it:
        h.update(m)
        n += len(m)
    return b"%d:%s" % (n, h.hexdigest().encode())


def _bidi(it, ctx):
    for m in it:
        yield m.upper()


def _download(req, ctx):
    total = int(req.decode())
    block = bytes(range(256)) * (CHUNK // 256)
    for _ in range(total // CHUNK):
        yield block


class Handler(grpc.GenericRpcHandler):
    METHODS = {
        "/shop.Orders/Get": grpc.unary_unary_rpc_method_handler(_unary),
        "/shop.Orders/Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "/shop.Orders/List": grpc.unary_stream_rpc_method_handler(_server_stream),
        "/shop.Orders/Upload": grpc.stream_unary_rpc_method_handler(_client_stream),
        "/shop.Orders/Chat": grpc.stream_stream_rpc_method_handler(_bidi),
        "/shop.Orders/Download": grpc.unary_stream_rpc_method_handler(_download),
        "/shop.Admin/Wipe": grpc.unary_unary_rpc_method_handler(_unary),
    }

    def service(self, details):
        return self.METHODS.get(details.method)


class GrpcApp:
    def __init__(self):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.max_receive_message_length", 8 << 20)])
        self.server.add_generic_rpc_handlers((Handler(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self):
        self.server.stop(0)


@pytest.fixture
def grpc_pair(mesh):
    app = GrpcApp()
    mesh.apps.append(app)
    inb, in_port = http_inbound(mesh, app.port, RULES)
    outb, out_port = http_outbound(mesh, [in_port])
    ch = grpc.insecure_channel(f"127.0.0.1:{out_port}",
                               options=[("grpc.max_receive_message_length", 8 << 20)])
    yield ch, inb, outb
    ch.close()


def stub(ch, method, kind="unary_unary"):
    return getattr(ch, kind)(method)


def test_unary(grpc_pair):
    ch, _, _ = grpc_pair
    assert stub(ch, "/shop.Orders/Get")(b"hello", timeout=10) == b"echo:hello"


def test_server_streaming(grpc_pair):
    ch, _, _ = grpc_pair
    got = list(stub(ch, "/shop.Orders/List", "unary_stream")(b"50", timeout=10))
    assert got == [b"item-%d" % i for i in range(50)]


def test_client_streaming(grpc_pair):
    ch, _, _ = grpc_pair
    msgs = [bytes([i]) * 1000 for i in range(100)]
    h = hashlib.sha256(b"".join(msgs)).hexdigest().encode()
    assert stub(ch, "/shop.Orders/Upload", "stream_unary")(iter(msgs), timeout=10) == b"100000:" + h


def test_bidi(grpc_pair):
    ch, _, _ = grpc_pair
    got = list(stub(ch, "/shop.Orders/Chat", "stream_stream")(iter([b"a", b"bc", b"def"]),
                                                              timeout=10))
    assert got == [b"A", b"BC", b"DEF"]


def test_denied_method_is_permission_denied_with_rule(grpc_pair):
    ch, inb, _ = grpc_pair
    with pytest.raises(grpc.RpcError) as ei:
        stub(ch, "/shop.Admin/Wipe")(b"x", timeout=10)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ei.value.details() == "denied by rule no-admin-rpc"
    # A method no rule allows falls to the default (deny).
    with pytest.raises(grpc.RpcError) as ei:
        stub(ch, "/shop.Other/Call")(b"x", timeout=10)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ei.value.details() == "denied by rule default"
    # The connection still serves allowed calls.
    assert stub(ch, "/shop.Orders/Get")(b"ok", timeout=10) == b"echo:ok"
    m = inb.metrics()
    assert m.get("meshlet_grpc_requests_total", grpc_status="7") == 2
    assert m.get("meshlet_grpc_requests_total", grpc_status="0") == 1
    assert m.get("meshlet_http_requests_total", code="200") == 3


def test_upstream_down_is_unavailable(mesh):
    dead = free_port()
    inb, in_port = http_inbound(mesh, dead, RULES)
    outb, out_port = http_outbound(mesh, [in_port])
    with grpc.insecure_channel(f"127.0.0.1:{out_port}") as ch:
        with pytest.raises(grpc.RpcError) as ei:
            stub(ch, "/shop.Orders/Get")(b"x", timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    # The sidecar's own grpc-status 14, worded as the upstream went away.
    assert ei.value.details() in {"upstream unavailable", "upstream reset the stream",
                                  "upstream closed the stream"}


def test_deadline_shorter_than_slow_method(grpc_pair):
    ch, _, _ = grpc_pair
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        stub(ch, "/shop.Orders/Slow")(b"x", timeout=0.5)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2.5
    assert stub(ch, "/shop.Orders/Get")(b"after", timeout=10) == b"echo:after"


TRANSFER = 100 << 20


def test_large_streamed_transfer_intact_rss_bounded(grpc_pair):
    ch, inb, outb = grpc_pair
    before = (rss_kib(inb.proc.pid), rss_kib(outb.proc.pid))
    h = hashlib.sha256()
    n = 0
    peak = [0, 0]
    for m in stub(ch, "/shop.Orders/Download", "unary_stream")(str(TRANSFER).encode(),
                                                             timeout=120):
        h.update(m)
        n += len(m)
        if n % (8 * CHUNK) == 0:
            peak[0] = max(peak[0], rss_kib(inb.proc.pid))
            peak[1] = max(peak[1], rss_kib(outb.proc.pid))
    block = bytes(range(256)) * (CHUNK // 256)
    want = hashlib.sha256()
    for _ in range(TRANSFER // CHUNK):
        want.update(block)
    assert n == TRANSFER and h.hexdigest() == want.hexdigest()
    # Windows bound what a sidecar holds: growth stays far below the transfer.
    for b, p in zip(before, peak):
        assert p - b < 48 * 1024, (before, peak)


def test_large_client_stream_intact_rss_bounded(grpc_pair):
    """The other direction: 100 MiB uploaded as 1 MiB messages; the sidecars
    pass them on only as the app takes them (flow control), so neither holds
    more than its windows."""
    ch, inb, outb = grpc_pair
    block = bytes(range(256)) * (CHUNK // 256)
    before = (rss_kib(inb.proc.pid), rss_kib(outb.proc.pid))
    peak = [0, 0]

    def messages():
        for i in range(TRANSFER // CHUNK):
            if i % 8 == 0:
                peak[0] = max(peak[0], rss_kib(inb.proc.pid))
                peak[1] = max(peak[1], rss_kib(outb.proc.pid))
            yield block

    want = hashlib.sha256(block * (TRANSFER // CHUNK)).hexdigest().encode()
    got = stub(ch, "/shop.Orders/Upload", "stream_unary")(messages(), timeout=120)
    assert got == b"%d:%s" % (TRANSFER, want)
    for b, p in zip(before, peak):
        assert p - b < 48 * 1024, (before, peak)
