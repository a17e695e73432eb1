"""Traffic documents (docs/traffic.md) end to end, with real processes:
the control API (PUT/GET/DELETE /v1/traffic/{svc}, GET /v1/traffic,
versions and If-Match, every bad document refused with its JSON path and
nothing stored), meshletctl traffic apply|get|delete|list, /v1/check's
report of the rate limits and faults that would apply, delivery in the
config long poll to real proxies (their admin /config shows what they
installed), and static mode's traffic_file accepted or refused at start."""

import copy
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from control_helpers import (assert_refused, control, control_factory, new_svid,  # noqa: F401
                             policy_doc)
from dynamic_helpers import allow_policy, dyn  # noqa: F401
from helpers import addr, free_port, spiffe, wait_for

EXAMPLE = {
    "service": "orders",
    "timeouts": {"connect_seconds": 2, "request_seconds": 15},
    "retries": {"attempts": 2, "on": ["connect-failure", "reset", "503"],
                "budget_percent": 20, "backoff_ms": 25},
    "outlier": {"consecutive_failures": 5, "eject_seconds": 30, "max_ejected_percent": 50},
    "limits": {"max_connections": 1024, "max_pending_requests": 1024},
    "rate_limits": [{"name": "frontend-rps", "from": ["spiffe://mesh.local/svc/frontend"],
                     "requests_per_second": 100, "burst": 200}],
    "faults": [{"name": "slow-orders", "from": ["*"], "paths": ["/orders/*"],
                "percent": 10, "delay_ms": 500},
               {"name": "orders-503", "percent": 5, "abort_status": 503}],
}


def doc(**changes):
    d = copy.deepcopy(EXAMPLE)
    d.update(changes)
    return d


def put(control, d, service=None, if_match=None):
    h = {"If-Match": str(if_match)} if if_match is not None else None
    return control.api("PUT", f"/v1/traffic/{service or d['service']}", body=d, headers=h)


# ---------------------------------------------------------------- API and CLI


def test_ctl_apply_get_list_delete(control, tmp_path):
    f = tmp_path / "orders-traffic.json"
    f.write_text(json.dumps(EXAMPLE))
    out = control.ctl_json("traffic", "apply", "-f", str(f))
    assert out["service"] == "orders" and out["version"] > 0
    v = out["version"]

    got = control.ctl_json("traffic", "get", "orders")
    assert got == {"version": v, "traffic": EXAMPLE}
    table = control.ctl("traffic", "get", "orders")
    assert table.returncode == 0, table.stderr
    for word in ("timeouts.connect_seconds", "frontend-rps", "slow-orders", "orders-503", "503"):
        assert word in table.stdout, table.stdout
    assert control.ctl_json("traffic", "list") == {"traffic": [{"service": "orders", "version": v}]}
    # Traffic documents are their own kind: no policy appeared.
    assert control.ctl_json("policy", "list") == {"policies": []}

    p = control.ctl("traffic", "delete", "orders")
    assert p.returncode == 0 and "traffic orders deleted" in p.stdout, p
    p = control.ctl("traffic", "get", "orders")
    assert p.returncode == 1 and "no traffic document for service orders" in p.stderr, p
    assert control.ctl_json("traffic", "list") == {"traffic": []}
    p = control.ctl("traffic", "delete", "orders")
    assert p.returncode == 1, p
    # In the help, and usage errors: exit 2.
    p = control.ctl("--help", flags=False)
    for words in ("traffic apply", "traffic get", "traffic delete", "traffic list"):
        assert words in p.stdout, f"{words!r} missing from --help"
    assert control.ctl("traffic", "apply").returncode == 2
    assert control.ctl("traffic", "apply", "-f", str(tmp_path / "missing.json")).returncode == 2
    assert control.ctl("traffic", "get").returncode == 2


