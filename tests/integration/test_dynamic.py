"""Dynamic proxies: join with a token, watch policy and endpoints, renew
certificates, CA rotation, revocation, control down, refusals."""

import json
import os
import stat
import time
from pathlib import Path

from control_helpers import control_factory  # noqa: F401
from dynamic_helpers import (Caller, Stream, allow_policy, deny_policy, dyn,  # noqa: F401
                             ready)
from helpers import addr, free_port, try_call, wait_for


def _flip(dyn, port, doc, want_ok, limit=1.0):
    """Applies doc with meshletctl and measures until a call's outcome is
    want_ok. Returns (seconds from the apply command's start, seconds after
    it returned)."""
    t0 = time.monotonic()
    dyn.apply_policy(doc)
    t1 = time.monotonic()
    while True:
        ok, why = try_call(port, timeout=2)
        now = time.monotonic()
        if ok == want_ok:
            return now - t0, now - t1
        assert now - t0 < 10, f"decision did not flip to {want_ok} within 10s: {why}"


def test_join_traffic_and_policy_push_within_one_second(dyn):
    dyn.start_control()
    app = dyn.mesh.app("echo")
    outb, inb, port = dyn.pair(app)
    times = []
    for doc, want in ((deny_policy("orders", "frontend"), False),
                      (allow_policy("orders", "frontend"), True),
                      (deny_policy("orders", "frontend"), False),
                      (allow_policy("orders", "frontend"), True)):
        total, after = _flip(dyn, port, doc, want)
        times.append((want, total, after))
    for want, total, after in times:
        print(f"policy push -> {'allow' if want else 'deny'}: {total * 1000:.0f} ms from "
              f"meshletctl start, {after * 1000:.0f} ms after it returned")
    for p in (outb, inb):
        print(f"{p.name}: VmRSS {p.rss_kb()} kB")
    assert max(t for _, t, _ in times) < 1.0, times
    st, body = ready(inb)
    assert st == 200 and body["control"] == "connected" and not body["degraded"], body
    assert "installed config version" in inb.stderr()
    assert inb.metrics().get("meshlet_control_connected") == 1

    # The cache: a 0700 directory, the key 0600, the state as JSON.
    state = Path(inb.cfg["state_dir"])
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "svid.key").stat().st_mode) == 0o600
    cached = json.loads((state / "state.json").read_text())
    assert cached["policy"] == allow_policy("orders", "frontend"), cached
    assert (state / "svid.pem").exists() and (state / "bundle.pem").exists()
    assert "PRIVATE KEY" not in inb.stderr() + outb.stderr()

    # SIGTERM during a long poll: the control client lets go at once.
    t0 = time.monotonic()
    assert outb.stop() == 0
    print(f"frontend-out stopped in {(time.monotonic() - t0) * 1000:.0f} ms during a long poll")
    assert time.monotonic() - t0 < 1.5


def _proxies(dyn, service):
    """control's /v1/proxies entries of service."""
    r = dyn.control.api("GET", "/v1/proxies")
    assert r.status == 200, r
    return [p for p in r.json["proxies"] if p["service"] == service]


def _serial(dyn, service):
    """The SVID serial of service's (only) proxy, as control knows it."""
    ps = _proxies(dyn, service)
    return ps[0]["cert_serial"] if len(ps) == 1 else None


def _all_up_to_date(dyn, services=("orders", "frontend")):
    r = dyn.control.api("GET", "/v1/proxies")
    assert r.status == 200, r
    mine = [p for p in r.json["proxies"] if p["service"] in services and p["connected"]]
    return len(mine) == len(services) and all(p["up_to_date"] for p in mine)


