"""The proxies' counter summaries and GET /v1/stats: real control and
control-mode proxies on 127.0.0.1, real traffic; summaries that are too
big, malformed or lie are refused without losing the long poll; 10,000
callers keep control's memory and answer bounded."""

import http.client
import json
import subprocess
import time

from control_helpers import control, control_factory, ctl_binary, request  # noqa: F401
from dynamic_helpers import dyn  # noqa: F401
from helpers import wait_for
from stats_helpers import (ALLOW_RULE, DENY_RULE, call, edge, start_http_mesh, stats,
                           wait_edge)

STATS_EDGES_MAX = 512


def test_stats_show_the_edge_its_rates_and_recent_denials(dyn):
    c, inb, outb, port = start_http_mesh(dyn)
    # The mesh's own readiness call may already be counted (a proxy reports
    # its first traffic at once): count from there.
    assert [e for e in stats(c)["edges"] if e["denied"]] == []
    before = edge(stats(c), "frontend", "orders")
    base = before["requests"] if before else 0
    for _ in range(20):
        assert call(port, "/ok/items") == 200
    for _ in range(3):
        assert call(port, "/admin/keys") == 403
    e = wait_edge(c, "frontend", "orders", base + 23, 3)
    assert e["request_rate"] > 0 and e["denial_rate"] > 0, e
    assert e["denied_by_rule"].get(DENY_RULE, 0) >= 3, e
    assert ALLOW_RULE not in e["denied_by_rule"], e
    assert e["p50_ms"] >= 0 and e["p99_ms"] >= e["p50_ms"], e
    doc = stats(c)
    d = [x for x in doc["recent_denials"] if x["rule"] == DENY_RULE]
    assert d, doc["recent_denials"]
    assert d[0]["from"] == "frontend" and d[0]["to"] == "orders"
    assert d[0]["method"] == "GET" and d[0]["path"] == "/admin/keys", d[0]
    assert any(s["name"] == "orders" and s["requests"] >= 23 for s in doc["services"]), doc
    assert doc["truncated"] is False and doc["summaries"]["refused"] == 0, doc
    # Once every summary is in, control's counts equal the proxy's own.
    m = inb.metrics()
    allowed = m.get("meshlet_policy_decisions_total", decision="allow", rule=ALLOW_RULE)
    denied = m.get("meshlet_policy_decisions_total", decision="deny", rule=DENY_RULE)
    e = wait_edge(c, "frontend", "orders", allowed + denied, denied)
    assert (e["requests"], e["denied"]) == (allowed + denied, denied), (e, allowed, denied)

    # meshletctl top --once: the same edge as a table, and as JSON.
    p = c.ctl("top", "--once")
    assert p.returncode == 0, p.stderr
    line = [ln for ln in p.stdout.splitlines() if "frontend" in ln and "orders" in ln]
    assert line, p.stdout
    assert DENY_RULE in p.stdout, p.stdout
    j = c.ctl_json("top", "--once")
    assert edge(j, "frontend", "orders")["requests"] >= 23
    # Refused options.
    p = c.ctl("top", "--interval", "0")
    assert p.returncode == 2 and "--interval" in p.stderr, p.stderr


def test_stats_needs_the_admin_token(control):
    r = control.api("GET", "/v1/stats", token=None)
    assert r.status == 401, r
    r = control.api("GET", "/v1/stats", token="not-the-token")
    assert r.status == 403, r


def poll(c, summary, conn=None, service="orders"):
    """A config poll (wait=0) with the admin token carrying summary (a
    dict, or a raw string) in Meshlet-Stats."""
    text = summary if isinstance(summary, str) else json.dumps(summary, separators=(",", ":"))
    return request(c.port, c.context(), "GET", f"/v1/services/{service}/config?after=0&wait=0",
                   token=c.token, headers={"Meshlet-Stats": text}, conn=conn)


def good(**kw):
    doc = {"interval_s": 5,
           "callers": [{"from": "web", "requests": 10, "denied": 2, "errors_5xx": 1,
                        "p50_ms": 1.5, "p99_ms": 7.0}],
           "denied": [{"from": "web", "rule": "no-admin", "n": 2}],
           "recent": [{"at": 1764770000, "from": "web", "rule": "no-admin",
                       "method": "POST", "path": "/admin"}]}
    doc.update(kw)
    return doc


