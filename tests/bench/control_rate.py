#!/usr/bin/python3
"""Request rates of meshlet-control's API on this machine, and its RSS.

Starts its own meshlet-control (fresh state directory, free port on
127.0.0.1), then measures for --seconds each:

  bundle   GET /v1/bundle over mTLS with a proxy SVID (obtained with a join
           token), one keep-alive connection per client
  policy   PUT /v1/policies/<svc> with the admin token, each client writing
           its own service (every 2xx is fsync'd by the daemon)

Clients are processes (so Python's GIL does not cap the rate), --clients of
them, each with one keep-alive connection. The daemon's VmRSS is sampled
idle and during each run. Prints a table, or JSON with --json.

  tests/bench/control_rate.py [--build build-release] [--seconds 5] [--clients 4]

The binary is $MESHLET_BUILD/control/meshlet-control (or --build DIR/...).
Remember the machine: the clients share its cores with the daemon.
"""

import argparse
import http.client
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

from control_helpers import Control, Identity, enroll, sanitizer_env, tls_context  # noqa: E402
from helpers import REPO, rss_kb  # noqa: E402


def client(kind, port, ca, cert, key, token, seconds, idx, start_evt, out_q):
    ctx = tls_context(ca, cert, key) if cert else tls_context(ca)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    ok = errors = reconnects = 0
    lat = []
    body = None
    headers = {"Accept": "application/json"}
    if kind == "policy":
        headers["Authorization"] = f"Bearer {token}"
        headers["Content-Type"] = "application/json"
    start_evt.wait()
    t_end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < t_end:
        n += 1
        if kind == "bundle":
            method, path = "GET", "/v1/bundle"
        else:
            method, path = "PUT", f"/v1/policies/bench-{idx}"
            body = json.dumps({"service": f"bench-{idx}", "rules": [
                {"name": f"r{n}", "action": "allow", "from": ["spiffe://mesh.local/svc/frontend"],
                 "ports": [8080], "methods": ["GET"], "paths": ["/orders/*"]}]})
        t0 = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            if 200 <= r.status < 300:
                ok += 1
                lat.append(time.monotonic() - t0)
            else:
                errors += 1
            if r.getheader("Connection", "").lower() == "close":
                conn.close()
                reconnects += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            reconnects += 1
            conn.close()
    conn.close()
    out_q.put({"ok": ok, "errors": errors, "reconnects": reconnects, "lat": lat})


def run(kind, ctrl, svid, seconds, clients):
    q = mp.Queue()
    start = mp.Event()
    args = (str(ctrl.ca_file), str(svid.cert) if kind == "bundle" else None,
            str(svid.key) if kind == "bundle" else None, ctrl.token, seconds)
    procs = [mp.Process(target=client, args=(kind, ctrl.port, *args[:4], seconds, i, start, q))
             for i in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    peak = [ctrl.rss_kb()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], ctrl.rss_kb())
            time.sleep(0.05)

    s = threading.Thread(target=sample, daemon=True)
    s.start()
    t0 = time.monotonic()
    start.set()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    elapsed = time.monotonic() - t0
    for p in procs:
        p.join(10)
    stop.set()
    s.join(1)
    ok = sum(r["ok"] for r in results)
    lat = sorted(x for r in results for x in r["lat"])

    def pct(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

    return {"kind": kind, "clients": clients, "seconds": round(elapsed, 2), "ok": ok,
            "errors": sum(r["errors"] for r in results),
            "reconnects": sum(r["reconnects"] for r in results),
            "rate": round(ok / elapsed, 1), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "rss_peak_kb": peak[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.environ.get("MESHLET_BUILD", str(REPO / "build-test")))
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    build = Path(a.build)
    if not build.is_absolute():
        build = REPO / build
    binary = build / "control" / "meshlet-control"
    if not binary.exists():
        sys.exit(f"{binary}: not built")

    with tempfile.TemporaryDirectory(prefix="meshlet-bench-") as tmp:
        tmp = Path(tmp)
        state = tmp / "state"
        state.mkdir(mode=0o700)
        env = sanitizer_env()
        env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")
        ctrl = Control(binary, state, tmp, env, name="bench")
        ctrl.start()
        try:
            time.sleep(0.5)
            idle = ctrl.rss_kb()
            tok = ctrl.join_token("orders")
            svid = Identity(tmp / "svid", "orders")
            r = enroll(ctrl, svid, token=tok)
            if r.status not in (200, 201):
                sys.exit(f"enrolment failed: {r}")
            out = {"binary": str(binary), "rss_idle_kb": idle,
                   "bundle": run("bundle", ctrl, svid, a.seconds, a.clients),
                   "policy": run("policy", ctrl, svid, a.seconds, a.clients)}
            time.sleep(0.5)
            out["rss_after_kb"] = ctrl.rss_kb()
        finally:
            ctrl.stop()
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(f"meshlet-control: {out['binary']}")
    print(f"{'request':<22}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'reconn':>8}{'peak RSS':>11}")
    for k, label in (("bundle", "GET /v1/bundle (mTLS)"), ("policy", "PUT /v1/policies")):
        r = out[k]
        print(f"{label:<22}{r['clients']:>8}{r['rate']:>10}{r['p50_ms']:>9}{r['p99_ms']:>9}"
              f"{r['errors']:>8}{r['reconnects']:>8}{r['rss_peak_kb']:>8} kB")
    print(f"RSS idle {out['rss_idle_kb']} kB, after the runs {out['rss_after_kb']} kB")


if __name__ == "__main__":
    main()
