"""The containers for real, with podman (root): the image built from
deploy/docker/Dockerfile, a sidecar and meshlet-control running from it,
and the Compose mesh run as pods by deploy/compose/demo.

podman is configured by deploy/podman/containers.conf (CONTAINERS_CONF):
runc, and ulimits the host grants. No registry is needed: the base image
is made from the Debian mirror by deploy/podman/base-image (cached under
/var/cache/meshlet-test, so a machine runs debootstrap once), and every
build uses --pull=never.

Skipped, with the reason, only where podman cannot run a container at all
(not root, podman missing, podman broken). Everything else is a failure.
Facts for the tests/run summary (image size, time from `up` to the first
200) go to $MESHLET_CONTAINERS_REPORT when it is set.
"""

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "podman" / "containers.conf"
BASE_IMAGE_SCRIPT = REPO / "deploy" / "podman" / "base-image"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
COMPOSE_DIR = REPO / "deploy" / "compose"
DEMO = COMPOSE_DIR / "demo"

IMAGE = os.environ.get("MESHLET_TEST_IMAGE", "localhost/meshlet:0.1.0")
APP_IMAGE = os.environ.get("MESHLET_TEST_APP_IMAGE", "localhost/meshlet-busybox:1.35")
SIZE_LIMIT = 100_000_000          # bytes, as podman counts (decimal MB)
PROXY_UID = 1337
LABEL = f"io.meshlet.test={uuid.uuid4().hex[:8]}"
DEMO_LABEL = "io.meshlet.demo=compose"

os.environ.setdefault("CONTAINERS_CONF", str(CONF))


