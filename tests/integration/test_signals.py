"""SIGHUP reloads (policy, certificates, config) and SIGTERM drains."""

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from helpers import (client_context, connect_refused, roundtrip, spiffe, tls_connect, try_call,
                     wait_for)

V1 = [{"name": "v1-frontend", "action": "allow", "from": [spiffe("frontend")]}]
V2 = [{"name": "v2-payments", "action": "allow", "from": [spiffe("payments")]}]


def write_json(path, doc):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def config_version(p):
    return p.metrics().get("meshlet_config_version")


def test_sighup_policy_applies_to_new_connections_only(mesh, pki):
    app = mesh.app("echo")
    inb, port = mesh.inbound(app.port, rules=V1)
    frontend, payments = client_context(pki.svid("frontend")), client_context(pki.svid("payments"))

    held = tls_connect(port, frontend)
    assert roundtrip(held) == b"ping\n"
    assert not try_call(port, payments)[0]
    v0 = config_version(inb)

    write_json(inb.cfg["policy_file"], {"service": "orders", "default": "deny", "rules": V2})
    inb.signal(signal.SIGHUP)
    wait_for(lambda: config_version(inb) > v0, 10, what="meshlet_config_version to grow after SIGHUP")

    assert try_call(port, payments)[0], "the new policy's allow rule is not in force"
    assert not try_call(port, frontend)[0], "the old policy still admits new connections"
    # The connection opened under the old snapshot keeps working.
    assert roundtrip(held, b"still here\n") == b"still here\n"
    held.close()
    inb.wait_access(peer=spiffe("payments"), decision="allow", rule="v2-payments")
    inb.wait_access(peer=spiffe("frontend"), decision="deny", rule="default")
    inb.wait_access(peer=spiffe("frontend"), decision="allow", rule="v1-frontend")
    assert inb.admin("/ready")[0] == 200


BROKEN = [
    # (what is broken, file, document, JSON path the error must name)
    ("policy", "policy_file",
     {"service": "orders", "rules": [{"name": "open", "action": "allow", "from": ["*"], "ports": [70000]}]},
     "rules[0].ports[0]"),
    ("policy-unknown-field", "policy_file",
     {"service": "orders", "rules": [{"name": "open", "action": "allow", "from": ["*"], "color": "red"}]},
     "rules[0].color"),
    ("config", None, {"timeouts": {"idle_seconds": "long"}}, "timeouts.idle_seconds"),
]


@pytest.mark.parametrize("what,key,doc,path", BROKEN, ids=[b[0] for b in BROKEN])
def test_sighup_with_broken_file_keeps_old_snapshot(mesh, pki, what, key, doc, path):
    app = mesh.app("echo")
    inb, port = mesh.inbound(app.port, rules=V1)
    frontend, payments = client_context(pki.svid("frontend")), client_context(pki.svid("payments"))
    v0 = config_version(inb)
    err_before = len(inb.stderr())

    if key == "policy_file":
        write_json(inb.cfg["policy_file"], doc)
    else:
        cfg = json.loads(inb.config_path.read_text())
        cfg.update(doc)
        write_json(inb.config_path, cfg)
    inb.signal(signal.SIGHUP)
    wait_for(lambda: path in inb.stderr()[err_before:], 10,
             what=f"an error naming {path} on stderr after SIGHUP")

    assert inb.alive()
    assert config_version(inb) == v0, "a broken file changed the config version"
    assert inb.admin("/ready")[0] == 200
    assert try_call(port, frontend)[0], "the old policy no longer admits frontend"
    # The broken policies would admit anyone: the old one must still refuse payments.
    assert not try_call(port, payments)[0]

    # A good file afterwards is taken.
    if key == "policy_file":
        write_json(inb.cfg["policy_file"], {"service": "orders", "rules": V2})
    else:
        write_json(inb.config_path, inb.cfg)
        write_json(inb.cfg["policy_file"], {"service": "orders", "rules": V2})
    inb.signal(signal.SIGHUP)
    wait_for(lambda: config_version(inb) > v0, 10, what="the next good reload")
    assert try_call(port, payments)[0]


def test_sighup_reloads_certificate(mesh, pki, tmp_path):
    svid_dir = tmp_path / "orders-svid"
    old = pki.reissue("orders", svid_dir)
    app = mesh.app("echo")
    inb, port = mesh.inbound(app.port, svid=old)
    frontend = client_context(pki.svid("frontend"))

    old_serial = old.serial()
    held = tls_connect(port, frontend)
    assert int(held.getpeercert()["serialNumber"], 16) == int(old_serial, 16)
    v0 = config_version(inb)

    new = pki.reissue("orders", svid_dir)        # same files, new key and serial
    assert new.serial() != old_serial
    inb.signal(signal.SIGHUP)
    wait_for(lambda: config_version(inb) > v0, 10, what="meshlet_config_version to grow")

    with tls_connect(port, frontend) as s:
        assert int(s.getpeercert()["serialNumber"], 16) == int(new.serial(), 16), \
            "new handshakes still present the old certificate"
        assert roundtrip(s) == b"ping\n"
    assert roundtrip(held, b"old conn\n") == b"old conn\n"
    held.close()
    assert inb.metrics().get("meshlet_cert_expiry_timestamp_seconds") == pytest.approx(new.not_after(), abs=1)


