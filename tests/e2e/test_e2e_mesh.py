"""The mesh as users run it: services in network namespaces, sidecars in
transparent mode behind meshlet-iptables, everything from meshlet-control.

One mesh (the demo's topology) serves the whole module; the tests run in
file order and the last one removes the mesh and checks that nothing is
left behind. Needs root: skipped with the reason otherwise.
"""

import json
import subprocess
import time

from e2e_helpers import (DEMO, alive, demo_env, netns_list, orders_policy, root_iptables,
                         root_links, spiffe, wait_for)
from e2e_helpers import e2e_runnable, mesh, root_before  # noqa: F401  (fixtures)

HANDSHAKE_FAILURES = 'meshlet_tls_handshake_failures_total{reason="handshake"}'
OUT_CONNS = 'meshlet_connections_total{direction="outbound"}'
IN_CONNS = 'meshlet_connections_total{direction="inbound"}'


def decisions(m, decision, rule):
    return m.get(f'meshlet_policy_decisions_total{{decision="{decision}",rule="{rule}"}}', 0)


def test_topology(mesh):
    """Every service in its own namespace with its own address; the app port
    redirected to the sidecar by meshlet-iptables; the sidecars run as the
    proxy uid and registered their inbound addresses with control."""
    for node in ("control", "frontend", "orders", "reports"):
        assert mesh.ns[node] in netns_list()
        p = mesh.run(node, "ip", "-4", "-o", "addr", "show", "dev", "ml-eth0", check=True)
        assert f"{mesh.ip[node]}/24" in p.stdout
    for svc in ("frontend", "orders", "reports"):
        rules = mesh.run(svc, "iptables", "-w", "-t", "nat", "-S", check=True).stdout
        assert "-A OUTPUT -p tcp -j MESHLET_OUTPUT" in rules
        assert f"-m owner --uid-owner {mesh.proxy_uid} -j RETURN" in rules
        assert "--dport 8080 -j REDIRECT --to-ports 15006" in rules
    pids = mesh.pids()
    for svc in ("frontend", "orders", "reports"):
        pid, _ = pids[f"{svc}-proxy"]
        uid = [ln.split()[1] for ln in open(f"/proc/{pid}/status") if ln.startswith("Uid:")][0]
        assert int(uid) == mesh.proxy_uid, f"{svc}'s sidecar runs as uid {uid}"
    proxies = json.loads(mesh.ctl("-o", "json", "proxies", "list").stdout)["proxies"]
    got = {p["service"]: p["address"] for p in proxies}
    # orders has two inbound listeners (its app, and its gRPC app on
    # 15007); `proxies list` shows one address per proxy, either of them
    want = {s: {f"{mesh.ip[s]}:15006"} for s in ("frontend", "orders", "reports")}
    want["orders"].add(f"{mesh.ip['orders']}:15007")
    assert set(got) == set(want) and all(got[s] in want[s] for s in want), got


def test_allowed_call_goes_through_both_sidecars_with_mtls(mesh):
    """frontend's app calls orders' address and app port in plain HTTP; its
    sidecar takes the connection (metrics), opens mutual TLS to orders'
    sidecar, which verified frontend's SVID (it names frontend's SPIFFE ID to
    the app and in its access log) and allowed it by rule."""
    f0, o0 = mesh.metrics("frontend"), mesh.metrics("orders")
    code, body, err = mesh.curl("frontend", mesh.orders_url())
    assert (code, body) == (200, f"orders: 3 open orders (caller {spiffe('frontend')})"), err
    f1, o1 = mesh.metrics("frontend"), mesh.metrics("orders")
    assert f1[OUT_CONNS] == f0[OUT_CONNS] + 1, "frontend's sidecar did not carry the call"
    assert o1[IN_CONNS] == o0[IN_CONNS] + 1, "orders' sidecar did not receive the call"
    assert decisions(o1, "allow", "frontend-reads-orders") == \
        decisions(o0, "allow", "frontend-reads-orders") + 1
    assert o1.get('meshlet_http_requests_total{code="200"}', 0) == \
        o0.get('meshlet_http_requests_total{code="200"}', 0) + 1
    line = wait_for(lambda: [e for e in mesh.access_log("orders")
                             if e.get("peer") == spiffe("frontend")], 3,
                    what="orders' access-log line")[-1]
    assert (line["direction"], line["decision"], line["rule"], line["status"]) == \
        ("inbound", "allow", "frontend-reads-orders", 200)
    assert line["source"].startswith(mesh.ip["frontend"] + ":")


def test_denied_call_names_the_rule(mesh):
    code, body, err = mesh.curl("reports", mesh.orders_url())
    assert code == 403, (code, body, err)
    assert json.loads(body).get("rule") == "no-reports"
    # a path the allow rule does not cover, from an allowed peer: default deny
    code, body, _ = mesh.curl("frontend", mesh.orders_url("/admin"))
    assert code == 403 and json.loads(body).get("rule") == "default"


