"""The callers' request-level traffic rules (docs/traffic.md, issue 13) on
the pool of HTTP/2 connections between sidecars: request_seconds (504),
retries after a request was sent (reset, 503/5xx, timeout) within attempts
and the budget, never a POST once its body was sent, passive ejection on
5xx answers and timeouts, limits.max_pending_requests.

frontend's outbound proxy (static mode, traffic_file with orders'
document) -> orders' inbound sidecars (http) -> flaky test apps written
here: they answer 503 to a given share of requests, hang, or close before
the head. Run with -s to see the measured rates."""

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers import free_port, spiffe, wait_for
from http_helpers import HttpClient, addr, http_inbound, request, timeouts

RULES = [{"name": "frontend-all", "action": "allow", "from": [spiffe("frontend")]}]


class FlakyApp:
    """An HTTP/1.1 app: fail_share of the requests (a seeded draw) get
    fail_status; hang: no answer until stopped; close_share: the connection
    closes before the head. Counts what it received, by method."""

    def __init__(self, name, fail_share=0.0, fail_status=503, hang=False, seed=1):
        self.name, self.fail_share, self.fail_status = name, fail_share, fail_status
        self.hang = hang
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.seen = []                  # (method, path, body)
        self.stop_ev = threading.Event()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                with app.lock:
                    app.seen.append((self.command, self.path, body))
                    fail = app.rng.random() < app.fail_share
                if app.hang:
                    app.stop_ev.wait(60)
                    self.close_connection = True
                    return
                status = app.fail_status if fail else 200
                out = json.dumps({"app": app.name, "status": status}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, method=None):
        with self.lock:
            return sum(1 for m, _, _ in self.seen if method is None or m == method)

    def stop(self):
        self.stop_ev.set()
        self.server.shutdown()
        self.server.server_close()


def sidecar(mesh, app, name):
    """orders' inbound sidecar in front of app; returns its port."""
    mesh.apps.append(app)
    _, port = http_inbound(mesh, app.port, RULES, name=name)
    return port


def caller(mesh, endpoints, traffic, pool=None, tmo=None):
    """frontend's outbound (http) to orders at endpoints, with orders' document."""
    f = mesh.tmp / f"traffic-{free_port()}.json"
    f.write_text(json.dumps({"service": "orders", **traffic}))
    port = free_port()
    item = {"listen": addr(port), "service": "orders", "protocol": "http",
            "endpoints": [addr(e) for e in endpoints]}
    if pool:
        item["pool"] = pool
    cfg = mesh.config("frontend", policy=mesh.policy("frontend", []), outbound=[item],
                      traffic_file=str(f), timeouts=timeouts(**(tmo or {})))
    return mesh.proxy(f"frontend-out-{port}", cfg), port


def call(port, method="GET", path="/orders/1", body=None, timeout=20):
    """One request on a connection of its own: (status, response, seconds)."""
    t0 = time.monotonic()
    with HttpClient(port, timeout=timeout) as c:
        c.send(request(method, path, headers=[("Connection", "close")], body=body))
        r = c.read_response()
    return (r.status if r else None), r, time.monotonic() - t0


def statuses(port, n, method="GET", workers=8):
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda i: call(port, method, f"/orders/{i}")[0], range(n)))


def metric(p, name, **labels):
    return p.metrics().get(name, **labels) or 0


def test_retries_keep_the_success_rate_up(mesh):
    """Two endpoints answering 503 to 30 % of requests: about 70 % succeed
    without retries; with attempts 2 on 503 (and a budget that allows
    them), at least 95 %. Every retry is counted."""
    n = 300
    a = FlakyApp("a", fail_share=0.3, seed=11)
    b = FlakyApp("b", fail_share=0.3, seed=12)
    eps = [sidecar(mesh, a, "orders-a"), sidecar(mesh, b, "orders-b")]
    plain, p_port = caller(mesh, eps, {})
    got = statuses(p_port, n)
    without = got.count(200) / n
    assert set(got) <= {200, 503}, set(got)
    assert 0.6 <= without <= 0.8, without
    assert metric(plain, "meshlet_retries_total") == 0

    retrying, r_port = caller(mesh, eps, {"retries": {
        "attempts": 2, "on": ["503"], "budget_percent": 100, "backoff_ms": 5}})
    before = a.count() + b.count()
    got = statuses(r_port, n)
    with_retries = got.count(200) / n
    reached = a.count() + b.count() - before
    retries = metric(retrying, "meshlet_retries_total")
    print(f"\n30 % failing upstreams, {n} GETs: {without:.1%} succeeded without retries, "
          f"{with_retries:.1%} with attempts 2 ({retries} retries, {reached} requests "
          f"reached the apps)")
    assert with_retries >= 0.95, with_retries
    assert reached == n + retries, (reached, retries)
    assert retries >= 0.3 * n * 0.7


