"""meshletctl against a real meshlet-control: the operator flow of docs/design.md
in both output formats, with the exit codes (0 success, 1 refused, 2 usage
or local problem)."""

import json
import re

import pytest

from control_helpers import (Identity, control, control_factory, enroll, new_svid,  # noqa: F401
                             policy_doc, spiffe)

ORDERS = {
    "service": "orders",
    "default": "deny",
    "rules": [
        {"name": "frontend-reads", "action": "allow", "from": [spiffe("frontend")],
         "ports": [8080], "methods": ["GET", "HEAD"], "paths": ["/orders", "/orders/*"],
         "headers": {"x-tenant": "acme"}},
        {"name": "no-admin", "action": "deny", "from": ["*"], "paths": ["/admin/*"]},
        {"name": "batch-tcp", "action": "allow", "from": [spiffe("batch")], "ports": [9000]},
    ],
}


def table(text):
    """Rows of an aligned table (header first) as lists of cells."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines() if line.strip()]


def write(tmp_path, name, doc):
    p = tmp_path / name
    p.write_text(json.dumps(doc, indent=2) if not isinstance(doc, str) else doc)
    return p


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def refused(p, *needles):
    assert p.returncode == 1, f"expected exit 1, got {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    for n in needles:
        assert n in p.stderr, f"{n!r} not in stderr: {p.stderr!r}"
    return p


def usage(p, *needles):
    assert p.returncode == 2, f"expected exit 2, got {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    for n in needles:
        assert n in p.stderr, f"{n!r} not in stderr: {p.stderr!r}"
    return p


# ---------------------------------------------------------------- policies


def test_policy_apply_get_list_delete(control, tmp_path):
    # nothing yet
    assert control.ctl_json("policy", "list") == {"policies": []}
    ok(control.ctl("policy", "list"))

    f = write(tmp_path, "orders.json", ORDERS)
    p = ok(control.ctl("policy", "apply", "-f", f))
    rows = table(p.stdout)
    assert rows[0][:2] == ["SERVICE", "VERSION"], p.stdout
    assert rows[1][0] == "orders"
    v1 = int(rows[1][1])
    assert v1 > 0

    got = control.ctl_json("policy", "get", "orders")
    assert got["version"] == v1
    assert got["policy"]["service"] == "orders"
    assert [r["name"] for r in got["policy"]["rules"]] == ["frontend-reads", "no-admin", "batch-tcp"]
    assert got["policy"]["rules"][0]["headers"] == {"x-tenant": "acme"}

    p = ok(control.ctl("policy", "get", "orders"))
    assert "frontend-reads" in p.stdout and "no-admin" in p.stdout and "/admin/*" in p.stdout
    rows = table(p.stdout)
    assert rows[0] == ["SERVICE", "VERSION", "DEFAULT", "RULES"]
    assert rows[1] == ["orders", str(v1), "deny", "3"]

    # apply again (json output): the version grows
    out = control.ctl_json("policy", "apply", "-f", f)
    assert out["service"] == "orders" and out["version"] > v1
    v2 = out["version"]

    # a second service; the list shows both with their versions
    ok(control.ctl("policy", "apply", "-f", write(tmp_path, "pay.json", policy_doc("payments"))))
    lst = control.ctl_json("policy", "list")["policies"]
    assert {e["service"]: e["version"] for e in lst}["orders"] == v2
    assert {e["service"] for e in lst} == {"orders", "payments"}
    rows = table(ok(control.ctl("policy", "list")).stdout)
    assert rows[0] == ["SERVICE", "VERSION"]
    assert ["orders", str(v2)] in rows[1:]

    # standard input works as a file
    p = ok(control.ctl("policy", "apply", "-f", "-", input=json.dumps(policy_doc("stdin-svc"))))
    assert "stdin-svc" in p.stdout

    # delete: gone afterwards, a second delete is refused
    ok(control.ctl("policy", "delete", "payments"))
    refused(control.ctl("policy", "get", "payments"))
    refused(control.ctl("policy", "delete", "payments"))
    assert {e["service"] for e in control.ctl_json("policy", "list")["policies"]} == {"orders", "stdin-svc"}


def test_policy_if_match(control, tmp_path):
    f = write(tmp_path, "orders.json", ORDERS)
    v = control.ctl_json("policy", "apply", "-f", f)["version"]
    refused(control.ctl("policy", "apply", "-f", f, "--if-match", str(v + 100)))
    assert control.ctl_json("policy", "get", "orders")["version"] == v
    v2 = control.ctl_json("policy", "apply", "-f", f, "--if-match", str(v))["version"]
    assert v2 > v
    # the stale version is refused now
    refused(control.ctl("policy", "apply", "-f", f, "--if-match", str(v)))
    refused(control.ctl("policy", "delete", "orders", "--if-match", str(v)))
    ok(control.ctl("policy", "delete", "orders", "--if-match", str(v2)))


BAD_POLICIES = [
    # (what is wrong, the document, the JSON path the message must name)
    ("unknown field", {"service": "orders", "rules": [{"name": "a", "action": "allow", "colour": "red"}]},
     "rules[0].colour"),
    ("unknown top-level field", {"service": "orders", "rulez": []}, "rulez"),
    ("wrong type", {"service": "orders", "rules": [{"name": "a", "action": "allow", "ports": "80"}]},
     "rules[0].ports"),
    ("port out of range", {"service": "orders", "rules": [{"name": "a", "action": "allow",
                                                           "ports": [8080, 70000]}]},
     "rules[0].ports[1]"),
    ("duplicate rule name", {"service": "orders", "rules": [{"name": "a", "action": "allow"},
                                                            {"name": "a", "action": "deny"}]},
     "rules[1].name"),
    ("bad SPIFFE ID", {"service": "orders", "rules": [{"name": "a", "action": "allow",
                                                       "from": [spiffe("frontend"), "https://mesh.local/svc/x"]}]},
     "rules[0].from[1]"),
    ("bad trust domain", {"service": "orders", "rules": [{"name": "a", "action": "allow",
                                                          "from": ["spiffe://Mesh Local/svc/x"]}]},
     "rules[0].from[0]"),
    ("bad action", {"service": "orders", "rules": [{"name": "a", "action": "permit"}]},
     "rules[0].action"),
    ("bad default", {"service": "orders", "default": "maybe", "rules": []}, "default"),
    ("missing rule name", {"service": "orders", "rules": [{"action": "allow"}]}, "rules[0].name"),
    ("bad path", {"service": "orders", "rules": [{"name": "a", "action": "allow", "paths": ["orders"]}]},
     "rules[0].paths[0]"),
    ("bad method", {"service": "orders", "rules": [{"name": "a", "action": "allow", "methods": ["G ET"]}]},
     "rules[0].methods[0]"),
    ("bad service name", {"service": "Orders_X", "rules": []}, "service"),
]


@pytest.mark.parametrize("what,doc,path", BAD_POLICIES, ids=[b[0] for b in BAD_POLICIES])
def test_policy_errors_name_the_json_path(control, tmp_path, what, doc, path):
    f = write(tmp_path, "bad.json", doc)
    p = refused(control.ctl("policy", "apply", "-f", f))
    assert p.stdout == ""
    line = p.stderr.strip().splitlines()[-1]
    assert path in line, f"{what}: path {path!r} not in {line!r}"
    # nothing was stored
    assert control.ctl_json("policy", "list")["policies"] == []


def test_policy_apply_local_problems(control, tmp_path):
    usage(control.ctl("policy", "apply", "-f", tmp_path / "missing.json"), "missing.json")
    usage(control.ctl("policy", "apply"), "-f")
    usage(control.ctl("policy", "apply", "-f", write(tmp_path, "x.json", "{not json")), "x.json")
    usage(control.ctl("policy", "apply", "-f", write(tmp_path, "y.json", {"rules": []})), "service")
    d = tmp_path / "adir"
    d.mkdir()
    usage(control.ctl("policy", "apply", "-f", d), "adir")


# ---------------------------------------------------------------- dry run


def test_check(control, tmp_path):
    ok(control.ctl("policy", "apply", "-f", write(tmp_path, "o.json", ORDERS)))
    fe = spiffe("frontend")
    got = control.ctl_json("check", "--from", fe, "--to", "orders", "--port", "8080", "--method", "GET",
                           "--path", "/orders/7", "--header", "X-Tenant=acme")
    assert got["decision"] == "allow" and got["rule"] == "frontend-reads"
    # wrong tenant: no allow rule matches, the default decides
    got = control.ctl_json("check", "--from", fe, "--to", "orders", "--port", "8080", "--method", "GET",
                           "--path", "/orders/7", "--header", "x-tenant=evil")
    assert got["decision"] == "deny" and got["rule"] == "default"
    # deny wins
    got = control.ctl_json("check", "--from", fe, "--to", "orders", "--port", "8080", "--method", "GET",
                           "--path", "/admin/x", "--header", "x-tenant=acme")
    assert got["decision"] == "deny" and got["rule"] == "no-admin"
    # TCP: the rule without HTTP fields allows; a deny rule naming HTTP fields still applies (fail closed)
    got = control.ctl_json("check", "--from", spiffe("batch"), "--to", "orders", "--port", "9000")
    assert got["decision"] == "deny" and got["rule"] == "no-admin"
    # table output
    p = ok(control.ctl("check", "--from", fe, "--to", "orders", "--port", "8080", "--method", "HEAD",
                       "--path", "/orders", "--header", "x-tenant=acme"))
    rows = table(p.stdout)
    assert rows[0][:2] == ["DECISION", "RULE"] and rows[1][:2] == ["allow", "frontend-reads"]
    # a service without a policy: nothing is allowed
    got = control.ctl_json("check", "--from", fe, "--to", "nopolicy", "--port", "80")
    assert got["decision"] == "deny"
    # bad input
    refused(control.ctl("check", "--from", "not-an-id", "--to", "orders", "--port", "80"))
    usage(control.ctl("check", "--from", fe, "--to", "orders"), "--port")
    usage(control.ctl("check", "--from", fe, "--to", "orders", "--port", "0"), "--port")
    usage(control.ctl("check", "--from", fe, "--to", "orders", "--port", "80", "--header", "novalue"),
          "--header")


# ---------------------------------------------------------------- tokens, certs, proxies


def test_tokens_certs_proxies(control, tmp_path):
    tok = control.ctl_json("token", "create", "--service", "orders", "--ttl", "10m", "--uses", "2")
    assert tok["service"] == "orders" and tok["token"] and tok["expires_at"]
    p = ok(control.ctl("token", "create", "--service", "orders"))
    rows = table(p.stdout)
    assert rows[0][:3] == ["TOKEN", "SERVICE", "EXPIRES_AT"] and rows[1][1] == "orders"
    assert rows[1][0] != tok["token"]

    a = Identity(tmp_path / "a", "orders")
    r = enroll(control, a, token=tok["token"])
    assert r.status in (200, 201), r
    assert a.uri_sans() == [spiffe("orders")]
    b = Identity(tmp_path / "b", "orders")
    assert enroll(control, b, token=tok["token"]).status in (200, 201)

    certs = control.ctl_json("certs", "list")
    lst = certs["certs"] if isinstance(certs, dict) else certs
    serials = {c["serial"] for c in lst}
    assert {a.serial, b.serial} <= serials
    p = ok(control.ctl("certs", "list"))
    assert a.serial in p.stdout and "SERIAL" in p.stdout.splitlines()[0]

    # the proxy fetches its config and registers: it shows in proxies list
    r = control.api("GET", "/v1/services/orders/config?after=0&wait=0", token=None, svid=a)
    assert r.status == 200, r
    r = control.api("POST", "/v1/services/orders/endpoints", {"address": "127.0.0.1:15006", "ports": [8080]},
                    token=None, svid=a)
    assert r.status in (200, 201), r
    prox = control.ctl_json("proxies", "list")
    assert "orders" in json.dumps(prox), prox
    p = ok(control.ctl("proxies", "list"))
    assert "orders" in p.stdout

    # rotation requests
    ok(control.ctl("certs", "rotate", "--service", "orders"))
    ok(control.ctl("certs", "rotate", "--all", "-o", "json"))
    usage(control.ctl("certs", "rotate"))
    usage(control.ctl("certs", "rotate", "--all", "--service", "orders"))

    # revoke b (serial given in upper case with colons): on the bundle's list, and b is refused
    colon = ":".join(b.serial.upper()[i:i + 2] for i in range(0, len(b.serial), 2))
    ok(control.ctl("certs", "revoke", colon))
    bundle = control.api("GET", "/v1/bundle", token=None, svid=a)
    assert bundle.status == 200, bundle
    assert b.serial in bundle.json["revoked"]
    try:
        r = control.api("GET", "/v1/bundle", token=None, svid=b)
        assert r.status in (401, 403), r
    except OSError:
        pass                    # refused in the handshake: fine too
    usage(control.ctl("certs", "revoke", "not-hex"), "serial")
    refused(control.ctl("certs", "revoke", "abcdef0123"))   # never issued
    usage(control.ctl("token", "create"), "--service")
    usage(control.ctl("token", "create", "--service", "orders", "--ttl", "soon"), "--ttl")
    usage(control.ctl("token", "create", "--service", "orders", "--uses", "0"), "--uses")
    refused(control.ctl("token", "create", "--service", "Bad_Name"))


# ---------------------------------------------------------------- CA rotation


def test_ca_rotation_three_phases(control, tmp_path):
    ca0 = control.ctl_json("ca", "show")
    assert ca0["phase"] == "stable" and len(ca0["roots"]) == 1 and ca0["signing"] == 0
    p = ok(control.ctl("ca", "show"))
    assert "stable" in p.stdout and "KEY_SHA256" in p.stdout
    p = ok(control.ctl("ca", "status"))
    assert table(p.stdout)[1][:3] == ["stable", "0", "1"]
    old_root = ca0["roots"][0]

    a = new_svid(control, tmp_path, "orders")          # signed by the old root

    # 1. stable -> prepared: the new root joins the bundle, the old one still signs
    p = ok(control.ctl("ca", "rotate"))
    assert "prepared" in p.stdout
    ca1 = control.ctl_json("ca", "show")
    assert ca1["phase"] == "prepared" and len(ca1["roots"]) == 2
    assert ca1["roots"][ca1["signing"]] == old_root
    new_root = [r for r in ca1["roots"] if r != old_root][0]
    bundle = control.api("GET", "/v1/bundle", token=None, svid=a).json
    assert new_root in bundle["roots"] and old_root in bundle["roots"]

    # 2. prepared -> switched: the new root signs (json output of rotate)
    out = control.ctl_json("ca", "rotate")
    assert out["phase"] == "switched"
    ca2 = control.ctl_json("ca", "status")
    assert ca2["phase"] == "switched" and ca2["roots"][ca2["signing"]] == new_root
    b = new_svid(control, tmp_path, "payments")
    chain = b.cert.read_text()
    # b verifies against the new root only
    (tmp_path / "new.pem").write_text(new_root)
    (tmp_path / "old.pem").write_text(old_root)
    from helpers import run
    run(["openssl", "verify", "-CAfile", str(tmp_path / "new.pem"), str(b.cert)])
    assert "BEGIN CERTIFICATE" in chain

    # 3. switched -> stable is refused while a's certificate (old root) is valid ...
    p = refused(control.ctl("ca", "rotate"))
    assert control.ctl_json("ca", "status")["phase"] == "switched"
    # ... and allowed once it is revoked
    ok(control.ctl("certs", "revoke", a.serial))
    p = ok(control.ctl("ca", "rotate"))
    assert "stable" in p.stdout
    ca3 = control.ctl_json("ca", "show")
    assert ca3["phase"] == "stable" and ca3["roots"] == [new_root] and ca3["signing"] == 0

    # meshletctl still verifies the control with the state dir's ca.pem
    ok(control.ctl("policy", "list"))
    assert new_root.strip() in control.ca_file.read_text()
    # and again around: a full second rotation with --force at the end
    ok(control.ctl("ca", "rotate"))
    ok(control.ctl("ca", "rotate"))
    p = ok(control.ctl("ca", "rotate", "--force"))
    assert "stable" in p.stdout
    assert len(control.ctl_json("ca", "show")["roots"]) == 1
    ok(control.ctl("ca", "status"))


# ---------------------------------------------------------------- CLI plumbing


def test_help_and_usage_errors(control):
    p = ok(control.ctl("--help", flags=False))
    for words in ("policy apply", "policy get", "policy delete", "policy list", "token create",
                  "certs list", "certs rotate", "certs revoke", "ca show", "ca rotate", "ca status",
                  "proxies list", "check", "MESHLET_CONTROL", "MESHLET_CA", "MESHLET_TOKEN_FILE",
                  "MESHLET_TOKEN", "--control", "--ca", "--token-file", "-o", "Exit status"):
        assert words in p.stdout, f"{words!r} missing from --help"
    p = ok(control.ctl("policy", "--help", flags=False))
    for words in ("apply", "get", "delete", "list"):
        assert f"policy {words}" in p.stdout
    for cmd in (["policy", "apply"], ["token", "create"], ["certs", "rotate"], ["check"], ["ca", "rotate"]):
        p = ok(control.ctl(*cmd, "--help", flags=False))
        assert p.stdout.startswith(f"Usage: meshletctl {' '.join(cmd)}")
    p = ok(control.ctl("check", "--help", flags=False))
    for o in ("--from", "--to", "--port", "--method", "--path", "--header"):
        assert o in p.stdout
    ok(control.ctl("--version", flags=False))

    usage(control.ctl(flags=False), "no command")
    usage(control.ctl("frobnicate"), "frobnicate")
    usage(control.ctl("policy"), "subcommand")
    usage(control.ctl("policy", "frobnicate"), "frobnicate")
    usage(control.ctl("policy", "list", "--bogus"), "--bogus")
    usage(control.ctl("--bogus", "policy", "list"), "--bogus")
    usage(control.ctl("policy", "get"), "missing argument")
    usage(control.ctl("policy", "get", "a", "b"), "unexpected argument")
    usage(control.ctl("policy", "list", "-o", "yaml"), "yaml")
    usage(control.ctl("policy", "list", "--timeout", "never"), "--timeout")
    usage(control.ctl("policy", "apply", "-f"), "-f")


def test_configuration_sources(control, tmp_path):
    """Flags, environment variables and the state directory all find the
    control, its CA and the admin token; a missing file is a local problem."""
    env = {"MESHLET_CONTROL": control.url, "MESHLET_CA": str(control.ca_file),
           "MESHLET_TOKEN_FILE": str(control.token_file)}
    ok(control.ctl("policy", "list", flags=False, env=env))
    env = {"MESHLET_CONTROL": control.url, "MESHLET_CA": str(control.ca_file),
           "MESHLET_TOKEN": control.token}
    ok(control.ctl("policy", "list", flags=False, env=env))
    ok(control.ctl("--control", control.url, "--state-dir", control.state_dir, "policy", "list", flags=False))
    ok(control.ctl("policy", "list", "--control", control.url, flags=False,
                   env={"MESHLET_STATE_DIR": str(control.state_dir)}))
    ok(control.ctl("--control", f"https://localhost:{control.port}", "--state-dir", control.state_dir,
                   "policy", "list", flags=False))

    # a wrong token (environment) is refused by the control: exit 1, its message
    p = refused(control.ctl("policy", "list", flags=False,
                            env={"MESHLET_CONTROL": control.url, "MESHLET_CA": str(control.ca_file),
                                 "MESHLET_TOKEN": "0" * 64}))
    assert p.stderr.strip()
    bad = tmp_path / "wrong.token"
    bad.write_text("nope\n")
    refused(control.ctl("--control", control.url, "--ca", control.ca_file, "--token-file", bad,
                        "policy", "list", flags=False))

    # local problems: exit 2 naming the file
    usage(control.ctl("--control", control.url, "--ca", control.ca_file, "--token-file",
                      tmp_path / "none.token", "policy", "list", flags=False), "none.token")
    usage(control.ctl("--control", control.url, "--ca", tmp_path / "none.pem", "--token-file",
                      control.token_file, "policy", "list", flags=False), "none.pem")
    usage(control.ctl("--control", control.url, "--state-dir", tmp_path / "nodir", "policy", "list",
                      flags=False), "nodir")
    usage(control.ctl("--control", "http://127.0.0.1:1", "policy", "list"), "https")

    # the control is not there, or is not who the CA file vouches for: exit 1
    from helpers import free_port
    refused(control.ctl("--control", f"https://127.0.0.1:{free_port()}", "policy", "list"))
    other = tmp_path / "other-ca.pem"
    from helpers import run
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(tmp_path / "other.key"), "-subj", "/CN=other", "-days", "1", "-out", str(other)])
    p = refused(control.ctl("--control", control.url, "--ca", other, "--token-file", control.token_file,
                            "policy", "list", flags=False))
    assert "certificate" in p.stderr


def test_client_verifies_the_control_and_bounds_time(control, tmp_path):
    """meshletctl refuses a server whose certificate chains to the CA but is
    not the control's (a proxy's SVID), and gives up on a silent server
    after --timeout."""
    import socket
    import ssl
    import threading
    import time

    svid = new_svid(control, tmp_path, "orders")
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(str(svid.cert), str(svid.key))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    port = lsock.getsockname()[1]
    stop = threading.Event()

    def serve():
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                with srv_ctx.wrap_socket(c, server_side=True) as s:
                    s.settimeout(2)
                    s.recv(65536)
                    s.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"policies":[]}')
            except (OSError, ssl.SSLError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        for host in ("127.0.0.1", "localhost"):
            p = refused(control.ctl("--control", f"https://{host}:{port}", "policy", "list"))
            assert "not valid for" in p.stderr, p.stderr
            assert p.stdout == ""
    finally:
        stop.set()
        lsock.close()
        t.join(2)

    # a server that accepts but never answers the handshake
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        t0 = time.monotonic()
        p = refused(control.ctl("--control", f"https://127.0.0.1:{silent.getsockname()[1]}", "--timeout", "1s",
                                "policy", "list"))
        assert time.monotonic() - t0 < 10
        assert "timed out" in p.stderr
    finally:
        silent.close()


def test_oversized_policy_is_refused_by_the_control(control, tmp_path):
    doc = policy_doc("orders")
    doc["rules"] = [{"name": f"r{i}", "action": "allow", "from": [spiffe(f"s{i}")], "ports": [8080]}
                    for i in range(4000)]
    doc["rules"][0]["paths"] = ["/" + "a" * (1536 * 1024)]
    f = write(tmp_path, "big.json", doc)
    assert f.stat().st_size > 1024 * 1024
    refused(control.ctl("policy", "apply", "-f", f))
    assert control.ctl_json("policy", "list")["policies"] == []
