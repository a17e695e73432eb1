"""A control-mode proxy keeps its connection to control (issue 14: a TLS
handshake per long poll dominated control's CPU with many proxies): its
long polls ride one connection across several config versions, counted by
control's meshlet_control_connections_accepted_total and seen in its access
log (one remote port)."""

import json
import time

import prom_helpers as prom
from control_helpers import control_factory  # noqa: F401
from dynamic_helpers import allow_policy, dyn  # noqa: F401
from helpers import free_port, wait_for

ACCEPTED = "meshlet_control_connections_accepted_total"


def accepted(url):
    return prom.value(prom.parse(prom.scrape(url))[0], ACCEPTED)


def installs(proxy):
    return proxy.stderr().count("installed config version")


def config_remotes(control):
    out = []
    for line in control.stdout().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == "api" and rec.get("path") == "/v1/services/orders/config":
            out.append((rec["remote"], rec["status"]))
    return out


def test_long_polls_ride_one_connection(dyn):
    port = free_port()
    dyn.control = dyn.factory.new(extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}/metrics"
    inb, _ = dyn.inbound(free_port())
    wait_for(lambda: installs(inb) >= 1, 15, what="a first config")
    time.sleep(1)           # the long poll after the first answer is waiting
    before, seen = accepted(url), installs(inb)
    n_polls = len(config_remotes(dyn.control))
    for i in range(4):
        # One connection each (Python's http.client, Connection: close).
        r = dyn.control.put_policy(allow_policy("orders", "frontend", name=f"v{i}"))
        assert r.status in (200, 201), r
        wait_for(lambda: installs(inb) >= seen + i + 1, 15, what=f"config push {i}")
    time.sleep(0.5)
    # Four policy writes, and nothing else: the proxy opened no connection.
    assert accepted(url) - before == 4
    polls = config_remotes(dyn.control)[n_polls - 1:]
    assert len(polls) >= 4, polls
    assert len({remote for remote, _ in polls}) == 1, polls
    assert all(status == 200 for _, status in polls), polls
