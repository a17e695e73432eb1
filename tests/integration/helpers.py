"""Helpers for meshlet's integration tests: certificates, proxies, apps, TLS.

Everything runs as real processes and sockets on 127.0.0.1. Only the Python
standard library is used (plus pytest in conftest.py), so the tests run with
Debian's python3 and python3-pytest.
"""

import calendar
import hashlib
import json
import os
import random
import re
import secrets
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEV_CA = REPO / "certs" / "dev-ca"
TRUST_DOMAIN = "mesh.local"

SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "WARNING: ThreadSanitizer",
)


def spiffe(service, td=TRUST_DOMAIN):
    return f"spiffe://{td}/svc/{service}"


def wait_for(pred, timeout, interval=0.05, what="condition"):
    """Polls pred() until it returns a truthy value; returns it, or raises
    AssertionError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- ports

_used_ports = set()


def free_port():
    """A TCP port that is free on 127.0.0.1 right now (and not handed out
    before by this process)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port")


def addr(port):
    return f"127.0.0.1:{port}"


def port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def connect_refused(port, timeout=1.0):
    """True when a TCP connect to 127.0.0.1:port is refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- certificates


@dataclass
class Svid:
    """A certificate, its key and the trust bundle that goes with it."""
    cert: Path
    key: Path
    bundle: Path
    uri: str = ""

    def tls(self):
        return {"cert": str(self.cert), "key": str(self.key), "bundle": str(self.bundle)}

    def not_after(self):
        out = run(["openssl", "x509", "-in", str(self.cert), "-noout", "-enddate"])
        txt = out.split("=", 1)[1].strip()
        return calendar.timegm(time.strptime(txt, "%b %d %H:%M:%S %Y GMT"))

    def serial(self):
        out = run(["openssl", "x509", "-in", str(self.cert), "-noout", "-serial"])
        return out.split("=", 1)[1].strip().lower()


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p.stdout


class Pki:
    """Certificates for the tests, made with certs/dev-ca (valid SVIDs) and
    the openssl CLI directly (deliberately malformed ones).

    ca:      the mesh's CA, trust domain mesh.local (ca/bundle.pem)
    other:   a second, unrelated CA, also for mesh.local
    """

    def __init__(self, root: Path):
        self.root = root
        self.ca_dir = root / "ca"
        self.other_dir = root / "other-ca"
        run([str(DEV_CA), "init", "--trust-domain", TRUST_DOMAIN, "--out", str(self.ca_dir), "--days", "30"])
        run([str(DEV_CA), "init", "--trust-domain", TRUST_DOMAIN, "--out", str(self.other_dir), "--days", "30"])
        self.bundle = self.ca_dir / "bundle.pem"
        self._cache = {}

    def svid(self, service, variant="valid"):
        """Returns a (cached) Svid for service. Variants:
        valid          CA-signed X.509-SVID as docs/design.md describes it
        other-ca       the same identity, signed by the unrelated CA
        expired        validity in 2020
        other-td       CA-signed, but spiffe://other.local/svc/<service>
        two-uris       two URI SANs (<service> and <service>-admin)
        no-uri         no URI SAN at all (a DNS SAN only)
        leaf-ca        CA:TRUE, keyCertSign
        eku-server     extKeyUsage serverAuth only
        eku-client     extKeyUsage clientAuth only
        bad-name       spiffe://mesh.local/svc/<Service_X> (not a service name)
        not-svc        spiffe://mesh.local/ns/<service> (not a /svc/ path)
        """
        k = (service, variant)
        if k not in self._cache:
            self._cache[k] = self._make(service, variant)
        return self._cache[k]

    def reissue(self, service, out_dir):
        """Issues a fresh valid SVID for service into out_dir (files replaced)."""
        run([str(DEV_CA), "issue", "--service", service, "--ca", str(self.ca_dir),
             "--out", str(out_dir), "--hours", "2"])
        return Svid(out_dir / f"{service}.pem", out_dir / f"{service}.key",
                    out_dir / "bundle.pem", spiffe(service))

    def _make(self, service, variant):
        out = self.root / variant
        out.mkdir(exist_ok=True)
        issue = [str(DEV_CA), "issue", "--service", service, "--out", str(out)]
        if variant == "valid":
            run(issue + ["--ca", str(self.ca_dir), "--hours", "2"])
            return Svid(out / f"{service}.pem", out / f"{service}.key", self.bundle, spiffe(service))
        if variant == "other-ca":
            run(issue + ["--ca", str(self.other_dir), "--hours", "2"])
            return Svid(out / f"{service}.pem", out / f"{service}.key", self.bundle, spiffe(service))
        if variant == "expired":
            run(issue + ["--ca", str(self.ca_dir), "--not-before", "20200101000000Z",
                         "--not-after", "20200102000000Z"])
            return Svid(out / f"{service}.pem", out / f"{service}.key", self.bundle, spiffe(service))
        if variant == "other-td":
            run(issue + ["--ca", str(self.ca_dir), "--hours", "2", "--trust-domain", "other.local"])
            return Svid(out / f"{service}.pem", out / f"{service}.key", self.bundle,
                        spiffe(service, "other.local"))

        base = {
            "basicConstraints": "critical, CA:FALSE",
            "keyUsage": "critical, digitalSignature",
            "extendedKeyUsage": "serverAuth, clientAuth",
            "subjectAltName": f"URI:{spiffe(service)}",
        }
        if variant == "two-uris":
            base["subjectAltName"] = f"URI:{spiffe(service)}, URI:{spiffe(service + '-admin')}"
        elif variant == "no-uri":
            base["subjectAltName"] = f"DNS:{service}.mesh.local"
        elif variant == "leaf-ca":
            base["basicConstraints"] = "critical, CA:TRUE"
            base["keyUsage"] = "critical, digitalSignature, keyCertSign"
        elif variant == "eku-server":
            base["extendedKeyUsage"] = "serverAuth"
        elif variant == "eku-client":
            base["extendedKeyUsage"] = "clientAuth"
        elif variant == "bad-name":
            base["subjectAltName"] = f"URI:spiffe://{TRUST_DOMAIN}/svc/{service.capitalize()}_X"
        elif variant == "not-svc":
            base["subjectAltName"] = f"URI:spiffe://{TRUST_DOMAIN}/ns/{service}"
        else:
            raise ValueError(f"unknown certificate variant {variant}")
        return self._custom(out, service, base)

    def _custom(self, out, service, exts):
        key, csr, pem, ext = (out / f"{service}.{s}" for s in ("key", "csr", "pem", "ext"))
        ext.write_text("[ext]\n" + "".join(f"{k} = {v}\n" for k, v in exts.items()))
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(key)])
        os.chmod(key, 0o600)
        run(["openssl", "req", "-new", "-key", str(key), "-subj", f"/O=meshlet test/CN={service}",
             "-out", str(csr)])
        run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.ca_dir / "ca.pem"),
             "-CAkey", str(self.ca_dir / "ca.key"), "-set_serial", "0x" + secrets.token_hex(16),
             "-days", "1", "-sha256", "-extfile", str(ext), "-extensions", "ext", "-out", str(pem)])
        return Svid(pem, key, self.bundle, "")


# ---------------------------------------------------------------- TLS


def client_context(svid=None, bundle=None, max_version=None):
    """A TLS 1.3 client context for talking straight to an inbound listener:
    presents svid (when given), verifies the server against bundle, no
    host name check (SVIDs carry URI SANs only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(bundle or svid.bundle))
    if max_version is not None:
        ctx.maximum_version = max_version
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if svid is not None:
        ctx.load_cert_chain(str(svid.cert), str(svid.key))
    return ctx


