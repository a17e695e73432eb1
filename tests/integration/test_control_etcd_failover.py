"""Several control replicas on one real etcd, seen from the clients: proxies
with control.urls and meshletctl with --control URL,URL move to another
replica when theirs dies, without a failed data-path request or a missed
version.
"""

import json
import time

from control_helpers import control_factory  # noqa: F401
from dynamic_helpers import Caller, allow_policy, deny_policy, dyn, ready  # noqa: F401
from etcd_helpers import etcd_factory  # noqa: F401
from helpers import try_call, wait_for
from test_control_etcd import etcd_args, make_kek


def two_replicas(dyn, etcd_factory, tmp_path):  # noqa: F811
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    a = dyn.factory.new(name="a", extra_args=etcd_args(cluster, kek))   # initialises
    b = dyn.factory.new(name="b", extra_args=etcd_args(cluster, kek))
    dyn.control = a
    b.token_file.write_text(a.token_file.read_text())
    b.token_file.chmod(0o600)
    return a, b


def pair_on(dyn, app, urls):
    """orders' inbound in front of app and frontend's outbound, both with
    control.urls; waits until a call goes through."""
    from helpers import addr, free_port
    dyn.apply_policy(allow_policy("orders", "frontend"))
    in_port, out_port = free_port(), free_port()
    icfg = dyn.config("orders", dyn.token_file("orders"),
                      inbound=[{"listen": addr(in_port), "forward": addr(app.port)}])
    ocfg = dyn.config("frontend", dyn.token_file("frontend"),
                      outbound=[{"listen": addr(out_port), "service": "orders"}])
    for cfg in (icfg, ocfg):
        cfg["control"] = {"urls": urls, "token_file": cfg["control"]["token_file"]}
    inb = dyn.proxy("orders-in", icfg)
    outb = dyn.proxy("frontend-out", ocfg)
    wait_for(lambda: try_call(out_port, timeout=2)[0], 15, what="a call through the pair")
    return outb, inb, out_port


def test_replica_killed_a_push_through_the_other_applies(dyn, etcd_factory, tmp_path):  # noqa: F811
    a, b = two_replicas(dyn, etcd_factory, tmp_path)
    app = dyn.mesh.app("echo")
    outb, inb, port = pair_on(dyn, app, [a.url, b.url])
    a.kill()
    killed = time.monotonic()
    # a change made through b reaches the proxies, who were polling a
    dyn.apply_policy(deny_policy("orders", "frontend"), control=b)
    wait_for(lambda: not try_call(port, timeout=2)[0], 10, what="the deny pushed through b")
    applied = time.monotonic() - killed
    wait_for(lambda: "moving to " + b.url in inb.stderr(), 10, what="orders-in to move to b")
    print(f"replica a killed: a deny pushed through b applied after {applied * 1000:.0f} ms")
    assert applied < 5.0
    for p in (inb, outb):
        st, body = ready(p)
        assert st == 200 and body["control"] == "connected", body
    # both polling b, up to date, as b sees them
    def on_b():
        r = b.api("GET", "/v1/proxies")
        assert r.status == 200, r
        mine = [p for p in r.json["proxies"]
                if p["service"] in ("orders", "frontend") and p["connected"]]
        return len(mine) == 2 and all(p["up_to_date"] for p in mine)
    wait_for(on_b, 10, what="both proxies polling b, up to date")


def test_no_failed_request_across_the_move(dyn, etcd_factory, tmp_path):  # noqa: F811
    a, b = two_replicas(dyn, etcd_factory, tmp_path)
    app = dyn.mesh.app("echo")
    outb, inb, port = pair_on(dyn, app, [a.url, b.url])
    with Caller(port) as caller:
        wait_for(lambda: caller.ok >= 5, 5, what="requests to flow")
        a.kill()
        wait_for(lambda: "moving to " + b.url in inb.stderr() and
                 "moving to " + b.url in outb.stderr(), 10, what="both proxies to move to b")
        n = caller.ok
        wait_for(lambda: caller.ok >= n + 20, 10, what="requests after the move")
        # an allow -> allow change with another rule name: a new version, still allowed
        doc = allow_policy("orders", "frontend", name="allow-after-move")
        dyn.apply_policy(doc, control=b)
        wait_for(lambda: inb.metrics().get("meshlet_control_connected") == 1, 5,
                 what="orders-in connected")
        time.sleep(1)
    assert caller.failures == [], caller.failures[:5]
    # the version b serves is the one orders-in holds: nothing missed
    want = b.api("GET", "/v1/services/orders/config?after=0&wait=0").json["version"]
    wait_for(lambda: str(want) in inb.stderr(), 5, what=f"orders-in to install version {want}")


def test_meshletctl_two_urls_first_dead(dyn, etcd_factory, tmp_path):  # noqa: F811
    a, b = two_replicas(dyn, etcd_factory, tmp_path)
    both = f"{a.url},{b.url}"
    argv = ["--control", both, "--ca", str(a.ca_file), "--token-file", str(a.token_file)]
    p = a.ctl(*argv, "policy", "list", flags=False)
    assert p.returncode == 0, p.stderr
    p = a.ctl(*argv, "status", flags=False)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line.split() for line in p.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == [a.url, b.url] and all(r[1] == "up" for r in rows), p.stdout
    assert all("etcd" in r and "ok" in r for r in rows), p.stdout
    a.kill()
    p = a.ctl(*argv, "status", "-o", "json", flags=False)
    assert p.returncode == 1, p.stdout + p.stderr
    st = json.loads(p.stdout)
    assert st[0]["state"].startswith("unreachable") and st[1]["state"] == "up", st
    assert st[1]["health"]["store"]["backend"] == "etcd" and st[1]["health"]["store"]["ok"]
    p = a.ctl(*argv, "policy", "list", flags=False)
    assert p.returncode == 0, p.stderr
    assert "trying the next control" in p.stderr
    # every URL dead: a clear refusal, exit 1
    b.kill()
    p = a.ctl(*argv, "policy", "list", flags=False)
    assert p.returncode == 1 and b.url in p.stderr, p.stderr
    # a malformed list is a usage error
    p = a.ctl("--control", f"{a.url},", "--ca", str(a.ca_file), "--token-file",
              str(a.token_file), "policy", "list", flags=False)
    assert p.returncode == 2, p.stderr
