"""meshlet-control's registry (POST /v1/services/{svc}/endpoints) as a
hostile proxy would use it: addresses it does not connect from, addresses
and application ports another live service holds, admin-assigned
addresses (meshletctl endpoints), the caps per instance and per service,
coalesced version bumps, and config answers scoped to the upstreams a
proxy asks for.

Every caller here connects from 127.0.0.1, as every proxy of the
integration tests does: several services share that IP, so what collides
is the registered ip:port and the application ports on it, never the bare
IP."""

import json
import threading
import time

from control_helpers import (assert_refused, control, control_factory,  # noqa: F401
                             new_svid)
from dynamic_helpers import allow_policy, dyn  # noqa: F401
from helpers import addr, free_port, wait_for

OUTSIDE = "10.213.9.7"        # an address no test process connects from


def register(ctrl, svid, service, address, ports=None):
    body = {"address": address}
    if ports is not None:
        body["ports"] = ports
    return ctrl.api("POST", f"/v1/services/{service}/endpoints", body, token=None, svid=svid)


def config(ctrl, svid, service, upstreams="*", after=0, wait=0):
    q = f"after={after}&wait={wait}"
    if upstreams is not None:
        q += f"&upstreams={upstreams}"
    r = ctrl.api("GET", f"/v1/services/{service}/config?{q}", token=None, svid=svid,
                 timeout=wait + 10)
    assert r.status == 200, r
    return r.json


def registry(ctrl, svid, service="frontend"):
    """{svc: {address: ports}} of a config answer that asked for everything."""
    eps = config(ctrl, svid, service)["endpoints"]
    return {s: {e["address"]: e["ports"] for e in lst} for s, lst in eps.items()}


def ports(n):
    out = set()
    while len(out) < n:
        out.add(free_port())
    return sorted(out)


# ---------------------------------------------------------------- defect 1


def test_only_addresses_the_caller_connects_from(control, tmp_path):
    orders = new_svid(control, tmp_path, "orders")
    frontend = new_svid(control, tmp_path, "frontend")
    p_in, p_app = ports(2)
    # another host's address (B's real address, an outside host's): refused
    for address in (f"{OUTSIDE}:15006", f"{OUTSIDE}:{p_in}", "[fd00::7]:15006"):
        e = assert_refused(register(control, orders, "orders", address, [p_app]), 403)
        assert e[0] == "forbidden" and e[2] == "address", e
        assert "connect" in e[1] and "meshletctl endpoints add" in e[1], e
    assert registry(control, frontend) == {}
    # its own address (the IP it connects from, any port): accepted
    r = register(control, orders, "orders", f"127.0.0.1:{p_in}", [p_app])
    assert r.status == 200, r
    assert registry(control, frontend) == {"orders": {f"127.0.0.1:{p_in}": [p_app]}}


def test_address_or_app_port_of_another_live_service_is_409(control, tmp_path):
    orders = new_svid(control, tmp_path, "orders")
    orders2 = new_svid(control, tmp_path, "orders")
    payments = new_svid(control, tmp_path, "payments")
    frontend = new_svid(control, tmp_path, "frontend")
    o_in, o_app, p_in, p_app, spare = ports(5)
    assert register(control, orders, "orders", f"127.0.0.1:{o_in}", [o_app]).status == 200
    hostile = [
        (f"127.0.0.1:{o_in}", [p_app]),       # orders' registered address
        (f"127.0.0.1:{p_in}", [o_app]),       # orders' application port on that IP
        (f"127.0.0.1:{o_app}", [p_app]),      # an address that is orders' app port
        (f"127.0.0.1:{p_in}", [o_in]),        # an app port that is orders' address
    ]
    for address, ps in hostile:
        e = assert_refused(register(control, payments, "payments", address, ps), 409)
        assert e[0] == "conflict" and "orders" in e[1], (address, ps, e)
    # nothing of that reached the registry
    assert registry(control, frontend) == {"orders": {f"127.0.0.1:{o_in}": [o_app]}}
    # the same IP with ports of its own: fine (a shared-IP host)
    assert register(control, payments, "payments", f"127.0.0.1:{p_in}", [p_app]).status == 200
    # another instance of the same service may share orders' app port
    assert register(control, orders2, "orders", f"127.0.0.1:{spare}", [o_app]).status == 200
    reg = registry(control, frontend)
    assert reg == {"orders": {f"127.0.0.1:{o_in}": [o_app], f"127.0.0.1:{spare}": [o_app]},
                   "payments": {f"127.0.0.1:{p_in}": [p_app]}}

    # once the holder's SVIDs are revoked, the address is free again
    for ident in (orders, orders2):
        r = control.api("POST", "/v1/certs/revoke", {"serial": ident.serial})
        assert r.status == 200, r
    assert registry(control, frontend) == {"payments": {f"127.0.0.1:{p_in}": [p_app]}}
    assert register(control, payments, "payments", f"127.0.0.1:{o_in}", [o_app]).status == 200
    reg = registry(control, frontend)
    assert reg == {"payments": {f"127.0.0.1:{p_in}": [p_app], f"127.0.0.1:{o_in}": [o_app]}}


