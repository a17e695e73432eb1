"""meshlet-control's API refusals and limits: who may call what, join tokens,
CSR checks, request validation and size limits, and If-Match under
concurrent writers. Requests go straight to the daemon with Python's
http.client (mTLS with SVIDs obtained from it), as a proxy would."""

import json
import ssl
import threading
import time

from control_helpers import (Identity, assert_refused, control, control_factory,  # noqa: F401
                             csr_naming, csr_with_bad_signature, enroll, new_svid, policy_doc,
                             request, spiffe)


def test_health_and_admin_token_required(control):
    assert control.api("GET", "/v1/health", token=None).status == 200
    admin = [("GET", "/v1/policies", None), ("GET", "/v1/policies/orders", None),
             ("PUT", "/v1/policies/orders", policy_doc("orders")),
             ("DELETE", "/v1/policies/orders", None),
             ("POST", "/v1/tokens", {"service": "orders"}), ("GET", "/v1/proxies", None),
             ("GET", "/v1/certs", None), ("POST", "/v1/certs/rotate", {"all": True}),
             ("POST", "/v1/certs/revoke", {"serial": "abcd"}), ("GET", "/v1/ca", None),
             ("POST", "/v1/ca/rotate", {}),
             ("POST", "/v1/check", {"from": spiffe("a"), "service": "orders", "port": 80})]
    for method, path, body in admin:
        # no token
        assert_refused(control.api(method, path, body, token=None), 401)
        # a wrong token, of the right length and of another
        assert_refused(control.api(method, path, body, token="0" * 64), 401, 403)
        assert_refused(control.api(method, path, body, token=control.token[:-1]), 401, 403)
        # not Bearer
        assert_refused(control.api(method, path, body, token=None,
                                   headers={"Authorization": f"Basic {control.token}"}), 401, 403)
    # nothing was changed by all that
    assert control.api("GET", "/v1/policies").json == {"policies": []}
    assert control.api("GET", "/v1/ca").json["phase"] == "stable"


def test_join_token_expiry_and_uses(control, tmp_path):
    # an expired token
    r = control.api("POST", "/v1/tokens", {"service": "orders", "ttl_seconds": 1, "uses": 5})
    assert r.status in (200, 201), r
    expired = r.json["token"]
    assert r.json["service"] == "orders"
    time.sleep(2.2)
    ident = Identity(tmp_path / "x", "orders")
    e = assert_refused(enroll(control, ident, token=expired), 401, 403)
    assert "expired" in e[1], e

    # a one-use token used twice
    once = control.join_token("orders", uses=1)
    assert enroll(control, Identity(tmp_path / "y", "orders"), token=once).status in (200, 201)
    assert_refused(enroll(control, Identity(tmp_path / "z", "orders"), token=once), 401, 403)

    # a two-use token: twice, not three times
    twice = control.join_token("payments", uses=2)
    for i in range(2):
        r = enroll(control, Identity(tmp_path / f"p{i}", "payments"), token=twice)
        assert r.status in (200, 201), r
    assert_refused(enroll(control, Identity(tmp_path / "p3", "payments"), token=twice), 401, 403)

    # a made-up token of the right format, garbage, the admin token: no SVID
    fake = once[:-5] + ("AAAAA" if not once.endswith("AAAAA") else "BBBBB")
    for tok in (fake, "garbage", control.token):
        assert_refused(enroll(control, Identity(tmp_path / "f", "orders"), token=tok), 400, 401, 403)
    # no credentials at all
    assert_refused(enroll(control, Identity(tmp_path / "n", "orders")), 401, 403)
    # the admin token is not a join token either way round: a join token is not admin
    assert_refused(control.api("GET", "/v1/policies", token=twice), 401, 403)


