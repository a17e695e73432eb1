"""The admin listener: /healthz, /ready, /metrics, /config."""

import json

from helpers import client_context, try_call, wait_for

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


def test_admin_out_of_descriptors_does_not_spin(mesh, pki):
    """The process runs out of file descriptors with a health probe pending
    on the admin listener: accepting pauses (no busy loop, under 5 % of a
    core), the "Too many open files" line is rate-limited, and the probe is
    answered once descriptors are free again (issue 9, defect 10)."""
    import socket
    import subprocess
    import threading
    import time

    from http_helpers import cpu_seconds

    app = mesh.app("echo")
    tmo = {"handshake_seconds": 60, "connect_seconds": 5, "idle_seconds": 300, "drain_seconds": 1}
    inb, port = mesh.inbound(app.port, timeouts=tmo)
    limit = 64
    subprocess.run(["prlimit", "--pid", str(inb.pid), f"--nofile={limit}:{limit}"], check=True)

    # Connections that never start their handshake fill the descriptors.
    fillers = []
    try:
        for _ in range(limit + 16):
            fillers.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_for(lambda: "Too many open files" in inb.stderr(), 10,
                 what="the proxy to run out of descriptors")

        probe = {}

        def health():
            try:
                probe["answer"] = inb.admin("/healthz", timeout=30)
            except OSError as e:
                probe["answer"] = e
        t = threading.Thread(target=health, daemon=True)
        t.start()
        time.sleep(0.5)                  # the probe waits in the admin backlog
        assert "answer" not in probe, f"answered while out of descriptors: {probe}"

        err0, cpu0, t0 = len(inb.stderr()), cpu_seconds(inb.pid), time.monotonic()
        time.sleep(3)
        cpu = (cpu_seconds(inb.pid) - cpu0) / (time.monotonic() - t0)
        grown = len(inb.stderr()) - err0
        assert cpu < 0.05, f"the proxy used {cpu:.0%} of a core while out of descriptors"
        assert grown < 4096, f"stderr grew by {grown} bytes in 3 s:\n{inb.stderr()[-1500:]}"
    finally:
        for s in fillers:
            s.close()
    t.join(15)
    assert probe.get("answer") == (200, "ok\n"), probe
    assert try_call(port, client_context(pki.svid("frontend")))[0]