def test_certs_rotate_all_during_a_stream(dyn):
    dyn.start_control()
    app = dyn.mesh.app("echo")
    outb, inb, port = dyn.pair(app)
    before = {s: _serial(dyn, s) for s in ("orders", "frontend")}
    assert all(before.values()), before
    with Stream(port) as st:
        wait_for(lambda: st.echoed >= 10, 5, what="the stream to flow")
        t0 = time.monotonic()
        dyn.ctl("certs", "rotate", "--all")
        wait_for(lambda: all(_serial(dyn, s) not in (None, before[s]) for s in before), 10,
                 what="both proxies to renew")
        renewed = time.monotonic() - t0
        n = st.echoed
        wait_for(lambda: st.echoed >= n + 20, 5, what="the stream to keep flowing")
        assert st.error is None, st.error
    after = {s: _serial(dyn, s) for s in before}
    issued = {c["serial"] for c in dyn.certs()}
    print(f"certs rotate --all: both proxies renewed within {renewed * 1000:.0f} ms; "
          f"{before} -> {after}; stream: {st.echoed} echoes, unbroken")
    assert set(after.values()) <= issued
    assert st.error is None, st.error
    assert try_call(port)[0]
    for p in (outb, inb):
        assert "renewed the SVID (control asked)" in p.stderr()


def test_ca_rotation_three_phases_without_a_failed_request(dyn, tmp_path):
    from control_helpers import new_svid
    from dynamic_helpers import client_with
    control = dyn.start_control()
    app = dyn.mesh.app("echo")
    outb, inb, port = dyn.pair(app)
    in_port = int(inb.cfg["inbound"][0]["listen"].rsplit(":", 1)[1])
    old = new_svid(control, tmp_path, "frontend")            # signed by the first root
    assert try_call(in_port, client_with(old, control.ca_file))[0]
    phases = []
    with Caller(port) as caller:
        wait_for(lambda: caller.ok >= 5, 5, what="requests to flow")
        t0 = time.monotonic()
        ca = control.ctl_json("ca", "rotate")                  # stable -> prepared
        assert ca["phase"] == "prepared", ca
        wait_for(lambda: _all_up_to_date(dyn), 10, what="proxies to hold the new bundle")
        phases.append(("prepared", time.monotonic() - t0))
        before = {s: _serial(dyn, s) for s in ("orders", "frontend")}
        t0 = time.monotonic()
        ca = control.ctl_json("ca", "rotate")                  # prepared -> switched
        assert ca["phase"] == "switched", ca
        new_root = ca["root_ids"][ca["signing"]]

        def renewed_under_new_root():
            roots = {c["serial"]: c["root"] for c in dyn.certs()}
            serials = {s: _serial(dyn, s) for s in before}
            return all(serials[s] not in (None, before[s]) and roots.get(serials[s]) == new_root
                       for s in before) and _all_up_to_date(dyn)
        wait_for(renewed_under_new_root, 10, what="proxies to renew under the new root")
        phases.append(("switched", time.monotonic() - t0))
        t0 = time.monotonic()
        p = dyn.ctl("ca", "rotate", check=False)               # switched -> stable
        if p.returncode != 0:
            assert "--force" in p.stderr or "until" in p.stderr or p.returncode == 1, p.stderr
            dyn.ctl("ca", "rotate", "--force")
        wait_for(lambda: _all_up_to_date(dyn), 10, what="proxies to drop the old root")
        phases.append(("stable", time.monotonic() - t0))
        n = caller.ok
        wait_for(lambda: caller.ok >= n + 10, 5, what="requests after the rotation")
    ca = control.ctl_json("ca", "show")
    assert ca["phase"] == "stable" and len(ca["roots"]) == 1, ca
    print("ca rotate: " + ", ".join(f"{ph} applied by the proxies in {t * 1000:.0f} ms"
                                    for ph, t in phases) +
          f"; {caller.ok} requests, {len(caller.failures)} failed")
    assert caller.failures == [], caller.failures[:5]
    # A certificate of the old root is refused now; a new one is accepted.
    ok, why = try_call(in_port, client_with(old, control.ca_file))
    assert not ok, "a certificate signed by the removed root was accepted"
    fresh = new_svid(control, tmp_path, "frontend")
    assert try_call(in_port, client_with(fresh, control.ca_file))[0]


