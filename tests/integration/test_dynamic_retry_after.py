"""A proxy that control refuses with Retry-After (here a long poll over
control's --max-polls) waits that long before asking again, instead of its
own short backoff: retrying sooner would only be refused and add to the
load of a control plane that is already at a limit."""

import json
import time

from control_helpers import control_factory  # noqa: F401
from dynamic_helpers import dyn  # noqa: F401
from helpers import wait_for

RETRY_AFTER = 5                 # control's SERVER_RETRY_AFTER


def refused_polls(ctrl, caller):
    """Times (monotonic-free: the access log's own clock) of caller's long
    polls that control answered 429."""
    out = []
    for line in ctrl.stdout_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if (rec.get("type") == "api" and rec.get("status") == 429
                and rec.get("caller") == caller and rec.get("path", "").endswith("/config")):
            out.append(rec["time"])
    return out


def seconds(ts):
    """'2026-12-03T21:58:01.123Z' (or with an offset) → seconds of the day."""
    clock = ts.split("T", 1)[1].rstrip("Z")[:12]
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def test_a_refused_poll_waits_as_long_as_control_asks(dyn):
    dyn.control = dyn.factory.new(extra_args=["--max-polls", "1"])
    dyn.outbound(service="frontend")
    time.sleep(1)               # it now holds the only long poll
    refused, _ = dyn.outbound(service="billing", wait_ready=False)
    caller = "spiffe://mesh.local/svc/billing"
    wait_for(lambda: refused_polls(dyn.control, caller), 20, what="a refused long poll")
    time.sleep(2 * RETRY_AFTER + 2)
    times = [seconds(t) for t in refused_polls(dyn.control, caller)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Without Retry-After the proxy's own backoff (0.1 s doubling) would
    # have asked 6 or more times by now.
    assert 2 <= len(times) <= 3, (times, refused.stderr()[-2000:])
    assert all(g >= RETRY_AFTER - 0.05 for g in gaps), gaps
    assert refused.alive()
