"""tests/bench/control_scale and its load tool ctlload must keep working:
a run with 50 simulated proxies (each with its own SVID, one TLS
connection per long poll) sees every push reach every proxy, and the
second run reuses the SVIDs it issued. ctlload itself is checked against a
control started here: its SVIDs come from control's CA, the versions it
logs are control's, and bad set-up is refused clearly. Not a measurement:
the numbers are not judged, only that they exist."""

import json
import os
import subprocess
import time
from pathlib import Path

from control_helpers import control, control_factory  # noqa: F401 (fixtures)
from helpers import REPO

DRIVER = REPO / "tests" / "bench" / "control_scale"


def build_dir():
    b = Path(os.environ.get("MESHLET_BUILD", REPO / "build-test"))
    return b if b.is_absolute() else REPO / b


def ctlload():
    return build_dir() / "tests" / "bench" / "ctlload"


def bench_env():
    env = dict(os.environ, MESHLET_BUILD=str(build_dir()))
    # An ASan build's leak report at exit is not what this test is about.
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    return env


def test_driver_with_50_proxies(tmp_path):
    out = tmp_path / "out"
    argv = [str(DRIVER), "--sizes", "50", "--services", "5", "--pushes", "2", "--idle", "1",
            "--settle", "0.5", "--no-chart", "--out", str(out)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=bench_env())
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert rec["proxies"] == 50 and rec["issue"]["issued"] == 50, rec["issue"]
    assert rec["rss_mb"] > 0 and rec["idle_cpu"] >= 0
    for push in rec["pushes"]:
        want = 50 if push["kind"] == "fanout" else 10
        assert push["targets"] == want and push["seen"] == want, push
        assert push["p99_ms"] is not None and push["max_ms"] >= push["p50_ms"] >= 0, push
    assert rec["fanout"]["all_seen"] and rec["policy"]["all_seen"]
    assert rec["load_summary"]["errors"] == 0, rec["load_summary"]
    assert "| sqlite | 1 | 50 |" in (out / "table.md").read_text()
    # Again: the control state and the SVIDs are reused, nothing is issued.
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=bench_env())
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert rec["issue"]["issued"] == 0 and rec["issue"]["cached"] == 50, rec["issue"]
    assert "Traceback" not in p.stderr


def run_load(control, tmp_path, *extra, timeout=120, token_file=None):
    argv = [str(ctlload()), "--url", control.url, "--ca", str(control.ca_file),
            "--admin-token-file", str(token_file or control.token_file),
            "--events", str(tmp_path / "events"), *extra]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=bench_env())


def test_ctlload_sees_a_push_with_its_own_svids(control, tmp_path):
    svids = tmp_path / "svids"
    p = run_load(control, tmp_path, "--proxies", "20", "--services", "4", "--register",
                 "--svid-dir", str(svids))
    lines = []
    try:
        deadline = time.monotonic() + 90
        while not any(x.startswith("ready") for x in lines):
            line = p.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines) + p.stderr.read()
            lines.append(line)
        r = control.api("PUT", "/v1/traffic/load-001",
                        {"service": "load-001", "timeouts": {"request_seconds": 7}})
        assert r.status in (200, 201), r
        want = (r.json or {}).get("version")
        time.sleep(2.5)   # a flush of the events file, once a second
    finally:
        out, err = p.communicate(input="", timeout=60)
    assert p.returncode == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["issued"] == 20 and summary["errors"] == 0, (summary, err)
    assert summary["registered"] == 20, (summary, err)
    # Every proxy logged a first version, then the traffic version.
    seen = {}
    for line in (tmp_path / "events").read_text().splitlines():
        i, v, _ = (int(x) for x in line.split())
        seen.setdefault(i, []).append(v)
    assert sorted(seen) == list(range(20))
    assert all(len(v) >= 2 and v == sorted(v) for v in seen.values()), seen
    if want is not None:
        assert all(v[-1] >= want for v in seen.values()), (want, seen)
    # One SVID per proxy, of its service, in control's records.
    assert len(list(svids.glob("*.pem"))) == 20
    certs = control.api("GET", "/v1/certs").json
    listed = json.dumps(certs)
    for s in range(4):
        assert f"load-{s:03d}" in listed


def test_ctlload_refuses_bad_setup(control, tmp_path):
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-admin-token\n")
    p = run_load(control, tmp_path, "--proxies", "3", token_file=bad)
    out, err = p.communicate(input="", timeout=60)
    assert p.returncode == 1 and "POST /v1/tokens: HTTP 403" in err and "wrong admin token" in err, (out, err)
    p = subprocess.run([str(ctlload()), "--url", "http://127.0.0.1:1", "--ca", "x",
                        "--admin-token-file", "y"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "expected https://" in p.stderr, p.stderr
    p = subprocess.run([str(ctlload()), "--url", control.url, "--ca", str(control.ca_file),
                        "--admin-token-file", str(control.token_file), "--proxies", "0"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--proxies: expected 1..200000" in p.stderr, p.stderr
