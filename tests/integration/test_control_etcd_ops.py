"""meshlet-control on etcd: what operators meet with several replicas.

CA steps taken through two replicas at once, the admin token given to every
replica with --admin-token-file, and an etcd that is slow (stopped) rather
than down. Real etcd (etcd_helpers), real control replicas.
"""

import hashlib
import json
import os
import signal
import subprocess
import threading
import time

from control_helpers import control_factory, ctl_binary, policy_doc  # noqa: F401
from etcd_helpers import etcd_factory  # noqa: F401
import prom_helpers as prom
from helpers import free_port
from test_control_etcd import admin_token, etcd_args, make_kek, replicas, rule


def ca_records(cluster):
    """meta/ca and {id: certificate PEM} of the ca/<id> records in etcd."""
    keys = cluster.get_prefix()
    meta = json.loads(keys["/meshlet/meta/ca"][0])
    certs = {int(k.rsplit("/", 1)[1]): json.loads(v)["cert"]
             for k, (v, _) in keys.items() if k.startswith("/meshlet/ca/")}
    return meta, certs


def test_simultaneous_ca_steps_on_two_replicas(control_factory, etcd_factory, tmp_path):  # noqa: F811
    """Both replicas are asked for the next CA step at the same moment, round
    after round. Each step is conditioned on the meta/ca revision its replica
    decided on: one of the two applies, the other answers 409 ca_changed
    (never a second step taken on a stale view, never a root replaced), and
    afterwards both replicas serve exactly the roots etcd holds."""
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    a, b = replicas(control_factory, cluster, kek, 2)
    token = admin_token([a, b])
    refused = 0
    for rnd in range(6):
        before = a.api("GET", "/v1/ca", token=token).json["phase"]
        go = threading.Barrier(2)
        out = {}

        def step(rep):
            go.wait()
            out[rep.name] = rep.api("POST", "/v1/ca/rotate", {"force": True}, token=token)

        ts = [threading.Thread(target=step, args=(r,)) for r in (a, b)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        statuses = sorted(r.status for r in out.values())
        assert statuses in ([200, 200], [200, 409]), (rnd, out)
        for r in out.values():
            if r.status == 409:
                refused += 1
                code, message, _ = r.error()
                assert code == "ca_changed" and "nothing was applied" in message, r
        meta, certs = ca_records(cluster)
        # one step per 200: two only when the second replica saw the first
        # step before deciding (then its step was the next one, from there)
        order = ["stable", "prepared", "switched"]
        steps = statuses.count(200)
        assert meta["phase"] == order[(order.index(before) + steps) % 3], (rnd, before, meta)
        time.sleep(0.5)                  # the watch brings the step to the other replica
        for rep in (a, b):
            view = rep.api("GET", "/v1/ca", token=token).json
            assert view["phase"] == meta["phase"], (rep.name, view["phase"], meta)
            assert view["root_ids"] == meta["roots"], (rep.name, view, meta)
            # no lost root: what each replica serves is the certificate in etcd
            assert view["roots"] == [certs[i] for i in meta["roots"]], rep.name
    assert refused >= 1, "no round had the two steps race; the test proved nothing"
    # the sealed keys in etcd open and match: a fresh start loads them and
    # signs with the signing root
    b.restart()
    view = b.api("GET", "/v1/ca", token=token).json
    assert view["root_ids"] == ca_records(cluster)[0]["roots"]


def token_file(path, text, mode=0o600):
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_admin_token_file_on_every_replica(control_factory, etcd_factory, tmp_path):  # noqa: F811
    """--admin-token-file: three replicas started at once with the same file;
    the store keeps only its digest, no replica writes admin.token, the
    token works on each of them and through meshletctl --token-file."""
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    secret = os.urandom(32).hex()
    tok = token_file(tmp_path / "admin-token", secret)
    args = ["--store", f"etcd:{cluster.endpoints}", "--kek-file", str(kek),
            "--admin-token-file", str(tok)]
    reps = [control_factory.new(name=f"r{i}", extra_args=args, start=False) for i in range(3)]
    for r in reps:
        r.start(wait=False)
    for r in reps:
        r.wait_healthy()
    assert not any(r.token_file.exists() for r in reps)
    keys = cluster.get_prefix()
    assert not any(secret in v for v, _ in keys.values())
    digest = json.loads(keys["/meshlet/meta/admin"][0])["sha256"]
    assert digest == hashlib.sha256(secret.encode()).hexdigest()
    for r in reps:
        assert r.api("GET", "/v1/ca", token=secret).status == 200
        assert r.api("GET", "/v1/ca", token="0" * 64).status == 403
        p = subprocess.run([str(ctl_binary()), "--control", r.url, "--ca", str(r.ca_file),
                            "--token-file", str(tok), "ca", "show"],
                           capture_output=True, text=True, timeout=30, env=r.env)
        assert p.returncode == 0, p.stderr
    assert "the admin token is the one in --admin-token-file" in "".join(
        r.stderr() for r in reps)


def test_admin_token_file_refusals(control_factory, etcd_factory, tmp_path):  # noqa: F811
    """A file that is not the store's token, one others may read, an absent
    one or a malformed one: the replica does not start, says why and writes
    nothing; with SQLite the option is a usage error."""
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    good = token_file(tmp_path / "good", os.urandom(32).hex())
    base = ["--store", f"etcd:{cluster.endpoints}", "--kek-file", str(kek)]
    first = control_factory.new(name="first", extra_args=base + ["--admin-token-file",
                                                                  str(good)])
    first.stop()
    rev, keys = cluster.revision(), cluster.get_prefix()
    cases = [
        (token_file(tmp_path / "other", os.urandom(32).hex()), "is not the admin token"),
        (token_file(tmp_path / "loose", good.read_text().strip(), 0o644), "chmod 600"),
        (tmp_path / "absent", "No such file"),
        (token_file(tmp_path / "short", "abc"), "expected one token"),
        (token_file(tmp_path / "two", "a" * 20 + " " + "b" * 20), "expected one token"),
    ]
    for i, (path, why) in enumerate(cases):
        c = control_factory.new(name=f"bad{i}", start=False,
                                extra_args=base + ["--admin-token-file", str(path)])
        c.start(wait=False)
        assert c.proc.wait(30) != 0, f"{path.name}: started"
        assert why in c.stderr(), f"{path.name}: {c.stderr()[-1500:]}"
    assert cluster.revision() == rev and cluster.get_prefix() == keys
    # without the option a replica joins as before (the digest is in the store)
    second = control_factory.new(name="second", extra_args=base)
    assert second.api("GET", "/v1/ca", token=good.read_text().strip()).status == 200
    # SQLite: the option belongs to etcd
    c = control_factory.new(name="sqlite", start=False,
                            extra_args=["--admin-token-file", str(good)])
    c.start(wait=False)
    assert c.proc.wait(30) == 2 or c.proc.returncode != 0
    assert "go with --store etcd" in c.stderr()


def changed_since(cluster, rev):
    """{key: mod_revision} of the keys written after revision rev."""
    return {k: m for k, (_, m) in cluster.get_prefix().items() if m > rev}


def test_etcd_stopped_not_down(control_factory, etcd_factory, tmp_path):  # noqa: F811
    """etcd frozen (SIGSTOP), not gone: a write waits for it and succeeds
    when the stall is shorter than the store's deadline (5 s); a longer one
    answers 503 at the deadline, is never half applied (the write is one
    etcd transaction: all of its keys at one revision, or none), and when
    etcd runs again (SIGCONT) the replicas write and wake long polls as
    before."""
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    a, b = replicas(control_factory, cluster, kek, 2)
    token = admin_token([a, b])
    assert a.put_policy(policy_doc("orders"), token=token).status in (200, 201)
    etcd = cluster.members[0].proc

    # 3 s: slow, under the deadline: the write is answered once etcd runs
    etcd.send_signal(signal.SIGSTOP)
    resume = threading.Timer(3.0, etcd.send_signal, args=(signal.SIGCONT,))
    resume.start()
    t0 = time.monotonic()
    r = a.put_policy(policy_doc("orders", rules=rule("spiffe://mesh.local/slow")), token=token,
                     timeout=30)
    took = time.monotonic() - t0
    resume.join()
    assert r.status in (200, 201) and 2.5 < took < 5.0, (r, took)
    assert "spiffe://mesh.local/slow" in json.dumps(b.api("GET", "/v1/policies/orders",
                                                          token=token).json)

    # 8 s: past the deadline: 503 at about 5 s, nothing acknowledged
    rev = cluster.revision()
    etcd.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = a.put_policy(policy_doc("orders", rules=rule("spiffe://mesh.local/late")),
                         token=token, timeout=30)
        took = time.monotonic() - t0
        assert r.status == 503 and "unavailable" in r.error()[1], r
        assert 4.5 < took < 7.5, took
        time.sleep(max(0.0, 8.0 - took))
    finally:
        etcd.send_signal(signal.SIGCONT)
    cluster.wait_healthy()
    # etcd may still carry out the request it had received before it froze
    # (503 means "not acknowledged", not "not applied"); either way whole
    time.sleep(0.5)
    moved = changed_since(cluster, rev)
    assert len(set(moved.values())) <= 1, f"a write torn over revisions: {moved}"
    late = "spiffe://mesh.local/late" in json.dumps(b.api("GET", "/v1/policies/orders",
                                                          token=token).json)
    assert late == bool(moved), (late, moved)

    # after: a long poll on b wakes for a write through a
    cur = b.api("GET", "/v1/services/orders/config?after=0&wait=0", token=token)
    assert cur.status == 200, cur
    version = cur.json["version"]
    out = {}

    def poll():
        out["r"] = b.api("GET", f"/v1/services/orders/config?after={version}&wait=20",
                         token=token, timeout=30)

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    r = a.put_policy(policy_doc("orders", rules=rule("spiffe://mesh.local/after")), token=token)
    assert r.status in (200, 201), r
    t.join(30)
    assert out["r"].status == 200 and out["r"].json["version"] > version, out
    assert time.monotonic() - t0 < 1.0


def store_gets(url):
    samples = prom.parse(prom.scrape(url))[0]
    return samples[("meshlet_control_store_duration_seconds_count",
                    frozenset({"op": "get"}.items()))]


def a_and_c_with_metrics(control_factory, etcd_factory, tmp_path):  # noqa: F811
    """One etcd member, replicas A and C (C serving its metrics): (cluster,
    a, c, C's metrics URL, the admin token)."""
    cluster = etcd_factory(1)
    kek = make_kek(tmp_path / "kek")
    port = free_port()
    a = control_factory.new(name="a", extra_args=etcd_args(cluster, kek))
    c = control_factory.new(name="c", extra_args=etcd_args(cluster, kek) +
                            ["--metrics-listen", f"127.0.0.1:{port}"])
    metrics = f"http://127.0.0.1:{port}/metrics"
    token = admin_token([a, c])
    return cluster, a, c, metrics, token


def test_long_poll_wake_ups_read_no_store(control_factory, etcd_factory, tmp_path):  # noqa: F811
    """20 long polls on C, for 20 services: writes through A to a service
    nobody polls wake C's loop (the watch), which finds from the revisions
    its follower keeps that no poll's version moved, without reading etcd
    (before: 4 + 20 reads per wake-up). A write to one polled service
    wakes that poll only; after etcd restarts (the watch is resumed and the
    revisions primed again) a write still wakes a poll within a second."""
    cluster, a, c, metrics, token = a_and_c_with_metrics(control_factory, etcd_factory,
                                                         tmp_path)
    svcs = [f"svc{i}" for i in range(20)]
    for s in svcs:
        assert a.put_policy(policy_doc(s), token=token).status in (200, 201)
    time.sleep(0.3)
    after = {s: c.api("GET", f"/v1/services/{s}/config?after=0&wait=0",
                      token=token).json["version"] for s in svcs}
    got = {}

    def poll(s, wait=8):
        got[s] = (c.api("GET", f"/v1/services/{s}/config?after={after[s]}&wait={wait}",
                        token=token, timeout=wait + 10), time.monotonic())

    ts = [threading.Thread(target=poll, args=(s,)) for s in svcs]
    for t in ts:
        t.start()
    time.sleep(0.5)
    before = store_gets(metrics)
    for i in range(5):
        r = a.put_policy(policy_doc("elsewhere", rules=rule(f"spiffe://mesh.local/e{i}")),
                         token=token)
        assert r.status in (200, 201), r
        time.sleep(0.2)
    time.sleep(0.3)
    reads = store_gets(metrics) - before
    print(f"\nstore reads on C for 5 wake-ups with 20 long polls: {reads:.0f}")
    assert not got, f"a poll woke for another service's write: {list(got)}"
    assert reads <= 2, f"{reads} store reads on C for 5 wake-ups"
    t0 = time.monotonic()
    assert a.put_policy(policy_doc("svc7", rules=rule("spiffe://mesh.local/x")),
                        token=token).status in (200, 201)
    ts[7].join(5)
    r, t = got["svc7"]
    assert r.status == 200 and r.json["version"] > after["svc7"] and t - t0 < 1.0, r
    assert list(got) == ["svc7"]
    for t in ts:
        t.join(15)

    # etcd restarts: the watch is resumed, its revisions primed again
    member = cluster.members[0]
    member.stop()
    time.sleep(2.0)                      # the watch finds it gone (and retries)
    member.start()
    cluster.wait_healthy()
    deadline = time.monotonic() + 15
    while c.api("GET", "/v1/health", token=None).json["store"].get("ok") is not True:
        assert time.monotonic() < deadline, c.stderr()[-2000:]
        time.sleep(0.1)
    time.sleep(1.0)                      # the watch reconnects (it retries every 500 ms)
    after["svc3"] = c.api("GET", "/v1/services/svc3/config?after=0&wait=0",
                          token=token).json["version"]
    got.clear()
    t = threading.Thread(target=poll, args=("svc3",))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert a.put_policy(policy_doc("svc3", rules=rule("spiffe://mesh.local/y")),
                        token=token).status in (200, 201)
    t.join(10)
    r, t1 = got["svc3"]
    assert r.status == 200 and r.json["version"] > after["svc3"] and t1 - t0 < 1.0, r


def store_reads(url):
    """Store calls that read (get and list) so far, from control's metrics."""
    samples = prom.parse(prom.scrape(url))[0]
    return sum(v for (name, labels), v in samples.items()
               if name == "meshlet_control_store_duration_seconds_count"
               and dict(labels).get("op") in ("get", "list"))


def test_config_answers_reused_until_the_version_moves(control_factory, etcd_factory,  # noqa: F811
                                                       tmp_path):
    """30 config answers of one service on C (as 30 proxies re-polling
    after a timeout) read etcd about once, not 30 times (before: some 17
    reads each); a write through A moves the version, and C's next answer
    has it; an answer for a proxy that holds a later version than C knows
    is read from etcd, never an older one from what C kept."""
    cluster, a, c, metrics, token = a_and_c_with_metrics(control_factory, etcd_factory,
                                                         tmp_path)
    assert a.put_policy(policy_doc("orders"), token=token).status in (200, 201)
    time.sleep(0.3)
    path = "/v1/services/orders/config?after=0&wait=0&upstreams=billing"
    first = c.api("GET", path, token=token)
    assert first.status == 200, first
    before = store_reads(metrics)
    for _ in range(30):
        r = c.api("GET", path, token=token)
        assert r.status == 200 and r.json == first.json, r
    reads = store_reads(metrics) - before
    print(f"\nstore reads on C for 30 config answers: {reads:.0f}")
    assert reads <= 3, f"{reads} store reads for 30 answers of one version"

    assert a.put_policy(policy_doc("orders", rules=rule("spiffe://mesh.local/z")),
                        token=token).status in (200, 201)
    deadline = time.monotonic() + 1.0
    while True:
        r = c.api("GET", path, token=token)
        if r.json["version"] > first.json["version"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.json["version"] > first.json["version"], r
    assert "spiffe://mesh.local/z" in json.dumps(r.json["policy"]), r

    # a proxy ahead of what C kept: answered from etcd, not from the cache
    ahead = r.json["version"] + 1000
    r2 = c.api("GET", f"/v1/services/orders/config?after={ahead}&wait=0&upstreams=billing",
               token=token)
    assert r2.status == 200 and r2.json["version"] == r.json["version"], r2