def test_hostile_summaries_are_refused_and_the_poll_still_answered(control):
    c = control
    r = poll(c, good())
    assert r.status == 200 and "meshlet-stats-refused" not in r.headers, r
    assert "version" in r.json
    caller = good()["callers"][0]
    cases = {
        "not json": "{not json",
        "an array": "[]",
        "over the size limit": json.dumps(good(pad="x" * 9000)),
        "unknown field": good(extra=1),
        "unknown caller field": good(callers=[dict(caller, admin=True)]),
        "negative count": good(callers=[dict(caller, requests=-5)]),
        "huge count": good(callers=[dict(caller, requests=10 ** 30)]),
        "real count": good(callers=[dict(caller, requests=1.5)]),
        "denied over requests": good(callers=[dict(caller, denied=11)]),
        "bad caller name": good(callers=[dict(caller, **{"from": "Web Server"})]),
        "control character": good(callers=[dict(caller, **{"from": "we\nb"})]),
        "negative latency": good(callers=[dict(caller, p50_ms=-1)]),
        "one latency alone": good(callers=[{k: v for k, v in caller.items() if k != "p99_ms"}]),
        "too many callers": good(callers=[dict(caller, **{"from": f"s{i}"}) for i in range(17)]),
        "zero interval": good(interval_s=0),
        "bad rule": good(denied=[{"from": "web", "rule": "no admin!", "n": 1}]),
        "path with control bytes": good(recent=[dict(good()["recent"][0], path="/a\u0001")]),
        "deep nesting": good(callers=[[[[1]]]]),
    }
    before = stats(c)["summaries"]
    for name, doc in cases.items():
        r = poll(c, doc)
        assert r.status == 200, f"{name}: the long poll itself failed: {r}"
        assert "version" in r.json, name
        why = r.headers.get("meshlet-stats-refused")
        assert why, f"{name}: not refused"
        print(f"{name}: {why}")
    after = stats(c)["summaries"]
    assert after["refused"] == before["refused"] + len(cases), after
    assert after["accepted"] == before["accepted"], after
    assert "counter summary for orders refused" in c.stderr()
    # Only the one good summary counted.
    e = edge(stats(c), "web", "orders")
    assert e and e["requests"] == 10 and e["denied"] == 2 and e["errors_5xx"] == 1, e
    # A head over control's limit is refused whole, with a clear status.
    r = poll(c, "x" * 20000)
    assert r.status in (400, 413, 431), r
    assert c.alive()


def test_ten_thousand_callers_keep_memory_and_answer_bounded(control):
    c = control
    rss0 = c.rss_kb()
    conn = http.client.HTTPSConnection("127.0.0.1", c.port, context=c.context(), timeout=30)
    n = 0
    try:
        for batch in range(10000 // 16):
            callers = [{"from": f"caller-{batch * 16 + i}", "requests": 3, "denied": 1,
                        "errors_5xx": 0} for i in range(16)]
            denied = [{"from": x["from"], "rule": "deny-all", "n": 1} for x in callers]
            r = poll(c, {"interval_s": 5, "callers": callers, "denied": denied, "recent": []},
                     conn=conn, service=f"svc-{batch % 7}")
            assert r.status == 200 and "meshlet-stats-refused" not in r.headers, r
            n += 16
    finally:
        conn.close()
    r = c.api("GET", "/v1/stats")
    assert r.status == 200
    doc = r.json
    size = len(r.body)
    rss1 = c.rss_kb()
    print(f"{n} callers: {len(doc['edges'])} edges, answer {size} bytes, "
          f"control VmRSS {rss0} -> {rss1} kB, others {doc['others']}")
    assert len(doc["edges"]) <= STATS_EDGES_MAX
    assert doc["truncated"] is True
    assert doc["others"]["callers_folded"] >= n - STATS_EDGES_MAX
    assert doc["others"]["requests"] >= 3 * (n - STATS_EDGES_MAX)
    assert size < 400 * 1024, size
    assert rss1 - rss0 < 64 * 1024, (rss0, rss1)
    # Another round changes nothing in the bound.
    r2 = poll(c, {"interval_s": 5, "callers": [{"from": "late", "requests": 1, "denied": 0,
                                                "errors_5xx": 0}], "denied": [], "recent": []})
    assert r2.status == 200
    assert len(stats(c)["edges"]) <= STATS_EDGES_MAX
    wait_for(lambda: c.alive(), 1)


def test_top_refreshes_and_says_when_control_is_away(control):
    c = control
    argv = [str(ctl_binary()), "--control", c.url, "--ca", str(c.ca_file), "--token-file",
            str(c.token_file), "top", "--interval", "1"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=c.env)
    time.sleep(2.5)
    c.stop()
    time.sleep(1.5)
    p.terminate()
    out, err = p.communicate(timeout=10)
    assert out.count("meshlet top") >= 2, out
    assert "no traffic reported" in out, out
    assert "control unreachable; retrying" in err, err
    q = c.ctl("top", "--once")
    assert q.returncode == 1, (q.returncode, q.stderr)
