"""Helpers and fixtures for the meshlet-control / meshletctl integration tests.

The binaries are $MESHLET_BUILD/control/meshlet-control and
$MESHLET_BUILD/control/meshletctl (MESHLET_BUILD defaults to build-test/ in
the repository, the build tests/run makes); $MESHLET_CONTROL_BIN and
$MESHLETCTL override them one by one.

Every daemon runs on 127.0.0.1 on a free port with its own state directory
under the test's tmp_path, and is stopped (SIGTERM, then SIGKILL) at
teardown, also on failure; a sanitizer report in its stderr fails the test.
Only the Python standard library is used.

Test modules import the fixtures they need:

    from control_helpers import control, control_factory  # noqa: F401
"""

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import REPO, SANITIZER_MARKERS, TRUST_DOMAIN, free_port, rss_kb, run, spiffe  # noqa: E402

DEFAULT_TIMEOUT = 10


def _build_dir():
    build = Path(os.environ.get("MESHLET_BUILD", REPO / "build-test"))
    if not build.is_absolute():
        build = REPO / build
    return build


def control_binary():
    if os.environ.get("MESHLET_CONTROL_BIN"):
        return Path(os.environ["MESHLET_CONTROL_BIN"])
    return _build_dir() / "control" / "meshlet-control"


def ctl_binary():
    if os.environ.get("MESHLETCTL"):
        return Path(os.environ["MESHLETCTL"])
    return _build_dir() / "control" / "meshletctl"


def sanitizer_env():
    """The environment for the binaries under test: leak checks on, ASan's
    quarantine small enough for RSS numbers to mean something."""
    env = dict(os.environ)
    for k in ("MESHLET_CONTROL", "MESHLET_CA", "MESHLET_TOKEN", "MESHLET_TOKEN_FILE",
              "MESHLET_STATE_DIR", "MESHLET_TIMEOUT"):
        env.pop(k, None)
    asan = [o for o in env.get("ASAN_OPTIONS", "").split(":") if o]
    keys = {o.split("=", 1)[0] for o in asan}
    for k, v in (("detect_leaks", "1"), ("quarantine_size_mb", "16"),
                 ("allocator_release_to_os_interval_ms", "500")):
        if k not in keys:
            asan.append(f"{k}={v}")
    env["ASAN_OPTIONS"] = ":".join(asan)
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


def sanitizer_report(text):
    for marker in SANITIZER_MARKERS:
        i = text.find(marker)
        if i >= 0:
            return text[max(0, i - 200): i + 6000]
    return None


# ---------------------------------------------------------------- HTTP


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers          # {lower-case name: value}
        self.body = body                # bytes
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def error(self):
        """(code, message, path) of an API error answer, or None."""
        e = (self.json or {}).get("error") if isinstance(self.json, dict) else None
        if not isinstance(e, dict):
            return None
        return e.get("code"), e.get("message"), e.get("path")

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


def tls_context(ca_file, cert=None, key=None, check_hostname=True):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(ca_file))
    ctx.check_hostname = check_hostname
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def request(port, ctx, method, path, body=None, token=None, headers=None, raw=None,
            timeout=DEFAULT_TIMEOUT, conn=None):
    """One HTTPS request to 127.0.0.1:port. body is JSON-encoded; raw (bytes)
    is sent as is. Returns a Response. Reuses conn (an HTTPSConnection) when
    given, for keep-alive."""
    h = {"Accept": "application/json"}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
    elif raw is not None:
        data = raw
    if data is not None:
        h["Content-Type"] = "application/json"
    elif method in ("POST", "PUT"):
        data = b""
    h.update(headers or {})
    own = conn is None
    c = conn or http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    try:
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        payload = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, payload)
    finally:
        if own:
            c.close()


# ---------------------------------------------------------------- the daemon