def test_revocation_closes_the_open_connection_and_refuses_new_ones(dyn):
    dyn.start_control()
    app = dyn.mesh.app("echo")
    outb, inb, port = dyn.pair(app)
    serial = _serial(dyn, "frontend")
    with Stream(port) as st:
        wait_for(lambda: st.echoed >= 10, 5, what="the stream to flow")
        t0 = time.monotonic()
        dyn.ctl("certs", "revoke", serial)
        wait_for(lambda: st.error is not None, 5, what="the revoked peer's connection to close")
        closed = time.monotonic() - t0
    print(f"revocation of {serial}: open connection closed after {closed * 1000:.0f} ms")
    assert "closed" in st.error or "reset" in st.error.lower(), st.error
    ok, why = try_call(port, timeout=3)
    assert not ok, "a new connection of the revoked peer went through"
    assert "certificate was revoked" in inb.stderr()


def test_revoked_upstream_closes_its_pooled_connections(dyn):
    """http listeners carry requests over a pool of kept connections between
    sidecars: revoking the upstream's certificate closes the pooled
    connection to it (as it closes a single one), and no request is served
    by the revoked peer afterwards."""
    from http_helpers import HttpApp, HttpClient, request

    dyn.start_control()
    app = HttpApp("ok")
    dyn.mesh.apps.append(app)
    dyn.apply_policy(allow_policy("orders", "frontend"))
    inb, _ = dyn.inbound(app.port, protocol="http")
    outb, port = dyn.outbound(protocol="http")

    def call():
        try:
            with HttpClient(port, None) as c:
                c.send(request("GET", "/orders/1"))
                return c.read_response().status
        except OSError:
            return None
    wait_for(lambda: call() == 200, 15, what="a call through the pooled pair")
    assert outb.metrics().get("meshlet_upstream_connections_active") == 1
    served = len(app.requests)
    dyn.ctl("certs", "revoke", _serial(dyn, "orders"))
    wait_for(lambda: "certificate was revoked" in outb.stderr(), 10,
             what="the outbound to close its pooled connection to the revoked upstream")
    wait_for(lambda: outb.metrics().get("meshlet_upstream_connections_active") == 0, 5,
             what="the pool to hold no connection")
    assert call() != 200
    assert len(app.requests) == served, "the revoked upstream served a request"


def test_control_killed_then_restarted_and_proxy_restarted_from_cache(dyn):
    control = dyn.start_control()
    app = dyn.mesh.app("echo")
    outb, inb, port = dyn.pair(app)
    with Caller(port) as caller:
        wait_for(lambda: caller.ok >= 5, 5, what="requests to flow")
        control.kill()
        killed = time.monotonic()
        wait_for(lambda: ready(inb)[1]["degraded"] and ready(outb)[1]["degraded"], 5,
                 what="the proxies to notice control is gone")
        n = caller.ok
        time.sleep(max(0.0, 3 - (time.monotonic() - killed)))   # a few backoff rounds
        assert caller.ok >= n + 20, f"only {caller.ok - n} requests while control was down"
    assert caller.failures == [], caller.failures[:5]
    for p in (inb, outb):
        st, body = ready(p)
        assert st == 200 and body["degraded"] is True, body
        assert body["control"].startswith("disconnected: "), body
        assert p.metrics().get("meshlet_control_connected") == 0

    # A proxy restarted while control is down serves from its cache.
    inb.stop()
    t0 = time.monotonic()
    inb.start(wait_ready=True, timeout=10)
    print(f"orders-in restarted from its cache while control is down: ready after "
          f"{(time.monotonic() - t0) * 1000:.0f} ms")
    st, body = ready(inb)
    assert st == 200 and body["degraded"] is True, body
    assert "serving from the cache" in inb.stderr()
    wait_for(lambda: try_call(port, timeout=2)[0], 5, what="a call through the restarted proxy")

    # Control back: the proxies reconnect and apply a change made right after.
    time.sleep(1)
    down = time.monotonic() - killed
    control.start()
    t0 = time.monotonic()
    dyn.apply_policy(deny_policy("orders", "frontend"))
    wait_for(lambda: not try_call(port, timeout=2)[0], 15, what="the deny to apply")
    applied = time.monotonic() - t0
    wait_for(lambda: not ready(inb)[1]["degraded"] and not ready(outb)[1]["degraded"], 15,
             what="both proxies to reconnect")
    reconnected = time.monotonic() - t0
    print(f"control restarted after {down:.1f}s down: a policy change made "
          f"at once applied after {applied * 1000:.0f} ms; both proxies connected after "
          f"{reconnected * 1000:.0f} ms")
    for p in (inb, outb):
        assert p.metrics().get("meshlet_control_connected") == 1
        print(f"{p.name}: VmRSS {p.rss_kb()} kB")