def test_admin_assigned_addresses(control, tmp_path):
    orders = new_svid(control, tmp_path, "orders")
    payments = new_svid(control, tmp_path, "payments")
    frontend = new_svid(control, tmp_path, "frontend")
    addr = f"{OUTSIDE}:15006"

    # usage errors: exit 2, nothing sent
    for args in (("endpoints", "add", addr), ("endpoints", "add", "--service", "orders"),
                 ("endpoints", "add", "--service", "orders", "not-an-address"),
                 ("endpoints", "add", "--service", "Bad_Name", addr),
                 ("endpoints", "remove", "--service", "orders"), ("endpoints", "frob")):
        p = control.ctl(*args)
        assert p.returncode == 2, (args, p.returncode, p.stdout, p.stderr)

    p = control.ctl("endpoints", "add", "--service", "orders", addr)
    assert p.returncode == 0, p.stderr
    # idempotent
    assert control.ctl("endpoints", "add", "--service", "orders", addr).returncode == 0
    # another service cannot take it, from the admin or by registering
    p = control.ctl("endpoints", "add", "--service", "payments", addr)
    assert p.returncode == 1 and "orders" in p.stderr, (p.returncode, p.stderr)
    e = assert_refused(register(control, payments, "payments", addr, [8080]), 409)
    assert "orders" in e[1], e
    # the service it was assigned to may register it though it connects from elsewhere
    r = register(control, orders, "orders", addr, [8080])
    assert r.status == 200, r
    assert registry(control, frontend) == {"orders": {addr: [8080]}}

    listing = control.ctl_json("endpoints", "list")
    assert {"service": "orders", "address": addr} in \
        [{k: a[k] for k in ("service", "address")} for a in listing["assignments"]]
    regs = [(e["service"], e["address"], e["ports"], e["live"]) for e in listing["endpoints"]]
    assert regs == [("orders", addr, [8080], True)], listing
    table = control.ctl("endpoints", "list")
    assert table.returncode == 0 and addr in table.stdout and "SERVICE" in table.stdout

    # survives a restart
    control.restart()
    assert [a["address"] for a in control.ctl_json("endpoints", "list")["assignments"]] == [addr]

    # removing: wrong service refused, right one removes assignment and registration
    p = control.ctl("endpoints", "remove", "--service", "payments", addr)
    assert p.returncode == 1, (p.returncode, p.stderr)
    p = control.ctl("endpoints", "remove", "--service", "orders", addr)
    assert p.returncode == 0, p.stderr
    listing = control.ctl_json("endpoints", "list")
    assert listing["assignments"] == [] and listing["endpoints"] == []
    assert registry(control, frontend) == {}
    assert_refused(register(control, orders, "orders", addr, [8080]), 403)
    p = control.ctl("endpoints", "remove", "--service", "orders", addr)
    assert p.returncode == 1, (p.returncode, p.stderr)

    # an address a live service holds cannot be assigned to another
    o_in = ports(1)[0]
    assert register(control, orders, "orders", f"127.0.0.1:{o_in}", [8080]).status == 200
    p = control.ctl("endpoints", "add", "--service", "payments", f"127.0.0.1:{o_in}")
    assert p.returncode == 1 and "orders" in p.stderr, (p.returncode, p.stderr)
    # the API's shape, for the record
    r = control.api("POST", "/v1/endpoints/assign", {"service": "payments", "address": "x"})
    assert_refused(r, 400)
    assert_refused(control.api("POST", "/v1/endpoints/assign",
                               {"service": "payments", "address": addr}, token=None, svid=payments),
                   401, 403)


