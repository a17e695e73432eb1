"""The registry as the transparent sidecars use it, in the demo's
namespaces: a proxy cannot claim another service's address (issue 9,
defect 1), and the destination port is part of the mapping (defect 3).

One mesh (the demo's topology) serves the module; the last test removes
it and checks the sidecars' logs for sanitizer reports. Needs root:
skipped with the reason otherwise.
"""

import json

from e2e_helpers import APP_PORT, spiffe, wait_for
from e2e_helpers import e2e_runnable, mesh, root_before  # noqa: F401  (fixtures)


def register_as(mesh, svid_of, node, address, ports):
    """POST /v1/services/<svid_of>/endpoints with svid_of's SVID (its
    sidecar's state_dir), made from node's namespace as the proxy uid (so
    node's redirect lets it through). Returns (HTTP status, body)."""
    state = mesh.dir / svid_of / "state"
    body = json.dumps({"address": address, "ports": ports})
    p = mesh.run(node, "curl", "-sS", "--max-time", "5", "--cacert", state / "bundle.pem",
                 "--cert", state / "svid.pem", "--key", state / "svid.key",
                 "-H", "content-type: application/json", "-X", "POST", "--data", body,
                 "-w", "\n%{http_code}",
                 f"{mesh.info['CONTROL_URL']}/v1/services/{svid_of}/endpoints",
                 uid=mesh.proxy_uid)
    out, _, code = p.stdout.rpartition("\n")
    return int(code or 0), out.strip() or p.stderr.strip()


def registry(mesh):
    return json.loads(mesh.ctl("-o", "json", "endpoints", "list").stdout)


def orders_calls_work(mesh):
    """frontend reaches orders (allowed), reports is denied by orders' own
    rule: both calls went to orders' sidecar, not to a claimed look-alike."""
    code, body, err = mesh.curl("frontend", mesh.orders_url())
    assert (code, body) == (200, f"orders: 3 open orders (caller {spiffe('frontend')})"), \
        (code, body, err)
    code, body, err = mesh.curl("reports", mesh.orders_url())
    assert code == 403 and json.loads(body).get("rule") == "no-reports", (code, body, err)


def test_the_demo_registered_each_sidecar_once(mesh):
    entries = registry(mesh)["endpoints"]
    got = {(e["service"], e["address"], tuple(e["ports"]), e["via"]) for e in entries}
    want = {(s, f"{mesh.ip[s]}:15006", (APP_PORT,), "connection")
            for s in ("frontend", "orders", "reports")}
    # orders' second inbound listener, in front of its gRPC app on 9090:
    # one entry per listener, each with its own application port
    want.add(("orders", f"{mesh.ip['orders']}:15007", (9090,), "connection"))
    assert got == want
    orders_calls_work(mesh)


def test_a_proxy_cannot_claim_another_services_address(mesh):
    """frontend's SVID posts orders' real address as frontend's: from
    frontend's own namespace it is not an address frontend connects from
    (403); from orders' namespace (a shared-IP host) orders holds it and
    its application port (409). Calls to orders keep going to orders."""
    orders_in = f"{mesh.ip['orders']}:15006"
    code, body = register_as(mesh, "frontend", "frontend", orders_in, [APP_PORT])
    assert code == 403, (code, body)
    assert json.loads(body)["error"]["path"] == "address"
    # an outside host's address: the same
    code, body = register_as(mesh, "frontend", "frontend", f"{mesh.ip['control']}:7443", [7443])
    assert code == 403, (code, body)
    # from orders' IP: its address and its app port are orders'
    code, body = register_as(mesh, "frontend", "orders", orders_in, [APP_PORT])
    assert code == 409 and "orders" in body, (code, body)
    code, body = register_as(mesh, "frontend", "orders", f"{mesh.ip['orders']}:15099", [APP_PORT])
    assert code == 409 and "orders" in body, (code, body)
    entries = registry(mesh)["endpoints"]
    # (orders twice: its app's listener and its gRPC app's)
    assert sorted(e["service"] for e in entries) == ["frontend", "orders", "orders", "reports"], entries
    orders_calls_work(mesh)
    # control's address stays outside the mesh for frontend's app
    code, _, err = mesh.curl("frontend", f"http://{mesh.ip['control']}:7443/v1/health")
    assert code == 0, err


def test_the_destination_port_is_part_of_the_mapping(mesh):
    """orders registered its inbound address with application port 8080:
    frontend's app dialling orders' IP on another port (5432) is outside
    the mesh (refused here, outside_mesh: refuse), not delivered to orders'
    app on 8080."""
    before = mesh.stderr("frontend-proxy").count(f"{mesh.ip['orders']}:5432 is outside the mesh")
    code, body, err = mesh.curl("frontend", f"http://{mesh.ip['orders']}:5432/orders")
    assert code == 0 and "open orders" not in body, (code, body, err)
    wait_for(lambda: mesh.stderr("frontend-proxy").count(
        f"{mesh.ip['orders']}:5432 is outside the mesh") > before, 3,
        what="frontend's sidecar to refuse orders_ip:5432")
    # the registered application port still maps to orders
    code, body, _ = mesh.curl("frontend", mesh.orders_url())
    assert code == 200 and "3 open orders" in body


def test_teardown_without_sanitizer_reports(mesh):
    p = mesh.down()
    assert p.returncode == 0, p.stderr
    reports = mesh.sanitizer_reports()
    assert not reports, "\n".join(reports)
