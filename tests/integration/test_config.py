"""Config and policy validation: `--check-config`, and errors that name the
JSON path and stop the proxy before it binds anything."""

import copy
import json
import socket
import subprocess

import pytest

from conftest import ORDERS_RULES
from helpers import addr, free_port, spiffe


def base(mesh):
    pol = mesh.policy("orders", ORDERS_RULES)
    return mesh.config(
        "orders", policy=pol,
        inbound=[{"listen": addr(free_port()), "forward": addr(free_port()), "protocol": "tcp"}],
        outbound=[{"listen": addr(free_port()), "service": "payments", "protocol": "tcp",
                   "endpoints": [addr(free_port()), addr(free_port())]}])


def run_proxy(binary, cfg, tmp_path, *args, timeout=20):
    path = tmp_path / "check.json"
    path.write_text(json.dumps(cfg, indent=2))
    p = subprocess.run([str(binary), "-c", str(path), *args], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


def listen_on(a):
    """Holds a listening socket on "127.0.0.1:P" (without SO_REUSEPORT, so a
    proxy that binds it fails)."""
    host, port = a.rsplit(":", 1)
    s = socket.socket()
    s.bind((host, int(port)))
    s.listen(1)
    return s


def test_check_config_accepts_valid_config_without_binding(mesh, proxy_bin, tmp_path):
    cfg = base(mesh)
    held = [listen_on(cfg["inbound"][0]["listen"]), listen_on(cfg["admin"]["listen"])]
    try:
        rc, out = run_proxy(proxy_bin, cfg, tmp_path, "--check-config")
    finally:
        for s in held:
            s.close()
    assert rc == 0, out


def _set(path_keys, value):
    def mutate(cfg):
        d = cfg
        for k in path_keys[:-1]:
            d = d[k]
        d[path_keys[-1]] = value
    return mutate


def _delete(path_keys):
    def mutate(cfg):
        d = cfg
        for k in path_keys[:-1]:
            d = d[k]
        del d[path_keys[-1]]
    return mutate


# (id, mutation of the valid config, JSON path the error must name)
BAD_CONFIGS = [
    ("listen-port", _set(["inbound", 0, "listen"], "127.0.0.1:99999"), "inbound[0].listen"),
    ("unknown-tls-field", _set(["tls", "crt"], "x.pem"), "tls.crt"),
    ("unknown-top-field", _set(["bogus"], 1), "bogus"),
    ("outbound-service", _set(["outbound", 0, "service"], "Payments!"), "outbound[0].service"),
    ("endpoint", _set(["outbound", 0, "endpoints", 1], "nowhere"), "outbound[0].endpoints[1]"),
    ("workers-type", _set(["workers"], "two"), "workers"),
    ("timeout-type", _set(["timeouts", "idle_seconds"], "long"), "timeouts.idle_seconds"),
    ("log-level", _set(["log", "level"], "loud"), "log.level"),
    ("trust-domain", _set(["trust_domain"], "Mesh Local"), "trust_domain"),
    ("missing-service", _delete(["service"]), "service"),
    ("protocol", _set(["inbound", 0, "protocol"], "udp"), "inbound[0].protocol"),
    ("key-file", _set(["tls", "key"], "/nonexistent/orders.key"), "tls.key"),
]

# (id, policy document, JSON path)
BAD_POLICIES = [
    ("port-range", {"service": "orders", "rules": [
        {"name": "a", "action": "allow", "from": ["*"]},
        {"name": "b", "action": "allow", "from": ["*"], "ports": [70000]}]}, "rules[1].ports[0]"),
    ("duplicate-name", {"service": "orders", "rules": [
        {"name": "a", "action": "allow", "from": ["*"]},
        {"name": "a", "action": "deny", "from": ["*"]}]}, "rules[1].name"),
    ("bad-id", {"service": "orders", "rules": [
        {"name": "a", "action": "allow", "from": [spiffe("frontend"), "spiffe://mesh.local/svc/Bad Name"]}]},
     "rules[0].from[1]"),
    ("bad-action", {"service": "orders", "rules": [{"name": "a", "action": "permit"}]}, "rules[0].action"),
    ("bad-default", {"service": "orders", "default": "maybe", "rules": []}, "default"),
]


@pytest.mark.parametrize("case", BAD_CONFIGS + BAD_POLICIES, ids=[c[0] for c in BAD_CONFIGS + BAD_POLICIES])
@pytest.mark.parametrize("mode", ["check-config", "run"])
def test_errors_name_json_path_before_binding(mesh, proxy_bin, tmp_path, case, mode):
    name, change, path = case
    cfg = base(mesh)
    if callable(change):
        change(cfg)
    else:
        pol = tmp_path / "bad-policy.json"
        pol.write_text(json.dumps(change))
        cfg["policy_file"] = str(pol)

    # Hold the listen and admin ports: a proxy that bound anything before
    # validating would fail with "address in use" instead of naming the path.
    held = []
    for a in (cfg["admin"]["listen"], cfg["inbound"][0]["listen"], cfg["outbound"][0]["listen"]):
        if int(a.rsplit(":", 1)[1]) < 65536:
            held.append(listen_on(a))
    try:
        args = ["--check-config"] if mode == "check-config" else []
        rc, out = run_proxy(proxy_bin, copy.deepcopy(cfg), tmp_path, *args)
    finally:
        for s in held:
            s.close()
    assert rc != 0, f"{name}: exit status 0 for an invalid config:\n{out}"
    assert path in out, f"{name}: the error does not name {path}:\n{out}"
    assert "in use" not in out.lower(), f"{name}: the proxy tried to bind before validating:\n{out}"
    assert "AddressSanitizer" not in out and "runtime error" not in out, out