def test_versions_and_if_match(control, tmp_path):
    r1 = put(control, EXAMPLE)
    assert r1.status == 200, r1
    v1 = r1.json["version"]
    assert r1.headers.get("etag") in (str(v1), f'"{v1}"')
    g = control.api("GET", "/v1/traffic/orders")
    assert g.status == 200 and g.json == {"version": v1, "traffic": EXAMPLE}

    r2 = put(control, doc(timeouts={"connect_seconds": 1}), if_match=v1)
    assert r2.status == 200, r2
    v2 = r2.json["version"]
    assert v2 > v1
    # A writer holding v1 lost the race: 412, the document is v2's.
    e = assert_refused(put(control, EXAMPLE, if_match=v1), 412)
    assert e[2] == "If-Match"
    assert control.api("GET", "/v1/traffic/orders").json == {
        "version": v2, "traffic": doc(timeouts={"connect_seconds": 1})}
    # "*": only when one exists.
    assert_refused(put(control, doc(service="payments"), if_match="*"), 412)
    assert put(control, EXAMPLE, if_match="*").status == 200
    v3 = control.api("GET", "/v1/traffic/orders").json["version"]
    # meshletctl passes --if-match on.
    f = tmp_path / "t.json"
    f.write_text(json.dumps(EXAMPLE))
    p = control.ctl("traffic", "apply", "-f", str(f), "--if-match", str(v1))
    assert p.returncode == 1 and "412" not in p.stdout, p
    p = control.ctl("traffic", "apply", "-f", str(f), "--if-match", "soon")
    assert p.returncode == 2, p
    assert_refused(control.api("DELETE", "/v1/traffic/orders", headers={"If-Match": str(v1)}), 412)
    r = control.api("DELETE", "/v1/traffic/orders", headers={"If-Match": str(v3)})
    assert r.status == 200 and r.json["deleted"] is True, r
    assert_refused(control.api("GET", "/v1/traffic/orders"), 404)
    assert_refused(control.api("DELETE", "/v1/traffic/orders"), 404)


def test_admin_only(control, tmp_path):
    assert put(control, EXAMPLE).status == 200
    assert_refused(control.api("GET", "/v1/traffic", token=None), 401)
    assert_refused(control.api("GET", "/v1/traffic/orders", token="0" * 64), 401, 403)
    orders = new_svid(control, tmp_path, "orders")
    # A proxy's SVID is not an operator, not even for its own service.
    r = control.api("PUT", "/v1/traffic/orders", body=EXAMPLE, token=None, svid=orders)
    assert_refused(r, 401, 403)