def test_svid_contents(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    assert a.uri_sans() == [spiffe("orders")]
    assert len(a.serial) >= 16 and a.serial == a.serial.lower()
    assert a.expires_at.endswith("Z")
    from helpers import run
    text = run(["openssl", "x509", "-in", str(a.cert), "-noout", "-text"])
    assert "CA:FALSE" in text and "TLS Web Server Authentication" in text \
        and "TLS Web Client Authentication" in text
    # the CSR's own subject/SAN asked for another identity: ignored
    other = csr_naming(tmp_path / "q", "orders", spiffe("payments"))
    r = enroll(control, other, token=control.join_token("orders"))
    if r.status in (200, 201):
        assert other.uri_sans() == [spiffe("orders")]
    else:
        assert_refused(r, 400, 403)


def test_svid_entitles_only_its_own_service(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    b = new_svid(control, tmp_path, "payments")
    ok = control.api("GET", "/v1/services/orders/config?after=0&wait=0", token=None, svid=a)
    assert ok.status == 200, ok
    assert control.api("GET", "/v1/bundle", token=None, svid=a).status == 200

    # A asking for B's config or registering as B
    assert_refused(control.api("GET", "/v1/services/payments/config?after=0&wait=0", token=None, svid=a), 403)
    assert_refused(control.api("POST", "/v1/services/payments/endpoints",
                               {"address": "127.0.0.1:15006"}, token=None, svid=a), 403)
    # A asking for an SVID of B: explicitly, and with a CSR naming B
    ident = Identity(tmp_path / "a2", "orders")
    assert_refused(control.api("POST", "/v1/svid", {"csr": ident.csr_pem(), "service": "payments"},
                               token=None, svid=a), 403)
    ask_b = csr_naming(tmp_path / "a3", "orders", spiffe("payments"))
    r = control.api("POST", "/v1/svid", {"csr": ask_b.csr_pem()}, token=None, svid=a)
    if r.status in (200, 201):
        ask_b.enrolled(r.json)
        assert ask_b.uri_sans() == [spiffe("orders")]
    else:
        assert_refused(r, 400, 403)
    # A renews itself over mTLS
    renew = Identity(tmp_path / "a4", "orders")
    r = enroll(control, renew, svid=a)
    assert r.status in (200, 201), r
    assert renew.uri_sans() == [spiffe("orders")]

    # a proxy SVID is not an admin credential
    for method, path, body in (("GET", "/v1/policies", None), ("POST", "/v1/tokens", {"service": "payments"}),
                               ("GET", "/v1/ca", None), ("POST", "/v1/ca/rotate", {})):
        assert_refused(control.api(method, path, body, token=None, svid=a), 401, 403)
    # the bundle and configs need a proxy SVID
    assert_refused(control.api("GET", "/v1/bundle", token=None), 401, 403)
    assert_refused(control.api("GET", "/v1/services/orders/config?wait=0", token=None), 401, 403)


def test_foreign_client_certificate_refused(control, tmp_path, pki):
    """An SVID from another CA (the dev CA of the proxy tests) gets nothing."""
    foreign = pki.svid("orders")
    try:
        r = control.api("GET", "/v1/bundle", token=None, svid=foreign)
        assert_refused(r, 401, 403)
    except (ssl.SSLError, OSError):
        pass


def test_csr_checks(control, tmp_path):
    tok = control.join_token("orders", uses=10)
    good = Identity(tmp_path / "good", "orders")
    e = assert_refused(control.api("POST", "/v1/svid", {"csr": csr_with_bad_signature(good)}, token=tok), 400)
    assert e[2] == "csr" and "signature" in e[1], e
    weak = Identity(tmp_path / "weak", "orders", key_type="rsa1024")
    e = assert_refused(enroll(control, weak, token=tok), 400)
    assert e[2] == "csr" and "RSA" in e[1] and "P-256" in e[1], e
    p384 = Identity(tmp_path / "p384", "orders", key_type="p384")
    assert_refused(enroll(control, p384, token=tok), 400)
    assert_refused(control.api("POST", "/v1/svid", {"csr": "not a csr"}, token=tok), 400)
    assert_refused(control.api("POST", "/v1/svid", {}, token=tok), 400)
    # the refusals consumed no use: the good CSR still gets its SVID
    assert enroll(control, good, token=tok).status in (200, 201)


def test_request_validation(control):
    # body over 1 MiB
    big = json.dumps({"service": "orders", "rules": [], "x": "a" * (2 * 1024 * 1024)}).encode()
    try:
        r = control.api("PUT", "/v1/policies/orders", raw=big)
        assert_refused(r, 413)
    except (ConnectionError, ssl.SSLError) as e:
        raise AssertionError(f"2 MiB body: connection dropped without a 413 answer: {e!r}")
    # nesting 40 deep
    deep = {"service": "orders", "rules": []}
    inner = "x"
    for _ in range(40):
        inner = [inner]
    deep["extra"] = inner
    assert_refused(control.api("PUT", "/v1/policies/orders", body=deep), 400)
    deep_rules = '{"service":"orders","rules":' + "[" * 40 + "]" * 40 + "}"
    assert_refused(control.api("PUT", "/v1/policies/orders", raw=deep_rules.encode()), 400)
    # invalid UTF-8
    bad = b'{"service":"orders","rules":[{"name":"a\xff\xfe","action":"allow"}]}'
    assert_refused(control.api("PUT", "/v1/policies/orders", raw=bad), 400)
    # unknown field, top level and nested
    e = assert_refused(control.api("PUT", "/v1/policies/orders", body={"service": "orders", "colour": "red"}), 400)
    assert "colour" in (e[2] or "") + e[1]
    assert_refused(control.api("POST", "/v1/tokens", {"service": "orders", "ttl": 5}), 400)
    # not JSON, duplicate keys, not an object
    assert_refused(control.api("PUT", "/v1/policies/orders", raw=b"{nope"), 400)
    assert_refused(control.api("PUT", "/v1/policies/orders",
                               raw=b'{"service":"orders","service":"orders","rules":[]}'), 400)
    assert_refused(control.api("PUT", "/v1/policies/orders", raw=b"[]"), 400)
    # the URL and the document disagree
    assert_refused(control.api("PUT", "/v1/policies/orders", body=policy_doc("payments")), 400)
    # a policy error carries its JSON path
    e = assert_refused(control.api("PUT", "/v1/policies/orders",
                                   body={"service": "orders", "rules": [{"name": "a", "action": "allow",
                                                                         "ports": [0]}]}), 400)
    assert e[2] == "rules[0].ports[0]", e
    # token and rotate bodies
    assert_refused(control.api("POST", "/v1/tokens", {"service": "orders", "ttl_seconds": 0}), 400)
    assert_refused(control.api("POST", "/v1/tokens", {"service": "orders", "uses": -1}), 400)
    assert_refused(control.api("POST", "/v1/certs/rotate", {}), 400)
    assert_refused(control.api("POST", "/v1/certs/rotate", {"all": True, "service": "orders"}), 400)
    # unknown routes and methods
    assert_refused(control.api("GET", "/v1/nothing"), 404)
    r = control.api("PATCH", "/v1/policies/orders", body=policy_doc("orders"))
    assert r.status in (404, 405), r
    # nothing of all that was stored; the daemon is still fine
    assert control.api("GET", "/v1/policies").json == {"policies": []}
    assert control.alive()


def test_etag_and_if_match_header_forms(control):
    r = control.put_policy(policy_doc("orders"))
    assert r.status in (200, 201), r
    v = r.json["version"]
    assert r.headers.get("etag", "").strip('"') == str(v)
    g = control.api("GET", "/v1/policies/orders")
    assert g.json["version"] == v and g.headers.get("etag", "").strip('"') == str(v)
    assert control.put_policy(policy_doc("orders"), if_match=f'"{v}"').status in (200, 201)
    assert_refused(control.put_policy(policy_doc("orders"), if_match=f'"{v}"'), 412)
    assert_refused(control.put_policy(policy_doc("orders"), if_match="soon"), 400, 412)
    # "*": only if it exists
    assert control.put_policy(policy_doc("orders"), if_match="*").status in (200, 201)
    assert_refused(control.put_policy(policy_doc("fresh"), if_match="*"), 412)


def test_concurrent_writers_with_if_match(control):
    r = control.put_policy(policy_doc("orders"))
    start = r.json["version"]
    n = 8
    barrier = threading.Barrier(n)
    results = [None] * n
    token, ctx = control.token, control.context()

    def writer(i):
        doc = policy_doc("orders", [{"name": f"writer-{i}", "action": "allow"}])
        barrier.wait()
        results[i] = request(control.port, ctx, "PUT", "/v1/policies/orders", body=doc, token=token,
                             headers={"If-Match": str(start)})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = sorted(r.status for r in results)
    winners = [i for i, r in enumerate(results) if 200 <= r.status < 300]
    assert len(winners) == 1, statuses
    assert statuses.count(412) == n - 1, statuses
    for r in results:
        if r.status == 412:
            assert_refused(r, 412)
    final = control.api("GET", "/v1/policies/orders").json
    assert final["version"] == start + 1 == results[winners[0]].json["version"]
    assert final["policy"]["rules"][0]["name"] == f"writer-{winners[0]}"


def test_concurrent_read_modify_write_loses_nothing(control):
    """N threads each add K rules with GET + PUT If-Match, retrying on 412:
    every one of the N*K rules is there at the end."""
    control.put_policy(policy_doc("counter"))
    n, k = 4, 6
    token, ctx = control.token, control.context()
    errors = []

    def worker(i):
        for j in range(k):
            for _attempt in range(200):
                g = request(control.port, ctx, "GET", "/v1/policies/counter", token=token)
                doc = g.json["policy"]
                doc["rules"] = doc.get("rules", []) + [{"name": f"w{i}-{j}", "action": "allow"}]
                p = request(control.port, ctx, "PUT", "/v1/policies/counter", body=doc, token=token,
                            headers={"If-Match": str(g.json["version"])})
                if 200 <= p.status < 300:
                    break
                if p.status != 412:
                    errors.append(p)
                    return
            else:
                errors.append(f"worker {i}: no success after 200 attempts")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    names = {r["name"] for r in control.api("GET", "/v1/policies/counter").json["policy"]["rules"]}
    assert names == {f"w{i}-{j}" for i in range(n) for j in range(k)}


def test_config_long_poll_wakes_on_policy_change(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    first = control.api("GET", "/v1/services/orders/config?after=0&wait=0", token=None, svid=a)
    assert first.status == 200, first
    v = first.json["version"]
    got = {}

    def poll():
        t0 = time.monotonic()
        got["r"] = control.api("GET", f"/v1/services/orders/config?after={v}&wait=20", token=None,
                               svid=a, timeout=30)
        got["t"] = time.monotonic() - t0

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    assert control.put_policy(policy_doc("orders", [{"name": "new", "action": "allow"}])).status in (200, 201)
    t.join(30)
    assert got["r"].status == 200, got["r"]
    assert got["r"].json["version"] > v
    assert got["t"] < 10, f"long poll answered after {got['t']:.1f}s"
    assert got["r"].json["policy"]["rules"][0]["name"] == "new"


def test_keepalive_requests_are_not_delayed(control, tmp_path):
    """Requests on one keep-alive connection (what proxies do) answer in
    about the time the work takes: no 40 ms Nagle / delayed-ACK stall per
    answer (the daemon must set TCP_NODELAY)."""
    import http.client
    a = new_svid(control, tmp_path, "orders")
    conn = http.client.HTTPSConnection("127.0.0.1", control.port, context=control.context(a), timeout=10)
    lat = []
    try:
        for _ in range(30):
            t0 = time.monotonic()
            r = request(control.port, None, "GET", "/v1/bundle", conn=conn)
            lat.append(time.monotonic() - t0)
            assert r.status == 200, r
            assert r.headers.get("connection", "").lower() != "close"
    finally:
        conn.close()
    lat.sort()
    median = lat[len(lat) // 2]
    assert median < 0.025, f"median {median * 1000:.1f} ms per keep-alive request " \
                           f"(min {lat[0] * 1000:.1f}, max {lat[-1] * 1000:.1f})"
