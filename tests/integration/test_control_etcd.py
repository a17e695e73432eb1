"""meshlet-control on etcd: several replicas on one real etcd cluster.

Every test starts its own etcd (1 member, or 3 where the issue asks) on
127.0.0.1 with data under tmp_path (etcd_helpers), and control replicas with
--store etcd:... and a KEK made by `meshlet-control init-kek`.
"""

import json
import os
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from control_helpers import control_binary, control_factory, policy_doc  # noqa: F401
from etcd_helpers import etcd_factory  # noqa: F401


def make_kek(path):
    p = subprocess.run([str(control_binary()), "init-kek", str(path)], capture_output=True,
                       text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    return path


def etcd_args(cluster, kek, prefix=None):
    a = ["--store", f"etcd:{cluster.endpoints}", "--kek-file", str(kek)]
    if prefix:
        a += ["--etcd-prefix", prefix]
    return a


def replicas(control_factory, cluster, kek, n, start=True):  # noqa: F811
    return [control_factory.new(name=f"r{i}", extra_args=etcd_args(cluster, kek), start=start)
            for i in range(n)]


def admin_token(reps):
    """The admin token: in the state dir of the one replica that initialised the store."""
    files = [r.token_file for r in reps if r.token_file.exists()]
    assert len(files) == 1, f"expected one admin.token among the replicas, found {files}"
    return files[0].read_text().strip()


def test_kek_file_made_0600_never_overwritten(tmp_path):
    kek = make_kek(tmp_path / "kek")
    assert stat.S_IMODE(os.stat(kek).st_mode) == 0o600
    assert kek.stat().st_size == 32
    before = kek.read_bytes()
    p = subprocess.run([str(control_binary()), "init-kek", str(kek)], capture_output=True,
                       text=True, timeout=10)
    assert p.returncode != 0 and "never overwritten" in p.stderr
    assert kek.read_bytes() == before


def test_three_replicas_at_once_one_ca_one_token(control_factory, etcd_factory, tmp_path):  # noqa: F811
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    reps = replicas(control_factory, cluster, kek, 3, start=False)
    for r in reps:                       # all three before any is healthy
        r.start(wait=False)
    for r in reps:
        r.wait_healthy()
    token = admin_token(reps)
    keys = cluster.get_prefix()
    assert [k for k in keys if k.startswith("/meshlet/ca/")] == ["/meshlet/ca/0"]
    assert "/meshlet/meta/admin" in keys
    # the CA key is sealed, not PEM; the admin token is stored only as a digest
    ca0 = json.loads(keys["/meshlet/ca/0"][0])
    assert ca0["key"].startswith("aes-256-gcm:") and "PRIVATE KEY" not in keys["/meshlet/ca/0"][0]
    assert not any(token in v for v, _ in keys.values())
    # one CA: every replica serves the same bundle, and the token works everywhere
    pems = {r.ca_file.read_text() for r in reps}
    assert len(pems) == 1
    for r in reps:
        a = r.api("GET", "/v1/ca", token=token)
        assert a.status == 200, a
        assert len(a.json["roots"]) == 1
    assert len({r.api("GET", "/v1/ca", token=token).json["pins"][0]
                for r in reps}) == 1
    assert r.api("GET", "/v1/ca", token="0" * 64).status == 403
    winners = [r for r in reps if "first start: initialised the store" in r.stderr()]
    assert len(winners) == 1


def test_wrong_or_missing_kek_refuses_and_writes_nothing(control_factory, etcd_factory,  # noqa: F811
                                                          tmp_path):
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    first = control_factory.new(name="first", extra_args=etcd_args(cluster, kek))
    first.stop()
    rev = cluster.revision()
    keys = cluster.get_prefix()
    other = make_kek(tmp_path / "other-kek")
    loose = tmp_path / "loose-kek"
    loose.write_bytes(kek.read_bytes())
    loose.chmod(0o644)
    short = tmp_path / "short-kek"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    cases = [
        (["--kek-file", str(other)], "does not decrypt"),
        (["--kek-file", str(tmp_path / "absent")], "No such file"),
        (["--kek-file", str(loose)], "chmod 600"),
        (["--kek-file", str(short)], "exactly 32 bytes"),
        ([], "needs --kek-file"),
    ]
    for i, (args, why) in enumerate(cases):
        c = control_factory.new(name=f"bad{i}", start=False,
                                extra_args=["--store", f"etcd:{cluster.endpoints}"] + args)
        c.start(wait=False)
        assert c.proc.wait(30) != 0, f"{args}: started"
        assert why in c.stderr(), f"{args}: {c.stderr()[-1500:]}"
    assert cluster.revision() == rev, "a refused replica wrote to etcd"
    assert cluster.get_prefix() == keys
    # the right KEK still starts
    first.start()


def test_unreachable_etcd_refused_at_start(control_factory, etcd_factory, tmp_path):  # noqa: F811
    from helpers import free_port
    kek = make_kek(tmp_path / "kek")
    c = control_factory.new(name="noetcd", start=False, extra_args=[
        "--store", f"etcd:http://127.0.0.1:{free_port()}", "--kek-file", str(kek)])
    c.start(wait=False)
    assert c.proc.wait(30) != 0
    assert "cannot connect" in c.stderr(), c.stderr()[-1500:]


def rule(frm):
    return [{"name": "r", "action": "allow", "from": [frm]}]


def long_poll(rep, token, svc, after, wait=30):
    r = rep.api("GET", f"/v1/services/{svc}/config?after={after}&wait={wait}", token=token,
                timeout=wait + 10)
    assert r.status == 200, r
    return r.json


def test_policy_through_a_wakes_long_poll_on_c(control_factory, etcd_factory, tmp_path):  # noqa: F811
    """A 3-member etcd and 3 replicas: a policy pushed through A reaches a long
    poll on C within 1 s (p99 over 100 pushes)."""
    cluster = etcd_factory(3)
    kek = make_kek(tmp_path / "kek")
    a, b, c = replicas(control_factory, cluster, kek, 3)
    token = admin_token([a, b, c])
    svc = "orders"
    cur = long_poll(c, token, svc, 0, wait=0)["version"]
    lat = []
    for i in range(100):
        got = {}

        def poll():
            got["t"] = None
            got["cfg"] = long_poll(c, token, svc, cur)
            got["t"] = time.monotonic()
        th = threading.Thread(target=poll)
        th.start()
        time.sleep(0.05)                 # the poll is waiting on C
        doc = policy_doc(svc, rules=rule(f"spiffe://mesh.local/svc-{i}"))
        t0 = time.monotonic()
        r = a.put_policy(doc, token=token)
        assert r.status in (200, 201), r
        th.join(15)
        assert not th.is_alive(), f"push {i}: the long poll on C did not wake"
        cfg = got["cfg"]
        assert cfg["version"] > cur, f"push {i}: version did not move"
        assert cfg["policy"]["rules"][0]["from"] == [f"spiffe://mesh.local/svc-{i}"]
        lat.append(got["t"] - t0)
        cur = cfg["version"]
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
    print(f"\nwatch latency A->C over {len(lat)} pushes: p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
    assert p99 < 1.0, f"p99 {p99:.3f}s"
    # B saw every write too: the same version and policy
    assert long_poll(b, token, svc, 0, wait=0)["version"] == cur


def test_etcd_down_writes_503_then_recovery(control_factory, etcd_factory, tmp_path):  # noqa: F811
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    a, b = replicas(control_factory, cluster, kek, 2)
    token = admin_token([a, b])
    assert a.put_policy(policy_doc("orders"), token=token).status in (200, 201)
    member = cluster.members[0]
    member.stop()
    r = a.put_policy(policy_doc("orders", rules=rule("spiffe://mesh.local/x")),
                     token=token, timeout=30)
    assert r.status == 503, r
    assert "unavailable" in r.error()[1], r
    # a config answer needs the store: 503, never a half answer (versions read as 0)
    r = b.api("GET", "/v1/services/orders/config?after=0&wait=0", token=token, timeout=30)
    assert r.status == 503, r
    # what needs no store still answers, and says the store does not
    h = a.api("GET", "/v1/health", token=None)
    assert h.status == 200 and h.json["store"] == {"backend": "etcd", "ok": False,
                                                  "error": "unavailable"}, h
    assert b.api("GET", "/v1/health", token=None).status == 200
    member.start()
    cluster.wait_healthy()
    deadline = time.monotonic() + 20
    while True:
        r = b.api("GET", "/v1/policies/orders", token=token)
        if r.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status == 200, r
    # the refused write was not applied; a new one is, on both replicas
    r = a.put_policy(policy_doc("orders", rules=rule("spiffe://mesh.local/y")),
                     token=token)
    assert r.status in (200, 201), r
    assert "spiffe://mesh.local/y" in json.dumps(b.api("GET", "/v1/policies/orders",
                                                       token=token).json)
    assert "spiffe://mesh.local/x" not in json.dumps(cluster.get_prefix())


def test_ca_rotation_and_revocation_across_replicas(control_factory, etcd_factory, tmp_path):  # noqa: F811
    """A CA step through A is what B serves within a second: roots, phase, and
    its own server certificate from the new signing root after the switch;
    a revocation through A is on B's list."""
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    a, b = replicas(control_factory, cluster, kek, 2)
    token = admin_token([a, b])

    def ca(rep):
        r = rep.api("GET", "/v1/ca", token=token)
        assert r.status == 200, r
        return r.json

    r = a.api("POST", "/v1/ca/rotate", {"force": True}, token=token)
    assert r.status == 200, r
    deadline = time.monotonic() + 1.0
    while ca(b)["phase"] != "prepared":
        assert time.monotonic() < deadline, f"b still {ca(b)['phase']}"
        time.sleep(0.02)
    assert ca(b)["pins"] == ca(a)["pins"] and len(ca(b)["pins"]) == 2
    assert b.ca_file.read_text() == a.ca_file.read_text()
    r = a.api("POST", "/v1/ca/rotate", {"force": True}, token=token)
    assert r.status == 200, r
    time.sleep(1.0)
    assert ca(b)["phase"] == "switched" and ca(b)["signing"] == ca(a)["signing"]
    assert "reloaded after another replica's step" in b.stderr()
    # b's own certificate now comes from the new signing root
    assert "server certificate renewed" in b.stderr()
    # a revocation through a: b refuses that certificate too
    svc = "orders"
    tok = a.join_token(svc)
    from control_helpers import Identity, enroll
    ident = Identity(tmp_path / "id", svc)
    r = enroll(a, ident, token=tok)
    assert r.status in (200, 201), r
    assert b.api("GET", "/v1/bundle", svid=ident, token=None).status == 200
    r = a.api("POST", "/v1/certs/revoke", {"serial": ident.serial}, token=token)
    assert r.status in (200, 201, 204), r
    time.sleep(1.0)
    try:                                 # refused in the handshake, or by the API
        status = b.api("GET", "/v1/bundle", svid=ident, token=None).status
    except ssl.SSLError:
        status = "handshake refused"
    assert status in (401, 403, "handshake refused"), status


def test_1000_writes_while_the_etcd_leader_is_killed(control_factory, etcd_factory, tmp_path):  # noqa: F811
    """1,000 policy writes spread over three replicas while the leader of a
    3-member etcd is killed and restarted: every acknowledged write is there
    afterwards, versions never repeat, no torn state."""
    cluster = etcd_factory(3)
    kek = make_kek(tmp_path / "kek")
    reps = replicas(control_factory, cluster, kek, 3)
    token = admin_token(reps)
    workers, per_worker, services = 4, 250, 5
    acked = []                  # (worker, i, service, version)
    tried = set()               # (worker, i)
    lock = threading.Lock()
    status_counts = {}

    def work(w):
        for i in range(per_worker):
            svc = f"w{w}-s{i % services}"
            rep = reps[(w + i) % len(reps)]
            doc = policy_doc(svc, rules=[{"name": f"n{w}-{i}", "action": "allow",
                                          "from": ["spiffe://mesh.local/svc/x"]}])
            with lock:
                tried.add((w, i))
            try:
                r = rep.put_policy(doc, token=token, timeout=15)
                st = r.status
            except OSError as e:
                st = type(e).__name__
            with lock:
                status_counts[st] = status_counts.get(st, 0) + 1
                if st in (200, 201):
                    acked.append((w, i, svc, int(r.json["version"])))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    while len(acked) < 200:
        time.sleep(0.05)
    leader = cluster.leader()
    assert leader is not None
    leader.kill()
    killed_at = len(acked)
    time.sleep(2)
    leader.start()
    for t in threads:
        t.join(300)
    cluster.wait_healthy()
    print(f"\nleader {leader.name} killed after {killed_at} acknowledged writes; answers: "
          f"{status_counts}")
    assert sum(status_counts.values()) == workers * per_worker
    assert len(acked) >= 900, status_counts
    # versions never repeat
    versions = [v for *_, v in acked]
    assert len(set(versions)) == len(versions)
    # every acknowledged write is there: each service holds its last
    # acknowledged write, or a later one that was tried (and may have been
    # applied without its answer arriving)
    last = {}
    for w, i, svc, v in acked:
        if svc not in last or i > last[svc][0]:
            last[svc] = (i, v)
    for svc, (i, v) in last.items():
        w = int(svc[1:svc.index("-")])
        r = reps[0].api("GET", f"/v1/policies/{svc}", token=token)
        assert r.status == 200, r
        name = r.json["policy"]["rules"][0]["name"] if "policy" in r.json else \
            r.json["rules"][0]["name"]
        got = int(name.split("-")[1])
        assert got >= i and (w, got) in tried, f"{svc}: holds n{w}-{got}, acked up to {i}"
        assert int(r.headers.get("etag", '"0"').strip('"W/')) >= v
    # no torn state: every replica answers the same for every service
    for svc in last:
        answers = {json.dumps(rep.api("GET", f"/v1/policies/{svc}", token=token).json,
                              sort_keys=True) for rep in reps}
        assert len(answers) == 1, svc


def test_etcd_over_https_with_client_certificates(control_factory, etcd_factory, tmp_path):  # noqa: F811
    from etcd_helpers import make_tls
    tls = make_tls(tmp_path / "etcd-tls")
    cluster = etcd_factory(1, tls=tls)
    kek = make_kek(tmp_path / "kek")
    flags = ["--etcd-cacert", str(tls["ca"]), "--etcd-cert", str(tls["client"]),
             "--etcd-key", str(tls["client-key"])]
    a, b = [control_factory.new(name=f"t{i}", extra_args=etcd_args(cluster, kek) + flags)
            for i in range(2)]
    token = admin_token([a, b])
    assert cluster.endpoints.startswith("https://")
    cur = long_poll(b, token, "orders", 0, wait=0)["version"]
    r = a.put_policy(policy_doc("orders", rules=rule("spiffe://mesh.local/svc/tls")), token=token)
    assert r.status in (200, 201), r
    assert long_poll(b, token, "orders", cur, wait=10)["version"] > cur
    assert "/meshlet/policies/orders" in cluster.get_prefix()
    # no client certificate, or a CA that does not sign etcd's: refused at start
    for i, (bad, why) in enumerate((
            (["--etcd-cacert", str(tls["ca"])], "client certificate"),
            (["--etcd-cacert", str(tls["client"]), "--etcd-cert", str(tls["client"]),
              "--etcd-key", str(tls["client-key"])], "TLS handshake failed"),
            (["--etcd-cert", str(tls["client"]), "--etcd-key", str(tls["server-key"])],
             "do not match"))):
        c = control_factory.new(name=f"bad{i}", start=False,
                                extra_args=etcd_args(cluster, kek) + bad)
        c.start(wait=False)
        assert c.proc.wait(30) == 1, c.stderr()[-1500:]
        assert why in c.stderr(), c.stderr()[-1500:]