def report(key, value):
    """One fact for tests/run's summary line (and the test's output)."""
    print(f"{key}: {value}")
    path = os.environ.get("MESHLET_CONTAINERS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(f"{key}: {value}\n")


def podman(*args, check=True, timeout=120, **kw):
    r = subprocess.run(["podman", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(map(str, args))} exited {r.returncode}:\n"
                             f"{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return r


def wait_until(fn, seconds, what, interval=0.5):
    end = time.monotonic() + seconds
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(interval)


def why_podman_cannot_run():
    if os.geteuid() != 0:
        return "not root (podman's networks and iptables in the pods need root)"
    if not shutil.which("podman"):
        return "podman is not installed (tests/run installs podman runc catatonit)"
    try:
        r = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"podman info failed: {e}"
    if r.returncode != 0:
        return f"podman info failed: {r.stderr.strip()[-300:]}"
    return None


# ---------------------------------------------------------------- images


@pytest.fixture(scope="module")
def engine():
    reason = why_podman_cannot_run()
    if reason:
        pytest.skip(f"podman cannot run here: {reason}")


@pytest.fixture(scope="module")
def base_image(engine):
    r = subprocess.run([BASE_IMAGE_SCRIPT], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"deploy/podman/base-image failed:\n{r.stderr[-3000:]}"
    name = r.stdout.strip().splitlines()[-1]
    # A runtime that cannot start any container means podman cannot run here.
    t = podman("run", "--rm", "--network", "none", name, "true", check=False, timeout=120)
    if t.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {t.stderr.strip()[-300:]}")
    return name


def build(base, dockerfile, tag, context, *extra):
    t0 = time.monotonic()
    podman("build", "--pull=never", "--format", "docker", "--build-arg", f"DEBIAN_IMAGE={base}",
           *extra, "-f", dockerfile, "-t", tag, context, timeout=1200)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def image(base_image):
    secs = build(base_image, DOCKERFILE, IMAGE, REPO,
                 "--ignorefile", REPO / "deploy" / "docker" / "Dockerfile.dockerignore")
    report("image build", f"{secs:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def app_image(base_image):
    build(base_image, REPO / "deploy" / "podman" / "busybox.Containerfile", APP_IMAGE,
          REPO / "deploy" / "podman")
    return APP_IMAGE


def inspect(name, fmt):
    return podman("image", "inspect", "--format", fmt, name).stdout.strip()


def test_image_size(image):
    size = int(inspect(image, "{{.Size}}"))
    layers = podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image).stdout
    big = [ln[:110] for ln in layers.splitlines() if not ln.startswith("0 B")]
    report("image size", f"{size / 1e6:.1f} MB")
    print("layers that hold bytes:\n  " + "\n  ".join(big))
    assert size <= SIZE_LIMIT, f"image is {size / 1e6:.1f} MB (limit {SIZE_LIMIT / 1e6:.0f}):\n{layers}"


def test_image_config(image):
    cfg = json.loads(inspect(image, "{{json .Config}}"))
    assert cfg["User"] == f"{PROXY_UID}:{PROXY_UID}"
    assert cfg["Entrypoint"] == ["meshlet-proxy"]
    assert cfg["Cmd"] == ["-c", "/etc/meshlet/proxy.json"]
    assert set(cfg["ExposedPorts"]) == {"15006/tcp", "7443/tcp"}
    assert cfg["StopSignal"] in ("SIGTERM", "15")
    # --format docker keeps HEALTHCHECK (an OCI image would drop it)
    hc = json.loads(inspect(image, "{{json .HealthCheck}}"))
    assert hc and hc["Test"] == ["CMD", "meshlet-probe", "--quiet", "/ready"], hc


def test_image_contents(image):
    """Every binary's libraries resolve, the state directories are the
    proxy's own, nothing runs as root by default, no curl."""
    script = r"""
set -e
id -u
for b in meshlet-proxy meshlet-control meshletctl; do
  ldd /usr/local/bin/$b
  /usr/local/bin/$b --help >/dev/null 2>&1 || /usr/local/bin/$b --version >/dev/null
done
stat -c '%u %a %n' /var/lib/meshlet-proxy /var/lib/meshlet-control
test -x /usr/local/bin/meshlet-iptables && test -x /usr/local/bin/meshlet-probe
command -v iptables ip6tables
if command -v curl wget; then echo "curl or wget in the image"; exit 1; fi
"""
    r = podman("run", "--rm", "--no-healthcheck", "--network", "none", "--entrypoint", "bash", image,
               "-c", script, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(PROXY_UID)
    assert "not found" not in r.stdout, r.stdout
    assert f"{PROXY_UID} 700 /var/lib/meshlet-proxy" in lines
    assert f"{PROXY_UID} 700 /var/lib/meshlet-control" in lines


# ---------------------------------------------------------------- one sidecar, one control


class Mesh:
    """A network, meshlet-control and sidecars in containers, all labelled;
    removed at the end whatever happened."""

    def __init__(self, image):
        self.image = image
        self.id = uuid.uuid4().hex[:8]
        self.net = f"meshlet-test-{self.id}"
        self.control = f"{self.net}-control"
        self.secrets = []
        podman("network", "create", "--label", LABEL, self.net)

    def start_control(self):
        podman("run", "-d", "--name", self.control, "--label", LABEL, "--network", self.net,
               "--network-alias", "control", "--entrypoint", "meshlet-control", self.image,
               "--listen", "0.0.0.0:7443", "--state-dir", "/var/lib/meshlet-control",
               "--trust-domain", "mesh.local", "--san", "control")
        wait_until(lambda: self.ctl("ca", "status", check=False).returncode == 0, 60,
                   "meshlet-control to answer")

    def ctl(self, *args, check=True, input=None):
        return podman("exec", "-i", self.control, "meshletctl", *args, check=check, input=input)

    def token_secret(self, service, uses=1):
        out = self.ctl("token", "create", "--service", service, "--ttl", "15m",
                       "--uses", str(uses)).stdout
        tok = out.splitlines()[1].split()[0]
        assert tok.startswith(f"mlt1.{service}."), out
        name = f"{self.net}-{service}-token"
        podman("secret", "create", name, "-", input=tok + "\n")
        self.secrets.append(name)
        return name

    def start_proxy(self, name, config, secret):
        podman("run", "-d", "--name", name, "--label", LABEL, "--network", self.net,
               "--secret", f"{secret},target=meshlet-token",
               "-v", f"{config}:/etc/meshlet/proxy.json:ro",
               "-v", f"{name}-state:/var/lib/meshlet-proxy", self.image)

    def close(self):
        for c in podman("ps", "-aq", "--filter", f"label={LABEL}").stdout.split():
            podman("rm", "-f", "-t", "2", c, check=False)
        for v in podman("volume", "ls", "-q").stdout.split():
            if v.startswith(self.net):
                podman("volume", "rm", "-f", v, check=False)
        for s in self.secrets:
            podman("secret", "rm", s, check=False)
        podman("network", "rm", "-f", self.net, check=False)


@pytest.fixture
def mesh(image):
    m = Mesh(image)
    try:
        yield m
    finally:
        m.close()


def probe(container, path, *extra):
    return podman("exec", container, "meshlet-probe", *extra, path, check=False)


def healthcheck(container):
    return podman("healthcheck", "run", container, check=False)


def test_sidecar_ready_healthcheck_and_sigterm_drain(mesh, tmp_path):
    """A sidecar in a container joins control with a join token (a podman
    secret), is ready, and the image's HEALTHCHECK says healthy; SIGTERM
    drains and exits 0 well within drain_seconds; restarted, it serves from
    its state volume (the token is spent); draining (POST /drain), the
    health check fails while /healthz stays 200."""
    mesh.start_control()
    mesh.ctl("policy", "apply", "-f", "-", input=(COMPOSE_DIR / "policies" / "orders.json").read_text())
    secret = mesh.token_secret("orders")
    cfg = json.loads((COMPOSE_DIR / "orders-proxy.json").read_text())
    drain = cfg["timeouts"]["drain_seconds"]
    path = tmp_path / "orders-proxy.json"
    path.write_text(json.dumps(cfg))
    path.chmod(0o644)
    name = f"{mesh.net}-orders"
    mesh.start_proxy(name, path, secret)

    def ready():
        return probe(name, "/ready", "--quiet").returncode == 0
    try:
        wait_until(ready, 60, "the sidecar's /ready")
    except AssertionError:
        raise AssertionError(podman("logs", name, check=False).stderr[-3000:])
    r = healthcheck(name)
    assert r.returncode == 0, r.stdout + r.stderr
    health = json.loads(podman("inspect", "--format", "{{json .State.Health}}", name).stdout)
    assert health["Status"] == "healthy", health

    # SIGTERM: drain, exit 0, in less than the drain time (nothing in flight)
    t0 = time.monotonic()
    podman("stop", "-t", str(drain + 10), name)
    took = time.monotonic() - t0
    state = json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)
    logs = podman("logs", name).stderr
    assert state["ExitCode"] == 0, f"exit {state['ExitCode']}:\n{logs[-3000:]}"
    assert took < drain, f"SIGTERM took {took:.1f}s (drain_seconds {drain})"
    report("sidecar SIGTERM to exit", f"{took:.1f} s")

    # restart: the SVID and policy come from the state volume and control, no token needed
    podman("start", name)
    wait_until(ready, 60, "the restarted sidecar's /ready")
    assert healthcheck(name).returncode == 0

    # draining: not ready, so not healthy; still alive
    assert probe(name, "/drain", "--post", "--quiet").returncode == 0
    r = healthcheck(name)
    assert r.returncode != 0 and "unhealthy" in r.stdout, r.stdout + r.stderr
    r = probe(name, "/ready")
    assert r.returncode == 1 and "draining" in r.stdout, r.stdout
    assert probe(name, "/healthz", "--quiet").returncode == 0


def test_sidecar_with_a_bad_token_is_not_healthy(mesh, tmp_path):
    """The hostile case: a token for another service; the sidecar never
    becomes ready and the health check says so."""
    mesh.start_control()
    mesh.ctl("policy", "apply", "-f", "-", input=(COMPOSE_DIR / "policies" / "orders.json").read_text())
    secret = mesh.token_secret("frontend")       # wrong service for orders' config
    path = tmp_path / "orders-proxy.json"
    path.write_text((COMPOSE_DIR / "orders-proxy.json").read_text())
    path.chmod(0o644)
    name = f"{mesh.net}-orders"
    mesh.start_proxy(name, path, secret)
    time.sleep(5)
    r = healthcheck(name)
    assert r.returncode != 0, r.stdout
    logs = podman("logs", name, check=False)
    assert "token" in (logs.stdout + logs.stderr).lower(), logs.stderr[-2000:]


# ---------------------------------------------------------------- the compose mesh as pods


def demo(*args, timeout=300):
    env = dict(os.environ, MESHLET_IMAGE=IMAGE, MESHLET_APP_IMAGE=APP_IMAGE)
    return subprocess.run([DEMO, *args], capture_output=True, text=True, timeout=timeout, env=env)


def demo_leftovers():
    """Everything the demo made that is still there."""
    left = []
    for kind, argv in (("pod", ["pod", "ps", "-q"]), ("container", ["ps", "-aq"]),
                       ("volume", ["volume", "ls", "-q"])):
        for x in podman(*argv, "--filter", f"label={DEMO_LABEL}").stdout.split():
            left.append(f"{kind} {x}")
    for s in ("meshlet-orders-token", "meshlet-frontend-token"):
        if podman("secret", "inspect", s, check=False).returncode == 0:
            left.append(f"secret {s}")
    if podman("network", "exists", "meshlet", check=False).returncode == 0:
        left.append("network meshlet")
    return left


@pytest.fixture
def compose_mesh(image, app_image):
    down = demo("down")
    assert down.returncode == 0, down.stderr
    t0 = time.monotonic()
    try:
        up = demo("up", "--no-build", timeout=300)
        assert up.returncode == 0, f"demo up failed:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}"
        yield t0
    finally:
        down = demo("down")
    assert down.returncode == 0, down.stdout + down.stderr
    left = demo_leftovers()
    assert not left, f"demo down left: {left}"


def exec_app(svc, *argv):
    return podman("exec", f"meshlet-{svc}-app", *argv, check=False, timeout=30)


def raw_get(svc, host, port, path):
    """The whole HTTP answer to GET path, from svc's app container."""
    return exec_app(svc, "sh", "-c", 'printf "GET $3 HTTP/1.0\r\nHost: $1\r\n\r\n" | nc -w 5 "$1" "$2"',
                    "sh", host, str(port), path).stdout


def test_compose_mesh_as_pods(compose_mesh):
    """control, orders and frontend (init + sidecar + app, one network
    namespace per service): frontend's app calls orders:8080 in plain HTTP,
    its iptables send it to its sidecar, the sidecars speak mTLS, orders'
    app answers 200; /admin/* is denied with a 403 naming the rule; a
    plaintext caller outside the mesh does not reach orders' app."""
    t0 = compose_mesh

    def call():
        r = exec_app("frontend", "wget", "-q", "-O", "-", "http://orders:8080/orders/42")
        return r.stdout if r.returncode == 0 else None
    body = wait_until(call, 60, "frontend -> orders through the sidecars")
    report("compose mesh: up to first 200", f"{time.monotonic() - t0:.1f} s")
    assert json.loads(body) == {"order": 42, "status": "shipped"}

    # It went through both sidecars, with orders seeing frontend's SPIFFE ID.
    log = podman("logs", "meshlet-orders-proxy").stdout
    entries = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]
    hit = [e for e in entries if e.get("path") == "/orders/42" and e.get("status") == 200]
    assert hit and hit[-1]["peer"] == "spiffe://mesh.local/svc/frontend", log[-2000:]
    assert hit[-1]["direction"] == "inbound" and hit[-1]["rule"] == "frontend-reads-orders"
    # frontend's sidecar took the intercepted connection and verified orders' ID
    flog = podman("logs", "meshlet-frontend-proxy").stdout
    out = [json.loads(ln) for ln in flog.splitlines() if ln.startswith("{")]
    assert any(e["direction"] == "outbound" and e["peer"] == "spiffe://mesh.local/svc/orders"
               and e["destination"].endswith(":15006") for e in out), flog[-2000:]

    # denied: 403, a JSON body naming the rule, never the app's answer
    ans = raw_get("frontend", "orders", 8080, "/admin/stats")
    head, _, body = ans.partition("\n\n")      # (text mode: CRLF read as LF)
    assert head.startswith("HTTP/1.1 403"), ans
    assert json.loads(body) == {"error": "forbidden", "rule": "no-admin"}
    # a method the rule does not allow: the policy's default
    r = exec_app("frontend", "wget", "-q", "-O", "-", "--post-data", "x", "http://orders:8080/orders/42")
    assert r.returncode != 0 and "403" in r.stderr, r.stdout + r.stderr

    # outside the mesh: plaintext from another container on the network reaches
    # orders' mTLS listener (PREROUTING), never the app
    r = podman("exec", "meshlet-control", "meshlet-probe", "--timeout", "3", "--addr", "orders:8080",
               "/orders/42", check=False)
    assert r.returncode == 1 and "order" not in r.stdout, r.stdout

    # the app cannot go around its sidecar: its outgoing TCP is intercepted, so
    # a connection to control's port (not in the registry) is refused
    r = exec_app("frontend", "wget", "-q", "-T", "5", "-O", "-", "http://control:7443/v1/health")
    assert r.returncode != 0, r.stdout

    # the init step ran as root with NET_ADMIN and exited 0; the others are not root
    st = podman("inspect", "--format", "{{.State.ExitCode}} {{.Config.User}}", "meshlet-orders-init").stdout
    assert st.split() == ["0", "0:0"], st
    assert podman("exec", "meshlet-orders-proxy", "id", "-u").stdout.strip() == str(PROXY_UID)
    assert podman("exec", "meshlet-orders-app", "id", "-u").stdout.strip() == "1000"
    # tokens are podman secrets where the configs' token_file points
    assert podman("exec", "meshlet-orders-proxy", "test", "-s", "/run/secrets/meshlet-token",
                  check=False).returncode == 0


def test_compose_demo_end_to_end(image, app_image):
    """deploy/compose/demo as a user runs it: every step behaves and it
    leaves nothing behind."""
    assert demo("down").returncode == 0
    r = demo("--no-build")
    assert r.returncode == 0, f"{r.stdout[-5000:]}\n{r.stderr[-3000:]}"
    assert "all steps behaved as expected" in r.stdout
    m = re.search(r"200 from orders \(([0-9.]+) s after up\)", r.stdout)
    assert m, r.stdout[-3000:]
    assert not demo_leftovers()


# ---------------------------------------------------------------- Kubernetes against the image

K8S = REPO / "deploy" / "kubernetes"


def k8s_meshlet_containers():
    """(where, pod spec, container) for every container of the manifests that runs the meshlet image."""
    yaml = pytest.importorskip("yaml")
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
                continue
            spec = doc["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                if c["image"].split("/")[-1].startswith("meshlet:"):
                    out.append((f"{f.name}:{doc['metadata']['name']}/{c['name']}", spec, c))
    return out


def test_kubernetes_manifests_fit_the_built_image(image):
    """The manifests stay text (no cluster here), but what they assume of the
    image is checked on the image itself: every command exists in it, the
    uids are the image's user (or root for the iptables init), the ports
    are the exposed ones, the mount targets and probe commands exist."""
    cfg = json.loads(inspect(image, "{{json .Config}}"))
    exposed = {int(p.split("/")[0]) for p in cfg["ExposedPorts"]}
    uid = int(cfg["User"].split(":")[0])
    found = k8s_meshlet_containers()
    assert len(found) >= 5, found             # control, and init + sidecar for two services
    checks = []
    for where, spec, c in found:
        sc = c.get("securityContext", {})
        run_as = sc.get("runAsUser", spec.get("securityContext", {}).get("runAsUser", uid))
        if c["name"] == "meshlet-init":
            assert run_as == 0, f"{where}: the iptables init needs root"
        else:
            assert run_as == uid, f"{where}: runs as {run_as}, the image's user is {uid}"
        for p in c.get("ports", []):
            assert p["containerPort"] in exposed, f"{where}: port {p['containerPort']} is not EXPOSEd"
        cmds = [c.get("command", cfg["Entrypoint"])[0]]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "exec" in c.get(probe, {}):
                cmds.append(c[probe]["exec"]["command"][0])
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if pre:
            cmds.append(pre[0])
        for cmd in cmds:
            checks.append(f'command -v {cmd} >/dev/null || echo "{where}: no {cmd} in the image"')
        for m in c.get("volumeMounts", []):       # state volumes go where the image keeps state
            if m["mountPath"].startswith("/var/lib/"):
                checks.append(f'[ "$(stat -c %u {m["mountPath"]})" = {uid} ] '
                              f'|| echo "{where}: {m["mountPath"]} is not the image\'s state dir"')
    r = podman("run", "--rm", "--no-healthcheck", "--network", "none", "--entrypoint", "bash", image, "-c",
               "\n".join(checks), check=False)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_kubernetes_probes_against_a_sidecar_container(mesh, tmp_path):
    """The sidecar's startup/readiness/liveness probes and preStop hook,
    exactly as the manifests write them, run in a sidecar container of the
    built image: they pass on a ready sidecar, and after preStop (drain)
    readiness fails while liveness passes."""
    mesh.start_control()
    mesh.ctl("policy", "apply", "-f", "-", input=(K8S / "policies" / "orders.json").read_text())
    secret = mesh.token_secret("orders")
    cfg = json.loads((K8S / "config" / "orders-proxy.json").read_text())
    cfg["control"]["url"] = "https://control:7443"         # the cluster's Service name, here
    cfg["control"]["token_file"] = "/run/secrets/meshlet-token"
    path = tmp_path / "orders-proxy.json"
    path.write_text(json.dumps(cfg))
    path.chmod(0o644)
    name = f"{mesh.net}-k8s-orders"
    mesh.start_proxy(name, path, secret)
    side = next(c for w, s, c in k8s_meshlet_containers()
                if w.startswith("orders.yaml") and c["name"] == "meshlet-proxy")

    def run_exec(cmd):
        return podman("exec", name, *cmd, check=False).returncode
    wait_until(lambda: run_exec(side["startupProbe"]["exec"]["command"]) == 0, 60, "the startup probe")
    assert run_exec(side["readinessProbe"]["exec"]["command"]) == 0
    assert run_exec(side["livenessProbe"]["exec"]["command"]) == 0
    pre = side["lifecycle"]["preStop"]["exec"]["command"]
    assert run_exec(pre) == 0
    assert run_exec(side["readinessProbe"]["exec"]["command"]) != 0, "ready after preStop's drain"
    assert run_exec(side["livenessProbe"]["exec"]["command"]) == 0, "not alive after preStop's drain"
