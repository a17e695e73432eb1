"""TLS records split across TCP segments, as on a real network (veth, MTU 1500):
the proxies must keep reading when OpenSSL holds part of a record and the
socket is momentarily empty. Loopback delivers whole records, so a Python
relay between the proxies chops the stream into small, delayed pieces."""

import hashlib
import socket
import threading
import time

from helpers import addr, free_port, pattern_chunks

MiB = 1 << 20


class Chopper:
    """TCP relay 127.0.0.1:port -> target that forwards each direction in
    pieces of `piece` bytes with a pause after each burst."""

    def __init__(self, target_port, piece=700, burst=3, pause=0.0005):
        self.target, self.piece, self.burst, self.pause = target_port, piece, burst, pause
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.threads = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((c, u), (u, c)):
                t = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                t.start()
                self.threads.append(t)

    def _pipe(self, src, dst):
        try:
            n = 0
            while True:
                data = src.recv(self.piece)
                if not data:
                    break
                dst.sendall(data)
                n += 1
                if n % self.burst == 0:
                    time.sleep(self.pause)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.sock.close()


def test_chopped_records_stream_intact(mesh):
    """1 MiB each way through outbound -> chopper -> inbound -> echo app,
    on several connections at once: every byte arrives, nothing stalls."""
    app = mesh.app("echo")
    inb, in_port = mesh.inbound(app.port)
    chop = Chopper(in_port)
    outb, out_port = mesh.outbound([chop.port])
    total = 1 * MiB
    results, errors = [], []

    def one(seed):
        try:
            s = socket.create_connection(("127.0.0.1", out_port), timeout=20)
            sent, got = hashlib.sha256(), hashlib.sha256()

            def send():
                for chunk in pattern_chunks(total, chunk=64 * 1024, seed=seed):
                    sent.update(chunk)
                    s.sendall(chunk)
                s.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=send, daemon=True)
            t.start()
            n = 0
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got.update(data)
                n += len(data)
            t.join(20)
            s.close()
            results.append((n, sent.hexdigest() == got.hexdigest()))
        except OSError as e:
            errors.append(repr(e))

    workers = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    chop.close()
    assert not errors, errors
    assert len(results) == 4, "a connection did not finish (stalled)"
    for n, same in results:
        assert n == total, f"received {n} of {total} bytes"
        assert same, "data corrupted"
    print(f"4 x {total // 1024} KiB echoed through chopped TLS in {time.monotonic() - t0:.1f} s")