class Control:
    """One meshlet-control process with its state directory."""

    def __init__(self, binary, state_dir, workdir, env, name="control", trust_domain=TRUST_DOMAIN,
                 extra_args=()):
        self.binary, self.state_dir, self.workdir = binary, Path(state_dir), Path(workdir)
        self.env, self.name, self.td = env, name, trust_domain
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.proc = None
        self.stdout_path = self.workdir / f"{name}.stdout"
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.starts = 0

    # -- files
    @property
    def url(self):
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self):
        return self.state_dir / "ca.pem"

    @property
    def token_file(self):
        return self.state_dir / "admin.token"

    @property
    def token(self):
        return self.token_file.read_text().strip()

    def db_files(self):
        """The SQLite database file(s) in the state dir (main files only)."""
        out = []
        for p in sorted(self.state_dir.iterdir()):
            if p.is_file() and not p.name.endswith(("-wal", "-shm", "-journal")):
                with open(p, "rb") as f:
                    if f.read(16) == b"SQLite format 3\x00":
                        out.append(p)
        return out

    def db_file(self):
        dbs = self.db_files()
        assert len(dbs) == 1, f"expected one SQLite database in {self.state_dir}, found {dbs}"
        return dbs[0]

    # -- process
    def argv(self):
        return [str(self.binary), "--listen", f"127.0.0.1:{self.port}",
                "--state-dir", str(self.state_dir), "--trust-domain", self.td,
                "--san", "127.0.0.1", "--san", "localhost"] + self.extra_args

    def start(self, wait=True, timeout=30):
        self.starts += 1
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            err.write(f"\n===== start {self.starts}: {' '.join(self.argv())}\n".encode())
            err.flush()
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=self.env)
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout=30):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name}: meshlet-control exited with "
                                     f"{self.proc.returncode} before it was healthy:\n"
                                     f"{self.stderr()[-4000:]}")
            if self.ca_file.exists():
                try:
                    r = self.api("GET", "/v1/health", token=None, timeout=2)
                    if r.status == 200:
                        return
                    last = r
                except (OSError, ssl.SSLError, http.client.HTTPException) as e:
                    last = e
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: not healthy after {timeout}s ({last!r}):\n"
                                     f"{self.stderr()[-4000:]}")
            time.sleep(0.05)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid

    def rss_kb(self):
        return rss_kb(self.proc.pid)

    def kill(self):
        """SIGKILL, and wait for it to be gone."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, grace=10):
        """SIGTERM, then SIGKILL after grace seconds. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def restart(self, **kw):
        self.stop()
        return self.start(**kw)

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stdout(self):
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def sanitizer_report(self):
        return sanitizer_report(self.stderr())

    # -- API
    def context(self, svid=None, check_hostname=True):
        if svid is None:
            return tls_context(self.ca_file, check_hostname=check_hostname)
        return tls_context(self.ca_file, svid.cert, svid.key, check_hostname)

    def api(self, method, path, body=None, token="admin", svid=None, headers=None, raw=None,
            timeout=DEFAULT_TIMEOUT):
        """A request with the admin token (token="admin", the default), another
        token (a string) or none (None), optionally over mTLS with svid."""
        if token == "admin":
            token = self.token
        return request(self.port, self.context(svid), method, path, body=body, token=token,
                       headers=headers, raw=raw, timeout=timeout)

    def put_policy(self, doc, service=None, if_match=None, **kw):
        h = {"If-Match": str(if_match)} if if_match is not None else None
        return self.api("PUT", f"/v1/policies/{service or doc['service']}", body=doc, headers=h, **kw)

    def join_token(self, service, ttl=600, uses=1):
        r = self.api("POST", "/v1/tokens", {"service": service, "ttl_seconds": ttl, "uses": uses})
        assert r.status in (200, 201), r
        return r.json["token"]

    # -- meshletctl
    def ctl(self, *args, env=None, flags=True, timeout=60, input=None):
        """Runs meshletctl against this daemon (flags: --control, --ca and
        --token-file given on the command line). Returns CompletedProcess
        (text)."""
        argv = [str(ctl_binary())]
        if flags:
            argv += ["--control", self.url, "--ca", str(self.ca_file),
                     "--token-file", str(self.token_file)]
        argv += [str(a) for a in args]
        e = dict(self.env)
        e.update(env or {})
        p = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=timeout,
                           input=input)
        rep = sanitizer_report(p.stderr)
        assert rep is None, f"meshletctl {args}: sanitizer report:\n{rep}"
        return p

    def ctl_json(self, *args, **kw):
        p = self.ctl(*args, "-o", "json", **kw)
        assert p.returncode == 0, f"meshletctl {args} failed ({p.returncode}): {p.stderr}"
        return json.loads(p.stdout)


# ---------------------------------------------------------------- identities


