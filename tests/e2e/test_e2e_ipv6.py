"""IPv6 in transparent mode: nothing goes around the sidecar over IPv6.

The demo's mesh gives every namespace an IPv6 address from a unique local
prefix (fd00::/8, only inside the namespaces) besides its IPv4 one, and
its apps listen on every address, IPv4 and IPv6, as real apps do.
meshlet-iptables (default `--ipv6 intercept`) installs the same nat rules
with ip6tables, and the sidecars listen on both families, so:

- a plaintext IPv6 connection to an app port from another namespace lands
  on the sidecar's mutual-TLS listener and is refused there, as over IPv4;
- the app's own IPv6 connections go to its sidecar's transparent listener
  (which refuses destinations outside the mesh), the proxy's uid excepted;
- `--ipv6 drop` refuses IPv6 TCP to and from the app instead; `--ipv6 off`
  leaves IPv6 alone (for pods without IPv6: then IPv6 does go around);
- on a namespace with IPv6 disabled, install succeeds and says so; where
  IPv6 is on but ip6tables cannot be used, install refuses to half-protect.

Needs root: skipped with the reason otherwise.
"""

import ipaddress
import json
import os
import subprocess
import time

import pytest
from e2e_helpers import (IPTABLES_HELPER, alive, build_dir, netns_list, root_iptables, spiffe,
                         wait_for)
from e2e_helpers import e2e_runnable, mesh, root_before  # noqa: F401  (fixtures)

HANDSHAKE_FAILURES = 'meshlet_tls_handshake_failures_total{reason="handshake"}'
ECHO_PORT = 9099          # a server outside the mesh, in control's namespace
APP_ARGS = ["--proxy-uid", "1337", "--outbound-port", "15001", "--inbound-port", "15006",
            "--app-ports", "8080"]      # as the demo installs them

# A TCP client: prints "reply <first line>" or "error <exception name>".
CLIENT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.sendall(b"GET /orders HTTP/1.0\r\n\r\n")
    data = s.recv(200).decode(errors="replace")
    print("reply", data.splitlines()[0] if data else "(closed)")
except OSError as e:
    print("error", type(e).__name__)
"""

ECHO_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(200)
    c.sendall(b"echo server here\n"); c.close()
"""


def py():
    return "/usr/bin/python3"


def connect(mesh, node, host, port, uid=None, timeout=3):
    p = mesh.run(node, py(), "-c", CLIENT, host, port, timeout, uid=uid, timeout=timeout + 10)
    return p.stdout.strip()


def rules(mesh, node, tool, table):
    p = mesh.run(node, tool, "-w", "-t", table, "-S", check=True)
    return p.stdout.splitlines()


def ours(lines):
    return [r for r in lines if "MESHLET" in r]


def helper(mesh, node, *args):
    p = mesh.run(node, IPTABLES_HELPER, *args, timeout=30)
    assert p.returncode == 0, f"meshlet-iptables {args}: {p.stdout}{p.stderr}"
    return p


def handshake_failures(mesh):
    return mesh.metrics("orders").get(HANDSHAKE_FAILURES, 0)


@pytest.fixture(scope="module")
def v6(mesh):
    if not mesh.ip6["orders"]:
        pytest.skip("the kernel has no IPv6: the demo made an IPv4-only mesh")
    return mesh