def server_context(svid, require_client=True):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(svid.cert), str(svid.key))
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(svid.bundle))
    return ctx


def uri_sans(der_or_dict):
    """URI SANs of a peer certificate as returned by getpeercert()."""
    return [v for k, v in der_or_dict.get("subjectAltName", ()) if k == "URI"]


def tls_connect(port, ctx, timeout=5.0):
    """Connects and completes the TLS handshake. Returns the SSLSocket;
    raises ssl.SSLError / OSError when refused."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise


def roundtrip(sock, payload=b"ping\n", timeout=5.0):
    """Sends payload on an echo connection and returns what came back
    (b"" on EOF). Raises on errors."""
    sock.settimeout(timeout)
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def try_call(port, ctx=None, payload=b"ping\n", timeout=5.0):
    """One call to an echo service: over TLS with ctx, or plaintext when
    ctx is None. Returns (True, reply) when the payload came back, else
    (False, why)."""
    try:
        if ctx is None:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        else:
            s = tls_connect(port, ctx, timeout)
    except (ssl.SSLError, OSError) as e:
        return False, f"connect/handshake: {e!r}"
    with s:
        try:
            got = roundtrip(s, payload, timeout)
        except (ssl.SSLError, OSError) as e:
            return False, f"exchange: {e!r}"
    if got == payload:
        return True, got
    return False, f"reply {got!r}"


# ---------------------------------------------------------------- apps


class App:
    """A threaded TCP server on 127.0.0.1 (optionally TLS) with a handler
    per connection. Records connections and errors.

    modes:
      echo     echoes everything; on EOF shuts its write side down
      name     sends "<name>\\n" first, then echoes
      sink     reads and hashes everything (see .received); `hold` (an
               Event) blocks reading while set
      count    reads until EOF, then replies with the byte count and closes
      silent   accepts, never reads or writes until the peer closes
      flood    sends without end, never reading, until a send fails
    """

    def __init__(self, mode="echo", name="app", tls_ctx=None):
        self.mode, self.name, self.tls_ctx = mode, name, tls_ctx
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.connections = 0
        self.handshakes = 0            # completed TLS handshakes
        self.app_bytes = 0             # application bytes received, all connections
        self.peer_uris = []            # URI SANs of TLS clients
        self.errors = []
        self.received = []             # sink: (bytes, sha256 hex) per finished connection
        self.hold = threading.Event()
        self.open_conns = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def addr(self):
        return addr(self.port)

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.open_conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        try:
            conn.settimeout(60)
            if self.tls_ctx is not None:
                conn = self.tls_ctx.wrap_socket(conn, server_side=True)
                with self.lock:
                    self.handshakes += 1
                    self.peer_uris.append(uri_sans(conn.getpeercert() or {}))
                    self.open_conns.append(conn)
            handler = {"echo": self._echo, "name": self._name, "sink": self._sink,
                       "count": self._count_reply, "silent": self._silent,
                       "flood": self._flood}[self.mode]
            handler(conn)
        except (OSError, ssl.SSLError) as e:
            with self.lock:
                self.errors.append(repr(e))
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _add_bytes(self, n):
        with self.lock:
            self.app_bytes += n

    def _echo(self, conn):
        while True:
            data = conn.recv(262144)
            if not data:
                break
            self._add_bytes(len(data))
            conn.sendall(data)
        self._shutdown_write(conn)

    def _flood(self, conn):
        chunk = b"f" * 65536
        while not self._stop.is_set():
            conn.sendall(chunk)

    def _name(self, conn):
        conn.sendall(self.name.encode() + b"\n")
        self._echo(conn)

    def _sink(self, conn):
        h, n = hashlib.sha256(), 0
        while True:
            while self.hold.is_set() and not self._stop.is_set():
                time.sleep(0.02)
            data = conn.recv(262144)
            if not data:
                break
            self._add_bytes(len(data))
            h.update(data)
            n += len(data)
        with self.lock:
            self.received.append((n, h.hexdigest()))
        self._shutdown_write(conn)

    def _count_reply(self, conn):
        n = 0
        while True:
            data = conn.recv(65536)
            if not data:
                break
            self._add_bytes(len(data))
            n += len(data)
        conn.sendall(f"{n}\n".encode())
        self._shutdown_write(conn)

    def _silent(self, conn):
        conn.settimeout(None)
        while not self._stop.is_set():
            r, _, _ = select.select([conn], [], [], 0.2)
            if r:
                if not conn.recv(65536):
                    return

    @staticmethod
    def _shutdown_write(conn):
        if isinstance(conn, ssl.SSLSocket):
            return                     # TLS: the close that follows ends it
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self):
        self._stop.set()
        self.hold.clear()
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            for c in self.open_conns:
                try:
                    c.close()
                except OSError:
                    pass
        self._thread.join(2)


# ---------------------------------------------------------------- data


def pattern_chunks(total, chunk=1 << 20, seed=1):
    """Deterministic pseudo-random data: yields chunks adding up to total."""
    block = random.Random(seed).randbytes(chunk)
    sent, i = 0, 0
    while sent < total:
        off = (i * 4099) % chunk
        c = block[off:] + block[:off]
        c = c[: total - sent]
        yield c
        sent += len(c)
        i += 1


# ---------------------------------------------------------------- proxies


def parse_metrics(text):
    """Prometheus text -> {(name, frozenset(labels.items())): value}."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)', line)
        if not m:
            continue
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            val = float(m.group(4))
        except ValueError:
            continue
        out[(m.group(1), frozenset(labels.items()))] = val
    return out