def test_a_refused_registration_does_not_stop_the_proxy(dyn):
    """A sidecar advertising an address control refuses (not its IP, no
    assignment) says why and keeps going: it becomes ready with its
    policy, and control's registry holds nothing of it."""
    c = dyn.start_control()
    dyn.apply_policy(allow_policy("orders", "frontend"))
    port, app = free_port(), free_port()
    cfg = dyn.config("orders", dyn.token_file("orders"),
                     inbound=[{"listen": addr(port), "forward": addr(app), "protocol": "tcp",
                               "advertise": f"{OUTSIDE}:{port}"}])
    p = dyn.proxy("orders-in", cfg)           # waits for /ready
    wait_for(lambda: f"{OUTSIDE}:{port} is not registered" in p.stderr(), 10,
             what="the proxy to report the refused registration")
    assert "HTTP 403 forbidden" in p.stderr()
    assert c.ctl_json("endpoints", "list")["endpoints"] == []


# ---------------------------------------------------------------- defect 6


def test_caps_per_instance_and_per_service(control_factory, tmp_path):
    control = control_factory.new(extra_args=["--max-endpoints-per-service", "20"])
    a = new_svid(control, tmp_path, "orders")
    b = new_svid(control, tmp_path, "orders")
    frontend = new_svid(control, tmp_path, "frontend")
    ps = ports(40)
    accepted = []
    codes = []
    for p in ps[:25]:
        r = register(control, a, "orders", f"127.0.0.1:{p}", [8080])
        codes.append(r.status)
        if r.status == 200:
            accepted.append(p)
        else:
            e = assert_refused(r, 429)
            assert e[0] == "too_many_requests" and "per instance" in e[1], e
    assert codes == [200] * 16 + [429] * 9, codes
    # re-registering one it holds is not a new entry
    assert register(control, a, "orders", f"127.0.0.1:{accepted[0]}", [8080]).status == 200
    # a second instance: the service's cap (20) stops it after four
    got = [register(control, b, "orders", f"127.0.0.1:{p}", [8080]).status for p in ps[25:32]]
    assert got == [200] * 4 + [429] * 3, got
    e = assert_refused(register(control, b, "orders", f"127.0.0.1:{ps[35]}", [8080]), 429)
    assert "per service" in e[1] and "20" in e[1], e
    assert sum(len(v) for v in registry(control, frontend).values()) == 20

    # bad values of the option
    for bad in ("0", "-1", "x", "100000000"):
        c = control_factory.new(name=f"bad{bad}", extra_args=["--max-endpoints-per-service", bad],
                                start=False)
        c.start(wait=False)
        assert c.proc.wait(timeout=20) == 2, bad
        assert "--max-endpoints-per-service" in c.stderr()


def test_identical_registration_bumps_nothing(control, tmp_path):
    orders = new_svid(control, tmp_path, "orders")
    frontend = new_svid(control, tmp_path, "frontend")
    p_in = ports(1)[0]
    assert register(control, orders, "orders", f"127.0.0.1:{p_in}", [8080]).status == 200
    time.sleep(1.2)      # past any coalescing window
    v0 = config(control, frontend, "frontend")["version"]
    for _ in range(5):
        assert register(control, orders, "orders", f"127.0.0.1:{p_in}", [8080]).status == 200
    time.sleep(1.2)
    assert config(control, frontend, "frontend")["version"] == v0


