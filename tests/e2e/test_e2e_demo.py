"""deploy/local/demo itself, as a new user runs it (as root): every step
OK, exit 0, and nothing left behind; with --keep, the dashboard it leaves
running answers on the host's loopback and shows the services, and
`demo down` stops it with the rest."""

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from e2e_helpers import DEMO, SANITIZER_MARKERS, demo_env, netns_list, root_iptables, root_links
from e2e_helpers import e2e_runnable, root_before  # noqa: F401  (fixtures)


def test_demo_runs_every_step_and_cleans_up(root_before):
    t0_ns = set(netns_list())
    p = subprocess.run([str(DEMO), "--no-build", "--no-install"], capture_output=True,
                       text=True, env=demo_env(), timeout=120)
    out = p.stdout + p.stderr
    m = re.search(r"\$DEMO = (/tmp/meshlet-demo\.\w+)", out)
    work = Path(m.group(1)) if m else None
    try:
        assert p.returncode == 0, out[-6000:]
        for title in ("network:", "control:", "policies:", "sidecars:", "allowed:", "denied:",
                      "gRPC allowed:", "gRPC denied:", "around the sidecars:", "policy push:",
                      "certificate rotation:", "chaos:", "metrics:", "cleaning up"):
            assert title in out, f"step {title!r} missing:\n{out}"
        assert "FAIL" not in out, out
        assert "all steps OK" in out
        assert out.count("    OK   ") == 13, out
        # the chaos step: rates measured by the client and from the metrics
        assert re.search(r"without retries: \d+ of 200 answered 200", out), out
        assert re.search(r"frontend's retried \d+", out), out
        # the gRPC steps: a real grpcio call answered by the app (naming the
        # caller its sidecar vouched for), and one refused by the named rule
        assert "-> OK order 42: 2 books, 1 lamp (caller spiffe://mesh.local/svc/frontend)" in out, out
        assert "-> PERMISSION_DENIED denied by rule no-order-deletes" in out, out
        assert re.search(r"path=/shop\.Orders/Get decision=allow rule=frontend-gets-orders-rpc status=200", out), out
        assert 'meshlet_policy_decisions_total{decision="deny",rule="no-order-deletes"} 1' in out, out
        assert set(netns_list()) == t0_ns
        assert [n for n in root_links() if n not in root_before["links"]] == []
        assert root_iptables() == root_before["iptables"]
        assert work is not None and (work / "logs").is_dir()
        for f in sorted((work / "logs").glob("*.err")):
            text = f.read_text(errors="replace")
            assert not any(mk in text for mk in SANITIZER_MARKERS), f"{f.name}:\n{text[-4000:]}"
    finally:
        if work and work.name.startswith("meshlet-demo."):
            shutil.rmtree(work, ignore_errors=True)


STATE_DIR = Path("/run/meshlet-demo")


def http_get(url, timeout=5):
    """(status, body) of a GET, or (None, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return None, str(e)


def test_demo_keep_leaves_the_dashboard_running_and_down_stops_it(root_before):
    t0_ns = set(netns_list())
    p = subprocess.run([str(DEMO), "--keep", "--no-build", "--no-install"], capture_output=True,
                       text=True, env=demo_env(), timeout=120)
    out = p.stdout + p.stderr
    m = re.search(r"\$DEMO = (/tmp/meshlet-demo\.\w+)", out)
    work = Path(m.group(1)) if m else None
    mid = re.search(r"id (\w+)\.", out)
    downed = False
    try:
        assert p.returncode == 0, out[-6000:]
        m = re.search(r"dashboard \(read-only web UI, stopped by demo down\): open "
                      r"(http://127\.0\.0\.1:(\d+)/)", out)
        assert m, out[-3000:]
        url = m.group(1)
        status, page = http_get(url)
        assert status == 200 and "<html" in page.lower(), (status, page[:500])
        status, body = http_get(url + "api/overview")
        assert status == 200, (status, body[:500])
        ov = json.loads(body)
        text = json.dumps(ov)
        for svc in ("frontend", "orders", "reports"):
            assert f'"{svc}"' in text, text[:2000]
        token = (work / "control" / "admin.token").read_text().strip()
        assert token not in page and token not in body
        # A process of the demo like the others: on record in its state file.
        state = STATE_DIR / f"{mid.group(1)}.state"
        names = [ln.split()[3] for ln in state.read_text().splitlines() if ln.startswith("pid ")]
        assert "dashboard" in names and "dashboard-forward" in names, names
        pids = [int(ln.split()[1]) for ln in state.read_text().splitlines()
                if ln.startswith("pid ") and ln.split()[3].startswith("dashboard")]
        down = subprocess.run([str(DEMO), "down", mid.group(1)], capture_output=True, text=True,
                              env=demo_env(), timeout=60)
        downed = True
        assert down.returncode == 0, down.stdout + down.stderr
        status, err = http_get(url, timeout=2)
        assert status is None, (status, err)
        assert not state.exists()
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z", pid
        assert set(netns_list()) == t0_ns
        assert root_iptables() == root_before["iptables"]
        err_log = (work / "logs" / "dashboard.err").read_text(errors="replace")
        assert not any(mk in err_log for mk in SANITIZER_MARKERS), err_log[-4000:]
    finally:
        if not downed and mid:
            subprocess.run([str(DEMO), "down", mid.group(1)], env=demo_env(), timeout=60)
        if work and work.name.startswith("meshlet-demo."):
            shutil.rmtree(work, ignore_errors=True)