def test_refusals_other_service_pin_mismatch_expired_token(dyn):
    first = dyn.start_control()
    other = dyn.start_control("impostor")      # another CA
    app = dyn.mesh.app("echo")

    # A token for another service: refused locally, nothing sent.
    p1, _ = dyn.inbound(app.port, name="wrong-service",
                        token_file=dyn.token_file("frontend"), wait_ready=False)
    # The first control's token, but the URL leads to another CA's control.
    cfg = dyn.config("orders", dyn.token_file("orders", control=first), control=other,
                     inbound=[{"listen": addr(free_port()), "forward": addr(app.port),
                               "protocol": "tcp"}])
    p2 = dyn.proxy("pin-mismatch", cfg, wait_ready=False)
    # An expired token.
    expired = dyn.token_file("orders", ttl=1)
    time.sleep(1.5)
    p3, _ = dyn.inbound(app.port, name="expired-token", token_file=expired, wait_ready=False)

    wait_for(lambda: "is for service frontend, not for orders" in p1.stderr(), 10,
             what="the wrong-service refusal")
    wait_for(lambda: "not sending the CSR" in p2.stderr(), 10, what="the pin refusal")
    wait_for(lambda: "expired or used up" in p3.stderr(), 10, what="the expired-token refusal")
    time.sleep(0.5)
    for p in (p1, p2, p3):
        st, body = ready(p)
        assert st == 503 and body["ready"] is False, body
        assert body["control"].startswith("disconnected: "), body
        assert p.alive()
        print(f"{p.name}: {body['control']}")
    assert "/v1/svid" not in other.stdout(), "the CSR reached the impostor"
    for p in (p1, p2, p3):
        assert "mlt1." not in p.stderr(), "a token in the log"

    # A state directory others may write to is refused at start.
    bad = dyn.tmp / "open-state"
    bad.mkdir(mode=0o777)
    os.chmod(bad, 0o777)
    cfg = dyn.config("orders", dyn.token_file("orders"), state_dir=bad,
                     inbound=[{"listen": addr(free_port()), "forward": addr(app.port),
                               "protocol": "tcp"}])
    p4 = dyn.proxy("open-state", cfg, wait_ready=False)
    assert p4.wait_exit(10) == 1
    assert "writable by group or others" in p4.stderr()