def test_retries_never_exceed_the_budget(mesh):
    """Half the requests fail; attempts 2 would double the load, but
    budget_percent 10 keeps the retries within 10 % of the first attempts
    (over the 10 s window): counted at the upstream, not just the metric."""
    n = 200
    a = FlakyApp("a", fail_share=0.5, seed=3)
    eps = [sidecar(mesh, a, "orders-a")]
    p, port = caller(mesh, eps, {"retries": {
        "attempts": 2, "on": ["5xx"], "budget_percent": 10, "backoff_ms": 1}})
    got = statuses(port, n, workers=4)
    retries = metric(p, "meshlet_retries_total")
    print(f"\nbudget 10 %: {n} requests sent, {a.count()} reached the app, {retries} retries, "
          f"{got.count(200)} succeeded")
    assert a.count() == n + retries
    assert retries <= n * 0.10 + 1, retries
    assert retries >= n * 0.10 - 2, retries    # the budget is used, not just respected


def test_post_never_retried_after_its_body_was_sent(mesh):
    """503 for everything: a POST goes once (the app sees it once, the
    caller gets the 503), a GET and a PUT (with its body again) twice, the
    retry to the other endpoint."""
    a = FlakyApp("a", fail_share=1.0)
    b = FlakyApp("b", fail_share=1.0)
    eps = [sidecar(mesh, a, "orders-a"), sidecar(mesh, b, "orders-b")]
    p, port = caller(mesh, eps, {"retries": {
        "attempts": 1, "on": ["503"], "budget_percent": 100, "backoff_ms": 1}})
    status, r, _ = call(port, "POST", "/orders", body=b'{"item": 1}')
    assert status == 503
    assert a.count("POST") + b.count("POST") == 1
    assert metric(p, "meshlet_retries_total") == 0
    status, r, _ = call(port, "GET", "/orders/1")
    assert status == 503
    assert a.count("GET") == 1 and b.count("GET") == 1
    status, r, _ = call(port, "PUT", "/orders/1", body=b"x" * 5000)
    assert status == 503
    puts = [body for m, _, body in a.seen + b.seen if m == "PUT"]
    assert len(puts) == 2 and all(body == b"x" * 5000 for body in puts)
    assert a.count("PUT") == 1 and b.count("PUT") == 1
    assert metric(p, "meshlet_retries_total") == 2


def test_a_body_over_the_bound_is_not_retried(mesh):
    """A PUT whose body outgrew the 64 KiB kept for a retry goes once."""
    a = FlakyApp("a", fail_share=1.0)
    p, port = caller(mesh, [sidecar(mesh, a, "orders-a")], {"retries": {
        "attempts": 2, "on": ["503"], "budget_percent": 100, "backoff_ms": 1}})
    status, _, _ = call(port, "PUT", "/orders/1", body=b"y" * (65536 + 1))
    assert status == 503
    assert a.count("PUT") == 1
    status, _, _ = call(port, "PUT", "/orders/1", body=b"y" * 65536)
    assert status == 503
    assert a.count("PUT") == 1 + 3


def test_post_refused_before_any_byte_goes_to_another_endpoint(mesh):
    """The first endpoint refuses connections: nothing of the POST reached
    anyone, so it goes to the next endpoint, for any method."""
    a = FlakyApp("a")
    dead = free_port()
    p, port = caller(mesh, [dead, sidecar(mesh, a, "orders-a")], {})
    for i in range(4):
        status, r, _ = call(port, "POST", f"/orders/{i}", body=b"{}")
        assert status == 200, (i, status)
    assert a.count("POST") == 4


