"""HTTP listeners: per-request policy (methods, paths, headers, peers), the
head the app receives (x-forwarded-client-cert, x-request-id, normalised
path, verbatim query), pipelining, keep-alive across a reload, access log
and metrics.

The pair is frontend's outbound (http) -> orders' inbound (http) -> HttpApp,
which records every request it receives.
"""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from helpers import spiffe, wait_for
from http_helpers import HttpClient, exchange, frontend_ctx, http_mesh, request

FRONTEND, PAYMENTS, ORDERS = spiffe("frontend"), spiffe("payments"), spiffe("orders")
XFCC_OK = f"By={ORDERS};URI={FRONTEND}"

RULES = [
    {"name": "reads", "action": "allow", "from": [FRONTEND], "methods": ["GET", "HEAD"],
     "paths": ["/orders", "/orders/*"]},
    {"name": "tenant-writes", "action": "allow", "from": [FRONTEND], "methods": ["POST"],
     "paths": ["/orders/*"], "headers": {"x-tenant": "acme"}},
    {"name": "ops", "action": "allow", "from": [FRONTEND], "paths": ["/ops/*"]},
    {"name": "no-ops-delete", "action": "deny", "from": ["*"], "methods": ["DELETE"],
     "paths": ["/ops/*"]},
    {"name": "no-admin", "action": "deny", "from": ["*"], "paths": ["/admin", "/admin/*"]},
]

# (id, method, target, headers, body, status, rule that decides)
CASES = [
    ("get-exact", "GET", "/orders", [], None, 200, "reads"),
    ("get-prefix", "GET", "/orders/42", [], None, 200, "reads"),
    ("head", "HEAD", "/orders/42", [], None, 200, "reads"),
    ("method-not-listed", "DELETE", "/orders/42", [], None, 403, "default"),
    ("prefix-is-a-segment", "GET", "/ordersX", [], None, 403, "default"),
    ("path-not-listed", "GET", "/other", [], None, 403, "default"),
    ("header-match", "POST", "/orders/42", [("x-tenant", "acme")], b"{}", 200, "tenant-writes"),
    ("header-name-case", "POST", "/orders/42", [("X-Tenant", "acme")], b"{}", 200, "tenant-writes"),
    ("header-value-exact", "POST", "/orders/42", [("x-tenant", "ACME")], b"{}", 403, "default"),
    ("header-missing", "POST", "/orders/42", [], b"{}", 403, "default"),
    ("header-missing-nobody", "POST", "/orders/42", [], None, 403, "default"),
    ("deny-path", "GET", "/admin/x", [], None, 403, "no-admin"),
    ("deny-exact", "GET", "/admin", [], None, 403, "no-admin"),
    ("deny-wins-over-allow", "DELETE", "/ops/1", [], None, 403, "no-ops-delete"),
    ("allow-other-method", "PUT", "/ops/1", [], b"x", 200, "ops"),
    # Method overrides (an app may act on them): both methods must be allowed.
    ("override-to-denied", "PUT", "/ops/1", [("X-HTTP-Method-Override", "DELETE")], b"x", 403,
     "no-ops-delete"),
    ("override-lowercase", "PUT", "/ops/1", [("x-method-override", "delete")], b"x", 403,
     "no-ops-delete"),
    ("override-unlisted", "GET", "/orders/42", [("X-HTTP-Method", "DELETE")], None, 403, "default"),
    ("override-allowed", "GET", "/orders/42", [("X-HTTP-Method-Override", "HEAD")], None, 200,
     "reads"),
    ("override-twice", "GET", "/orders/42", [("X-HTTP-Method-Override", "GET"),
                                             ("X-HTTP-Method-Override", "DELETE")], None, 400, None),
    ("override-not-a-method", "GET", "/orders/42", [("X-HTTP-Method-Override", "GET DELETE")],
     None, 400, None),
    # A header the policy evaluates, twice: refused, never first-wins.
    ("header-twice", "POST", "/orders/42", [("x-tenant", "acme"), ("x-tenant", "evil")], b"{}",
     400, None),
    ("header-twice-underscore", "POST", "/orders/42", [("x-tenant", "acme"), ("x_tenant", "evil")],
     b"{}", 400, None),
]