def _held_connection(side, mesh, pki, drain):
    """An open, working connection through the side under test. Returns
    (proxy, its listening port, a function opening a new connection, socket)."""
    timeouts = {"handshake_seconds": 10, "connect_seconds": 5, "idle_seconds": 300, "drain_seconds": drain}
    app = mesh.app("echo")
    if side == "inbound":
        inb, port = mesh.inbound(app.port, timeouts=timeouts)
        ctx = client_context(pki.svid("frontend"))
        s = tls_connect(port, ctx)
        return inb, port, s
    outb, inb, port = mesh.pair(app, out_extra={"timeouts": timeouts})
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return outb, port, s


@pytest.mark.parametrize("side", ["inbound", "outbound"])
def test_sigterm_drains_open_connections(mesh, pki, side):
    proxy, port, held = _held_connection(side, mesh, pki, drain=8)
    assert roundtrip(held) == b"ping\n"

    proxy.signal(signal.SIGTERM)
    wait_for(lambda: connect_refused(port), 3, what="the listener to refuse new connections after SIGTERM")
    assert proxy.alive(), "exited without waiting for the open connection"
    assert roundtrip(held, b"finishing\n") == b"finishing\n", "open connection broken by the drain"
    t0 = time.monotonic()
    held.close()
    rc = proxy.wait_exit(5)
    assert rc == 0, f"exit status {rc} after draining (None: still running)"
    assert time.monotonic() - t0 < 5
    # The held connection's line (a probe that raced the listener's close may log one too).
    peer = spiffe("frontend" if side == "inbound" else "orders")
    wait_for(lambda: [e for e in proxy.access_log() if e.get("direction") == side and e.get("peer") == peer
                      and e.get("bytes_in", 0) >= len(b"ping\nfinishing\n")], 5,
             what="the drained connection's access-log line")


def test_sigterm_drain_is_bounded(mesh, pki):
    proxy, port, held = _held_connection("inbound", mesh, pki, drain=2)
    assert roundtrip(held) == b"ping\n"
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    rc = proxy.wait_exit(2 + 5)
    waited = time.monotonic() - t0
    assert rc == 0, f"exit status {rc} (None: still running {waited:.1f}s after SIGTERM, drain_seconds 2)"
    assert waited > 1.5, f"exited after {waited:.1f}s without waiting for the open connection"
    held.settimeout(5)
    try:
        assert held.recv(10) == b""
    except OSError:
        pass
    held.close()


def resumptions(p, direction):
    return p.metrics().get("meshlet_tls_resumptions_total", direction=direction) or 0


def change_policy(p, rule_name):
    """Rewrites p's policy file with one more (harmless) rule."""
    path = Path(p.cfg["policy_file"])
    doc = json.loads(path.read_text())
    doc["rules"] = doc.get("rules", []) + [
        {"name": rule_name, "action": "deny", "from": [spiffe("nobody")]}]
    write_json(path, doc)


def reload(p):
    v0 = config_version(p)
    p.signal(signal.SIGHUP)
    wait_for(lambda: config_version(p) > v0, 10, what=f"{p.name} to reload")


def test_sighup_keeps_tls_sessions_unless_certificates_change(mesh, pki, tmp_path):
    """Static mode: a SIGHUP that changes only the policy keeps the TLS
    contexts, so the inbound's session tickets stay valid and the outbound
    resumes from its session cache; a changed certificate starts afresh
    (issue 9, defect 16)."""
    app = mesh.app("echo")
    out_svid = pki.reissue("frontend", tmp_path / "frontend-svid")
    in_svid = pki.reissue("orders", tmp_path / "orders-svid")
    outb, inb, port = mesh.pair(app, in_extra={"svid": in_svid}, out_extra={"svid": out_svid})

    def call():
        ok, why = try_call(port)
        assert ok, why
        time.sleep(0.1)      # the session ticket arrives after the reply

    def counts():
        return resumptions(outb, "outbound"), resumptions(inb, "inbound")

    call()
    before = counts()
    call()
    assert counts() == (before[0] + 1, before[1] + 1), "the second connection did not resume"

    # Policy only, on both sides: the next connection still resumes.
    for p, name in ((outb, "hup-out"), (inb, "hup-in")):
        change_policy(p, name)
        reload(p)
    before = counts()
    call()
    assert counts() == (before[0] + 1, before[1] + 1), \
        "no resumption after a policy-only SIGHUP: the TLS contexts were rebuilt"

    # A new certificate for the outbound: its session cache starts afresh.
    pki.reissue("frontend", tmp_path / "frontend-svid")
    reload(outb)
    before = counts()
    call()
    assert counts() == before, "resumed a session made with the old certificate"
    call()
    assert counts() == (before[0] + 1, before[1] + 1)

    # A new certificate for the inbound: its old tickets are no longer accepted.
    pki.reissue("orders", tmp_path / "orders-svid")
    reload(inb)
    before = counts()
    call()
    assert counts() == before, "the inbound accepted a ticket from before its new certificate"
    call()
    assert counts() == (before[0] + 1, before[1] + 1)