@pytest.fixture(scope="module")
def echo(v6):
    """A plain TCP server on every IPv6 address of control's namespace."""
    p = subprocess.Popen(["ip", "netns", "exec", v6.ns["control"], py(), "-c", ECHO_SERVER,
                          str(ECHO_PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        yield f"{v6.ip6['control']}"
    finally:
        p.kill()
        p.wait()


def test_every_node_has_a_unique_local_ipv6_address(v6):
    for node in ("control", "frontend", "orders", "reports"):
        addr = ipaddress.ip_address(v6.ip6[node])
        assert addr in ipaddress.ip_network("fd00::/8"), addr
        p = v6.run(node, "ip", "-6", "-o", "addr", "show", "dev", "ml-eth0", check=True)
        assert f"{addr}/64" in p.stdout, p.stdout
    # nothing of it in the root namespace
    p = subprocess.run(["ip", "-6", "-o", "addr", "show"], capture_output=True, text=True)
    assert v6.ip6["orders"] not in p.stdout


def test_the_app_answers_on_ipv6(v6):
    """The control for the tests below: orders' app does listen on its IPv6
    address (seen from its own namespace, where loopback is not redirected)."""
    got = connect(v6, "orders", v6.ip6["orders"], 8080, uid=v6.proxy_uid)
    assert got == "reply HTTP/1.1 200 OK", got


def test_meshlet_iptables_installs_the_nat_rules_for_ipv6_too(v6):
    for svc in ("frontend", "orders", "reports"):
        r6 = rules(v6, svc, "ip6tables", "nat")
        for want in ("-A OUTPUT -p tcp -j MESHLET_OUTPUT",
                     "-A PREROUTING -p tcp -j MESHLET_INBOUND",
                     f"-A MESHLET_OUTPUT -m owner --uid-owner {v6.proxy_uid} -j RETURN",
                     "-A MESHLET_OUTPUT -o lo -j RETURN",
                     "-A MESHLET_OUTPUT -d ::1/128 -j RETURN",
                     "-A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                     "-A MESHLET_INBOUND -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15006"):
            assert want in r6, f"{svc}: missing {want!r} in\n" + "\n".join(r6)
        assert ours(rules(v6, svc, "ip6tables", "filter")) == []


def test_plaintext_ipv6_to_the_app_port_is_refused(v6):
    """From control's namespace (no sidecar) and as the proxy uid in reports,
    IPv6 to orders' app port lands on orders' mutual-TLS listener."""
    before = handshake_failures(v6)
    got = connect(v6, "control", v6.ip6["orders"], 8080)
    assert "200" not in got, f"an IPv6 client reached orders' app around its sidecar: {got}"
    got = connect(v6, "reports", v6.ip6["orders"], 8080, uid=v6.proxy_uid)
    assert "200" not in got, f"IPv6 from reports' proxy uid reached orders' app: {got}"
    wait_for(lambda: handshake_failures(v6) >= before + 2, 3,
             what="orders' TLS listener to see both IPv6 plaintext calls")


def test_the_apps_ipv6_calls_go_to_its_sidecar(v6, echo):
    """frontend's app connects over IPv6 to a server outside the mesh: its
    sidecar's transparent listener takes it and refuses it; the proxy's own
    uid goes out directly (the path itself works)."""
    assert connect(v6, "frontend", echo, ECHO_PORT, uid=v6.proxy_uid) == "reply echo server here"
    got = connect(v6, "frontend", echo, ECHO_PORT)
    assert "echo server" not in got, f"frontend's app reached {echo} around its sidecar: {got}"
    wait_for(lambda: f"[{echo}]:{ECHO_PORT} is outside the mesh: refused"
             in v6.stderr("frontend-proxy"), 3,
             what="frontend's sidecar to log the IPv6 destination it refused")


def test_ipv6_exclude_cidr_lets_that_destination_go_direct(v6, echo):
    """--exclude-cidr with an IPv6 CIDR goes into ip6tables: frontend's app
    then reaches the excluded server directly, and is intercepted again once
    the rules are installed without it."""
    helper(v6, "frontend", "install", *APP_ARGS, "--exclude-cidr", f"{echo}/128,10.255.0.0/16")
    try:
        r6 = rules(v6, "frontend", "ip6tables", "nat")
        assert f"-A MESHLET_OUTPUT -d {echo}/128 -j RETURN" in r6, "\n".join(r6)
        assert not any("10.255.0.0/16" in r for r in r6), "an IPv4 CIDR in ip6tables"
        assert any("10.255.0.0/16" in r for r in rules(v6, "frontend", "iptables", "nat"))
        assert connect(v6, "frontend", echo, ECHO_PORT) == "reply echo server here"
    finally:
        helper(v6, "frontend", "install", *APP_ARGS)
    got = connect(v6, "frontend", echo, ECHO_PORT)
    assert "echo server" not in got, f"still excluded after reinstall: {got}"


def test_ipv6_drop(v6, echo):
    """--ipv6 drop: no ip6tables nat rules, a filter chain that refuses IPv6
    TCP to the app port and from the app; IPv4 interception is unchanged."""
    helper(v6, "orders", "install", *APP_ARGS, "--ipv6", "drop")
    try:
        assert ours(rules(v6, "orders", "ip6tables", "nat")) == []
        f6 = rules(v6, "orders", "ip6tables", "filter")
        assert "-A INPUT -p tcp -j MESHLET_INBOUND" in f6, f6
        assert "-A OUTPUT -p tcp -j MESHLET_OUTPUT" in f6, f6
        before = handshake_failures(v6)
        got = connect(v6, "control", v6.ip6["orders"], 8080, timeout=2)
        assert got.startswith("error"), got
        assert handshake_failures(v6) == before, "dropped, so the proxy never saw it"
        # the app's own IPv6 connections are refused at once; the proxy uid's are not
        t0 = time.monotonic()
        got = connect(v6, "orders", echo, ECHO_PORT, timeout=5)
        assert got == "error ConnectionRefusedError", got
        assert time.monotonic() - t0 < 4
        assert connect(v6, "orders", echo, ECHO_PORT, uid=v6.proxy_uid) == \
            "reply echo server here"
        # IPv4 through the sidecars as before
        assert v6.curl("frontend", v6.orders_url())[0] == 200
    finally:
        helper(v6, "orders", "install", *APP_ARGS)
    # back to intercept: the filter chains are gone, the nat ones back
    assert ours(rules(v6, "orders", "ip6tables", "filter")) == []
    assert "-A PREROUTING -p tcp -j MESHLET_INBOUND" in rules(v6, "orders", "ip6tables", "nat")
    assert "200" not in connect(v6, "control", v6.ip6["orders"], 8080)


def test_ipv6_off_leaves_ipv6_alone(v6):
    """--ipv6 off: no ip6tables rules at all, so IPv6 reaches the app
    directly (what the option is for: pods that have no IPv6)."""
    p = helper(v6, "orders", "install", *APP_ARGS, "--ipv6", "off")
    try:
        assert "IPv6 left alone" in p.stdout, p.stdout
        for table in ("nat", "filter"):
            assert ours(rules(v6, "orders", "ip6tables", table)) == []
        assert "-A PREROUTING -p tcp -j MESHLET_INBOUND" in rules(v6, "orders", "iptables", "nat")
        assert connect(v6, "control", v6.ip6["orders"], 8080) == "reply HTTP/1.1 200 OK"
    finally:
        helper(v6, "orders", "install", *APP_ARGS)
    assert "200" not in connect(v6, "control", v6.ip6["orders"], 8080)


class Sidecar:
    """frontend's sidecar restarted by the test with another config (it
    keeps its SVID in its state_dir); the demo's own process is stopped the
    first time, and one restarted process runs at a time."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.proc = None
        self.n = 0

    def stop_demo_proxy(self):
        pid, st = self.mesh.pids()["frontend-proxy"]
        if not alive(pid, st):
            return
        os.kill(pid, 15)
        wait_for(lambda: not alive(pid, st), 10, what="the demo's frontend sidecar to exit")

    def start(self, change):
        self.stop_demo_proxy()
        self.stop()
        cfg = json.loads((self.mesh.dir / "frontend" / "proxy.json").read_text())
        change(cfg)
        self.n += 1
        f = self.mesh.dir / "frontend" / f"proxy-e2e-{self.n}.json"
        f.write_text(json.dumps(cfg))
        os.chmod(f, 0o644)
        logs = self.mesh.dir / "logs"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.mesh.ns["frontend"], "setpriv",
             f"--reuid={self.mesh.proxy_uid}", f"--regid={self.mesh.proxy_uid}", "--clear-groups",
             "--", build_dir() / "proxy" / "meshlet-proxy", "-c", str(f)],
            stdout=open(logs / f"frontend-proxy-e2e-{self.n}.out", "w"),
            stderr=open(logs / f"frontend-proxy-e2e-{self.n}.err", "w"))
        wait_for(lambda: '"ready":true' in self.mesh.run(
            "frontend", "curl", "-sS", "--max-time", "2", "http://127.0.0.1:15000/ready").stdout,
            20, interval=0.1, what="the restarted frontend sidecar to be ready")

    def stderr(self):
        return (self.mesh.dir / "logs" / f"frontend-proxy-e2e-{self.n}.err").read_text()

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=15)
            self.proc = None


@pytest.fixture(scope="module")
def side(v6):
    s = Sidecar(v6)
    yield s
    s.stop()


def test_transparent_listener_on_dual_stack_wildcard(v6, echo, side):
    """transparent.listen "[::]:15001" (one dual-stack socket) takes the
    app's IPv4 calls, whose original destination is IPv4 (an IPv4-mapped
    socket), and its IPv6 ones."""
    try:
        side.start(lambda c: c["transparent"].update(listen="[::]:15001"))
        code, body, err = v6.curl("frontend", v6.orders_url())
        assert code == 200 and "3 open orders" in body, (code, body, err)
        got = connect(v6, "frontend", echo, ECHO_PORT)
        assert "echo server" not in got, got
    finally:
        side.start(lambda c: None)        # the demo's config again
    assert v6.curl("frontend", v6.orders_url())[0] == 200


def test_meshed_call_over_ipv6_end_to_end(v6, side):
    """frontend's app calls orders' IPv6 address: its sidecar takes the call
    (ip6tables -> [::1]:15001), maps the destination to orders, and opens
    mutual TLS to orders' sidecar over IPv6 ([::]:15006), whose policy
    allows it. Sidecars register one IPv4 address with control, so the
    IPv6 endpoint is given in frontend's config here; a static endpoint
    maps only its own ip:port (it says nothing of the app ports behind it),
    so the app dials that address."""
    url = f"http://[{v6.ip6['orders']}]:15006/orders"
    try:
        side.start(lambda c: c.update(outbound=[{
            "listen": "127.0.0.1:9001", "service": "orders", "protocol": "http",
            "endpoints": [f"[{v6.ip6['orders']}]:15006"]}]))
        code, body, err = v6.curl("frontend", url)
        assert (code, body) == (200, f"orders: 3 open orders (caller {spiffe('frontend')})"), \
            (code, body, err, side.stderr()[-3000:], v6.stderr("orders-proxy")[-2000:])
        line = wait_for(lambda: [e for e in v6.access_log("orders")
                                 if e.get("source", "").startswith(f"[{v6.ip6['frontend']}]:")], 3,
                        what="orders' access-log line for the IPv6 call")[-1]
        assert (line["direction"], line["decision"], line["status"]) == ("inbound", "allow", 200)
        # reports' app, whose sidecar has no such endpoint: outside the mesh, refused
        assert v6.curl("reports", url)[0] == 0
    finally:
        side.start(lambda c: None)
    assert v6.curl("frontend", v6.orders_url())[0] == 200


def test_remove_takes_away_both_families(v6):
    helper(v6, "orders", "remove")
    try:
        for tool in ("iptables", "ip6tables"):
            for table in ("nat", "filter"):
                assert ours(rules(v6, "orders", tool, table)) == [], (tool, table)
        assert helper(v6, "orders", "remove").returncode == 0     # twice is fine
    finally:
        helper(v6, "orders", "install", *APP_ARGS)


def test_down_leaves_no_ip6tables_rule_behind(mesh, root_before):
    p = mesh.down()
    assert p.returncode == 0, p.stderr
    assert [n for n in netns_list() if n.startswith(f"ml-{mesh.id}-")] == []
    assert root_iptables() == root_before["iptables"]
    reports = mesh.sanitizer_reports()
    assert not reports, "\n".join(reports)


# ---- namespaces of their own: IPv6 disabled, ip6tables missing

class Scratch:
    def __init__(self, ipv6_on):
        self.name = f"ml-v6t-{os.getpid()}-{int(ipv6_on)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        val = "0" if ipv6_on else "1"
        self.sh(f"echo {val} >/proc/sys/net/ipv6/conf/default/disable_ipv6 && "
                f"echo {val} >/proc/sys/net/ipv6/conf/all/disable_ipv6")
        self.sh("ip link set lo up")

    def sh(self, script):
        return subprocess.run(["ip", "netns", "exec", self.name, "bash", "-c", script],
                              capture_output=True, text=True, check=True)

    def run(self, *cmd):
        return subprocess.run(["ip", "netns", "exec", self.name, *map(str, cmd)],
                              capture_output=True, text=True, timeout=30)

    def ours(self, tool):
        out = []
        for table in ("nat", "filter"):
            out += ours(self.run(tool, "-w", "-t", table, "-S").stdout.splitlines())
        return out

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def scratch(e2e_runnable):
    made = []

    def make(ipv6_on):
        s = Scratch(ipv6_on)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("mode", ["intercept", "drop"])
def test_ipv6_disabled_in_the_namespace_is_not_an_error(scratch, mode):
    if not os.path.isdir("/proc/sys/net/ipv6"):
        pytest.skip("the kernel has no IPv6 at all")
    ns = scratch(ipv6_on=False)
    p = ns.run(IPTABLES_HELPER, "install", *APP_ARGS, "--ipv6", mode)
    assert p.returncode == 0, p.stderr
    assert "IPv6 is disabled in this network namespace" in p.stdout + p.stderr
    assert ns.ours("ip6tables") == []
    assert "-A OUTPUT -p tcp -j MESHLET_OUTPUT" in ns.ours("iptables")
    assert ns.run(IPTABLES_HELPER, "remove").returncode == 0
    assert ns.ours("iptables") == [] and ns.ours("ip6tables") == []


@pytest.mark.parametrize("mode", ["intercept", "drop"])
def test_ipv6_on_without_usable_ip6tables_fails_before_changing_anything(scratch, mode):
    ns = scratch(ipv6_on=True)
    p = ns.run(IPTABLES_HELPER, "install", *APP_ARGS, "--ipv6", mode,
               "--ip6tables", "/nonexistent/ip6tables")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "IPv6 is enabled" in p.stderr and "--ipv6 off" in p.stderr, p.stderr
    assert ns.ours("iptables") == [], "nothing installed when IPv6 cannot be covered"
