"""Inbound listener: mutual TLS, X.509-SVID checks, then the L4 policy.

Each refused case connects straight to the inbound listener with Python's
ssl module, so the proxy's own outbound side plays no part.
"""

from collections import namedtuple

import pytest

from helpers import client_context, free_port, spiffe, try_call, wait_for

Case = namedtuple("Case", "id svid reasons")

# (client certificate, the handshake-failure reasons that may be counted)
REFUSED = [
    Case("no-client-cert", None, {"no_peer_certificate", "no_certificate"}),
    Case("other-ca", ("frontend", "other-ca"), {"untrusted"}),
    Case("expired", ("frontend", "expired"), {"expired"}),
    Case("two-uri-sans", ("frontend", "two-uris"), {"multiple_uri_sans"}),
    Case("no-uri-san", ("frontend", "no-uri"), {"no_uri_san"}),
    Case("other-trust-domain", ("frontend", "other-td"), {"wrong_trust_domain"}),
    Case("leaf-is-ca", ("frontend", "leaf-ca"), {"leaf_is_ca"}),
    # OpenSSL's own purpose check may catch it first (verify error), or the SVID check.
    Case("eku-server-only", ("frontend", "eku-server"), {"bad_ext_key_usage", "untrusted"}),
    Case("bad-service-name", ("frontend", "bad-name"), {"not_a_service", "bad_spiffe_id"}),
    Case("not-a-svc-path", ("frontend", "not-svc"), {"not_a_service"}),
]

FAILURES = "meshlet_tls_handshake_failures_total"


def grown(before, after):
    return {r for r, v in after.items() if v > before.get(r, 0)}


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_inbound_refuses_bad_client_certificates(mesh, pki, case):
    app = mesh.app("echo")
    inb, port = mesh.inbound(app.port)
    before = inb.metrics().by_label(FAILURES, "reason")

    svid = pki.svid(*case.svid) if case.svid else None
    ok, why = try_call(port, client_context(svid, bundle=pki.bundle))
    assert not ok, f"{case.id}: the inbound relayed data for a refused client certificate"
    assert app.connections == 0, f"{case.id}: the app was connected for a refused peer"

    reasons = wait_for(lambda: grown(before, inb.metrics().by_label(FAILURES, "reason")), 5,
                       what=f"{FAILURES} to count the {case.id} refusal")
    assert reasons & case.reasons, (f"{case.id}: counted under {sorted(reasons)}, "
                                    f"expected one of {sorted(case.reasons)}")

    # The listener still serves a valid peer afterwards.
    ok, why = try_call(port, client_context(pki.svid("frontend")))
    assert ok, why
    assert app.connections == 1


def test_inbound_refuses_tls12_by_default(mesh, pki):
    import ssl
    app = mesh.app("echo")
    inb, port = mesh.inbound(app.port)
    ctx = client_context(pki.svid("frontend"), max_version=ssl.TLSVersion.TLSv1_2)
    ok, why = try_call(port, ctx)
    assert not ok, "TLS 1.2 accepted although the config does not ask for it"
    assert app.connections == 0


@pytest.mark.parametrize("caller,rule", [("intruder", "no-intruder"), ("payments", "default")])
def test_policy_denies_principal(mesh, pki, caller, rule):
    """A CA-valid SVID the policy does not admit: the handshake completes,
    then the connection is closed, logged and counted with the deciding rule."""
    app = mesh.app("echo")
    inb, port = mesh.inbound(app.port)
    ok, why = try_call(port, client_context(pki.svid(caller)))
    assert not ok, f"{caller} was let through"
    assert app.connections == 0

    e = inb.wait_access(peer=spiffe(caller), decision="deny")
    assert e.get("rule") == rule, e
    assert e.get("direction") == "inbound", e
    m = wait_for(lambda: inb.metrics().get("meshlet_policy_decisions_total", decision="deny", rule=rule),
                 5, what=f'meshlet_policy_decisions_total{{decision="deny",rule="{rule}"}}')
    assert m >= 1

    ok, why = try_call(port, client_context(pki.svid("frontend")))
    assert ok, why
    e = inb.wait_access(peer=spiffe("frontend"), decision="allow")
    assert e.get("rule") == "frontend-to-orders", e


def test_policy_deny_wins_and_wildcards(mesh, pki):
    app = mesh.app("echo")
    rules = [
        {"name": "any-peer", "action": "allow", "from": ["*"]},
        {"name": "svc-prefix-deny", "action": "deny", "from": ["spiffe://mesh.local/svc/*"],
         "ports": [1]},   # another port: never matches this listener
        {"name": "no-intruder", "action": "deny", "from": [spiffe("intruder")]},
    ]
    inb, port = mesh.inbound(app.port, rules=rules)
    assert try_call(port, client_context(pki.svid("payments")))[0]
    assert not try_call(port, client_context(pki.svid("intruder")))[0]
    inb.wait_access(peer=spiffe("payments"), decision="allow", rule="any-peer")
    inb.wait_access(peer=spiffe("intruder"), decision="deny", rule="no-intruder")


def test_policy_ports_are_the_applications_ports(mesh, pki):
    app = mesh.app("echo")
    rules = [
        {"name": "frontend-elsewhere", "action": "allow", "from": [spiffe("frontend")],
         "ports": [free_port()]},
        {"name": "payments-here", "action": "allow", "from": [spiffe("payments")], "ports": [app.port]},
    ]
    inb, port = mesh.inbound(app.port, rules=rules)
    assert not try_call(port, client_context(pki.svid("frontend")))[0]
    assert try_call(port, client_context(pki.svid("payments")))[0]
    inb.wait_access(peer=spiffe("frontend"), decision="deny", rule="default")
    inb.wait_access(peer=spiffe("payments"), decision="allow", rule="payments-here")


def test_http_fields_on_a_tcp_port_fail_closed(mesh, pki):
    """On a tcp listener an allow rule naming HTTP fields never matches, and a
    deny rule naming them matches on its other fields."""
    app = mesh.app("echo")
    rules = [
        {"name": "http-only-allow", "action": "allow", "from": ["*"], "methods": ["GET"]},
        {"name": "frontend", "action": "allow", "from": [spiffe("frontend")]},
        {"name": "payments-admin", "action": "deny", "from": [spiffe("payments")], "paths": ["/admin/*"]},
        {"name": "payments", "action": "allow", "from": [spiffe("payments")]},
    ]
    inb, port = mesh.inbound(app.port, rules=rules)
    assert try_call(port, client_context(pki.svid("frontend")))[0]
    assert not try_call(port, client_context(pki.svid("payments")))[0]
    assert not try_call(port, client_context(pki.svid("inventory")))[0]
    inb.wait_access(peer=spiffe("frontend"), decision="allow", rule="frontend")
    inb.wait_access(peer=spiffe("payments"), decision="deny", rule="payments-admin")
    inb.wait_access(peer=spiffe("inventory"), decision="deny", rule="default")
