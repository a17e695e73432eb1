"""SVID lineage: each renewal records its parent, a certificate renews a
bounded number of times, and revoking a certificate revokes what was renewed
from it (issue 9, defect 5)."""

import ssl
import time
from pathlib import Path

from control_helpers import (Identity, assert_refused, control, control_factory,  # noqa: F401
                             enroll, new_svid)

RENEWALS_MAX = 3
LINEAGE_RENEWALS_MAX = 10      # per lineage and SVID lifetime


def _child(control, tmp_path, parent):
    """A new key renewed over mTLS with parent's SVID; returns (Response, Identity)."""
    ident = Identity(Path(tmp_path) / f"child-{time.monotonic_ns()}", parent.service)
    return enroll(control, ident, svid=parent), ident


def _renew_ok(control, tmp_path, parent):
    r, ident = _child(control, tmp_path, parent)
    assert r.status == 200, r
    return ident


def _certs(control):
    r = control.api("GET", "/v1/certs")
    assert r.status == 200, r
    return {c["serial"]: c for c in r.json["certs"]}


def test_renewal_is_capped_per_certificate(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    children = [_renew_ok(control, tmp_path, a) for _ in range(RENEWALS_MAX)]
    # The next renewal with the same certificate is refused, and so is every
    # one after it (a loop minting SVIDs stops here).
    for _ in range(3):
        r, _ = _child(control, tmp_path, a)
        code, msg, _ = assert_refused(r, 403)
        assert code == "renewal_limit", r
        assert str(RENEWALS_MAX) in msg and a.serial in msg, msg
    certs = _certs(control)
    assert len([c for c in certs.values() if c["service"] == "orders"]) == 1 + RENEWALS_MAX
    assert certs[a.serial]["parent"] is None and certs[a.serial]["via"] == "token"
    assert certs[a.serial]["renewals"] == RENEWALS_MAX
    for c in children:
        assert certs[c.serial]["parent"] == a.serial, certs[c.serial]
        assert certs[c.serial]["via"] == "svid" and certs[c.serial]["renewals"] == 0
    # A child renews on its own budget.
    g = _renew_ok(control, tmp_path, children[0])
    assert _certs(control)[g.serial]["parent"] == children[0].serial


def test_revoking_a_certificate_revokes_its_descendants(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    b = _renew_ok(control, tmp_path, a)
    c = _renew_ok(control, tmp_path, b)
    b2 = _renew_ok(control, tmp_path, a)
    other = new_svid(control, tmp_path, "orders")          # another lineage
    other_child = _renew_ok(control, tmp_path, other)
    bundle0 = control.api("GET", "/v1/bundle", token=None, svid=other).json

    r = control.api("POST", "/v1/certs/revoke", {"serial": a.serial})
    assert r.status == 200, r
    assert sorted(r.json["descendants"]) == sorted([b.serial, c.serial, b2.serial]), r.json

    bundle = control.api("GET", "/v1/bundle", token=None, svid=other).json
    assert bundle["version"] == bundle0["version"] + 1     # one write for all of them
    for x in (a, b, c, b2):
        assert x.serial in bundle["revoked"], (x.serial, bundle["revoked"])
    for x in (other, other_child):
        assert x.serial not in bundle["revoked"]
    certs = _certs(control)
    assert all(certs[x.serial]["revoked"] for x in (a, b, c, b2))
    assert not certs[other.serial]["revoked"] and not certs[other_child.serial]["revoked"]

    # The grandchild can no longer renew: refused in the handshake or with 401/403.
    try:
        r, _ = _child(control, tmp_path, c)
        assert_refused(r, 401, 403)
    except (ssl.SSLError, ConnectionError) as e:
        print(f"renewal with a revoked descendant refused in the handshake: {e!r}")
    # The unrelated lineage still renews.
    other_grandchild = _renew_ok(control, tmp_path, other_child)

    # Revoking a child revokes its own descendants, not its parent.
    r = control.api("POST", "/v1/certs/revoke", {"serial": other_child.serial})
    assert r.status == 200 and r.json["descendants"] == [other_grandchild.serial], r
    assert not _certs(control)[other.serial]["revoked"]
    # Again: nothing left to revoke, no new bundle version.
    r2 = control.api("POST", "/v1/certs/revoke", {"serial": other_child.serial})
    assert r2.status == 200 and r2.json["descendants"] == [], r2
    assert r2.json["bundle_version"] == r.json["bundle_version"]


def test_certs_list_shows_the_lineage(control, tmp_path):
    a = new_svid(control, tmp_path, "payments")
    b = _renew_ok(control, tmp_path, a)
    p = control.ctl("certs", "list")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    header = lines[0].split()
    assert "PARENT" in header and "RENEWALS" in header, lines[0]
    col = header.index("PARENT")
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert rows[b.serial][col] == a.serial, p.stdout
    assert rows[a.serial][col] == "-", p.stdout


def test_a_lineage_cannot_fan_out(control, tmp_path):
    """The per-certificate cap alone lets a tree grow 3, 9, 27, ... wide:
    a lineage (everything renewed from one join) renews at most
    LINEAGE_RENEWALS_MAX times per SVID lifetime."""
    a = new_svid(control, tmp_path, "orders")
    frontier, issued, refused = [a], 0, None
    while refused is None and issued < 3 * LINEAGE_RENEWALS_MAX:
        nxt = []
        for parent in frontier:
            for _ in range(RENEWALS_MAX):
                r, ident = _child(control, tmp_path, parent)
                if r.status != 200:
                    refused = r
                    break
                issued += 1
                nxt.append(ident)
            if refused is not None:
                break
        frontier = nxt
    assert refused is not None, f"{issued} renewals in one lineage, none refused"
    code, msg, _ = assert_refused(refused, 403)
    assert code == "lineage_limit", refused
    assert issued == LINEAGE_RENEWALS_MAX, issued
    assert a.serial in msg, msg
    # Another lineage of the same service is not affected.
    b = new_svid(control, tmp_path, "orders")
    _renew_ok(control, tmp_path, b)
    certs = _certs(control)
    assert certs[a.serial]["lineage"] == a.serial
    assert all(c["lineage"] == a.serial for c in certs.values()
               if c["service"] == "orders" and c["serial"] not in (b.serial,)
               and c["parent"] != b.serial)


def test_renewal_refused_when_an_ancestor_is_revoked(control_factory, tmp_path):
    """A child whose own revocation record is missing (a store restored from
    a backup, another control instance) still cannot renew once any of its
    ancestors is revoked."""
    import sqlite3
    ctrl = control_factory.new("lineage")
    a = new_svid(ctrl, tmp_path, "orders")
    b = _renew_ok(ctrl, tmp_path, a)
    c = _renew_ok(ctrl, tmp_path, b)
    assert ctrl.api("POST", "/v1/certs/revoke", {"serial": a.serial}).status == 200
    ctrl.stop()
    con = sqlite3.connect(str(ctrl.db_file()))
    with con:
        n = con.execute("DELETE FROM kv WHERE key IN (?, ?)",
                        (f"revoked/{b.serial}", f"revoked/{c.serial}")).rowcount
    con.close()
    assert n == 2
    ctrl.start()
    r, _ = _child(ctrl, tmp_path, c)
    code, msg, _ = assert_refused(r, 403)
    assert code == "ancestor_revoked" and a.serial in msg, r


def test_a_retry_with_the_same_key_is_not_a_new_renewal(control, tmp_path):
    """A proxy whose answers are lost retries with the same key: control
    counts the key once against the certificate's cap, which therefore
    bounds distinct keys (a lost answer cannot lock the proxy out)."""
    a = new_svid(control, tmp_path, "orders")
    retried = Identity(Path(tmp_path) / "retried", "orders")
    for _ in range(RENEWALS_MAX + 2):           # every answer "lost" but the last
        r = enroll(control, retried, svid=a)
        assert r.status == 200, r
    assert _certs(control)[a.serial]["renewals"] == 1
    # Distinct keys are still capped: 1 used, RENEWALS_MAX - 1 left.
    for _ in range(RENEWALS_MAX - 1):
        _renew_ok(control, tmp_path, a)
    r, _ = _child(control, tmp_path, a)
    code, _, _ = assert_refused(r, 403)
    assert code == "renewal_limit", r
    # The first key retried again is still welcome.
    assert enroll(control, retried, svid=a).status == 200


def test_same_key_retries_still_count_against_the_lineage(control, tmp_path):
    a = new_svid(control, tmp_path, "orders")
    retried = Identity(Path(tmp_path) / "retried", "orders")
    for _ in range(LINEAGE_RENEWALS_MAX):
        r = enroll(control, retried, svid=a)
        assert r.status == 200, r
    r = enroll(control, retried, svid=a)
    code, _, _ = assert_refused(r, 403)
    assert code == "lineage_limit", r
