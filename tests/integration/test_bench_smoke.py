"""tests/bench/run must keep working: a --quick run on meshlet alone
(about 15 s) produces every meshlet row, and an interrupted run leaves no
process behind. Not a measurement: the numbers are not checked, only that
they exist and that no request failed."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import REPO

RUN = REPO / "tests" / "bench" / "run"
TOOLS = ("wrk", "hey", "nginx", "openssl")


def missing_tools():
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in TOOLS if shutil.which(t, path=path) is None]


pytestmark = pytest.mark.skipif(
    bool(missing_tools()),
    reason=f"tests/bench/run needs {', '.join(missing_tools())} (apt-get install wrk hey nginx)")


def running(pid):
    """True while pid exists and is not a zombie (a proxy whose adapter
    shell has exited is reaped by init, maybe a moment later)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def bench_env():
    env = dict(os.environ)
    build = Path(env.get("MESHLET_BUILD", REPO / "build-test"))
    env["MESHLET_BUILD"] = str(build if build.is_absolute() else REPO / build)
    env.pop("MESHLET_PROXY", None)
    # An ASan build's leak report at exit is not what this test is about.
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    return env


def test_quick_run_on_meshlet(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([str(RUN), "--quick", "--duration", "1", "--only", "meshlet",
                        "--no-install", "--no-chart", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=bench_env(),
                       cwd=tmp_path)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    got = {(r["candidate"], r["scenario"]): r for r in recs}
    for scen in ("keepalive", "keepalive_16k", "conn_close", "bulk_1m", "rate_1000"):
        for cand in ("direct", "meshlet"):
            r = got[(cand, scen)]
            assert r["requests"] > 0 and r["rps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0, r
            assert r["errors"] == 0, r
    assert got[("meshlet", "keepalive")]["cpu_s_per_10k"] > 0
    idle = got[("meshlet", "idle_conns")]
    # Only present, not positive: under ASan (tests/run's build) freed
    # memory returned by the allocator can make the difference negative.
    assert idle["idle_conns"] == 200 and idle["errors"] == 0, idle
    assert isinstance(idle["kb_per_conn"], (int, float)), idle
    assert got[("meshlet", "control_idle")]["rss_kb"] > 0
    table = (out / "table.md").read_text()
    for row in ("tcp keepalive req/s", "KB per idle connection", "control-mode idle sidecar"):
        assert row in table
    assert "Traceback" not in p.stderr


H2_TOOLS = ("h2load", "haproxy", "curl")


@pytest.mark.skipif(any(shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None
                        for t in H2_TOOLS),
                    reason="the h2 rows need h2load (nghttp2-client), haproxy and curl")
def test_quick_run_h2_rows(tmp_path):
    """The HTTP/2 rows: meshlet-h2 and haproxy-h2 through an h2c-only
    backend (a pair that fell back to HTTP/1.1 would not start), and
    direct's h2 baseline."""
    out = tmp_path / "out"
    p = subprocess.run([str(RUN), "--quick", "--duration", "1", "--only", "meshlet-h2,haproxy-h2",
                        "--no-install", "--no-chart", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=bench_env(),
                       cwd=tmp_path)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    got = {(r["candidate"], r["scenario"]): r for r in recs}
    assert set(got) == {(c, s) for c in ("direct", "meshlet-h2", "haproxy-h2")
                        for s in ("h2_keepalive", "grpc_unary_1000")}, sorted(got)
    for r in got.values():
        assert r["tool"] == "h2load" and r["requests"] > 0 and r["rps"] > 0, r
        assert r["p99_ms"] >= r["p50_ms"] > 0 and r["errors"] == 0, r
    table = (out / "table.md").read_text()
    for row in ("h2 keepalive req/s vs HAProxy h2", "gRPC unary added p99 ms @ 1000/s"):
        assert row in table
    assert "Traceback" not in p.stderr


def test_unknown_candidate_is_refused(tmp_path):
    p = subprocess.run([str(RUN), "--only", "meshlet,envoy", "--no-install", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=30, env=bench_env())
    assert p.returncode == 1
    assert "unknown envoy" in p.stderr and "Traceback" not in p.stderr


def test_interrupt_stops_every_process(tmp_path):
    """SIGINT during a load run: exit status 130, and the backend and both
    proxies are gone (the work directory of an interrupted run is kept,
    with the PIDs it started)."""
    proc = subprocess.Popen([str(RUN), "--quick", "--duration", "20", "--only", "meshlet,keepalive",
                             "--no-install", "--no-chart", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=bench_env(), cwd=tmp_path)
    err = ""
    try:
        deadline = time.monotonic() + 60
        while "meshlet keepalive" not in err:
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, f"run ended early:\n{err}"
            err += line
        time.sleep(1.5)  # inside the measured wrk run
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err += rest
    assert proc.returncode == 130, err
    work = Path(re.search(r"work directory (\S+);", err).group(1))
    try:
        pids = [int(x) for x in (work / "started-pids").read_text().split()]
        assert len(pids) >= 3, pids  # the backend and both proxies at least
        for pid in pids:
            assert not running(pid), f"pid {pid} still runs after SIGINT"
    finally:
        shutil.rmtree(work, ignore_errors=True)
