"""A proxy whose renewal answers are lost (control issued, the answer never
arrived) retries with the same key and renews once answers get through:
the per-certificate renewal cap does not lock it out (issue 9, defect 5)."""

import select
import socket
import threading
import time

from control_helpers import control_factory  # noqa: F401
from dynamic_helpers import dyn  # noqa: F401
from helpers import free_port, wait_for

LOST = 5                        # more than CONTROL_RENEWALS_MAX (3)


class LossyRelay:
    """TCP relay to control. While lossy, each connection forwards the
    client's bytes but, once the client speaks after the server did (the
    TLS client's last handshake flight, or a request on a kept-alive
    connection), holds the server's bytes and then cuts the connection:
    control handles the request, its answer is lost."""

    def __init__(self, target_port):
        self.port = free_port()
        self.target = target_port
        self.lossy = False
        self.cut = 0
        self._stop = threading.Event()
        self._ls = socket.create_server(("127.0.0.1", self.port))
        self._ls.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self._stop.set()

    def _accept(self):
        while not self._stop.is_set():
            try:
                c, _ = self._ls.accept()
            except socket.timeout:
                continue
            s = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(c, s), daemon=True).start()
        self._ls.close()

    def _pipe(self, c, s):
        server_spoke = holding = False
        held, hold_start = 0, 0.0
        was_lossy = False
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([c, s], [], [], 0.1)
                # After select: bytes that arrived once lossy was set count
                # as the server speaking on a kept-alive connection from now on.
                if self.lossy and not was_lossy:
                    server_spoke = False
                was_lossy = self.lossy
                if holding and (held > 1500 or time.monotonic() - hold_start > 3):
                    self.cut += 1
                    return
                for src in r:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is c:
                        if self.lossy and server_spoke and not holding:
                            holding, hold_start = True, time.monotonic()
                        s.sendall(data)
                    elif holding:
                        held += len(data)
                    else:
                        server_spoke = True
                        c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()
            s.close()


def test_renewal_survives_lost_answers(dyn, tmp_path):
    control = dyn.start_control()
    relay = LossyRelay(control.port)
    try:
        app = dyn.mesh.app("echo")
        port = free_port()
        cfg = dyn.config("orders", dyn.token_file("orders"),
                         inbound=[{"listen": f"127.0.0.1:{port}",
                                   "forward": f"127.0.0.1:{app.port}", "protocol": "tcp"}])
        cfg["control"]["url"] = f"https://127.0.0.1:{relay.port}"
        proxy = dyn.proxy("orders-lossy", cfg)
        parent = [c for c in dyn.certs("orders")][0]["serial"]

        relay.lossy = True
        dyn.ctl("certs", "rotate", "--service", "orders")

        def children():
            return [c for c in dyn.certs("orders") if c.get("parent") == parent]
        wait_for(lambda: len(children()) >= LOST, 60,
                 what=f"{LOST} renewals whose answers were lost")
        assert "renewal_limit" not in proxy.stderr()
        relay.lossy = False
        wait_for(lambda: "renewed the SVID" in proxy.stderr(), 60,
                 what="the proxy to renew once answers get through")
        assert "renewal_limit" not in proxy.stderr()
        # It serves with one of the certificates issued for the retried key.
        issued = {c["serial"] for c in children()}

        def serves_a_child():
            r = control.api("GET", "/v1/proxies")
            return any(p["service"] == "orders" and p["connected"] and
                       p["cert_serial"] in issued for p in r.json["proxies"])
        wait_for(serves_a_child, 30, what="the proxy to connect with its renewed SVID")
        assert relay.cut >= LOST, relay.cut
    finally:
        relay.close()
