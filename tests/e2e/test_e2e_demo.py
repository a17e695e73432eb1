"""deploy/local/demo itself, as a new user runs it (as root): every step
OK, exit 0, and nothing left behind."""

import re
import shutil
import subprocess
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
                      "certificate rotation:", "metrics:", "cleaning up"):
            assert title in out, f"step {title!r} missing:\n{out}"
        assert "FAIL" not in out, out
        assert "all steps OK" in out
        assert out.count("    OK   ") == 12, out
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
