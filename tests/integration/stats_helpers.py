"""A small HTTP mesh for the tests of GET /v1/stats, meshletctl top and the
dashboard: control, orders' inbound and frontend's outbound in control
mode on 127.0.0.1, in front of an HTTP app. frontend may GET /ok/...; the
rule "no-admin" denies /admin...; anything else falls to the default."""

import json
import time

from helpers import spiffe, wait_for
from http_helpers import HttpApp, exchange, request

ALLOW_RULE = "frontend-reads"
DENY_RULE = "no-admin"


def start_http_mesh(dyn, control_args=()):
    c = dyn.factory.new(extra_args=list(control_args))
    dyn.control = c
    dyn.apply_policy({"service": "orders", "default": "deny",
                      "rules": [{"name": DENY_RULE, "action": "deny", "from": ["*"],
                                 "paths": ["/admin", "/admin/*"]},
                                {"name": ALLOW_RULE, "action": "allow",
                                 "from": [spiffe("frontend")], "paths": ["/ok/*"]}]})
    app = HttpApp("ok")
    dyn.mesh.apps.append(app)
    inb, _ = dyn.inbound(app.port, protocol="http")
    outb, port = dyn.outbound(protocol="http")
    wait_for(lambda: call(port, "/ok/warmup") == 200, 15, what="a call through the pair")
    return c, inb, outb, port


def call(port, path, method="GET"):
    try:
        r = exchange(port, request(method, path), timeout=5)
    except OSError:
        return None
    return r.status if r else None


def stats(c):
    r = c.api("GET", "/v1/stats")
    assert r.status == 200, r
    return r.json


def edge(doc, frm, to):
    for e in doc["edges"]:
        if e["from"] == frm and e["to"] == to:
            return e
    return None


def wait_edge(c, frm, to, requests, denied, timeout=45):
    """Waits until /v1/stats shows frm -> to with at least that many
    requests and denials in its window (a proxy reports with its config
    poll: within 30 s when idle before, 5 s while traffic flows)."""
    def seen():
        e = edge(stats(c), frm, to)
        return e if e and e["requests"] >= requests and e["denied"] >= denied else None
    t0 = time.monotonic()
    e = wait_for(seen, timeout, what=f"/v1/stats to show {frm} -> {to} with {requests} "
                 f"requests, {denied} denied")
    print(f"{frm} -> {to} in /v1/stats after {time.monotonic() - t0:.1f} s: {json.dumps(e)}")
    return e