class Metrics:
    def __init__(self, text):
        self.text = text
        self.samples = parse_metrics(text)

    def get(self, name, **labels):
        """Sum of the samples of name whose labels include `labels`."""
        total = 0.0
        for (n, ls), v in self.samples.items():
            if n == name and all((k, str(val)) in ls for k, val in labels.items()):
                total += v
        return total

    def by_label(self, name, label):
        out = {}
        for (n, ls), v in self.samples.items():
            if n == name:
                d = dict(ls)
                if label in d:
                    out[d[label]] = out.get(d[label], 0.0) + v
        return out

    def names(self):
        return {n for n, _ in self.samples}


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Proxy:
    """One meshlet-proxy process: config file, stdout (access log) and
    stderr (diagnostics) under workdir."""

    def __init__(self, binary, name, cfg, workdir, env=None):
        self.binary, self.name, self.cfg, self.workdir = binary, name, cfg, workdir
        self.env = env
        self.config_path = workdir / f"{name}.json"
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.proc = None
        self.write_config(cfg)

    def write_config(self, cfg):
        self.cfg = cfg
        self.config_path.write_text(json.dumps(cfg, indent=2))

    @property
    def admin_port(self):
        return int(self.cfg["admin"]["listen"].rsplit(":", 1)[1])

    @property
    def pid(self):
        return self.proc.pid

    def start(self, wait_ready=True, timeout=20):
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen([str(self.binary), "-c", str(self.config_path)],
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=self.env)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name}: meshlet-proxy exited with {self.proc.returncode} "
                                     f"before /ready:\n{self.stderr()[-4000:]}")
            try:
                st, _ = self.admin("/ready", timeout=1)
                if st == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: /ready not 200 after {timeout}s:\n"
                                     f"{self.stderr()[-4000:]}")
            time.sleep(0.05)

    def admin(self, path, method="GET", timeout=5):
        """(status, body text) of an admin request."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def metrics(self):
        st, body = self.admin("/metrics")
        assert st == 200, f"{self.name}: /metrics answered {st}"
        return Metrics(body)

    def stdout(self):
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def access_log(self):
        """Access-log entries so far (JSON objects on stdout)."""
        out = []
        for line in self.stdout().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_access(self, timeout=5, **match):
        """Waits for an access-log entry whose fields equal `match`; returns it."""
        def find():
            for e in self.access_log():
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            return None
        try:
            return wait_for(find, timeout, what=f"access log entry {match}")
        except AssertionError:
            raise AssertionError(f"{self.name}: no access-log entry matching {match} within "
                                 f"{timeout}s; log:\n{self.stdout()[-3000:]}") from None

    def rss_kb(self):
        return rss_kb(self.proc.pid)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace=10):
        """SIGTERM, then SIGKILL after grace seconds. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(grace) is None:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def sanitizer_report(self):
        err = self.stderr()
        for marker in SANITIZER_MARKERS:
            i = err.find(marker)
            if i >= 0:
                return err[max(0, i - 200): i + 6000]
        return None


class RssSampler:
    """Samples the VmRSS of some processes every interval seconds in a thread
    and keeps the maximum of each."""

    def __init__(self, procs, interval=0.05):
        self.procs = procs
        self.max = {p.name: p.rss_kb() for p in procs}
        self.interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join(2)

    def _run(self):
        while not self._stop.is_set():
            for p in self.procs:
                self.max[p.name] = max(self.max[p.name], p.rss_kb())
            time.sleep(self.interval)
