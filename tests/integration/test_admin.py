"""The admin listener: /healthz, /ready, /metrics, /config."""

import json

from helpers import try_call, wait_for

L4_METRICS = [
    "meshlet_connections_total",
    "meshlet_connections_active",
    "meshlet_tls_handshake_failures_total",
    "meshlet_policy_decisions_total",
    "meshlet_bytes_total",
    "meshlet_cert_expiry_timestamp_seconds",
    "meshlet_config_version",
]


def test_admin_endpoints(mesh, pki):
    app = mesh.app("echo")
    outb, inb, port = mesh.pair(app)
    assert try_call(port, None)[0]

    for p in (outb, inb):
        assert p.admin("/healthz")[0] == 200
        assert p.admin("/ready")[0] == 200
        st, _ = p.admin("/no-such-endpoint")
        assert st == 404, f"{p.name}: unknown admin path answered {st}"

    mi, mo = inb.metrics(), outb.metrics()
    for name in L4_METRICS:
        assert name in mi.text, f"/metrics lacks {name}"
    assert "# TYPE meshlet_connections_total counter" in mi.text
    assert mi.get("meshlet_connections_total", direction="inbound") >= 1
    assert mo.get("meshlet_connections_total", direction="outbound") >= 1
    assert mi.get("meshlet_policy_decisions_total", decision="allow", rule="frontend-to-orders") >= 1
    assert mi.get("meshlet_bytes_total", direction="inbound") > 0
    assert mo.get("meshlet_bytes_total", direction="outbound") > 0
    assert abs(mi.get("meshlet_cert_expiry_timestamp_seconds") - pki.svid("orders").not_after()) <= 1
    assert abs(mo.get("meshlet_cert_expiry_timestamp_seconds") - pki.svid("frontend").not_after()) <= 1
    wait_for(lambda: inb.metrics().get("meshlet_connections_active", direction="inbound") == 0, 5,
             what="meshlet_connections_active to fall back to 0")


def test_config_endpoint_never_shows_keys(mesh, pki):
    app = mesh.app("echo")
    outb, inb, port = mesh.pair(app)
    for p, svc in ((inb, "orders"), (outb, "frontend")):
        st, body = p.admin("/config")
        assert st == 200
        doc = json.loads(body)
        assert svc in json.dumps(doc), f"/config of {p.name} does not describe {svc}: {body[:500]}"
        assert "PRIVATE KEY" not in body
        key_lines = [l for l in pki.svid(svc).key.read_text().splitlines() if not l.startswith("-----")]
        for l in key_lines:
            assert l not in body, f"/config of {p.name} contains key material"


def test_admin_state_changes_need_post(mesh, pki):
    """GET never changes state: GET /drain leaves the proxy serving."""
    app = mesh.app("echo")
    outb, inb, port = mesh.pair(app)
    st, _ = inb.admin("/drain")
    assert st >= 400, f"GET /drain answered {st}"
    assert inb.admin("/ready")[0] == 200
    assert try_call(port, None)[0], "the proxy stopped serving after GET /drain"