def test_plaintext_around_the_sidecars_is_refused(mesh):
    """A plaintext call to orders' app port that skips the caller's sidecar
    (as the proxy uid in reports, or from control's namespace, which has no
    sidecar) lands on orders' mutual-TLS listener and is refused there."""
    before = mesh.metrics("orders").get(HANDSHAKE_FAILURES, 0)
    code, body, err = mesh.curl("reports", mesh.orders_url(), uid=mesh.proxy_uid)
    assert code == 0 and "3 open orders" not in body, (code, body, err)
    code, body, err = mesh.curl("control", mesh.orders_url())
    assert code == 0 and "3 open orders" not in body, (code, body, err)
    after = mesh.metrics("orders").get(HANDSHAKE_FAILURES, 0)
    assert after == before + 2, "orders' TLS listener did not see the two plaintext calls"


def test_destination_outside_the_mesh_is_refused(mesh):
    """frontend's app connects to an address no service registered
    (control's API): its sidecar refuses it (outside_mesh: refuse)."""
    code, _, err = mesh.curl("frontend", f"http://{mesh.ip['control']}:7443/v1/health")
    assert code == 0, err
    wait_for(lambda: "is outside the mesh: refused" in mesh.stderr("frontend-proxy"), 3,
             what="frontend's sidecar to log the refusal")


def test_policy_push_flips_the_decision_within_a_second(mesh):
    assert mesh.curl("reports", mesh.orders_url())[0] == 403
    mesh.apply_policy(orders_policy(reports_allowed=True))
    t0 = time.monotonic()
    wait_for(lambda: mesh.curl("reports", mesh.orders_url())[0] == 200, 5,
             what="reports to be allowed")
    took = time.monotonic() - t0
    assert took < 1.0, f"the policy push took {took:.2f}s to take effect"
    code, body, _ = mesh.curl("reports", mesh.orders_url())
    assert (code, body) == (200, f"orders: 3 open orders (caller {spiffe('reports')})")
    # and back
    mesh.apply_policy(orders_policy(reports_allowed=False))
    t0 = time.monotonic()
    wait_for(lambda: mesh.curl("reports", mesh.orders_url())[0] == 403, 5,
             what="reports to be denied again")
    assert time.monotonic() - t0 < 1.0
    assert mesh.curl("frontend", mesh.orders_url())[0] == 200


def test_each_request_is_counted_once_by_its_rule(mesh):
    """meshlet_policy_decisions_total counts one decision per HTTP request,
    under the rule that made it (no extra connection-level decision)."""
    m0 = mesh.metrics("orders")
    for _ in range(3):
        assert mesh.curl("frontend", mesh.orders_url())[0] == 200
    for _ in range(2):
        assert mesh.curl("reports", mesh.orders_url())[0] == 403
    m1 = mesh.metrics("orders")
    delta = {k: m1[k] - m0.get(k, 0) for k in m1
             if k.startswith("meshlet_policy_decisions_total") and m1[k] != m0.get(k, 0)}
    assert delta == {
        'meshlet_policy_decisions_total{decision="allow",rule="frontend-reads-orders"}': 3,
        'meshlet_policy_decisions_total{decision="deny",rule="no-reports"}': 2,
    }, "3 allowed and 2 denied requests should count 3 + 2 decisions, each under its rule"


def test_certificate_rotation_keeps_calls_working(mesh):
    def serials():
        certs = json.loads(mesh.ctl("-o", "json", "certs", "list").stdout)["certs"]
        return {(c["service"], c["serial"]) for c in certs}

    before = serials()
    mesh.ctl("certs", "rotate", "--all")
    new = wait_for(lambda: (lambda n: n if {s for s, _ in n} >= {"frontend", "orders", "reports"}
                            else None)(serials() - before), 10, what="new serials")
    assert len(new) == 3
    assert mesh.curl("frontend", mesh.orders_url())[0] == 200
    assert mesh.curl("reports", mesh.orders_url())[0] == 403


def test_down_leaves_nothing_behind(mesh, root_before):
    pids = mesh.pids()
    assert set(pids) >= {"control", "frontend-app", "frontend-proxy", "orders-app",
                         "orders-proxy", "reports-app", "reports-proxy"}
    assert all(alive(*p) for p in pids.values())
    p = mesh.down()
    assert p.returncode == 0, p.stderr
    assert not mesh.state.exists()
    assert [n for n in netns_list() if n.startswith(f"ml-{mesh.id}-")] == []
    assert set(netns_list()) <= root_before["netns"]
    assert [n for n in root_links() if n not in root_before["links"]] == []
    assert root_iptables() == root_before["iptables"]
    assert [name for name, pid in pids.items() if alive(*pid)] == []
    reports = mesh.sanitizer_reports()
    assert not reports, "\n".join(reports)
    # a second down finds nothing to do
    p = subprocess.run([str(DEMO), "down", mesh.id], capture_output=True, text=True,
                       env=demo_env())
    assert p.returncode == 0 and "no meshlet demo to remove" in p.stdout
