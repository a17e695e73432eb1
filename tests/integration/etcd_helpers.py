"""Real etcd members for the control-on-etcd tests.

Each member is /usr/bin/etcd (the etcd-server package) on 127.0.0.1 with
ports picked free and a data dir under the test's tmp_path; a cluster is
1 or 3 members. Everything started is stopped at teardown (fixture
`etcd_factory`), also on failure.
"""

import base64
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port

ETCD = "/usr/bin/etcd"


class Member:
    def __init__(self, name, workdir, cluster_token, tls=None):
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data_dir = Path(workdir) / f"etcd-{name}"
        self.log_path = Path(workdir) / f"etcd-{name}.log"
        self.cluster_token = cluster_token
        self.proc = None
        self.initial_cluster = None
        self.tls = tls              # make_tls() paths: clients need https and a certificate

    @property
    def url(self):
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self):
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self):
        argv = [ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster,
                "--initial-cluster-token", self.cluster_token,
                "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500"]
        if self.tls:
            argv += ["--cert-file", str(self.tls["server"]), "--key-file",
                     str(self.tls["server-key"]), "--trusted-ca-file", str(self.tls["ca"]),
                     "--client-cert-auth"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self):
        self.stop(signal.SIGKILL)

    def context(self):
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls["ca"]))
        ctx.load_cert_chain(str(self.tls["client"]), str(self.tls["client-key"]))
        return ctx

    def call(self, path, body, timeout=5):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout, context=self.context()) as r:
            return json.loads(r.read())

    def healthy(self):
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2,
                                        context=self.context()) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False


def b64(s):
    return base64.b64encode(s.encode()).decode()


class Cluster:
    def __init__(self, workdir, size, tls=None):
        token = f"meshlet-test-{os.getpid()}-{time.monotonic_ns()}"
        self.members = [Member(f"m{i}", workdir, token, tls) for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def endpoints(self):
        return ",".join(m.url for m in self.members)

    def start(self, timeout=30):
        for m in self.members:
            m.start()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [m for m in self.members if m.alive()]
            if live and all(m.healthy() for m in live):
                return
            time.sleep(0.1)
        logs = "\n".join(m.log_path.read_text(errors="replace")[-2000:] for m in self.members)
        raise AssertionError(f"etcd not healthy after {timeout}s:\n{logs}")

    def any_live(self):
        return next(m for m in self.members if m.alive())

    def get_prefix(self, prefix="/meshlet/"):
        """{key: (value, mod_revision)} of every key under prefix."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        r = self.any_live().call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
        out = {}
        for kv in r.get("kvs", []):
            k = base64.b64decode(kv["key"]).decode()
            v = base64.b64decode(kv.get("value", "")).decode()
            out[k] = (v, int(kv["mod_revision"]))
        return out

    def revision(self):
        r = self.any_live().call("/v3/kv/range", {"key": b64("/"), "count_only": True})
        return int(r["header"]["revision"])

    def leader(self):
        for m in self.members:
            if not m.alive():
                continue
            try:
                st = m.call("/v3/maintenance/status", {})
            except OSError:
                continue
            if st.get("leader") == st.get("header", {}).get("member_id"):
                return m
        return None

    def stop(self):
        for m in self.members:
            m.stop()


@pytest.fixture
def etcd_factory(tmp_path):
    made = []

    def make(size=1, tls=None):
        c = Cluster(tmp_path, size, tls)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()


def make_tls(directory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate
    (openssl, EC P-256), for etcd over https. Returns a dict of paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    p = {k: d / f"{k}.pem" for k in ("ca", "ca-key", "server", "server-key", "client",
                                       "client-key")}

    def run(*argv):
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", str(p["ca-key"]), "-out", str(p["ca"]), "-days", "2",
        "-subj", "/CN=etcd test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        csr = d / f"{name}.csr"
        extf = d / f"{name}.ext"
        extf.write_text(ext + "\n")
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(p[f"{name}-key"]), "-out", str(csr), "-subj", f"/CN=etcd {name}")
        run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey",
            str(p["ca-key"]), "-CAcreateserial", "-out", str(p[name]), "-days", "2",
            "-extfile", str(extf))
    for k in ("ca-key", "server-key", "client-key"):
        p[k].chmod(0o600)
    return p