class Identity:
    """A key, its CSR and (once enrolled) the SVID: files under a directory."""

    def __init__(self, directory, service, key_type="ec"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.service = service
        self.key = self.dir / f"{service}.key"
        self.csr = self.dir / f"{service}.csr"
        self.cert = self.dir / f"{service}.pem"
        self.serial = None
        self.expires_at = None
        new_key = {"ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
                   "rsa1024": ["-newkey", "rsa:1024"],
                   "rsa2048": ["-newkey", "rsa:2048"],
                   "ed25519": ["-newkey", "ed25519"],
                   "p384": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"]}[key_type]
        run(["openssl", "req", "-new", *new_key, "-nodes", "-keyout", str(self.key),
             "-subj", f"/O=meshlet test/CN={service}", "-out", str(self.csr)])
        os.chmod(self.key, 0o600)

    def csr_pem(self):
        return self.csr.read_text()

    def enrolled(self, answer):
        """Stores the cert chain of a /v1/svid answer."""
        self.cert.write_text(answer["cert_chain"])
        self.serial = answer.get("serial")
        self.expires_at = answer.get("expires_at")
        return self

    def uri_sans(self):
        out = run(["openssl", "x509", "-in", str(self.cert), "-noout", "-ext", "subjectAltName"])
        return [w.strip().rstrip(",")[4:] for w in out.split() if w.startswith("URI:")]


def csr_with_bad_signature(ident):
    """ident's CSR with one byte of its signature flipped (still parseable)."""
    der = run_bytes(["openssl", "req", "-in", str(ident.csr), "-outform", "DER"])
    der = bytearray(der)
    der[-3] ^= 0x01         # inside the signature's last INTEGER
    b64 = base64.encodebytes(bytes(der)).decode().replace("\n", "")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines) + \
        "\n-----END CERTIFICATE REQUEST-----\n"


def csr_naming(directory, service, uri):
    """A P-256 key and a CSR whose subjectAltName asks for uri."""
    ident = Identity.__new__(Identity)
    ident.dir = Path(directory)
    ident.dir.mkdir(parents=True, exist_ok=True)
    ident.service = service
    ident.key = ident.dir / f"{service}-asks.key"
    ident.csr = ident.dir / f"{service}-asks.csr"
    ident.cert = ident.dir / f"{service}-asks.pem"
    ident.serial = ident.expires_at = None
    run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(ident.key), "-subj", f"/CN={service}", "-addext", f"subjectAltName=URI:{uri}",
         "-out", str(ident.csr)])
    return ident


def run_bytes(cmd):
    p = subprocess.run(cmd, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.decode(errors='replace')}")
    return p.stdout


def enroll(ctrl, ident, token=None, svid=None):
    """POST /v1/svid for ident with a join token or over mTLS with svid.
    Returns the Response; on 2xx ident holds the new certificate."""
    r = ctrl.api("POST", "/v1/svid", {"csr": ident.csr_pem()}, token=token, svid=svid)
    if 200 <= r.status < 300:
        ident.enrolled(r.json)
    return r


def new_svid(ctrl, tmp, service, uses=1):
    """A freshly enrolled identity of service (join token, then CSR)."""
    ident = Identity(Path(tmp) / f"id-{service}-{time.monotonic_ns()}", service)
    r = enroll(ctrl, ident, token=ctrl.join_token(service, uses=uses))
    assert r.status in (200, 201), f"enrolling {service}: {r}"
    return ident


def policy_doc(service, rules=None, default=None):
    d = {"service": service, "rules": rules if rules is not None else []}
    if default is not None:
        d["default"] = default
    return d


def assert_refused(r, *statuses):
    """r is an error answer with one of statuses and the API's error shape."""
    assert r.status in statuses, f"expected {statuses}, got {r}"
    e = r.error()
    assert e is not None, f"error answer without the {{\"error\": ...}} shape: {r}"
    assert isinstance(e[0], str) and e[0], f"error without a code: {r}"
    assert isinstance(e[1], str) and e[1], f"error without a message: {r}"
    return e


def wait_port_closed(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- fixtures


class ControlFactory:
    """Starts daemons for one test and stops them all afterwards."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.env = sanitizer_env()
        self.controls = []

    def new(self, name="control", state_dir=None, start=True, **kw):
        state = Path(state_dir) if state_dir else self.tmp / f"state-{name}"
        if not state.exists():
            state.mkdir(mode=0o700)
        c = Control(control_binary(), state, self.tmp, self.env, name=name, **kw)
        self.controls.append(c)
        if start:
            c.start()
        return c

    def close(self, failed):
        problems = []
        for c in self.controls:
            c.stop()
            rep = c.sanitizer_report()
            if rep:
                problems.append(f"{c.name}: sanitizer report:\n{rep}")
        if failed or problems:
            for c in self.controls:
                print(f"\n----- {c.name} stderr (last 5000 chars)\n{c.stderr()[-5000:]}")
                print(f"----- {c.name} stdout (last 3000 chars)\n{c.stdout()[-3000:]}")
        return problems


def _check_binaries():
    for b in (control_binary(), ctl_binary()):
        if not (b.is_file() and os.access(b, os.X_OK)):
            pytest.fail(f"{b} not found: build it first (tests/run does), or set MESHLET_BUILD")


@pytest.fixture
def control_factory(request, tmp_path):
    _check_binaries()
    f = ControlFactory(tmp_path)
    yield f
    rep = getattr(request.node, "rep_call", None)
    problems = f.close(failed=rep is not None and rep.failed)
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def control(control_factory):
    """A running meshlet-control with a fresh state directory."""
    return control_factory.new()


__all__ = ["Control", "ControlFactory", "Identity", "Response", "assert_refused", "control",
           "control_factory", "csr_naming", "csr_with_bad_signature", "ctl_binary", "control_binary",
           "enroll", "new_svid", "policy_doc", "request", "sanitizer_env", "spiffe", "tls_context",
           "wait_port_closed", "TRUST_DOMAIN"]