def test_registration_burst_wakes_long_polls_a_bounded_number_of_times(control, tmp_path):
    """One proxy changes its entries 40 times as fast as it can: a long
    poll of another service sees a handful of new versions, not 40, and
    still sees the final state promptly."""
    orders = new_svid(control, tmp_path, "orders")
    frontend = new_svid(control, tmp_path, "frontend")
    o_in, x, y = ports(3)
    address = f"127.0.0.1:{o_in}"
    assert register(control, orders, "orders", address, [x]).status == 200
    time.sleep(1.2)
    start = config(control, frontend, "frontend")["version"]
    seen = []
    stop = threading.Event()

    def poll():
        after = start
        while not stop.is_set():
            doc = config(control, frontend, "frontend", after=after, wait=2)
            if doc["version"] != after:
                seen.append(doc)
                after = doc["version"]

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.monotonic()
    for i in range(40):
        r = register(control, orders, "orders", address, [y if i % 2 == 0 else x])
        assert r.status == 200, r
    took = time.monotonic() - t0
    time.sleep(1.5)
    stop.set()
    t.join(timeout=10)
    # the last registration was [x]: the final answer says so
    assert seen, "the long poll saw no change at all"
    bound = 3 + int(took / 0.5)
    assert len(seen) <= min(bound, 12), \
        f"{len(seen)} wake-ups for 40 registrations in {took:.2f}s (bound {bound})"
    assert {e["address"]: e["ports"] for e in seen[-1]["endpoints"]["orders"]} == {address: [x]}


def test_a_bump_pending_at_a_crash_is_made_at_the_next_start(control, tmp_path):
    """A registration is on disk when control answers 200, its version bump
    may still wait for the coalescing window: after a crash inside that
    window, the next start bumps, so a proxy holding the old version is
    answered with the change instead of waiting for an unrelated one."""
    orders = new_svid(control, tmp_path, "orders")
    frontend = new_svid(control, tmp_path, "frontend")
    o_in, x, y = ports(3)
    address = f"127.0.0.1:{o_in}"
    assert register(control, orders, "orders", address, [x]).status == 200
    held = config(control, frontend, "frontend")["version"]
    assert register(control, orders, "orders", address, [y]).status == 200
    control.kill()                            # within the window: the bump is pending
    control.start()
    t0 = time.monotonic()
    doc = config(control, frontend, "frontend", after=held, wait=5)
    assert time.monotonic() - t0 < 2, "the long poll waited: the version did not move"
    assert doc["version"] != held
    assert doc["endpoints"]["orders"] == [{"address": address, "ports": [y]}]


# ---------------------------------------------------------------- defect 14


def test_config_answers_only_the_upstreams_asked_for(control, tmp_path):
    ids = {s: new_svid(control, tmp_path, s) for s in ("orders", "payments", "reports")}
    frontend = new_svid(control, tmp_path, "frontend")
    pp = ports(6)
    for i, (s, ident) in enumerate(sorted(ids.items())):
        r = register(control, ident, s, f"127.0.0.1:{pp[2 * i]}", [pp[2 * i + 1]])
        assert r.status == 200, r

    assert set(config(control, frontend, "frontend", "*")["endpoints"]) == \
        {"orders", "payments", "reports"}
    assert set(config(control, frontend, "frontend", "orders")["endpoints"]) == {"orders"}
    assert set(config(control, frontend, "frontend", "orders,reports")["endpoints"]) == \
        {"orders", "reports"}
    # a service with no entries: nothing for it; none asked: nothing at all
    assert config(control, frontend, "frontend", "billing")["endpoints"] == {}
    assert config(control, frontend, "frontend", None)["endpoints"] == {}
    # malformed or oversized lists are refused
    for bad in ("Orders", "orders,,reports", "orders,*", ",".join(f"s{i}" for i in range(65)),
                "orders&upstreams=reports"):
        r = control.api("GET", f"/v1/services/frontend/config?after=0&wait=0&upstreams={bad}",
                        token=None, svid=frontend)
        e = assert_refused(r, 400)
        assert e[2] in ("upstreams", "query"), e

