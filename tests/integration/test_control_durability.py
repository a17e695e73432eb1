"""meshlet-control's state survives: SIGKILL in the middle of writes loses
no acknowledged write and leaves a sound database; a restart keeps the CA,
the admin token, join tokens and policies; a state directory others can
read, or a damaged database, is refused and left alone."""

import hashlib
import itertools
import http.client
import os
import random
import sqlite3
import ssl
import stat
import subprocess
import threading
import time

from control_helpers import (Identity, control, control_factory, enroll, policy_doc,  # noqa: F401
                             request, wait_port_closed)


def integrity_ok(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("PRAGMA integrity_check").fetchall()
    finally:
        con.close()


def test_sigkill_during_writes_loses_nothing(control_factory):
    ctrl = control_factory.new("durable")
    rng = random.Random(int(time.time()))
    acked = {}          # service -> (version, rule name) of writes answered 2xx
    shared = []         # (version, rule name) of acked writes to the one shared service
    deadline = time.monotonic() + 45
    iterations = 0
    seq = itertools.count(1)

    for it in range(30):
        if time.monotonic() > deadline:
            break
        iterations += 1
        stop = threading.Event()
        token, ctx, port = ctrl.token, ctrl.context(), ctrl.port

        def writer():
            while not stop.is_set():
                n = next(seq)
                svc = f"d{n}"
                name = f"w{n}"
                target = svc if n % 3 else "shared"
                doc = policy_doc(target, [{"name": name, "action": "allow", "ports": [1 + n % 65535]}])
                try:
                    r = request(port, ctx, "PUT", f"/v1/policies/{target}", body=doc, token=token, timeout=5)
                except (OSError, ssl.SSLError, http.client.HTTPException):
                    return          # the daemon died under us
                if 200 <= r.status < 300:
                    if target == "shared":
                        shared.append((r.json["version"], name))
                    else:
                        acked[svc] = (r.json["version"], name)
                elif r.status >= 500:
                    continue
                else:
                    raise AssertionError(f"write refused: {r}")

        threads = [threading.Thread(target=writer) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.02, 0.35))
        ctrl.kill()
        stop.set()
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads)
        assert wait_port_closed(ctrl.port)
        ctrl.start()

    print(f"{iterations} SIGKILLs, {len(acked)} acknowledged writes to distinct services, "
          f"{len(shared)} to the shared one")
    assert iterations >= 10, f"only {iterations} iterations in the time budget"
    assert len(acked) > 20, f"only {len(acked)} acknowledged writes: too few to mean something"

    # every acknowledged write is there, with its version and content
    listed = {e["service"]: e["version"] for e in ctrl.api("GET", "/v1/policies").json["policies"]}
    for svc, (version, name) in acked.items():
        assert listed.get(svc) == version, f"{svc}: acked version {version}, listed {listed.get(svc)}"
        g = ctrl.api("GET", f"/v1/policies/{svc}")
        assert g.status == 200, f"{svc}: acknowledged at version {version}, now {g}"
        assert g.json["version"] == version
        assert g.json["policy"]["rules"][0]["name"] == name
    # the shared service: versions of acknowledged writes only grew (no version reused after a
    # crash), and what is stored is the last acknowledged write or a later one
    versions = [v for v, _ in shared]
    assert versions == sorted(versions) or len(set(versions)) == len(versions)
    assert len(set(versions)) == len(versions), "a version was handed out twice"
    if shared:
        g = ctrl.api("GET", "/v1/policies/shared").json
        last_v, last_name = max(shared)
        assert g["version"] >= last_v
        if g["version"] == last_v:
            assert g["policy"]["rules"][0]["name"] == last_name

    assert ctrl.stop() == 0
    db = ctrl.db_file()
    assert integrity_ok(db) == [("ok",)]


def test_restart_keeps_ca_tokens_and_policies(control_factory, tmp_path):
    ctrl = control_factory.new("restart")
    files = {n: (ctrl.state_dir / n).read_bytes() for n in ("ca.pem", "ca.key", "admin.token")}
    assert stat.S_IMODE(os.stat(ctrl.state_dir / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ctrl.state_dir / "admin.token").st_mode) == 0o600
    v = ctrl.put_policy(policy_doc("orders", [{"name": "keep", "action": "allow"}])).json["version"]
    join = ctrl.join_token("orders", uses=2)
    first = Identity(tmp_path / "first", "orders")
    assert enroll(ctrl, first, token=join).status in (200, 201)
    ca_before = ctrl.api("GET", "/v1/ca").json

    assert ctrl.stop() == 0
    ctrl.start()
    for n, data in files.items():
        assert (ctrl.state_dir / n).read_bytes() == data, f"{n} changed across a restart"
    g = ctrl.api("GET", "/v1/policies/orders").json
    assert g["version"] == v and g["policy"]["rules"][0]["name"] == "keep"
    assert ctrl.api("GET", "/v1/ca").json["roots"] == ca_before["roots"]
    # the join token has one use left; the first SVID still works
    second = Identity(tmp_path / "second", "orders")
    assert enroll(ctrl, second, token=join).status in (200, 201)
    assert enroll(ctrl, Identity(tmp_path / "third", "orders"), token=join).status in (401, 403)
    assert ctrl.api("GET", "/v1/bundle", token=None, svid=first).status == 200
    # versions keep growing after the restart
    assert ctrl.put_policy(policy_doc("orders")).json["version"] > v
    # and after a SIGKILL too
    ctrl.kill()
    ctrl.start()
    assert ctrl.api("GET", "/v1/policies/orders").json["version"] > v
    assert (ctrl.state_dir / "admin.token").read_bytes() == files["admin.token"]


def _start_refused(ctrl, timeout=20):
    ctrl.start(wait=False)
    try:
        rc = ctrl.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        ctrl.kill()
        raise AssertionError(f"meshlet-control kept running:\n{ctrl.stderr()[-3000:]}")
    assert rc != 0
    return ctrl.stderr().rsplit("===== start", 1)[-1]


def test_state_dir_open_to_others_refused(control_factory):
    ctrl = control_factory.new("perm")
    assert ctrl.stop() == 0
    before = {p.name: p.read_bytes() for p in ctrl.state_dir.iterdir() if p.is_file()}
    os.chmod(ctrl.state_dir, 0o755)
    err = _start_refused(ctrl)
    assert str(ctrl.state_dir) in err or "permission" in err.lower() or "0755" in err or "mode" in err.lower()
    after = {p.name: p.read_bytes() for p in ctrl.state_dir.iterdir() if p.is_file()}
    assert after == before
    os.chmod(ctrl.state_dir, 0o700)
    ctrl.start()


def test_damaged_database_refused_not_reinitialised(control_factory):
    ctrl = control_factory.new("damaged")
    ctrl.put_policy(policy_doc("orders"))
    assert ctrl.stop() == 0
    db = ctrl.db_file()
    data = bytearray(db.read_bytes())
    assert len(data) >= 8192
    # garbage over every page but the first: the schema and the data are damaged
    rng = random.Random(7)
    for off in range(4096, len(data), 4096):
        for i in range(off + 100, min(off + 4096, len(data)), 7):
            data[i] = rng.randrange(256)
    db.write_bytes(bytes(data))
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    token = ctrl.token_file.read_bytes()
    err = _start_refused(ctrl)
    assert "databas" in err.lower() or "store" in err.lower() or str(db) in err, err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest, "the damaged database was modified"
    assert ctrl.token_file.read_bytes() == token

    # a file that is not a database at all
    db.write_bytes(b"this is not a database" * 200)
    _start_refused(ctrl)
    assert db.read_bytes() == b"this is not a database" * 200
