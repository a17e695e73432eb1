"""The listeners iptables redirects to also take IPv6.

ip6tables REDIRECT sends the app's own connections to [::1] and inbound ones
to the interface's IPv6 address, so an inbound or transparent listener on
127.0.0.1:P also listens on [::1]:P (and one on 0.0.0.0:P on [::]:P), IPv6
only. Outbound and admin listeners are not doubled. Skipped on a host
without ::1.
"""

import json
import socket
import subprocess

import pytest

from helpers import addr, client_context, free_port, roundtrip, wait_for


def have_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def connect6(port, timeout=3.0):
    return socket.create_connection(("::1", port), timeout=timeout)


def refused6(port):
    try:
        connect6(port).close()
    except ConnectionRefusedError:
        return True
    return False


def test_inbound_on_loopback_takes_mtls_over_ipv6_too(mesh, pki):
    app = mesh.app("echo")
    inb, port = mesh.inbound(app.port)
    ctx = client_context(pki.svid("frontend"))
    with ctx.wrap_socket(connect6(port)) as s:
        assert roundtrip(s) == b"ping\n"
    e = inb.wait_access(decision="allow")
    assert e["source"].startswith("[::1]:"), e
    # the IPv4 side as before
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=3)) as s:
        assert roundtrip(s) == b"ping\n"
    assert app.connections == 2
    # a plaintext IPv6 client is refused there like an IPv4 one
    with connect6(port) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(5)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    assert app.connections == 2


def test_transparent_on_loopback_listens_on_ipv6_loopback(mesh):
    """Dialled directly (not redirected), the transparent listener accepts
    on [::1] and closes: there is no original destination."""
    app = mesh.app("echo")
    _, in_port = mesh.inbound(app.port)      # something to serve besides transparent
    port = free_port()
    cfg = mesh.config("frontend", transparent={"listen": addr(port)})
    p = mesh.proxy("frontend-transparent", cfg)
    with connect6(port) as s:
        s.settimeout(5)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    wait_for(lambda: "no original destination" in p.stderr(), 5,
             what="the transparent listener to take the IPv6 connection")


def test_outbound_and_admin_listeners_are_not_doubled(mesh):
    app = mesh.app("echo")
    _, in_port = mesh.inbound(app.port)
    outb, port = mesh.outbound([in_port])
    assert refused6(port), "the outbound listener also listens on [::1]"
    assert refused6(int(outb.cfg["admin"]["listen"].rsplit(":", 1)[1]))


def test_config_refuses_a_listener_on_the_ipv6_side_of_another(mesh, proxy_bin, tmp_path):
    port = free_port()
    cfg = mesh.config("orders",
                      inbound=[{"listen": addr(port), "forward": addr(free_port())}],
                      outbound=[{"listen": f"[::1]:{port}", "service": "payments",
                                 "endpoints": [addr(free_port())]}])
    f = tmp_path / "twin.json"
    f.write_text(json.dumps(cfg))
    p = subprocess.run([str(proxy_bin), "-c", str(f), "--check-config"], capture_output=True,
                       text=True, timeout=20)
    assert p.returncode != 0, p.stdout + p.stderr
    assert (f"outbound[0].listen: [::1]:{port} overlaps [::1]:{port}, where inbound[0].listen "
            "also listens for IPv6") in p.stdout + p.stderr