def test_renewal_at_half_life_and_serving_until_expiry_while_control_is_down(dyn, tmp_path):
    """SVIDs of 60 s: with control up the proxy renews by itself at about
    half of the lifetime; with control down it keeps serving until its
    SVID expires, then /ready turns 503."""
    from control_helpers import new_svid
    from dynamic_helpers import client_with
    up = dyn.start_control("control", svid_ttl="60s")
    down = dyn.start_control("control-down", svid_ttl="60s")
    app = dyn.mesh.app("echo")
    dyn.apply_policy(allow_policy("orders", "frontend"), control=up)
    dyn.apply_policy(allow_policy("orders", "frontend"), control=down)
    renewing, port_up = dyn.inbound(app.port, name="orders-renewing")
    cfg = dyn.config("orders", dyn.token_file("orders", control=down), control=down,
                     inbound=[{"listen": addr(free_port()), "forward": addr(app.port),
                               "protocol": "tcp"}])
    expiring = dyn.proxy("orders-expiring", cfg)
    port_down = int(cfg["inbound"][0]["listen"].rsplit(":", 1)[1])
    joined = time.monotonic()
    first = _serial(dyn, "orders")
    client = new_svid(down, tmp_path, "frontend")
    ctx = client_with(client, down.ca_file)
    assert try_call(port_down, ctx)[0]
    down.kill()

    wait_for(lambda: "renewed the SVID: serial" in renewing.stderr(), 45,
             what="a renewal at half of the SVID's lifetime")
    renewed_after = time.monotonic() - joined
    assert 20 <= renewed_after <= 40, renewed_after
    wait_for(lambda: _serial(dyn, "orders") not in (None, first), 5, what="control to see it")
    assert ready(renewing)[0] == 200
    # The other one could not renew: it still serves with the old SVID.
    st, body = ready(expiring)
    assert st == 200 and body["degraded"], body
    assert try_call(port_down, ctx)[0], "the proxy stopped serving before its SVID expired"

    wait_for(lambda: ready(expiring)[0] == 503, 45, what="/ready to turn 503 at expiry")
    expired_after = time.monotonic() - joined
    st, body = ready(expiring)
    print(f"SVID 60s: renewed by the timer {renewed_after:.1f}s after the join; with control "
          f"down the other proxy served until /ready turned 503 {expired_after:.1f}s after "
          f"its join ({body['reason']})")
    assert body["reason"] == "certificate expired", body
    assert expired_after >= 55, expired_after


def test_proxy_down_through_the_ca_switch_comes_back_without_a_token(dyn):
    """A proxy stopped in `stable` holds only the old root. The switch waits
    for it (409 naming it) until forced; started again from its cache, it
    verifies control through the new root cross-signed by the old one,
    fetches the new bundle, renews onto the new root and serves, with its
    join token long used up. A proxy joining now (its token pins the new
    root) gets in too."""
    control = dyn.start_control()
    app = dyn.mesh.app("echo")
    outb, inb, port = dyn.pair(app)
    down_serial = _serial(dyn, "orders")
    assert inb.stop() == 0
    ca = control.ctl_json("ca", "rotate")                          # stable -> prepared
    assert ca["phase"] == "prepared", ca
    wait_for(lambda: [p["service"] for p in
                      control.api("GET", "/v1/ca").json["gate"]["proxies"]] == ["orders"], 10,
             what="frontend to acknowledge the new root")
    p = dyn.ctl("ca", "rotate", check=False)
    assert p.returncode == 1 and "orders" in p.stderr and down_serial in p.stderr, p.stderr
    ca = control.ctl_json("ca", "rotate", "--force")               # prepared -> switched
    assert ca["phase"] == "switched", ca
    new_root = ca["root_ids"][ca["signing"]]

    t0 = time.monotonic()
    inb.start(wait_ready=True, timeout=20)

    def renewed():
        s = _serial(dyn, "orders")
        roots = {c["serial"]: c["root"] for c in dyn.certs()}
        return s not in (None, down_serial) and roots.get(s) == new_root
    wait_for(renewed, 20, what="the restarted proxy to renew under the new root")
    wait_for(lambda: try_call(port, timeout=2)[0], 15, what="a call through the restarted proxy")
    print(f"proxy down through the prepared phase: renewed under the new root "
          f"{(time.monotonic() - t0) * 1000:.0f} ms after its restart")
    assert "renewed the SVID" in inb.stderr()
    assert "join" not in inb.stderr().split("serving from the cache", 1)[-1].lower()
    cached = (Path(inb.cfg["state_dir"]) / "bundle.pem").read_text()
    assert cached.count("BEGIN CERTIFICATE") == 2, "the new bundle was not cached"

    # A proxy joining now: its token pins the new root, which control's chain
    # carries only cross-signed.
    app2 = dyn.mesh.app("echo", name="app2")
    inb2, port2 = dyn.inbound(app2.port, service="payments", name="payments-in")
    st, body = ready(inb2)
    assert st == 200 and body["control"] == "connected", body
