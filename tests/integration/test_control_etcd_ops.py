"""meshlet-control on etcd: what operators meet with several replicas.

CA steps taken through two replicas at once, the admin token given to every
replica with --admin-token-file, and an etcd that is slow (stopped) rather
than down. Real etcd (etcd_helpers), real control replicas.
"""

import json
import threading
import time

from control_helpers import control_factory  # noqa: F401
from etcd_helpers import etcd_factory  # noqa: F401
from test_control_etcd import admin_token, make_kek, replicas


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
