"""Streaming through the pair: integrity, bounded memory, backpressure,
half-close and timeouts."""

import hashlib
import os
import select
import socket
import struct
import threading
import time

from helpers import RssSampler, pattern_chunks, roundtrip, spiffe, tls_connect, client_context, wait_for

MiB = 1 << 20


def test_100mib_both_ways_intact_with_bounded_rss(mesh):
    """100 MiB up and the same 100 MiB back (echo), then a half-close: every
    byte arrives in order, and neither proxy's RSS grows by 64 MiB or more."""
    app = mesh.app("echo")
    outb, inb, port = mesh.pair(app)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert roundtrip(s, b"warm-up\n") == b"warm-up\n"
    base = {p.name: p.rss_kb() for p in (outb, inb)}

    total = 100 * MiB
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    received, errors = 0, []
    s = socket.create_connection(("127.0.0.1", port), timeout=30)

    def sender():
        try:
            for chunk in pattern_chunks(total):
                sent_hash.update(chunk)
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    t0 = time.monotonic()
    with RssSampler([outb, inb]) as rss:
        t = threading.Thread(target=sender, daemon=True)
        t.start()
        while True:
            data = s.recv(MiB)
            if not data:
                break
            got_hash.update(data)
            received += len(data)
        t.join(30)
    s.close()
    elapsed = time.monotonic() - t0
    assert not errors, errors
    assert received == total, f"received {received} of {total} bytes"
    assert got_hash.hexdigest() == sent_hash.hexdigest(), "data corrupted in transit"
    for p in (outb, inb):
        growth = (rss.max[p.name] - base[p.name]) // 1024
        print(f"{p.name}: RSS {base[p.name] // 1024} MiB -> max {rss.max[p.name] // 1024} MiB "
              f"(+{growth} MiB), {2 * total / MiB / elapsed:.0f} MiB/s through the pair")
        assert growth < 64, f"{p.name}: RSS grew by {growth} MiB during the transfer"

    def logged():
        for e in inb.access_log():
            if e.get("peer") == spiffe("frontend") and max(e.get("bytes_in", 0), e.get("bytes_out", 0)) >= total:
                return e
        return None
    wait_for(logged, 5, what="the inbound access log to account for the 100 MiB")


def test_slow_reader_does_not_grow_memory(mesh):
    """The app stops reading; the sender pushes as fast as the pair takes it.
    Backpressure must stall the sender with bounded proxy memory, and nothing
    is lost once the app reads again."""
    app = mesh.app("sink")
    app.hold.set()
    outb, inb, port = mesh.pair(app)
    base = {p.name: p.rss_kb() for p in (outb, inb)}

    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setblocking(False)
    h = hashlib.sha256()
    sent, pending = 0, b""
    gen = pattern_chunks(1 << 40, chunk=256 * 1024)
    samples = [(time.monotonic(), 0)]
    stalled = False
    t0 = time.monotonic()
    with RssSampler([outb, inb]) as rss:
        while time.monotonic() - t0 < 20:
            if not pending:
                pending = next(gen)
            _, w, _ = select.select([], [s], [], 0.1)
            if w:
                try:
                    n = s.send(pending)
                except BlockingIOError:
                    n = 0
                h.update(pending[:n])
                pending = pending[n:]
                sent += n
            now = time.monotonic()
            samples.append((now, sent))
            # Stalled: under 64 KiB accepted during the last 1.5 s.
            old = [x for t, x in samples if t <= now - 1.5]
            if old and sent - old[-1] < 64 * 1024:
                stalled = True
                break
    print(f"sender pushed {sent / MiB:.1f} MiB before stalling={stalled} "
          f"after {time.monotonic() - t0:.1f}s; max RSS " +
          ", ".join(f"{p.name} +{(rss.max[p.name] - base[p.name]) // 1024} MiB" for p in (outb, inb)))
    assert stalled, f"the sender was never held back: {sent / MiB:.0f} MiB pushed while the app read nothing"
    for p in (outb, inb):
        growth = (rss.max[p.name] - base[p.name]) // 1024
        assert growth < 32, f"{p.name}: RSS grew by {growth} MiB behind a reader that does not read"

    # Let the app read: everything pushed so far arrives, in order.
    app.hold.clear()
    s.setblocking(True)
    s.settimeout(30)
    s.sendall(pending)
    h.update(pending)
    sent += len(pending)
    s.shutdown(socket.SHUT_WR)
    wait_for(lambda: app.received, 30, what="the app to read everything")
    s.close()
    assert app.received[0] == (sent, h.hexdigest()), "bytes lost or reordered after the stall"


