"""CA rotation gates (issue 9, defect 8): prepared -> switched waits until
every proxy seen within the last SVID lifetime acknowledged a config version
carrying the new root (409 naming the others, --force overrides);
`meshletctl ca rotate --auto` walks the three phases as their gates open."""

import subprocess
import threading
import time

from control_helpers import (assert_refused, control, control_factory, ctl_binary,  # noqa: F401
                             new_svid)
from helpers import wait_for


def _poll(control, ident, after):
    """One config poll of ident's proxy (wait=0), as a proxy does; returns
    the config version it got."""
    r = control.api("GET", f"/v1/services/{ident.service}/config?after={after}&wait=0",
                    token=None, svid=ident)
    assert r.status == 200, r
    return r.json["version"]


def _ack(control, ident):
    """The proxy fetches the current config, then reports holding it (its
    next poll's after=), as meshlet-proxy does."""
    v = _poll(control, ident, 0)
    _poll(control, ident, v)
    return v


def _ca(control):
    r = control.api("GET", "/v1/ca")
    assert r.status == 200, r
    return r.json


def test_switch_waits_for_every_recent_proxy(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    b = new_svid(control, tmp_path, "frontend")
    for x in (a, b):
        _ack(control, x)
    assert control.ctl_json("ca", "rotate")["phase"] == "prepared"

    ca = _ca(control)
    gate = ca["gate"]
    assert gate["next_phase"] == "switched" and gate["open"] is False, gate
    assert {(p["service"], p["serial"]) for p in gate["proxies"]} == \
        {("orders", a.serial), ("frontend", b.serial)}, gate
    assert ca["new_root_version"] > 0

    # Refused while they have not acknowledged, naming them.
    r = control.api("POST", "/v1/ca/rotate", {})
    code, msg, _ = assert_refused(r, 409)
    assert code == "proxies_not_updated", r
    for x in (a, b):
        assert x.serial in msg and x.service in msg, msg
    p = control.ctl("ca", "rotate")
    assert p.returncode == 1 and a.serial in p.stderr and "--force" in p.stderr, p.stderr
    assert _ca(control)["phase"] == "prepared"

    # One acknowledges; the other still blocks.
    v = _ack(control, a)
    assert v >= ca["new_root_version"]
    gate = _ca(control)["gate"]
    assert [p["serial"] for p in gate["proxies"]] == [b.serial] and not gate["open"], gate
    assert_refused(control.api("POST", "/v1/ca/rotate", {}), 409)
    # A proxy that only reported an old version (after= below the new root's
    # version) has not acknowledged.
    _poll(control, b, 1)
    assert not _ca(control)["gate"]["open"]
    _ack(control, b)
    gate = _ca(control)["gate"]
    assert gate["open"] is True and gate["proxies"] == [], gate
    p = control.ctl("ca", "status")
    assert p.returncode == 0 and "switched" in p.stdout, p.stdout
    assert control.ctl_json("ca", "rotate")["phase"] == "switched"


def test_force_switches_and_revoked_proxies_do_not_block(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    b = new_svid(control, tmp_path, "frontend")
    _ack(control, a)
    _ack(control, b)
    control.ctl_json("ca", "rotate")
    # A revoked proxy cannot come back: it does not hold the switch.
    assert control.api("POST", "/v1/certs/revoke", {"serial": b.serial}).status == 200
    gate = _ca(control)["gate"]
    assert [p["serial"] for p in gate["proxies"]] == [a.serial], gate
    p = control.ctl("ca", "status")
    assert p.returncode == 0 and a.serial in p.stdout, p.stdout
    # --force overrides.
    out = control.ctl_json("ca", "rotate", "--force")
    assert out["phase"] == "switched", out
    # switched -> stable: a's certificate (old root) is still valid.
    gate = _ca(control)["gate"]
    assert gate["next_phase"] == "stable" and not gate["open"] and gate["certs"] == 1, gate
    code, _, _ = assert_refused(control.api("POST", "/v1/ca/rotate", {}), 409)
    assert code == "old_root_in_use"


def _ctl_bg(control, *args):
    """meshletctl in the background; returns (thread, result list)."""
    out = []
    t = threading.Thread(target=lambda: out.append(control.ctl(*args, timeout=120)), daemon=True)
    t.start()
    return t, out


def test_rotate_auto_walks_the_three_phases(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    _ack(control, a)
    t, out = _ctl_bg(control, "ca", "rotate", "--auto", "--timeout", "60s")
    wait_for(lambda: _ca(control)["phase"] == "prepared", 10, what="--auto to prepare")
    time.sleep(1.5)
    assert _ca(control)["phase"] == "prepared", "--auto switched before the proxy acknowledged"
    _ack(control, a)
    wait_for(lambda: _ca(control)["phase"] == "switched", 10, what="--auto to switch")
    time.sleep(1.5)
    assert _ca(control)["phase"] == "switched", "--auto finished while a's SVID was valid"
    # a renews under the new root and its old certificate is revoked: nothing
    # the old root signed is valid any more.
    assert control.api("POST", "/v1/certs/revoke", {"serial": a.serial}).status == 200
    t.join(30)
    assert out, "--auto did not finish"
    p = out[0]
    assert p.returncode == 0, p.stderr
    ca = _ca(control)
    assert ca["phase"] == "stable" and len(ca["roots"]) == 1, ca
    for phase in ("prepared", "switched", "stable"):
        assert phase in p.stdout, p.stdout


def test_rotate_auto_times_out_naming_what_it_waits_for(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    _ack(control, a)
    t0 = time.monotonic()
    p = control.ctl("ca", "rotate", "--auto", "--timeout", "3s")
    took = time.monotonic() - t0
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "timed out" in p.stderr and a.serial in p.stderr, p.stderr
    assert 2.5 < took < 15, took
    assert _ca(control)["phase"] == "prepared"
    p = control.ctl("ca", "rotate", "--auto", "--timeout", "nonsense")
    assert p.returncode == 2, p.stderr
    # Without --auto, --timeout is the request timeout (as before --auto):
    # the step is tried, and refused by its gate.
    p = control.ctl("ca", "rotate", "--timeout", "5s")
    assert p.returncode == 1 and a.serial in p.stderr, p.stderr
    p = control.ctl("ca", "rotate", "--timeout", "2h")
    assert p.returncode == 2, p.stderr