def test_reset_before_the_head_is_retried_for_a_get_not_a_post(mesh):
    """The endpoint holding the requests dies (its connection is lost
    before any answer): the GET goes again to the other endpoint and
    succeeds; the POST ends 502 and is never sent again."""
    hang = FlakyApp("hang", hang=True)
    ok = FlakyApp("ok")
    mesh.apps.extend([hang, ok])
    hang_in, hang_port = http_inbound(mesh, hang.port, RULES, name="orders-hang")
    ok_port = sidecar(mesh, ok, "orders-ok")
    p, port = caller(mesh, [hang_port, ok_port], {"retries": {
        "attempts": 1, "on": ["reset"], "budget_percent": 100, "backoff_ms": 1}})
    results = {}

    def go(method):
        results[method] = call(port, method, "/orders/1", body=b"{}" if method == "POST" else None)

    threads = []
    # Round robin: each request's first endpoint alternates; send until
    # one GET and one POST hang on the dying endpoint.
    for method in ("GET", "POST"):
        while True:
            before = hang.count(method)
            t = threading.Thread(target=go, args=(method,))
            t.start()
            try:
                wait_for(lambda: hang.count(method) > before or method in results, 5)
            except Exception:
                pass
            if hang.count(method) > before:
                threads.append(t)
                break
            t.join()
            results.pop(method, None)
    hang_in.proc.kill()
    for t in threads:
        t.join(20)
    assert results["GET"][0] == 200, results["GET"]
    assert results["POST"][0] == 502, results["POST"]
    # The POST that died with the endpoint never reached the other one
    # (only those whose first endpoint it was did).
    posts_ok = ok.count("POST")
    time.sleep(0.3)
    assert ok.count("POST") == posts_ok
    assert hang.count("POST") == 1
    assert metric(p, "meshlet_retries_total") == 1


def test_request_timeout_504_and_the_hanging_endpoint_ejected(mesh):
    """request_seconds 0.5: a request to the hanging endpoint ends 504
    after about 0.5 s; two in a row eject it, and the next requests all go
    to the other one. With "timeout" in retries.on, a GET that hit it is
    served by the other endpoint instead."""
    hang = FlakyApp("hang", hang=True)
    ok = FlakyApp("ok")
    eps = [sidecar(mesh, hang, "orders-hang"), sidecar(mesh, ok, "orders-ok")]
    p, port = caller(mesh, eps, {
        "timeouts": {"request_seconds": 0.5},
        "outlier": {"consecutive_failures": 2, "eject_seconds": 30, "max_ejected_percent": 50}})
    times = []
    while hang.count() < 2:
        status, _, took = call(port)
        if status == 504:
            times.append(took)
        else:
            assert status == 200
    assert len(times) == 2
    assert all(0.45 <= t < 1.5 for t in times), times
    assert metric(p, "meshlet_outlier_ejections_total") == 1
    for _ in range(10):
        assert call(port)[0] == 200
    assert hang.count() == 2
    print(f"\nrequest_seconds 0.5: 504 after {', '.join(f'{t:.3f}' for t in times)} s; "
          f"then ejected: 10 of 10 served by the other endpoint")

    p2, port2 = caller(mesh, eps, {
        "timeouts": {"request_seconds": 0.3},
        "retries": {"attempts": 1, "on": ["timeout"], "budget_percent": 100, "backoff_ms": 1}})
    for _ in range(4):
        status, _, took = call(port2)
        assert status == 200
        assert took < 1.0
    assert metric(p2, "meshlet_retries_total") >= 1


def test_request_timeout_on_the_single_connection_path(mesh):
    """A head too large for the pool goes 1:1 over a connection of its
    own; request_seconds bounds its response head there too."""
    hang = FlakyApp("hang", hang=True)
    f = mesh.tmp / "traffic-1to1.json"
    f.write_text(json.dumps({"service": "orders", "timeouts": {"request_seconds": 0.5}}))
    port = free_port()
    cfg = mesh.config("frontend", policy=mesh.policy("frontend", []),
                      outbound=[{"listen": addr(port), "service": "orders", "protocol": "http",
                                 "endpoints": [addr(sidecar(mesh, hang, "orders-hang"))]}],
                      traffic_file=str(f), timeouts=timeouts(),
                      http2={"max_header_list_bytes": 4096})
    mesh.proxy("frontend-out", cfg)
    t0 = time.monotonic()
    with HttpClient(port, timeout=10) as c:
        c.send(request("GET", "/orders/1", headers=[("x-big", "b" * 6000)]))
        r = c.read_response()
    took = time.monotonic() - t0
    assert r is not None and r.status == 504, r
    assert hang.count() == 1    # it did reach the app, over the 1:1 path
    assert 0.45 <= took < 1.5, took


def test_grpc_request_timeout_is_deadline_exceeded(mesh):
    """An h2c gRPC call whose response head does not come within
    request_seconds ends with grpc-status 4 (DEADLINE_EXCEEDED), as a
    passed grpc-timeout does."""
    from h2_helpers import H2Client
    hang = FlakyApp("hang", hang=True)
    mesh.apps.append(hang)
    in_port = free_port()
    cfg = mesh.config("orders", policy=mesh.policy("orders", RULES, "deny"),
                      inbound=[{"listen": addr(in_port), "forward": addr(hang.port),
                                "protocol": "http", "app_protocol": "http1"}],
                      timeouts=timeouts())
    mesh.proxy("orders-hang", cfg)
    p, port = caller(mesh, [in_port], {"timeouts": {"request_seconds": 0.4}})
    c = H2Client(port)
    try:
        t0 = time.monotonic()
        sid = c.request("/orders.Orders/Get", "POST",
                        headers=[("content-type", "application/grpc"), ("te", "trailers")],
                        body=b"\x00\x00\x00\x00\x00")
        status, hdrs, body, reset, trailers = c.response(sid, timeout=10)
        took = time.monotonic() - t0
    finally:
        c.close()
    assert status == 200, (status, hdrs, reset)
    assert {**hdrs, **trailers}.get("grpc-status") == "4", (hdrs, trailers)
    assert 0.35 <= took < 1.5, took