def test_half_close_both_ways(mesh):
    """The client's FIN reaches the app, the app's answer still flows back
    after it, and the app's FIN reaches the client."""
    app = mesh.app("count")
    outb, inb, port = mesh.pair(app)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"x" * 300000)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
    assert data == b"300000\n", f"got {data!r}"


def test_idle_timeout(mesh):
    timeouts = {"handshake_seconds": 10, "connect_seconds": 5, "idle_seconds": 1, "drain_seconds": 3}
    app = mesh.app("echo")
    outb, inb, port = mesh.pair(app, in_extra={"timeouts": timeouts}, out_extra={"timeouts": timeouts})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        # Traffic more often than the idle timeout keeps the connection.
        for i in range(6):
            assert roundtrip(s, b"tick %d\n" % i) == b"tick %d\n" % i
            time.sleep(0.4)
        t0 = time.monotonic()
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - t0
    assert data == b"", f"unexpected data {data!r}"
    assert 0.5 < waited < 5, f"idle connection closed after {waited:.1f}s (idle_seconds 1)"


def test_handshake_timeout(mesh, pki):
    timeouts = {"handshake_seconds": 1, "connect_seconds": 5, "idle_seconds": 300, "drain_seconds": 3}
    app = mesh.app("echo")
    inb, port = mesh.inbound(app.port, timeouts=timeouts)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        try:
            data = s.recv(100)               # never start the handshake
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - t0
    assert data == b"" and waited < 5, f"silent client held for {waited:.1f}s (handshake_seconds 1)"
    reasons = wait_for(lambda: inb.metrics().by_label("meshlet_tls_handshake_failures_total", "reason"),
                       5, what="a counted handshake failure")
    assert reasons.get("timeout", 0) >= 1, reasons
    # A real client is still served.
    with tls_connect(port, client_context(pki.svid("frontend"))) as t:
        assert roundtrip(t) == b"ping\n"


def cpu_seconds(pid):
    """utime + stime of a process, from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_peer_gone_after_close_notify_while_writing(mesh):
    """The client half-closes (the inbound proxy gets a close_notify), then
    goes away while the app is still sending: the inbound proxy's next
    SSL_write fails with EPIPE. OpenSSL reports that as SSL_ERROR_ZERO_RETURN
    once a close_notify came in, which must end the connection, not read as
    "0 bytes written, try again" (that spun a core at 100 % for as long as
    the proxy ran, found by tests/bench/run after bulk_1m)."""
    app = mesh.app("flood")
    outb, inb, port = mesh.pair(app)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"go")
    s.shutdown(socket.SHUT_WR)
    got = 0
    while got < 4 * MiB:
        got += len(s.recv(262144))
    # Unread data: close() sends a RST, the outbound side closes its TLS socket.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    wait_for(lambda: inb.metrics().get("meshlet_connections_active", direction="inbound") == 0, 5,
             what="the inbound connection to close once its peer is gone")
    before = cpu_seconds(inb.pid)
    time.sleep(2)
    used = cpu_seconds(inb.pid) - before
    assert used < 0.5, f"the inbound proxy used {used:.2f} s of CPU in 2 s with no connection"