def app_saw(app, rid):
    return [r for r in app.requests if r.header_values("x-request-id") == [rid]]


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_allow_and_deny_by_method_path_header(mesh, pki, via):
    hm = http_mesh(mesh, RULES, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    problems = []
    for i, (cid, method, target, headers, body, status, rule) in enumerate(CASES):
        rid = f"case-{i:02d}-{via[:3]}"
        with HttpClient(port, ctx) as c:
            c.send(request(method, target, headers=headers + [("x-request-id", rid)], body=body))
            resp = c.read_response(head_request=method == "HEAD")
        if resp is None:
            problems.append(f"{cid}: no response")
            continue
        if resp.status != status:
            problems.append(f"{cid}: {method} {target} answered {resp.status}, expected {status}"
                            f" ({resp.body[:200]!r})")
            continue
        if status == 403:
            assert resp.header("content-type") == "application/json", (cid, resp.headers)
            doc = resp.json()
            if doc != {"error": "forbidden", "rule": rule}:
                problems.append(f"{cid}: 403 body {doc}, expected the rule {rule!r}")
        e = hm.inb.wait_access(request_id=rid)
        if e.get("status") != status or (rule and e.get("rule") != rule):
            problems.append(f"{cid}: access log {e}")
        if status == 200:
            assert e.get("decision") == "allow", e
            seen = wait_for(lambda: app_saw(hm.app, rid), 5, what=f"{cid} at the app")
            if len(seen) != 1 or seen[0].method != method or seen[0].path != target:
                problems.append(f"{cid}: the app saw {seen}")
        elif status == 403:
            assert e.get("decision") == "deny", e
    # Every refused case: nothing of it reached the app.
    for i, (cid, method, target, headers, body, status, rule) in enumerate(CASES):
        if status != 200 and app_saw(hm.app, f"case-{i:02d}-{via[:3]}"):
            problems.append(f"{cid}: reached the app although answered {status}")
    allowed = sum(1 for c in CASES if c[5] == 200)
    assert len(hm.app.requests) == allowed, [r.line for r in hm.app.requests]
    assert not problems, "\n".join(problems)


def test_denied_by_peer_identity(mesh, pki):
    """The L4 fields still apply per request: payments is not in any allow rule."""
    hm = http_mesh(mesh, RULES, outbound=False)
    resp = exchange(hm.in_port, request("GET", "/orders/1", headers=[("x-request-id", "p1")]),
                    frontend_ctx(pki, "payments"))
    assert resp.status == 403 and resp.json() == {"error": "forbidden", "rule": "default"}
    e = hm.inb.wait_access(request_id="p1")
    assert e["peer"] == PAYMENTS and e["decision"] == "deny", e
    resp = exchange(hm.in_port, request("GET", "/admin/1"), frontend_ctx(pki, "payments"))
    assert resp.json()["rule"] == "no-admin"
    assert hm.app.requests == []


def test_denied_without_body_keeps_connection_usable(mesh, pki):
    hm = http_mesh(mesh, RULES)
    with HttpClient(hm.out_port) as c:
        for target, status in [("/orders/1", 200), ("/admin/x", 403), ("/orders/2", 200),
                               ("/other", 403), ("/orders/3", 200)]:
            c.send(request("GET", target))
            r = c.read_response()
            assert r is not None and r.status == status, (target, r)
            assert (r.header("connection") or "").lower() != "close", (target, r.headers)
    assert hm.app.paths() == ["/orders/1", "/orders/2", "/orders/3"]
    # All three over one connection of the inbound's pool to the app; the
    # inbound still opens its own connection to the app per mesh
    # connection (idle here), hence at most two.
    assert hm.app.connections <= 2
    assert len({r.conn for r in hm.app.requests}) == 1


@pytest.mark.parametrize("via", ["outbound", "inbound-direct"])
def test_denied_with_body_closes_connection(mesh, pki, via):
    """A denied request with a body: 403 with connection: close, and the
    connection ends; nothing after it (not even a request hidden in the
    body, nor the pipelined request behind it) reaches the app."""
    hm = http_mesh(mesh, RULES, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    smuggled = request("GET", "/orders/smuggled")
    with HttpClient(port, ctx) as c:
        c.send(request("POST", "/orders/1", body=smuggled) + request("GET", "/orders/after"))
        r = c.read_response()
        assert r.status == 403, r
        assert r.json() == {"error": "forbidden", "rule": "default"}
        if via == "outbound":
            # Through the pool between sidecars the client's connection is
            # its own: the outbound framed the body (content-length), so the
            # pipelined GET is a request of its own and is answered; the
            # request hidden in the body never is.
            assert c.read_response().status == 200
            assert hm.app.paths() == ["/orders/after"]
            return
        assert (r.header("connection") or "").lower() == "close", r.headers
        assert c.closed_within(5), "the connection stays open after a 403 with connection: close"
    assert hm.app.requests == []


@pytest.mark.parametrize("via", [
    "outbound",
    "inbound-direct"])
def test_no_answer_invented_after_connection_close(mesh, pki, via):
    """After a response with connection: close, the requests pipelined behind
    it were not processed: the client must see the connection end, not a
    502 that claims the gateway failed them."""
    hm = http_mesh(mesh, RULES, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx) as c:
        c.send(request("POST", "/orders/1", body=b"denied") + request("GET", "/orders/after"))
        assert c.read_response().status == 403
        r = c.read_response()
        if via == "outbound":
            # The pool between sidecars: the inbound's connection: close ends
            # no client connection; the next request is really processed.
            assert r is not None and r.status == 200 and hm.app.paths() == ["/orders/after"]
            return
        assert r is None, f"answer {r.status} for a request the upstream never processed"


def test_forwarded_client_cert_set_once(mesh, pki):
    """Whatever copies the client sends (any case, '_' for '-'), the app gets
    exactly one x-forwarded-client-cert, set by the inbound from the verified
    peer: By=<orders>;URI=<caller>."""
    rules = [{"name": "all", "action": "allow", "from": ["*"]}]
    hm = http_mesh(mesh, rules)
    forged = [("x-forwarded-client-cert", f"By={ORDERS};URI={spiffe('admin')}"),
              ("X-Forwarded-Client-Cert", "URI=spiffe://mesh.local/svc/root"),
              ("x_forwarded_client_cert", f"By={ORDERS};URI={spiffe('admin')}"),
              ("X_FORWARDED_CLIENT_CERT", "Hash=00")]
    # Through the pair: each forged copy alone, then all of them.
    for i, h in enumerate([[f] for f in forged] + [forged] + [[]]):
        r = exchange(hm.out_port, request("GET", f"/x/{i}", headers=h))
        assert r.status == 200, r
    # Straight to the inbound as payments.
    r = exchange(hm.in_port, request("GET", "/direct", headers=forged), frontend_ctx(pki, "payments"))
    assert r.status == 200, r
    reqs = hm.app.wait_requests(len(forged) + 3)
    for seen in reqs:
        want = f"By={ORDERS};URI={PAYMENTS}" if seen.path == "/direct" else XFCC_OK
        got = seen.header_values("x-forwarded-client-cert")
        assert got == [want], f"{seen.path}: the app got x-forwarded-client-cert {got}; headers {seen.headers}"


def test_request_id_added_or_kept(mesh, pki):
    rules = [{"name": "all", "action": "allow", "from": ["*"]}]
    hm = http_mesh(mesh, rules)
    assert exchange(hm.out_port, request("GET", "/no-id")).status == 200
    assert exchange(hm.out_port, request("GET", "/with-id",
                                         headers=[("X-Request-Id", "abc-123")])).status == 200
    assert exchange(hm.in_port, request("GET", "/direct-no-id"), frontend_ctx(pki)).status == 200
    reqs = {r.path: r for r in hm.app.wait_requests(3)}
    for p in ("/no-id", "/direct-no-id"):
        ids = reqs[p].header_values("x-request-id")
        assert len(ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", ids[0]), (p, reqs[p].headers)
        e = hm.inb.wait_access(path=p)
        assert e["request_id"] == ids[0], e
    assert reqs["/with-id"].header_values("x-request-id") == ["abc-123"]
    hm.inb.wait_access(path="/with-id", request_id="abc-123")
    # The proxy's own answers carry the ID too.
    hm2 = http_mesh(mesh, [], outbound=False)
    r = exchange(hm2.in_port, request("GET", "/denied", headers=[("x-request-id", "r-403")]),
                 frontend_ctx(pki))
    assert r.status == 403 and r.header("x-request-id") == "r-403", r


def test_path_normalised_and_query_verbatim(mesh, pki):
    rules = [{"name": "orders", "action": "allow", "from": [FRONTEND], "paths": ["/orders/*"]}]
    hm = http_mesh(mesh, rules)
    query = "x=%2F..%2f&y=/admin/../&z=a+b%20c&&w=&%7e=~"
    r = exchange(hm.out_port, request("GET", f"/orders/./a/..//b%7e%41?{query}"))
    assert r.status == 200, r
    seen = hm.app.wait_requests(1)[0]
    assert seen.path == "/orders/b~A" and seen.query == query, seen.line
    # A query never takes part in the match.
    r = exchange(hm.out_port, request("GET", "/other?/orders/x"))
    assert r.status == 403
    r = exchange(hm.out_port, request("GET", "/orders/y?"))
    assert r.status == 200
    assert hm.app.requests[-1].target == "/orders/y?", hm.app.requests[-1].line


def test_pipelined_allowed_denied_allowed(mesh, pki):
    """Three requests in one write: three answers in order; the app sees
    only the allowed two."""
    hm = http_mesh(mesh, RULES)
    for port, ctx in ((hm.out_port, None), (hm.in_port, frontend_ctx(pki))):
        before = len(hm.app.requests)
        with HttpClient(port, ctx) as c:
            c.send(request("GET", "/orders/p1") + request("GET", "/admin/p2")
                   + request("GET", "/orders/p3"))
            r1, r2, r3 = c.read_response(), c.read_response(), c.read_response()
        assert (r1.status, r2.status, r3.status) == (200, 403, 200), (r1, r2, r3)
        assert r1.json()["path"] == "/orders/p1" and r3.json()["path"] == "/orders/p3"
        assert r2.json() == {"error": "forbidden", "rule": "no-admin"}
        assert [r.path for r in hm.app.requests[before:]] == ["/orders/p1", "/orders/p3"]


def test_pipelined_many_in_one_write(mesh, pki):
    """More pipelined requests than the proxy keeps in flight, denied ones
    mixed in: every answer comes back, in order."""
    hm = http_mesh(mesh, RULES)
    targets = [("/admin/%d" % i if i % 3 == 1 else "/orders/%d" % i) for i in range(40)]
    with HttpClient(hm.out_port) as c:
        c.send(b"".join(request("GET", t) for t in targets))
        got = []
        for t in targets:
            r = c.read_response()
            assert r is not None, f"no answer for {t} after {len(got)}"
            got.append((t, r.status, r.json().get("path", r.json().get("rule"))))
    want = [(t, 403, "no-admin") if t.startswith("/admin") else (t, 200, t) for t in targets]
    assert got == want
    assert hm.app.paths() == [t for t in targets if t.startswith("/orders")]


def write_json(path, doc):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def test_keepalive_across_policy_reload(mesh, pki):
    """docs/design.md: existing connections keep the snapshot they started with.
    A keep-alive connection opened under v1 goes on being decided by v1
    after SIGHUP installs v2; new connections are decided by v2. The pooled
    HTTP/2 connections between sidecars are drained on a new policy, so the
    requests they carry next are decided by v2."""
    v1 = [{"name": "v1", "action": "allow", "from": [FRONTEND], "paths": ["/v1/*"]}]
    v2 = [{"name": "v2", "action": "allow", "from": [FRONTEND], "paths": ["/v2/*"]}]
    hm = http_mesh(mesh, v1)
    ctx = frontend_ctx(pki)
    held_in = HttpClient(hm.in_port, ctx)            # straight to the inbound
    held_out = HttpClient(hm.out_port)               # through the pair
    for c in (held_in, held_out):
        c.send(request("GET", "/v1/a"))
        assert c.read_response().status == 200
    v0 = hm.inb.metrics().get("meshlet_config_version")
    write_json(hm.inb.cfg["policy_file"], {"service": "orders", "default": "deny", "rules": v2})
    hm.inb.signal(signal.SIGHUP)
    wait_for(lambda: hm.inb.metrics().get("meshlet_config_version") > v0, 10,
             what="meshlet_config_version to grow after SIGHUP")

    # New connections: v2.
    assert exchange(hm.in_port, request("GET", "/v2/new"), ctx).status == 200
    r = exchange(hm.in_port, request("GET", "/v1/new"), ctx)
    assert r.status == 403 and r.json()["rule"] == "default"
    assert exchange(hm.out_port, request("GET", "/v2/new-out")).status == 200
    # The held HTTP/1.1 connection to the inbound: still v1, and still usable.
    held_in.send(request("GET", "/v1/b"))
    r = held_in.read_response()
    assert r is not None and r.status == 200, r
    held_in.send(request("GET", "/v2/b"))
    r = held_in.read_response()
    assert r is not None and r.status == 403 and r.json()["rule"] == "default", r
    # The app's connection to the outbound is not a connection to the
    # inbound: its requests ride the pool between the sidecars, whose
    # connections the inbound drained on the new policy. v2 decides them.
    held_out.send(request("GET", "/v2/b"))
    r = held_out.read_response()
    assert r is not None and r.status == 200, r
    held_out.send(request("GET", "/v1/b"))
    r = held_out.read_response()
    assert r is not None and r.status == 403 and r.json()["rule"] == "default", r
    held_in.send(request("GET", "/v1/c"))
    assert held_in.read_response().status == 200
    for c in (held_in, held_out):
        c.close()
    assert sorted(hm.app.paths()) == sorted(["/v1/a", "/v1/a", "/v2/new", "/v2/new-out",
                                             "/v1/b", "/v1/c", "/v2/b"])
    hm.inb.wait_access(path="/v2/new", rule="v2")
    hm.inb.wait_access(path="/v1/c", rule="v1")


def test_access_log_and_metrics(mesh, pki):
    hm = http_mesh(mesh, RULES)
    m0 = hm.inb.metrics()
    c403 = m0.get("meshlet_http_requests_total", code="403")
    c200 = m0.get("meshlet_http_requests_total", code="200")
    hist = m0.get("meshlet_request_duration_seconds_count")
    deny = m0.get("meshlet_policy_decisions_total", decision="deny", rule="no-admin")
    allow = m0.get("meshlet_policy_decisions_total", decision="allow", rule="reads")

    body = b"0123456789"
    r = exchange(hm.out_port, request("POST", "/admin/m", headers=[("x-request-id", "m-deny")], body=body))
    assert r.status == 403
    r = exchange(hm.out_port, request("GET", "/orders/m", headers=[("x-request-id", "m-allow")]))
    assert r.status == 200

    def moved():
        m = hm.inb.metrics()
        return (m.get("meshlet_http_requests_total", code="403") == c403 + 1
                and m.get("meshlet_http_requests_total", code="200") == c200 + 1
                and m.get("meshlet_request_duration_seconds_count") == hist + 2
                and m.get("meshlet_policy_decisions_total", decision="deny", rule="no-admin") == deny + 1
                and m.get("meshlet_policy_decisions_total", decision="allow", rule="reads") == allow + 1
                and m)
    m = wait_for(moved, 5, what="the inbound's HTTP metrics to count one 403 and one 200")
    assert "meshlet_request_duration_seconds_bucket" in m.names()
    assert m.get("meshlet_request_duration_seconds_bucket", le="+Inf") == hist + 2

    e = hm.inb.wait_access(request_id="m-deny")
    for k in ("time", "direction", "peer", "method", "path", "request_id", "status", "decision",
              "rule", "bytes_in", "bytes_out", "duration_ms"):
        assert k in e, f"access log entry without {k}: {e}"
    assert (e["protocol"], e["direction"], e["peer"], e["method"], e["path"], e["status"],
            e["decision"], e["rule"]) == ("http", "inbound", FRONTEND, "POST", "/admin/m", 403,
                                          "deny", "no-admin"), e
    assert e["bytes_out"] > 0 and e["duration_ms"] >= 0, e
    e = hm.inb.wait_access(request_id="m-allow")
    assert (e["status"], e["decision"], e["rule"], e["path"]) == (200, "allow", "reads", "/orders/m"), e
    assert e["bytes_in"] > 0 and e["bytes_out"] > len(b'{"method": "GET"}'), e
    # The outbound logs the requests it relayed too.
    e = hm.outb.wait_access(request_id="m-allow")
    assert e["protocol"] == "http" and e["direction"] == "outbound" and e["status"] == 200, e


@pytest.mark.parametrize("via", ["inbound-direct", "outbound"])
def test_denied_head_keeps_keepalive_in_sync(mesh, pki, via):
    hm = http_mesh(mesh, RULES, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    with HttpClient(port, ctx, timeout=3) as c:
        c.send(request("HEAD", "/admin/x") + request("GET", "/orders/1"))
        r1 = c.read_response(head_request=True)
        assert r1.status == 403, r1
        r2 = c.read_response()
        assert r2 is not None and r2.status == 200 and r2.json()["path"] == "/orders/1", r2


@pytest.mark.parametrize("ids", [["r" * 40], ["id-a", "id-b"]], ids=["long", "repeated"])
def test_request_id_matches_the_logs(mesh, pki, ids):
    rules = [{"name": "all", "action": "allow", "from": ["*"]}]
    hm = http_mesh(mesh, rules)
    r = exchange(hm.out_port, request("GET", "/rid", headers=[("x-request-id", i) for i in ids]))
    assert r.status == 200
    seen = hm.app.wait_requests(1)[0].header_values("x-request-id")
    e_in, e_out = hm.inb.wait_access(path="/rid"), hm.outb.wait_access(path="/rid")
    assert len(seen) == 1 and seen[0] == e_in["request_id"] == e_out["request_id"], \
        (seen, e_in["request_id"], e_out["request_id"])


def denied_upload(port, ctx, size):
    """POST /admin/upload with a size-byte body, sent whole before the
    response is read (what most clients do without Expect: 100-continue).
    Returns the response, or None when it was lost."""
    import threading
    with HttpClient(port, ctx, timeout=10) as c:
        def send():
            try:
                c.send(b"POST /admin/upload HTTP/1.1\r\nhost: orders\r\ncontent-length: %d\r\n\r\n" % size)
                c.sock.sendall(b"x" * size)
            except OSError:
                pass
        t = threading.Thread(target=send, daemon=True)
        t.start()
        t.join(10)
        time.sleep(0.2)
        try:
            return c.read_response()
        except (AssertionError, OSError):
            return None


@pytest.mark.parametrize("via", [
    "outbound",
    "inbound-direct"])
def test_denied_upload_still_gets_403(mesh, pki, via):
    hm = http_mesh(mesh, RULES, outbound=via == "outbound")
    port, ctx = (hm.out_port, None) if via == "outbound" else (hm.in_port, frontend_ctx(pki))
    got = [getattr(denied_upload(port, ctx, size), "status", None) for size in (64 << 10, 4 << 20)]
    assert got == [403, 403], got
    assert hm.app.requests == []


def test_decisions_counted_per_request_only(mesh, pki):
    """On an http listener each request is one decision; the connection is
    not counted too (a deny rule naming paths would match it at L4)."""
    hm = http_mesh(mesh, RULES)
    before = hm.inb.metrics().by_label("meshlet_policy_decisions_total", "rule")
    with HttpClient(hm.out_port) as c:
        for t in ("/orders/1", "/orders/2", "/orders/3"):
            c.send(request("GET", t))
            assert c.read_response().status == 200
    hm.inb.wait_access(path="/orders/3")
    after = hm.inb.metrics().by_label("meshlet_policy_decisions_total", "rule")
    moved = {r: after.get(r, 0) - before.get(r, 0) for r in after if after.get(r, 0) != before.get(r, 0)}
    assert moved == {"reads": 3}, moved