BAD = [
    ("unknown-top", lambda d: d.update(retires={}), "retires"),
    ("unknown-rule-field", lambda d: d["faults"][1].update(status=1), "faults[1].status"),
    ("percent-over-100", lambda d: d["faults"][0].update(percent=150), "faults[0].percent"),
    ("negative-percent", lambda d: d["faults"][0].update(percent=-1), "faults[0].percent"),
    ("negative-connect", lambda d: d["timeouts"].update(connect_seconds=-2), "timeouts.connect_seconds"),
    ("negative-eject", lambda d: d["outlier"].update(eject_seconds=-30), "outlier.eject_seconds"),
    ("negative-delay", lambda d: d["faults"][0].update(delay_ms=-500), "faults[0].delay_ms"),
    ("zero-rps", lambda d: d["rate_limits"][0].update(requests_per_second=0),
     "rate_limits[0].requests_per_second"),
    ("duplicate-fault", lambda d: d["faults"][1].update(name="slow-orders"), "faults[1].name"),
    ("duplicate-limit", lambda d: d["rate_limits"].append(dict(d["rate_limits"][0])),
     "rate_limits[1].name"),
    ("bad-from", lambda d: d["rate_limits"][0].update(**{"from": ["frontend"]}),
     "rate_limits[0].from[0]"),
    ("bad-from-uri", lambda d: d["faults"][0].update(**{"from": ["spiffe://mesh.local/svc/x/"]}),
     "faults[0].from[0]"),
    ("bad-path", lambda d: d["faults"][0].update(paths=["/orders/../admin"]), "faults[0].paths[0]"),
    ("bad-retry-on", lambda d: d["retries"].update(on=["503", "sometimes"]), "retries.on[1]"),
    ("attempts-too-many", lambda d: d["retries"].update(attempts=50), "retries.attempts"),
    ("budget-over-100", lambda d: d["retries"].update(budget_percent=101), "retries.budget_percent"),
    ("ejected-over-100", lambda d: d["outlier"].update(max_ejected_percent=101),
     "outlier.max_ejected_percent"),
    ("zero-max-connections", lambda d: d["limits"].update(max_connections=0), "limits.max_connections"),
    ("fault-does-nothing", lambda d: d["faults"][1].pop("abort_status"), "faults[1]"),
    ("abort-not-error", lambda d: d["faults"][1].update(abort_status=200), "faults[1].abort_status"),
    ("string-number", lambda d: d["timeouts"].update(request_seconds="15"), "timeouts.request_seconds"),
    ("bad-service", lambda d: d.update(service="Orders"), "service"),
    ("other-service", lambda d: d.update(service="payments"), "service"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_document_refused_with_path_nothing_applied(control, case):
    name, change, path = case
    good = put(control, EXAMPLE)
    assert good.status == 200, good
    bad = copy.deepcopy(EXAMPLE)
    change(bad)
    e = assert_refused(control.api("PUT", "/v1/traffic/orders", body=bad), 400)
    assert e[2] == path, f"{name}: path {e[2]!r}, message {e[1]!r}"
    # Nothing partially applied: the stored document and version are the good ones.
    g = control.api("GET", "/v1/traffic/orders")
    assert g.json == {"version": good.json["version"], "traffic": EXAMPLE}
    assert control.api("GET", "/v1/traffic").json["traffic"] == [
        {"service": "orders", "version": good.json["version"]}]


def test_ctl_names_the_path_of_a_bad_document(control, tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(doc(faults=[{"name": "x", "percent": 101, "delay_ms": 1}])))
    p = control.ctl("traffic", "apply", "-f", str(f))
    assert p.returncode == 1, p
    assert "faults[0].percent" in p.stderr and "0..100" in p.stderr, p.stderr
    f.write_text("{\"service\": ")
    assert control.ctl("traffic", "apply", "-f", str(f)).returncode == 2
    f.write_text(json.dumps({"faults": []}))
    p = control.ctl("traffic", "apply", "-f", str(f))
    assert p.returncode == 2 and "service: required" in p.stderr, p
    assert control.ctl_json("traffic", "list") == {"traffic": []}


def test_malformed_bodies(control):
    for raw in (b"[]", b"{\"service\": \"orders\",}", b"", b"{\"service\": \"orders\"} x"):
        assert_refused(control.api("PUT", "/v1/traffic/orders", raw=raw), 400)
    assert_refused(control.api("PUT", "/v1/traffic/Bad_Name", body=EXAMPLE), 400, 404)
    assert control.api("GET", "/v1/traffic").json == {"traffic": []}


# ---------------------------------------------------------------- /v1/check


def check(control, **body):
    r = control.api("POST", "/v1/check", body=body)
    assert r.status == 200, r
    return r.json


def test_check_reports_rate_limits_and_faults(control):
    assert control.put_policy(policy_doc("orders", [
        {"name": "fe", "action": "allow", "from": [spiffe("frontend")]}])).status == 200
    base = {"service": "orders", "port": 8080}
    no_doc = check(control, **base, **{"from": spiffe("frontend")}, method="GET", path="/orders/1")
    assert no_doc["rate_limits"] == [] and no_doc["faults"] == [] and no_doc["traffic_version"] == 0

    v = put(control, EXAMPLE).json["version"]
    a = check(control, **base, **{"from": spiffe("frontend")}, method="GET", path="/orders/1")
    assert a["decision"] == "allow" and a["rule"] == "fe"
    assert a["traffic_version"] == v
    assert [r["name"] for r in a["rate_limits"]] == ["frontend-rps"]
    assert a["rate_limits"][0] == {"name": "frontend-rps", "requests_per_second": 100.0,
                                   "burst": 200, "per": "caller"}
    assert a["faults"] == [{"name": "slow-orders", "percent": 10.0, "delay_ms": 500},
                           {"name": "orders-503", "percent": 5.0, "abort_status": 503}]
    # Another caller, another path: only what selects it.
    b = check(control, **base, **{"from": spiffe("ops")}, method="GET", path="/health")
    assert b["decision"] == "deny" and b["rate_limits"] == []
    assert [f["name"] for f in b["faults"]] == ["orders-503"]
    # A tcp connection: a rule naming HTTP fields never selects it.
    c = check(control, **base, **{"from": spiffe("frontend")})
    assert [r["name"] for r in c["rate_limits"]] == ["frontend-rps"]
    assert [f["name"] for f in c["faults"]] == ["orders-503"]
    # The path is matched normalised, as the proxy would.
    d = check(control, **base, **{"from": spiffe("frontend")}, method="GET", path="/x/../orders/2")
    assert d["path"] == "/orders/2" and [f["name"] for f in d["faults"]][0] == "slow-orders"
    # No policy: denied, and the traffic rules still reported.
    assert put(control, doc(service="payments")).status == 200
    e = check(control, **dict(base, service="payments"), **{"from": spiffe("frontend")},
              method="GET", path="/orders/1")
    assert e["rule"] == "no_policy" and [r["name"] for r in e["rate_limits"]] == ["frontend-rps"]
    p = control.ctl("check", "--from", spiffe("frontend"), "--to", "orders", "--port", "8080",
                    "--method", "GET", "--path", "/orders/1")
    assert p.returncode == 0 and "frontend-rps" in p.stdout and "slow-orders" in p.stdout, p


# ---------------------------------------------------------------- delivery


def config(control, svid, service, upstreams=None, after=0, wait=0):
    q = f"?after={after}&wait={wait}" + (f"&upstreams={upstreams}" if upstreams else "")
    r = control.api("GET", f"/v1/services/{service}/config{q}", token=None, svid=svid,
                    timeout=wait + 10)
    assert r.status == 200, r
    return r.json


def test_config_answer_carries_own_and_upstream_documents(control, tmp_path):
    orders = new_svid(control, tmp_path, "orders")
    frontend = new_svid(control, tmp_path, "frontend")
    reports = new_svid(control, tmp_path, "reports")
    assert config(control, orders, "orders")["traffic"] == {}
    v = put(control, EXAMPLE).json["version"]
    pay = put(control, doc(service="payments", rate_limits=[], faults=[])).json["version"]
    entry = {"version": v, "traffic": EXAMPLE}
    assert config(control, orders, "orders")["traffic"] == {"orders": entry}
    assert config(control, frontend, "frontend", upstreams="orders")["traffic"] == {"orders": entry}
    assert config(control, frontend, "frontend")["traffic"] == {}
    assert config(control, reports, "reports", upstreams="payments")["traffic"] == {
        "payments": {"version": pay, "traffic": doc(service="payments", rate_limits=[], faults=[])}}
    assert set(config(control, reports, "reports", upstreams="*")["traffic"]) == {"orders", "payments"}


def test_long_poll_wakes_on_traffic_change(control, tmp_path):
    frontend = new_svid(control, tmp_path, "frontend")
    first = config(control, frontend, "frontend", upstreams="orders")
    got = {}

    def poll():
        t0 = time.monotonic()
        got["a"] = config(control, frontend, "frontend", upstreams="orders",
                          after=first["version"], wait=20)
        got["t"] = time.monotonic() - t0

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    v = put(control, EXAMPLE).json["version"]
    t.join(30)
    assert got["t"] < 10, f"long poll answered after {got['t']:.1f}s"
    assert got["a"]["version"] > first["version"]
    assert got["a"]["traffic"] == {"orders": {"version": v, "traffic": EXAMPLE}}
    # A delete moves the version too.
    now = got["a"]["version"]
    assert control.api("DELETE", "/v1/traffic/orders").status == 200
    after = config(control, frontend, "frontend", upstreams="orders", after=now, wait=5)
    assert after["version"] > now and after["traffic"] == {}


def proxy_traffic(p):
    status, body = p.admin("/config")
    assert status == 200, body
    return {t["service"]: t for t in json.loads(body)["traffic"]}


def test_delivered_to_proxies_and_shown_in_admin_config(dyn):
    dyn.start_control()
    app = dyn.mesh.app()
    outb, inb, _ = dyn.pair(app)
    assert proxy_traffic(inb) == {} and proxy_traffic(outb) == {}
    f = dyn.tmp / "orders-traffic.json"
    f.write_text(json.dumps(EXAMPLE))
    v = dyn.ctl("traffic", "apply", "-f", str(f), "-o", "json")
    v = json.loads(v.stdout)["version"]
    want = {"service": "orders", "version": v, "connect_seconds": 2.0, "request_seconds": 15.0,
            "retries": {"attempts": 2, "budget_percent": 20, "backoff_ms": 25},
            "outlier": {"consecutive_failures": 5, "eject_seconds": 30.0,
                        "max_ejected_percent": 50},
            "limits": {"max_connections": 1024, "max_pending_requests": 1024},
            "rate_limits": ["frontend-rps"], "faults": ["slow-orders", "orders-503"]}
    # orders' own sidecar (rate limits, faults) and frontend's, which calls it.
    wait_for(lambda: proxy_traffic(inb).get("orders") == want, 15, what="orders' proxy holds it")
    wait_for(lambda: proxy_traffic(outb).get("orders") == want, 15, what="frontend's proxy holds it")
    # A document for a service neither calls nor is reaches neither.
    dyn.control.api("PUT", "/v1/traffic/reports", body=doc(service="reports"))
    time.sleep(1.5)
    assert set(proxy_traffic(inb)) == {"orders"} and set(proxy_traffic(outb)) == {"orders"}
    # Cached in state_dir with the rest of the config.
    state = json.loads((Path(inb.cfg["state_dir"]) / "state.json").read_text())
    assert state["traffic"]["orders"]["version"] == v
    dyn.ctl("traffic", "delete", "orders")
    wait_for(lambda: proxy_traffic(inb) == {} and proxy_traffic(outb) == {}, 15,
             what="both proxies drop it")


# ---------------------------------------------------------------- static mode


def run_proxy(binary, cfg, tmp_path, *args):
    path = tmp_path / "proxy.json"
    path.write_text(json.dumps(cfg, indent=2))
    p = subprocess.run([str(binary), "-c", str(path), *args], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


def static_cfg(mesh, traffic_file):
    cfg = mesh.config("orders", inbound=[{"listen": addr(free_port()), "forward": addr(free_port()),
                                          "protocol": "http"}])
    cfg["traffic_file"] = str(traffic_file)
    return cfg


def test_static_traffic_file_accepted(mesh, tmp_path):
    f = tmp_path / "traffic.json"
    f.write_text(json.dumps([EXAMPLE, doc(service="payments", faults=[])]))
    p = mesh.proxy("orders-in", static_cfg(mesh, f))
    got = proxy_traffic(p)
    assert set(got) == {"orders", "payments"}
    assert got["orders"]["version"] == 0 and got["orders"]["faults"] == ["slow-orders", "orders-503"]
    status, body = p.admin("/config")
    assert json.loads(body)["traffic_file"] == str(f)
    # One document alone is a set of one; SIGHUP reloads the file.
    f.write_text(json.dumps(doc(rate_limits=[])))
    p.proc.send_signal(1)
    wait_for(lambda: set(proxy_traffic(p)) == {"orders"} and
             proxy_traffic(p)["orders"]["rate_limits"] == [], 10, what="reloaded traffic_file")
    # A bad file on SIGHUP: refused, logged with its path, the running documents kept.
    f.write_text(json.dumps(doc(faults=[{"name": "f", "percent": 200, "abort_status": 503}])))
    p.proc.send_signal(1)
    wait_for(lambda: "faults[0].percent" in p.stderr(), 10, what="the reload refused")
    assert p.proc.poll() is None
    assert proxy_traffic(p)["orders"]["faults"] == ["slow-orders", "orders-503"]


STATIC_BAD = [
    ("percent", lambda: doc(faults=[{"name": "f", "percent": 101, "abort_status": 503}]),
     "faults[0].percent"),
    ("unknown", lambda: doc(timeout={}), "timeout: unknown field"),
    ("in-set", lambda: [EXAMPLE, doc(service="payments", outlier={"eject_seconds": -1})],
     "[1].outlier.eject_seconds"),
    ("twice", lambda: [EXAMPLE, EXAMPLE], "[1].service: a second document for service orders"),
]


@pytest.mark.parametrize("case", STATIC_BAD, ids=[c[0] for c in STATIC_BAD])
@pytest.mark.parametrize("mode", ["check-config", "run"])
def test_static_traffic_file_refused(mesh, proxy_bin, tmp_path, case, mode):
    name, make, want = case
    f = tmp_path / "traffic.json"
    f.write_text(json.dumps(make()))
    args = ["--check-config"] if mode == "check-config" else []
    rc, out = run_proxy(proxy_bin, static_cfg(mesh, f), tmp_path, *args)
    assert rc != 0, out
    assert want in out and str(f) in out, out
    assert "AddressSanitizer" not in out and "runtime error" not in out, out


def test_traffic_file_is_static_mode_only(mesh, proxy_bin, tmp_path):
    f = tmp_path / "traffic.json"
    f.write_text(json.dumps(EXAMPLE))
    tok = tmp_path / "token"
    tok.write_text("x\n")
    cfg = {"service": "orders", "trust_domain": "mesh.local", "state_dir": str(tmp_path / "st"),
           "control": {"url": "https://127.0.0.1:1", "token_file": str(tok)},
           "traffic_file": str(f), "admin": {"listen": addr(free_port())}}
    rc, out = run_proxy(proxy_bin, cfg, tmp_path, "--check-config")
    assert rc != 0 and "traffic_file: static mode only" in out, out
    missing = static_cfg(mesh, tmp_path / "nope.json")
    rc, out = run_proxy(proxy_bin, missing, tmp_path, "--check-config")
    assert rc != 0 and "nope.json" in out, out
