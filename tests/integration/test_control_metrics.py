"""meshlet-control's own /metrics (--metrics-listen): the text parses, the
counters move with the requests made, labels stay bounded (route patterns,
not paths), nothing secret is in it, and promtool finds it clean."""

import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from control_helpers import (control, control_factory, control_binary, enroll, new_svid,  # noqa: F401
                             policy_doc, sanitizer_env)
from helpers import free_port
import prom_helpers as prom

REQ = "meshlet_control_api_requests_total"


@pytest.fixture
def mctl(control_factory):
    port = free_port()
    c = control_factory.new(extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    c.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return c


def scrape(c):
    return prom.parse(prom.scrape(c.metrics_url))[0]


def test_requests_counted_by_route_pattern_method_and_code(mctl):
    before = scrape(mctl)
    assert mctl.put_policy(policy_doc("orders"), service="orders").status == 200
    assert mctl.put_policy(policy_doc("billing"), service="billing").status == 200
    assert mctl.api("GET", "/v1/policies/orders").status == 200
    assert mctl.api("GET", "/v1/policies", token=None).status == 401
    assert mctl.api("GET", "/v1/no/such/thing").status == 404
    assert mctl.api("GET", "/v1/nothing/here/either").status == 404
    after = scrape(mctl)

    def delta(**labels):
        return prom.value(after, REQ, **labels) - prom.value(before, REQ, **labels)

    assert delta(route="/v1/policies/{svc}", method="PUT", code="200") == 2
    assert delta(route="/v1/policies/{svc}", method="GET", code="200") == 1
    assert delta(route="/v1/policies", method="GET", code="401") == 1
    assert delta(route="unmatched", method="GET", code="404") == 2
    # Bounded: no series names a service or a raw path.
    for labels in prom.series(after, REQ):
        assert "orders" not in labels["route"] and "billing" not in labels["route"]
        assert "/no/such" not in labels["route"]
    # The writes went through the store, and were timed.
    h = "meshlet_control_store_duration_seconds_count"
    assert prom.value(after, h, op="apply") >= prom.value(before, h, op="apply") + 2
    assert prom.value(after, h, op="get") > prom.value(before, h, op="get")


def test_certificates_issued_by_kind(mctl, tmp_path):
    before = scrape(mctl)
    ident = new_svid(mctl, tmp_path, "orders")
    mid = scrape(mctl)
    r = enroll(mctl, ident, token=None, svid=ident)
    assert r.status in (200, 201), r
    after = scrape(mctl)
    issued = "meshlet_control_certificates_issued_total"
    assert prom.value(mid, issued, kind="join") == prom.value(before, issued, kind="join") + 1
    assert prom.value(mid, issued, kind="renewal") == prom.value(before, issued, kind="renewal")
    assert prom.value(after, issued, kind="renewal") == prom.value(mid, issued, kind="renewal") + 1
    # A refused join (a token that does not exist) issues nothing.
    bad = enroll(mctl, ident, token="0" * 64)
    assert bad.status in (401, 403), bad
    assert prom.value(scrape(mctl), issued, kind="join") == prom.value(after, issued, kind="join")


def test_waiting_long_polls_and_polling_proxies(mctl, tmp_path):
    a = new_svid(mctl, tmp_path, "orders")
    first = mctl.api("GET", "/v1/services/orders/config?after=0&wait=0", token=None, svid=a)
    assert first.status == 200, first
    v = first.json["version"]
    assert prom.value(scrape(mctl), "meshlet_control_long_polls_waiting") == 0
    got = {}
    t = threading.Thread(target=lambda: got.update(r=mctl.api(
        "GET", f"/v1/services/orders/config?after={v}&wait=20", token=None, svid=a, timeout=30)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while prom.value(scrape(mctl), "meshlet_control_long_polls_waiting") != 1:
            assert time.monotonic() < deadline, "the long poll never showed as waiting"
            time.sleep(0.05)
        assert prom.value(scrape(mctl), "meshlet_control_proxies_polling") == 1
    finally:
        # A policy write moves the version and answers the poll.
        mctl.put_policy(policy_doc("orders"), service="orders")
        t.join(30)
    assert got["r"].status == 200
    s = scrape(mctl)
    assert prom.value(s, "meshlet_control_long_polls_waiting") == 0
    assert prom.value(s, REQ, route="/v1/services/{svc}/config", method="GET", code="200") == 2


def test_long_poll_whose_client_left_counts_as_499(mctl, tmp_path):
    a = new_svid(mctl, tmp_path, "orders")
    v = mctl.api("GET", "/v1/services/orders/config?after=0&wait=0", token=None, svid=a).json["version"]
    with pytest.raises(OSError):   # socket.timeout: the client gives up and closes
        mctl.api("GET", f"/v1/services/orders/config?after={v}&wait=20", token=None, svid=a,
                 timeout=1)
    route = "/v1/services/{svc}/config"
    deadline = time.monotonic() + 10
    while prom.value(scrape(mctl), REQ, route=route, method="GET", code="499") != 1:
        assert time.monotonic() < deadline, "the abandoned long poll was never counted"
        time.sleep(0.05)
    s = scrape(mctl)
    assert prom.value(s, "meshlet_control_long_polls_waiting") == 0
    assert prom.value(s, "meshlet_control_proxies_polling") == 0


def test_gauges_of_the_ca_and_revocations(mctl, tmp_path):
    s = scrape(mctl)
    assert prom.value(s, "meshlet_control_ca_phase", phase="stable") == 1
    assert prom.value(s, "meshlet_control_ca_phase", phase="prepared") == 0
    assert prom.value(s, "meshlet_control_bundle_roots") == 1
    assert prom.value(s, "meshlet_control_revoked_certificates") == 0
    expiry = prom.value(s, "meshlet_control_server_cert_expiry_timestamp_seconds")
    assert time.time() < expiry < time.time() + 25 * 3600
    ident = new_svid(mctl, tmp_path, "orders")
    r = mctl.api("POST", "/v1/certs/revoke", {"serial": ident.serial})
    assert r.status == 200, r
    assert prom.value(scrape(mctl), "meshlet_control_revoked_certificates") == 1
    r = mctl.api("POST", "/v1/ca/rotate", {})
    assert r.status == 200, r
    s = scrape(mctl)
    assert prom.value(s, "meshlet_control_ca_phase", phase="prepared") == 1
    assert prom.value(s, "meshlet_control_ca_phase", phase="stable") == 0
    assert prom.value(s, "meshlet_control_bundle_roots") == 2


def test_nothing_secret_and_nothing_else_served(mctl):
    text = prom.scrape(mctl.metrics_url)
    assert mctl.token not in text
    base = mctl.metrics_url.rsplit("/", 1)[0]
    for path in ("/", "/metricsx", "/v1/health", "/metrics/../v1/policies"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=5)
        assert e.value.code in (400, 404), path
    req = urllib.request.Request(mctl.metrics_url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code in (405, 413), e.value.code
    # The query string is allowed (Prometheus sends none, but curl users might).
    assert "meshlet_control_long_polls_waiting" in prom.scrape(mctl.metrics_url + "?x=1")


def test_not_served_unless_asked(control):
    assert "metrics on http" not in control.stderr()


@pytest.mark.parametrize("addr", ["nonsense", "127.0.0.1:99999", "[::1:80"])
def test_bad_metrics_listen_refused(tmp_path, addr):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    p = subprocess.run([str(control_binary()), "--listen", f"127.0.0.1:{free_port()}",
                        "--state-dir", str(state), "--trust-domain", "mesh.test",
                        "--metrics-listen", addr], env=sanitizer_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 1, p
    assert b"metrics-listen" in p.stderr, p.stderr


def test_promtool_check_metrics_clean(mctl, tmp_path):
    if not prom.promtool():
        pytest.skip("promtool not installed (Debian package prometheus)")
    new_svid(mctl, tmp_path, "orders")
    mctl.put_policy(policy_doc("orders"), service="orders")
    mctl.api("GET", "/v1/nope")
    text = prom.scrape(mctl.metrics_url)
    assert prom.check_metrics(text) == "", text