def test_5xx_endpoint_ejected_then_back(mesh):
    """One of three endpoints answers 500: after consecutive_failures 3 it
    gets no requests for eject_seconds, then one more chance."""
    bad = FlakyApp("bad", fail_share=1.0, fail_status=500)
    good = [FlakyApp("g1"), FlakyApp("g2")]
    eps = [sidecar(mesh, bad, "orders-bad")] + [sidecar(mesh, g, f"orders-{g.name}")
                                                for g in good]
    p, port = caller(mesh, eps, {"outlier": {"consecutive_failures": 3, "eject_seconds": 2,
                                             "max_ejected_percent": 50}})
    while bad.count() < 3:
        call(port)
    t_eject = time.monotonic()
    assert metric(p, "meshlet_outlier_ejections_total") == 1
    assert metric(p, "meshlet_endpoints_ejected") == 1
    served = 0
    while time.monotonic() - t_eject < 1.8:
        assert call(port)[0] == 200
        served += 1
    assert bad.count() == 3
    while bad.count() == 3:
        call(port)
        time.sleep(0.01)
    back = time.monotonic() - t_eject
    print(f"\n5xx endpoint ejected after 3 answers: {served} requests to the others, "
          f"back after {back:.3f} s")
    assert 1.9 <= back < 2.6, back    # measured from the client's third answer


def test_ejection_never_passes_the_cap(mesh):
    """Two of three endpoints answer 500, max_ejected_percent 50: one of
    them at most is ejected at a time (floor(3 x 50 %) = 1)."""
    bad = [FlakyApp("b1", fail_share=1.0, fail_status=500),
           FlakyApp("b2", fail_share=1.0, fail_status=500)]
    good = FlakyApp("g")
    eps = [sidecar(mesh, x, f"orders-{x.name}") for x in bad + [good]]
    p, port = caller(mesh, eps, {"outlier": {"consecutive_failures": 2, "eject_seconds": 30,
                                             "max_ejected_percent": 50}})
    for _ in range(30):
        call(port)
        assert metric(p, "meshlet_endpoints_ejected") <= 1
    assert metric(p, "meshlet_endpoints_ejected") == 1
    assert metric(p, "meshlet_outlier_ejections_total") == 1
    # The one not ejected still gets its share.
    assert min(x.count() for x in bad) >= 2


def test_max_pending_requests_answered_503_overloaded(mesh):
    """One pooled connection with two streams to a hanging endpoint: two
    requests run, two wait (max_pending_requests 2), the fifth is refused at
    once with x-meshlet-overloaded: 1 and counted."""
    hang = FlakyApp("hang", hang=True)
    p, port = caller(mesh, [sidecar(mesh, hang, "orders-hang")],
                     {"limits": {"max_pending_requests": 2}},
                     pool={"max_connections": 1, "max_streams": 2})
    socks = []
    for i in range(4):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request("GET", f"/orders/{i}", headers=[("Connection", "close")]))
        socks.append(s)
        if i < 2:
            wait_for(lambda: hang.count() == i + 1, 5)
        else:
            time.sleep(0.2)
    try:
        status, r, took = call(port)
        assert status == 503
        assert r.header("x-meshlet-overloaded") == "1"
        assert r.json() == {"error": "overloaded", "limit": "max_pending_requests"}
        assert took < 0.5
        assert metric(p, "meshlet_overloaded_total") == 1
        # An h2c caller's stream gets the same answer.
        from h2_helpers import H2Client
        c = H2Client(port)
        try:
            status, hdrs, body, _, _ = c.response(c.request("/orders/h2"), timeout=5)
        finally:
            c.close()
        assert status == 503 and hdrs.get("x-meshlet-overloaded") == "1", (status, hdrs)
        assert json.loads(body) == {"error": "overloaded", "limit": "max_pending_requests"}
        assert metric(p, "meshlet_overloaded_total") == 2
        assert hang.count() == 2
    finally:
        for s in socks:
            s.close()
