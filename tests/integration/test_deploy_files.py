"""The deployment files (deploy/docker, deploy/compose, deploy/kubernetes)
and the transparent-mode helper proxy/meshlet-iptables.

Here the files are checked against the real binaries; tests/containers
(root, podman) builds the image and runs the sidecar, control and the compose
mesh (as pods) for real, and checks the Kubernetes manifests' assumptions on
the built image. Here: every YAML parses; every proxy config shipped in deploy/
passes `meshlet-proxy --check-config`; every flag the manifests, the compose
file and deploy/README.md give to meshlet-control, meshletctl,
meshlet-iptables and meshlet-probe exists; ports, probe paths, uids, mount
paths and file names agree between the Dockerfile, the manifests and the
configs; the Dockerfile's runtime packages provide every library the
binaries link; the files the Dockerfile copies build the binaries. The
compose flow runs for real on loopback (control, policies, join tokens made
the documented way, the shipped sidecar configs with only addresses and
paths rewritten, an outbound listener standing in for interception).
meshlet-iptables is checked with --dry-run everywhere and, as root, installed and removed for real in throwaway network
namespaces (both iptables backends), with traffic proving the redirects.
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import proxy_env
from control_helpers import control, control_factory  # noqa: F401
from helpers import REPO, SANITIZER_MARKERS, free_port, wait_for

yaml = pytest.importorskip("yaml", reason="python3-yaml is not installed (tests/run installs it)")

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
PROBE = DEPLOY / "docker" / "meshlet-probe"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "kubernetes"
IPTABLES = REPO / "proxy" / "meshlet-iptables"
README = DEPLOY / "README.md"

PROXY_UID = 1337
SIDECAR = "meshlet-proxy"
INIT = "meshlet-init"


# ---------------------------------------------------------------- binaries


def build_dir():
    b = Path(os.environ.get("MESHLET_BUILD", REPO / "build-test"))
    return b if b.is_absolute() else REPO / b


def binary(rel):
    b = build_dir() / rel
    if not (b.is_file() and os.access(b, os.X_OK)):
        pytest.fail(f"{b} not found: build first (tests/run does), or set MESHLET_BUILD")
    return b


PROXY_BIN = "proxy/meshlet-proxy"
CONTROL_BIN = "control/meshlet-control"
CTL_BIN = "control/meshletctl"


def run(argv, **kw):
    kw.setdefault("timeout", 60)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)


def flags_in(text):
    """Every --long and -s option named in a help text."""
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b", text))


_help_cache = {}


def help_flags(argv):
    """Options listed by `argv --help` (which must exit 0)."""
    key = tuple(map(str, argv))
    if key not in _help_cache:
        p = run(list(argv) + ["--help"])
        assert p.returncode == 0, f"{' '.join(key)} --help exited {p.returncode}: {p.stderr}"
        _help_cache[key] = flags_in(p.stdout + p.stderr)
    return _help_cache[key]


CTL_COMMANDS = {("policy", "apply"), ("policy", "get"), ("policy", "delete"), ("policy", "list"),
                ("token", "create"), ("certs", "list"), ("certs", "rotate"), ("certs", "revoke"),
                ("ca", "show"), ("ca", "rotate"), ("ca", "status"), ("proxies", "list"), ("check",)}


def check_meshletctl_args(args, where):
    """args: what follows `meshletctl`. The command must exist and every
    option must be one its --help lists."""
    ctl = binary(CTL_BIN)
    words = [a for a in args if not a.startswith("-")]
    # options, and the words that are not an option's value
    skip, cmd, opts = False, [], []
    for a in args:
        if skip:
            skip = False
            continue
        if a.startswith("-") and a != "-":
            opts.append(a)
            skip = "=" not in a and a not in ("--help", "-h", "--force", "--all", "--version")
            continue
        cmd.append(a)
    cmd_t = tuple(cmd[:2]) if tuple(cmd[:2]) in CTL_COMMANDS else tuple(cmd[:1])
    assert cmd_t in CTL_COMMANDS, f"{where}: meshletctl {' '.join(args)}: no such command ({words})"
    known = help_flags([ctl, *cmd_t])
    for a in opts:
        assert a.split("=", 1)[0] in known, \
            f"{where}: meshletctl {' '.join(cmd_t)} has no option {a} (its --help: {sorted(known)})"
    return cmd_t


def check_control_args(args, where):
    known = help_flags([binary(CONTROL_BIN)])
    for a in args:
        if a.startswith("-"):
            assert a.split("=", 1)[0] in known, f"{where}: meshlet-control has no option {a}"


def arg_value(args, flag):
    """The value after flag (or flag=VALUE), None when absent."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def arg_values(args, flag):
    return [args[i + 1] for i, a in enumerate(args) if a == flag and i + 1 < len(args)]


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def host_of(addr):
    return str(addr).rsplit(":", 1)[0].strip("[]")


def check_config(path, where=None):
    """meshlet-proxy --check-config on a shipped config; returns it parsed."""
    p = run([binary(PROXY_BIN), "-c", path, "--check-config"])
    assert p.returncode == 0, (f"{where or path}: meshlet-proxy --check-config failed "
                               f"({p.returncode}):\n{p.stdout}{p.stderr}")
    assert "ok" in p.stdout
    return json.loads(Path(path).read_text())


def probe_args(cmd):
    """(method, path, addr) of a meshlet-probe command line (a list), None if it is not one."""
    if not cmd:
        return None
    if cmd[0] in ("/bin/sh", "sh") and len(cmd) >= 3 and cmd[1] == "-c":
        m = re.search(r"meshlet-probe[^;&|]*", cmd[2])
        if not m:
            return None
        cmd = shlex.split(m.group(0))
    if Path(cmd[0]).name != "meshlet-probe":
        return None
    p = run([PROBE, "--help"])
    known = flags_in(p.stdout)
    for a in cmd[1:]:
        if a.startswith("-"):
            assert a.split("=", 1)[0] in known, f"meshlet-probe has no option {a}"
    paths = [a for a in cmd[1:] if a.startswith("/")]
    assert len(paths) == 1, f"meshlet-probe needs one path: {cmd}"
    return ("POST" if "--post" in cmd else "GET", paths[0], arg_value(cmd, "--addr"))


# ---------------------------------------------------------------- YAML


def yaml_files():
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def test_deploy_tree_has_the_files():
    for p in (DOCKERFILE, DOCKERIGNORE, PROBE, COMPOSE, K8S / "kustomization.yaml", README,
              IPTABLES):
        assert p.is_file(), f"{p.relative_to(REPO)} is missing"
    for p in (PROBE, IPTABLES):
        assert os.access(p, os.X_OK), f"{p.relative_to(REPO)} is not executable"


def test_every_yaml_parses():
    files = yaml_files()
    assert COMPOSE in files and K8S / "kustomization.yaml" in files
    for f in files:
        docs = load_all(f)
        assert docs, f"{f.relative_to(REPO)}: no YAML documents"
        for d in docs:
            assert isinstance(d, dict), f"{f.relative_to(REPO)}: a document is not a mapping"
        if f.parent == K8S and f.name != "kustomization.yaml":
            for d in docs:
                for k in ("apiVersion", "kind", "metadata"):
                    assert k in d, f"{f.relative_to(REPO)}: {d.get('kind')} without {k}"
                assert d["metadata"].get("name"), f"{f.relative_to(REPO)}: object without a name"


def test_every_shipped_proxy_config_checks():
    # deploy/observability's JSON is Prometheus targets and a Grafana dashboard
    # (test_observability.py checks those).
    configs = sorted(p for p in DEPLOY.rglob("*.json")
                     if not {"policies", "observability"} & set(p.relative_to(DEPLOY).parts))
    assert configs, "no proxy configs in deploy/"
    for c in configs:
        cfg = check_config(c)
        assert cfg.get("admin", {}).get("listen", "127.0.0.1:15000").startswith("127.0.0.1:"), \
            f"{c}: the admin listener must stay on loopback"


def test_shipped_policies_are_valid_and_do_what_the_docs_say(control):  # noqa: F811
    """Every shipped policy is accepted by meshlet-control, the compose and
    Kubernetes copies are the same, and the documented calls decide as the
    README says."""
    comp = sorted((DEPLOY / "compose" / "policies").glob("*.json"))
    kube = sorted((K8S / "policies").glob("*.json"))
    assert [p.name for p in comp] == [p.name for p in kube]
    for a, b in zip(comp, kube):
        assert json.loads(a.read_text()) == json.loads(b.read_text()), f"{a} and {b} differ"
    for p in comp:
        doc = json.loads(p.read_text())
        assert doc["service"] == p.stem
        r = control.ctl("policy", "apply", "-f", p)
        assert r.returncode == 0, f"{p}: {r.stderr}"
    allowed = control.ctl_json("check", "--from", "spiffe://mesh.local/svc/frontend", "--to", "orders",
                               "--port", "8080", "--method", "GET", "--path", "/orders/42")
    assert allowed["decision"] == "allow" and allowed["rule"] == "frontend-reads-orders"
    denied = control.ctl_json("check", "--from", "spiffe://mesh.local/svc/frontend", "--to", "orders",
                              "--port", "8080", "--method", "GET", "--path", "/admin/stats")
    assert denied["decision"] == "deny" and denied["rule"] == "no-admin"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text):
    """[(KEYWORD, args)] with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if cur and line.startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        kw, _, rest = cur.strip().partition(" ")
        out.append((kw.upper(), rest.strip()))
        cur = ""
    return out


def dockerfile_stages():
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    args, stages = {}, []
    for kw, rest in ins:
        if kw == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif kw == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            assert m, f"FROM {rest}"
            base = re.sub(r"\$\{?(\w+)\}?", lambda x: args.get(x.group(1), ""), m.group(1))
            stages.append({"base": base, "name": m.group(2), "ins": []})
        else:
            assert stages, f"{kw} before FROM"
            stages[-1]["ins"].append((kw, rest))
    return stages


def apt_packages(stage):
    pk = []
    for kw, rest in stage["ins"]:
        if kw == "RUN" and "apt-get install" in rest:
            seg = rest.split("apt-get install", 1)[1].split("&&", 1)[0]
            pk += [w for w in seg.split() if not w.startswith("-")]
    return pk


def exec_form(rest):
    assert rest.startswith("["), f"not exec form: {rest}"
    return json.loads(rest)


def test_dockerfile_stages_user_healthcheck_expose():
    stages = dockerfile_stages()
    assert len(stages) == 3, "a build stage, a rootfs stage and a runtime stage"
    build, rootfs, rt = stages
    for s in (build, rootfs):
        assert s["base"] == "debian:12-slim", f"stage {s['name']} is FROM {s['base']}"
    assert rt["base"] == "scratch", "the runtime stage is the pruned rootfs as one layer"
    assert (build["name"], rootfs["name"], rt["name"]) == ("build", "rootfs", "runtime")

    bpk = apt_packages(build)
    for p in ("meson", "ninja-build", "pkg-config", "libssl-dev", "libevent-dev", "libjansson-dev",
              "libsqlite3-dev", "libhttp-parser-dev", "libnghttp2-dev"):
        assert p in bpk, f"build stage does not install {p}"
    runs = " ".join(r for k, r in build["ins"] if k == "RUN")
    assert re.search(r"meson setup .*--buildtype=release", runs)
    assert "-Dtests=disabled" in runs
    assert re.search(r"meson install .*--destdir", runs)

    rpk = apt_packages(rootfs)
    assert rpk, "rootfs stage installs no packages"
    assert not [p for p in rpk if p.endswith("-dev")], f"-dev packages at runtime: {rpk}"
    for p in ("iptables", "ca-certificates", "libssl3", "libjansson4", "libsqlite3-0",
              "libhttp-parser2.9", "libnghttp2-14"):
        assert p in rpk, f"runtime stage does not install {p}"
    assert "curl" not in rpk and "wget" not in rpk, "meshlet-probe replaces curl"
    assert any(k == "RUN" and "rm -rf /var/lib/apt/lists" in r for k, r in rootfs["ins"])
    # the pruning keeps what the runtime needs: no runtime package, bash
    # (meshlet-probe, meshlet-iptables), coreutils, sed, grep or libc
    prune = re.search(r'prune="([^"]*)"', " ".join(r for k, r in rootfs["ins"] if k == "RUN"))
    assert prune, "the rootfs stage prunes nothing"
    pruned = set(prune.group(1).split())
    kept = pruned & (set(rpk) | {"bash", "coreutils", "sed", "grep", "libc6", "libc-bin"})
    assert not kept, f"the rootfs stage removes {kept}"

    ins = dict()
    for kw, rest in rootfs["ins"] + rt["ins"]:
        ins.setdefault(kw, []).append(rest)
    assert any(re.fullmatch(r"--from=rootfs\s+/\s+/", c) for c in ins["COPY"]), "runtime copies the rootfs"
    user_runs = " ".join(r for r in ins["RUN"] if "useradd" in r)
    assert re.search(r"useradd .*--uid 1337\b.*\bmeshlet\b", user_runs), "no user meshlet, uid 1337"
    assert re.search(r"groupadd .*--gid 1337\b.*\bmeshlet\b", user_runs)
    assert ins["USER"][-1].split(":")[0] in ("1337", "meshlet"), f"USER {ins['USER'][-1]}"
    assert re.search(r"install -d -o 1337 -g 1337 -m 0700 .*/var/lib/meshlet-proxy", user_runs)
    assert "/var/lib/meshlet-control" in user_runs

    hc = ins["HEALTHCHECK"][-1]
    m = re.search(r"\bCMD\s+(\[.*\])", hc)
    assert m, f"HEALTHCHECK without an exec-form CMD: {hc}"
    method, path, addr = probe_args(json.loads(m.group(1)))
    assert (method, path) == ("GET", "/ready")
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(ins.get("ENV", []))))
    assert (addr or env.get("MESHLET_ADMIN")) == "127.0.0.1:15000", \
        "the health check's target is the proxy's default admin.listen"
    for opt in ("--interval", "--timeout", "--start-period", "--retries"):
        assert opt in hc

    exposed = {int(p.split("/")[0]) for e in ins["EXPOSE"] for p in e.split()}
    assert {15006, 7443} <= exposed, f"EXPOSE {exposed}"
    assert 15000 not in exposed, "the admin port is loopback-only"

    assert exec_form(ins["ENTRYPOINT"][-1]) == ["meshlet-proxy"]
    cmd = exec_form(ins["CMD"][-1])
    assert cmd[0] == "-c" and cmd[1] == "/etc/meshlet/proxy.json"
    assert "/usr/local/bin/meshlet-probe" in " ".join(ins["COPY"])
    assert any("--from=build" in c and "/usr/local/bin" in c for c in ins["COPY"])


def dockerignore_allows(rel):
    """Whether Dockerfile.dockerignore keeps rel (a path in the context) in the context."""
    keep = True
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        parts = Path(rel).parts
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            keep = neg
    return keep


def dockerfile_copy_sources():
    srcs = []
    for s in dockerfile_stages():
        for kw, rest in s["ins"]:
            if kw != "COPY" or "--from=" in rest:
                continue
            words = [w for w in rest.split() if not w.startswith("--")]
            srcs += words[:-1]
    return srcs


def test_dockerfile_copies_exist_and_pass_the_dockerignore():
    srcs = dockerfile_copy_sources()
    assert srcs
    for s in srcs:
        p = REPO / s
        assert p.exists(), f"COPY {s}: not in the repository"
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            rel = f.relative_to(REPO)
            if "__pycache__" in rel.parts:
                continue
            assert dockerignore_allows(str(rel)), f"{rel} is copied but the dockerignore drops it"
    for dropped in (".git/HEAD", "build-test/build.ninja", "certs/out/ca.key", "tests/run"):
        assert not dockerignore_allows(dropped), f"{dropped} would be sent to the daemon"


def test_the_copied_sources_build_the_image_contents(tmp_path):
    """What the build stage does, outside a container: only the files the
    Dockerfile copies, meson release build without tests, meson install
    into a destdir."""
    for tool in ("meson", "ninja"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} not found (tests/run installs it)")
    src = tmp_path / "src"
    for s in dockerfile_copy_sources():
        p = REPO / s
        if p.is_dir():
            shutil.copytree(p, src / s, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / s).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, src / s)
    env = {k: v for k, v in os.environ.items() if k not in ("CFLAGS", "LDFLAGS")}
    for argv in (["meson", "setup", tmp_path / "b", src, "--buildtype=release", "-Dtests=disabled",
                  "--prefix=/usr/local"],
                 ["ninja", "-C", tmp_path / "b"],
                 ["meson", "install", "-C", tmp_path / "b", "--no-rebuild", "--strip",
                  "--destdir", tmp_path / "out"]):
        p = run(argv, timeout=900, env=env)
        assert p.returncode == 0, f"{' '.join(map(str, argv))}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
    bindir = tmp_path / "out" / "usr" / "local" / "bin"
    for name in ("meshlet-proxy", "meshlet-control", "meshletctl", "meshlet-iptables"):
        f = bindir / name
        assert f.is_file() and os.access(f, os.X_OK), f"meson install did not install {name}"
    assert (bindir / "meshlet-iptables").read_bytes() == IPTABLES.read_bytes()
    p = run([bindir / "meshlet-proxy", "--version"])
    assert p.returncode == 0


def test_runtime_packages_provide_every_linked_library():
    """Each shared library the binaries need comes from a package the
    runtime stage installs (resolved with dpkg on this Debian machine)."""
    if not (shutil.which("readelf") and shutil.which("dpkg")):
        pytest.skip("readelf or dpkg not available: cannot map libraries to Debian packages")
    rpk = set(apt_packages(dockerfile_stages()[1]))
    base = re.compile(r"^(libc\.so|libm\.so|libpthread|libdl|librt|ld-linux|libasan|libubsan|"
                      r"libgcc_s|libstdc\+\+|liblsan|libtsan)")
    needed = set()
    for b in (PROXY_BIN, CONTROL_BIN, CTL_BIN):
        p = run(["readelf", "-d", binary(b)])
        assert p.returncode == 0, p.stderr
        needed |= set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", p.stdout))
    assert needed
    for lib in sorted(needed):
        if base.match(lib):
            continue
        p = run(["dpkg", "-S", f"*/{lib}"])
        assert p.returncode == 0, f"{lib}: no Debian package provides it here ({p.stderr.strip()})"
        owners = {line.split(":", 1)[0].split(",")[0].strip() for line in p.stdout.splitlines()
                  if not line.startswith("diversion")}
        owners = {o.split(":")[0] for o in owners}
        assert owners & rpk, f"{lib} comes from {owners}, which the runtime stage does not install"


def test_dockerfile_packages_exist_in_debian():
    if not shutil.which("apt-cache"):
        pytest.skip("apt-cache not available")
    for s in dockerfile_stages():
        for pkg in apt_packages(s):
            p = run(["apt-cache", "show", "--no-all-versions", pkg])
            if p.returncode != 0 or not p.stdout.strip():
                q = run(["dpkg-query", "-W", pkg])
                assert q.returncode == 0, f"stage {s['name']}: no Debian package {pkg}"


# ---------------------------------------------------------------- meshlet-probe


def test_meshlet_probe_script():
    assert run(["bash", "-n", PROBE]).returncode == 0
    p = run([PROBE, "--help"])
    assert p.returncode == 0 and "--post" in p.stdout and "--addr" in p.stdout
    assert run([PROBE]).returncode == 2
    assert run([PROBE, "--bogus", "/ready"]).returncode == 2
    assert run([PROBE, "--addr", "nohostport", "/ready"]).returncode == 2
    port = free_port()
    p = run([PROBE, "--addr", f"127.0.0.1:{port}", "/ready"])
    assert p.returncode == 1 and "cannot connect" in p.stderr


def test_meshlet_probe_against_a_proxy(mesh):
    """The health check, the probes and the preStop hook against a real
    proxy's admin listener: 2xx -> 0, anything else -> 1; POST /drain drains."""
    app = mesh.app("echo")
    inb, _ = mesh.inbound(app.port)
    a = f"127.0.0.1:{inb.admin_port}"
    p = run([PROBE, "--addr", a, "/ready"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "200" in p.stdout and '"ready":true' in p.stdout.replace(" ", "")
    assert run([PROBE, "--quiet", "--addr", a, "/healthz"]).returncode == 0
    p = run([PROBE, "--addr", a, "/no-such-path"])
    assert p.returncode == 1 and "404" in p.stdout
    env = dict(os.environ, MESHLET_ADMIN=a)
    assert run([PROBE, "-q", "/ready"], env=env).returncode == 0
    p = run([PROBE, "--quiet", "--addr", a, "--post", "/drain"])
    assert p.returncode == 0
    assert run([PROBE, "--quiet", "--addr", a, "/ready"]).returncode == 1, "ready while draining"
    assert run([PROBE, "--quiet", "--addr", a, "/healthz"]).returncode == 0


# ---------------------------------------------------------------- compose


def compose():
    return load_all(COMPOSE)[0]


def compose_image_ok(img):
    return img == "${MESHLET_IMAGE:-meshlet:0.1.0}"


def volume_source(svc, target):
    """The source mounted at target (short syntax SOURCE:TARGET[:MODE])."""
    for v in svc.get("volumes", []):
        parts = v.split(":") if isinstance(v, str) else [v["source"], v["target"]]
        if parts[1] == target:
            return parts[0]
    return None


def test_compose_file():
    c = compose()
    svcs = c["services"]
    assert {"control", "policies", "frontend", "frontend-proxy", "orders", "orders-proxy"} <= set(svcs)
    for name, s in svcs.items():
        for dep in s.get("depends_on", {}):
            assert dep in svcs, f"{name} depends on unknown {dep}"

    # control
    ctl = svcs["control"]
    assert compose_image_ok(ctl["image"])
    assert ctl["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (COMPOSE.parent / ctl["build"]["context"]).resolve() == REPO
    assert ctl["entrypoint"] == ["meshlet-control"]
    args = [str(a) for a in ctl["command"]]
    check_control_args(args, "compose control")
    state = arg_value(args, "--state-dir")
    assert volume_source(ctl, state) == "control-state", "control's state dir is not on its volume"
    assert "control-state" in c["volumes"]
    listen_port = port_of(arg_value(args, "--listen"))
    sans = arg_values(args, "--san")
    hc = ctl["healthcheck"]["test"]
    assert hc[0] == "CMD" and hc[1] == "meshletctl"
    check_meshletctl_args(hc[2:], "compose control healthcheck")
    assert port_of(arg_value(hc, "--control")) == listen_port

    # policies one-shot
    pol = svcs["policies"]
    assert pol["depends_on"]["control"]["condition"] == "service_healthy"
    assert volume_source(pol, state) == "control-state", \
        "policies must see control's ca.pem and admin.token (meshletctl's default --state-dir)"
    assert state == "/var/lib/meshlet-control"
    script = pol["command"][0]
    calls = [shlex.split(line.strip().replace("$$", "$"))
             for line in script.splitlines() if line.strip().startswith("meshletctl")]
    assert calls
    for call in calls:
        check_meshletctl_args(call[1:], "compose policies")
        url = arg_value(call, "--control")
        assert host_of(url.split("//", 1)[1]) in sans and port_of(url) == listen_port
    pdir = volume_source(pol, "/etc/meshlet/policies")
    assert pdir and (COMPOSE.parent / pdir).is_dir()

    # sidecars and apps
    sidecars = {n: s for n, s in svcs.items() if n.endswith("-proxy")}
    assert set(sidecars) == {"frontend-proxy", "orders-proxy"}
    policy_services = {json.loads(p.read_text())["service"] for p in (COMPOSE.parent / pdir).glob("*.json")}
    for name, s in sidecars.items():
        where = f"compose {name}"
        assert compose_image_ok(s["image"])
        assert "entrypoint" not in s, "sidecars use the image's entrypoint, meshlet-proxy"
        assert s["command"][0] == "-c"
        cfg_path = s["command"][1]
        src = volume_source(s, cfg_path)
        assert src, f"{where}: {cfg_path} is not mounted"
        cfg = check_config(COMPOSE.parent / src, where)
        assert cfg["service"] == name[: -len("-proxy")]
        assert cfg["service"] in policy_services, f"{where}: no policy for {cfg['service']}"
        # the control URL names the control service (alias) and its port, the name is a --san
        host = host_of(cfg["control"]["url"].split("//", 1)[1])
        assert host in ctl["networks"]["mesh"]["aliases"] + ["control"] and host in sans
        assert port_of(cfg["control"]["url"]) == listen_port
        # the join token: a compose secret at the config's token_file
        sec = s["secrets"][0]
        assert f"/run/secrets/{sec['target']}" == cfg["control"]["token_file"]
        assert c["secrets"][sec["source"]]["file"].startswith("./secrets/")
        # state on a named volume at state_dir
        vol = volume_source(s, cfg["state_dir"])
        assert vol in c["volumes"], f"{where}: state_dir {cfg['state_dir']} is not on a volume"
        # health check = /ready on the config's admin listener
        method, path, addr = probe_args(s["healthcheck"]["test"][1:])
        assert (method, path) == ("GET", "/ready")
        assert addr in (None, cfg["admin"]["listen"])
        assert s["environment"]["MESHLET_ADMIN"] == cfg["admin"]["listen"]
        grace = s["stop_grace_period"]
        assert int(grace.rstrip("s")) > cfg["timeouts"]["drain_seconds"]
        for dep, cond in (("control", "service_healthy"), ("policies", "service_completed_successfully")):
            assert s["depends_on"][dep]["condition"] == cond
        # its init step: meshlet-iptables in the sidecar's namespace, root with
        # NET_ADMIN/NET_RAW only, ports from the config
        init = svcs[f"{cfg['service']}-init"]
        assert init["network_mode"] == f"service:{name}"
        assert str(init["user"]).split(":")[0] == "0"
        assert init["cap_drop"] == ["ALL"] and set(init["cap_add"]) == {"NET_ADMIN", "NET_RAW"}
        assert init["entrypoint"] == ["meshlet-iptables"]
        iargs = [str(a) for a in init["command"]]
        assert iargs[0] == "install"
        assert arg_value(iargs, "--proxy-uid") == str(PROXY_UID)
        assert int(arg_value(iargs, "--outbound-port")) == port_of(cfg["transparent"]["listen"])
        assert int(arg_value(iargs, "--inbound-port")) == port_of(cfg["inbound"][0]["listen"])
        fwd = port_of(cfg["inbound"][0]["forward"])
        assert [int(x) for x in arg_value(iargs, "--app-ports").split(",")] == [fwd]
        p = run([IPTABLES, "--dry-run", *iargs])
        assert p.returncode == 0, f"{where} init: meshlet-iptables {' '.join(iargs)}: {p.stderr}"
        assert init["depends_on"][name]["condition"] == "service_started"
        assert init["restart"] == "no" and init["healthcheck"]["disable"] is True
        # its app shares the namespace, waits for the rules and a healthy sidecar
        app = svcs[cfg["service"]]
        assert app["network_mode"] == f"service:{name}"
        assert app["depends_on"][name]["condition"] == "service_healthy"
        assert app["depends_on"][f"{name[:-len('-proxy')]}-init"]["condition"] == \
            "service_completed_successfully"
        assert str(app.get("user", "")).split(":")[0] not in ("0", str(PROXY_UID)), \
            "the app must run neither as root nor as 1337"
        app_cmd = " ".join(app["command"])
        assert re.search(rf"-p {fwd}\b", app_cmd), f"{cfg['service']} app does not listen on port {fwd}"
        assert app["healthcheck"]["test"][-1].endswith(f"127.0.0.1:{fwd}/")
        # other services reach it by its service name: an alias of the namespace's owner
        assert cfg["service"] in s["networks"]["mesh"]["aliases"]
    # frontend calls orders by name and port, intercepted, as the docs show
    assert "http://orders:8080/orders/42" in COMPOSE.read_text()
    assert "http://orders:8080/orders/42" in README.read_text()


def code_lines(path):
    """The shell code of a file: fenced blocks of a Markdown file, every line otherwise."""
    lines = path.read_text().splitlines()
    if path.suffix != ".md":
        return lines
    out, inside = [], False
    for line in lines:
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if inside:
            out.append(line)
    return out


def documented_ctl_calls(lines):
    """meshletctl argument lists in shell code (lines of code or comments)."""
    heads = {c[0] for c in CTL_COMMANDS}
    calls = []
    for line in lines:
        line = line.strip().lstrip("#").strip().lstrip("$").strip()
        i = line.find("meshletctl ")
        if i < 0 or line.startswith(("`", "|")) or (i > 0 and line[i - 1] == "`"):
            continue                                   # not code, or code quoted in prose
        cmd = line[i:].split("|")[0].split(";")[0].split("&&")[0].split(")")[0].rstrip("\\ ")
        try:
            argv = shlex.split(cmd, comments=True)
        except ValueError:
            continue
        argv = [a for a in argv[1:] if not a.startswith("$")]
        if argv and (argv[0].startswith("-") or argv[0] in heads):
            calls.append(argv)
    return calls


def test_documented_meshletctl_calls_exist():
    """Every meshletctl call shown in the compose file, the manifests and
    deploy/README.md names a real command with real options."""
    n = 0
    for f in [COMPOSE, README, *sorted(K8S.glob("*.yaml"))]:
        for argv in documented_ctl_calls(code_lines(f)):
            check_meshletctl_args(argv, f.relative_to(REPO))
            n += 1
    assert n >= 5, f"only {n} meshletctl calls found in the docs"


def test_documented_meshlet_control_calls_exist():
    for f in (README,):
        for line in code_lines(f):
            if "meshlet-control --" in line:
                argv = shlex.split(line[line.index("meshlet-control --"):].rstrip("\\ &"))
                check_control_args(argv[1:], f.relative_to(REPO))


# ---------------------------------------------------------------- Kubernetes


def k8s_objects():
    kust = load_all(K8S / "kustomization.yaml")[0]
    objs = []
    for r in kust["resources"]:
        assert (K8S / r).is_file(), f"kustomization resource {r} is missing"
        objs += load_all(K8S / r)
    return kust, objs


def find(objs, kind, name, ns=None):
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name
            and (ns is None or o["metadata"].get("namespace") == ns)]
    assert len(hits) == 1, f"expected one {kind} {ns}/{name}, found {len(hits)}"
    return hits[0]


def generated_configmaps(kust):
    """{(namespace, name): {key: file}} from the configMapGenerator."""
    out = {}
    for g in kust.get("configMapGenerator", []):
        files = {}
        for f in g["files"]:
            key, _, path = f.partition("=") if "=" in f else (Path(f).name, None, f)
            assert (K8S / path).is_file(), f"configMapGenerator {g['name']}: {path} is missing"
            files[key] = K8S / path
        out[(g.get("namespace"), g["name"])] = files
    return out


def named_port(container, name):
    for p in container.get("ports", []):
        if p.get("name") == name:
            return p["containerPort"]
    return None


def test_kustomization_and_namespaces():
    kust, objs = k8s_objects()
    assert kust["kind"] == "Kustomization"
    namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    assert namespaces == {"meshlet-system", "meshlet-demo"}
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") in namespaces, f"{o['kind']} {o['metadata']['name']}"
    images = set()
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            images.add(c["image"])
    assert any(i["name"] == "meshlet" for i in kust["images"])
    for i in images:
        assert i.startswith(("meshlet:", "busybox:")) and ":latest" not in i, f"image {i}"
    cms = generated_configmaps(kust)
    assert ("meshlet-system", "meshlet-policies") in cms


def test_control_statefulset():
    kust, objs = k8s_objects()
    sts = find(objs, "StatefulSet", "meshlet-control", "meshlet-system")
    spec = sts["spec"]
    assert spec["replicas"] == 1
    headless = find(objs, "Service", spec["serviceName"], "meshlet-system")
    assert headless["spec"]["clusterIP"] == "None"
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["meshlet-control"]
    args = [str(a) for a in c["args"]]
    check_control_args(args, "control.yaml")
    port = port_of(arg_value(args, "--listen"))
    assert named_port(c, "api") == port
    state = arg_value(args, "--state-dir")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env["MESHLET_STATE_DIR"] == state, "meshletctl in the pod must find ca.pem and admin.token"
    # the state dir is a subdirectory of the PVC's mount (control refuses a group-accessible dir)
    vct = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    state_mounts = [mounts[n] for n in vct if n in mounts]
    assert state_mounts and Path(state).parent == Path(state_mounts[0]), \
        f"--state-dir {state} is not a subdirectory of the volume claim's mount"
    assert pod["securityContext"]["fsGroup"] == PROXY_UID
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert pod["securityContext"]["runAsUser"] == PROXY_UID
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        g = c[probe]["httpGet"]
        assert g["scheme"] == "HTTPS" and g["path"] == "/v1/health" and g["port"] == "api"
    svc = find(objs, "Service", "meshlet-control", "meshlet-system")
    assert svc["spec"]["ports"][0]["port"] == port and svc["spec"]["ports"][0]["targetPort"] == "api"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    # the policies ConfigMap is mounted where the README's meshletctl calls read it
    pol = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "meshlet-policies"]
    assert pol
    assert mounts[pol[0]["name"]] == "/etc/meshlet/policies"
    cms = generated_configmaps(kust)
    for key in cms[("meshlet-system", "meshlet-policies")]:
        assert f"/etc/meshlet/policies/{key}" in README.read_text(), \
            f"README does not show how to apply {key}"
    # the name proxies use is on control's certificate
    for cfg in (K8S / "config").glob("*.json"):
        url = json.loads(cfg.read_text())["control"]["url"]
        host = host_of(url.split("//", 1)[1])
        assert host in arg_values(args, "--san"), f"{cfg.name}: {host} is not a --san of control"
        assert host.split(".")[:2] == ["meshlet-control", "meshlet-system"]
        assert port_of(url) == svc["spec"]["ports"][0]["port"]


def meshed_deployments(objs):
    return [o for o in objs if o["kind"] == "Deployment"
            and any(c["name"] == SIDECAR for c in o["spec"]["template"]["spec"].get("initContainers", []))]


def test_meshed_deployments():
    kust, objs = k8s_objects()
    deps = meshed_deployments(objs)
    assert {d["metadata"]["name"] for d in deps} == {"orders", "frontend"}
    cms = generated_configmaps(kust)
    for d in deps:
        name, ns = d["metadata"]["name"], d["metadata"]["namespace"]
        where = f"Deployment {ns}/{name}"
        pod = d["spec"]["template"]["spec"]
        inits = pod["initContainers"]
        names = [c["name"] for c in inits]
        assert names.index(INIT) < names.index(SIDECAR), f"{where}: iptables must come before the sidecar"
        init = inits[names.index(INIT)]
        side = inits[names.index(SIDECAR)]
        vols = {v["name"]: v for v in pod["volumes"]}

        # -- the sidecar's config (ConfigMap from a shipped file) passes --check-config
        assert side.get("restartPolicy") == "Always", f"{where}: not a native sidecar"
        assert side["args"][0] == "-c"
        cfg_path = Path(side["args"][1])
        smounts = {m["mountPath"]: m for m in side["volumeMounts"]}
        cm_vol = vols[smounts[str(cfg_path.parent)]["name"]]
        cm_files = cms[(ns, cm_vol["configMap"]["name"])]
        cfg = check_config(cm_files[cfg_path.name], where)
        assert cfg["service"] == name
        admin = cfg["admin"]["listen"]
        inbound_port = port_of(cfg["inbound"][0]["listen"])
        app_ports = sorted(port_of(i["forward"]) for i in cfg["inbound"])
        out_port = port_of(cfg["transparent"]["listen"])

        # -- iptables init: root, NET_ADMIN/NET_RAW, --proxy-uid 1337, ports from the config
        assert init["command"] == ["meshlet-iptables"]
        iargs = [str(a) for a in init["args"]]
        assert iargs[0] == "install"
        assert arg_value(iargs, "--proxy-uid") == str(PROXY_UID)
        assert int(arg_value(iargs, "--outbound-port")) == out_port
        assert int(arg_value(iargs, "--inbound-port")) == inbound_port
        assert sorted(int(p) for p in arg_value(iargs, "--app-ports").split(",")) == app_ports
        p = run([IPTABLES, "--dry-run", *iargs])
        assert p.returncode == 0, f"{where}: meshlet-iptables {' '.join(iargs)}: {p.stderr}"
        sc = init["securityContext"]
        assert sc["runAsUser"] == 0 and sc.get("runAsNonRoot") is False
        assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
        assert sc["capabilities"]["drop"] == ["ALL"]
        if sc.get("readOnlyRootFilesystem"):
            assert any(m["mountPath"] == "/run" for m in init["volumeMounts"]), \
                "iptables -w needs a writable /run for its lock"

        # -- the sidecar: uid 1337, ports, probes, preStop, token, state
        ssc = side["securityContext"]
        assert ssc["runAsUser"] == PROXY_UID and ssc["runAsNonRoot"] is True
        assert ssc["allowPrivilegeEscalation"] is False and ssc["capabilities"]["drop"] == ["ALL"]
        assert [p["containerPort"] for p in side["ports"]] == [inbound_port]
        env = {e["name"]: e.get("value") for e in side.get("env", [])}
        assert env.get("MESHLET_ADMIN", admin) == admin
        want = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/healthz"}
        for probe, path in want.items():
            got = probe_args(side[probe]["exec"]["command"])
            assert got == ("GET", path, admin), f"{where}: {probe} is {got}, want GET {path} on {admin}"
        pre = probe_args(side["lifecycle"]["preStop"]["exec"]["command"])
        assert pre == ("POST", "/drain", admin), f"{where}: preStop is {pre}"
        m = re.search(r"sleep (\d+)", side["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert m, "preStop should sleep a little after /drain"
        assert pod["terminationGracePeriodSeconds"] >= cfg["timeouts"]["drain_seconds"] + int(m.group(1))
        tok = Path(cfg["control"]["token_file"])
        tvol = vols[smounts[str(tok.parent)]["name"]]["secret"]
        assert tvol["secretName"] == f"{name}-meshlet-token"
        assert [i["path"] for i in tvol["items"]] == [tok.name]
        assert tvol["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == PROXY_UID, \
            "uid 1337 must be able to read the token"
        readme = README.read_text()
        loop = re.search(r"for s in ([a-z ]+); do", readme)
        assert f"{name}-meshlet-token" in readme or (
            loop and name in loop.group(1).split() and '"$s-meshlet-token"' in readme), \
            f"README does not show how to create the Secret {name}-meshlet-token"
        state = Path(cfg["state_dir"])
        assert "emptyDir" in vols[smounts[str(state.parent)]["name"]], \
            f"{where}: state_dir must be a subdirectory of an emptyDir (the proxy creates it 0700)"

        # -- the app: not uid 1337, its port is the inbound forward port, probes on loopback
        for c in pod["containers"]:
            pod_uid = pod.get("securityContext", {}).get("runAsUser")
            uid = c.get("securityContext", {}).get("runAsUser", pod_uid)
            assert uid != PROXY_UID, f"{where}: container {c['name']} runs as the proxy's uid"
            assert [p["containerPort"] for p in c.get("ports", [])] == app_ports
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in c:
                    assert "httpGet" not in c[probe] and "tcpSocket" not in c[probe], \
                        f"{where}: kubelet probes to an intercepted port reach the mTLS listener"
        # -- a headless Service: transparent mode maps pod addresses, not ClusterIPs
        svc = find(objs, "Service", name, ns)
        assert svc["spec"]["clusterIP"] == "None"
        assert [p["port"] for p in svc["spec"]["ports"]] == app_ports


# ---------------------------------------------------------------- the compose flow, for real


class HttpApp:
    """A tiny HTTP app like the compose demo's busybox httpd."""

    def __init__(self, files):
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()


def http_get(port, path, timeout=10):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_compose_flow_on_loopback(control, tmp_path):  # noqa: F811
    """The compose deployment's steps with the real binaries: the policies
    applied as the one-shot does, join tokens made with the documented
    `meshletctl token create | awk` line, the shipped sidecar configs with
    only addresses and paths rewritten, readiness checked with
    meshlet-probe as the health check does; then the README's calls: an
    allowed one through frontend's outbound listener and a denied one."""
    proxy_bin = binary(PROXY_BIN)

    app = HttpApp({"/": b'{"service":"orders"}\n', "/orders/42": b'{"order":42,"status":"shipped"}\n',
                   "/admin/stats": b'{"secret":"admin only"}\n'})
    front_app = HttpApp({"/": b'{"service":"frontend"}\n'})
    for p in sorted((DEPLOY / "compose" / "policies").glob("*.json")):
        r = control.ctl("policy", "apply", "-f", p)
        assert r.returncode == 0, r.stderr
        # policy ports are the app's port: 8080 in the deployment, a free port here
        doc = json.loads(p.read_text())
        for rule in doc["rules"]:
            if "ports" in rule:
                rule["ports"] = [app.port if x == 8080 else x for x in rule["ports"]]
        moved = tmp_path / p.name
        moved.write_text(json.dumps(doc))
        r = control.ctl("policy", "apply", "-f", moved)
        assert r.returncode == 0, r.stderr
    procs = []
    try:
        ctl_flags = (f"--control {control.url} --ca {control.ca_file} "
                     f"--token-file {control.token_file}")
        admins = {}
        out_port = None
        for svc, app_port in (("orders", app.port), ("frontend", front_app.port)):
            tok = tmp_path / f"{svc}.token"
            sh = (f"{shlex.quote(str(binary(CTL_BIN)))} {ctl_flags} token create --service {svc} "
                  f"--ttl 15m --uses 1 | awk 'NR == 2 {{ print $1 }}' > {shlex.quote(str(tok))}")
            r = subprocess.run(["bash", "-o", "pipefail", "-c", sh], capture_output=True, text=True,
                               env=control.env, timeout=60)
            assert r.returncode == 0, r.stderr
            assert re.fullmatch(rf"mlt1\.{svc}\.[0-9a-f]+\.\S+\n", tok.read_text()), tok.read_text()

            cfg = json.loads((DEPLOY / "compose" / f"{svc}-proxy.json").read_text())
            cfg["control"] = {"url": control.url, "token_file": str(tok)}
            cfg["state_dir"] = str(tmp_path / f"{svc}-state")
            cfg["inbound"][0]["listen"] = f"127.0.0.1:{free_port()}"
            cfg["inbound"][0]["forward"] = f"127.0.0.1:{app_port}"
            assert "transparent" in cfg, f"{svc}: the compose sidecars intercept"
            del cfg["transparent"]
            if svc == "frontend":
                out_port = free_port()
                cfg["outbound"] = [{"listen": f"127.0.0.1:{out_port}", "service": "orders",
                                    "protocol": "http"}]
            admins[svc] = f"127.0.0.1:{free_port()}"
            cfg["admin"]["listen"] = admins[svc]
            cfg["timeouts"]["drain_seconds"] = 2
            cfg["workers"] = 1
            path = tmp_path / f"{svc}-proxy.json"
            path.write_text(json.dumps(cfg))
            with open(tmp_path / f"{svc}.stdout", "wb") as o, open(tmp_path / f"{svc}.stderr", "wb") as e:
                procs.append(subprocess.Popen([proxy_bin, "-c", path], stdout=o, stderr=e,
                                              stdin=subprocess.DEVNULL, env=proxy_env()))

        def ready(svc):
            return run([PROBE, "--quiet", "--addr", admins[svc], "/ready"], timeout=10).returncode == 0

        for svc in admins:
            try:
                wait_for(lambda: ready(svc), 30, interval=0.2, what=f"{svc} sidecar /ready")
            except AssertionError:
                raise AssertionError(f"{svc}: {(tmp_path / f'{svc}.stderr').read_text()[-3000:]}")

        # frontend learns orders' endpoint from control's registry
        def call():
            try:
                return http_get(out_port, "/orders/42")
            except OSError:
                return None
        got = wait_for(lambda: (lambda r: r if r and r[0] == 200 else None)(call()), 30,
                       interval=0.3, what="frontend -> orders through the sidecars")
        assert b'"order":42' in got[1]
        status, body = http_get(out_port, "/admin/stats")
        assert status == 403, (status, body)
        assert b"admin only" not in body
    finally:
        codes = []
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                codes.append(p.wait(15))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait(5))
        app.stop()
        front_app.stop()
    # SIGTERM drains and exits 0 (what `docker compose stop` relies on)
    assert codes == [0, 0], f"sidecars exited {codes} on SIGTERM"
    for svc in ("orders", "frontend"):
        text = (tmp_path / f"{svc}.stderr").read_text(errors="replace")
        assert not any(m in text for m in SANITIZER_MARKERS), f"{svc} sidecar:\n{text[-5000:]}"


# ---------------------------------------------------------------- meshlet-iptables: everywhere


def ipt(*args, **kw):
    return run([IPTABLES, *args], **kw)


def test_meshlet_iptables_script_and_usage():
    assert run(["bash", "-n", IPTABLES]).returncode == 0
    p = ipt("--help")
    assert p.returncode == 0
    for word in ("install", "remove", "--proxy-uid", "--outbound-port", "--inbound-port", "--app-ports",
                 "--exclude-cidr", "--exclude-port", "--dry-run", "MESHLET_OUTPUT", "MESHLET_INBOUND",
                 "--ipv6", "intercept", "drop", "--ip6tables"):
        assert word in p.stdout, f"--help does not mention {word}"
    assert ipt("--version").returncode == 0
    for bad in ([], ["frobnicate"], ["install", "--dry-run"],                 # no --proxy-uid
                ["install", "--proxy-uid", "0", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--app-ports", "80,x", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--inbound-port", "70000", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--exclude-cidr", "10.0.0.0/33", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--exclude-cidr", "fd00::/129", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--exclude-cidr", "fd00::1::2", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--exclude-cidr", "1:2:3:4:5:6:7:8:9", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--exclude-cidr", "12345::/64", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--exclude-cidr", "10.0.0.0/8,", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--app-ports", "15006", "--dry-run"],
                ["install", "--proxy-uid", "no-such-user-xyz", "--dry-run"],
                ["remove", "--proxy-uid", "1337", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--ipv6", "both", "--dry-run"],
                ["install", "--proxy-uid", "1337", "--ipv6", "--dry-run"],
                ["remove", "--ipv6", "off", "--dry-run"],
                ["install", "remove", "--proxy-uid", "1337"],
                ["install", "--proxy-uid"]):
        p = ipt(*bad)
        assert p.returncode == 2, f"meshlet-iptables {bad}: exit {p.returncode}, want 2"
        assert "meshlet-iptables:" in p.stderr


def test_meshlet_iptables_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    for f in (IPTABLES, PROBE, DEPLOY / "compose" / "demo", DEPLOY / "podman" / "base-image"):
        p = run(["shellcheck", f])
        assert p.returncode == 0, p.stdout


def dry_lines(*args, family="iptables", table="nat"):
    """The --dry-run commands for one family (iptables or ip6tables) and table."""
    p = ipt(*args)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    for line in lines:
        assert re.match(r"ip6?tables(-legacy)? -w -t (nat|filter) ", line), line
    return [line.split(f" -t {table} ", 1)[1] for line in lines
            if line.split(" ", 1)[0].removesuffix("-legacy") == family and f" -t {table} " in line]


def test_meshlet_iptables_dry_run_install_with_app_ports():
    got = dry_lines("install", "--dry-run", "--proxy-uid", "1337", "--outbound-port", "15001",
                    "--inbound-port", "15006", "--app-ports", "9090,8080", "--exclude-cidr",
                    "10.96.0.0/12", "--exclude-port", "53", "--exclude-outbound-port=5432")
    assert got == [
        "-N MESHLET_OUTPUT", "-F MESHLET_OUTPUT", "-N MESHLET_INBOUND", "-F MESHLET_INBOUND",
        "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MESHLET_OUTPUT -o lo -j RETURN",
        "-A MESHLET_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "-A MESHLET_OUTPUT -d 10.96.0.0/12 -j RETURN",
        "-A MESHLET_OUTPUT -p tcp --dport 53 -j RETURN",
        "-A MESHLET_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "-A MESHLET_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006",
        "-A MESHLET_INBOUND -p tcp --dport 9090 -j REDIRECT --to-ports 15006",
        "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
        "-A PREROUTING -p tcp -j MESHLET_INBOUND",
    ]


def test_meshlet_iptables_dry_run_ipv6_modes():
    """intercept (default): the same nat rules with ip6tables (::1 for
    loopback, no IPv4 CIDRs); drop: a filter chain refusing what intercept
    would redirect; off: no ip6tables command at all."""
    args = ["install", "--dry-run", "--proxy-uid", "1337", "--app-ports", "8080",
            "--exclude-cidr", "10.96.0.0/12", "--exclude-port", "53"]
    v4 = dry_lines(*args)
    assert dry_lines(*args, family="ip6tables") == [
        "-N MESHLET_OUTPUT", "-F MESHLET_OUTPUT", "-N MESHLET_INBOUND", "-F MESHLET_INBOUND",
        "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MESHLET_OUTPUT -o lo -j RETURN",
        "-A MESHLET_OUTPUT -d ::1/128 -j RETURN",
        "-A MESHLET_OUTPUT -p tcp --dport 53 -j RETURN",
        "-A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "-A MESHLET_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006",
        "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
        "-A PREROUTING -p tcp -j MESHLET_INBOUND",
    ]
    assert dry_lines(*args, "--ipv6", "intercept", family="ip6tables") == \
        dry_lines(*args, family="ip6tables")
    assert dry_lines(*args, family="ip6tables", table="filter") == []

    assert dry_lines(*args, "--ipv6", "drop") == v4
    assert dry_lines(*args, "--ipv6", "drop", family="ip6tables") == []
    assert dry_lines(*args, "--ipv6", "drop", family="ip6tables", table="filter") == [
        "-N MESHLET_OUTPUT", "-F MESHLET_OUTPUT", "-N MESHLET_INBOUND", "-F MESHLET_INBOUND",
        "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MESHLET_OUTPUT -o lo -j RETURN",
        "-A MESHLET_OUTPUT -p tcp --dport 53 -j RETURN",
        "-A MESHLET_OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A MESHLET_INBOUND -i lo -j RETURN",
        "-A MESHLET_INBOUND -p tcp --dport 8080 -j DROP",
        "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
        "-A INPUT -p tcp -j MESHLET_INBOUND",
    ]
    # IPv6 CIDRs go to ip6tables only, IPv4 ones to iptables only
    mixed = args + ["--exclude-cidr", "fd00::/8,2001:db8::1"]
    assert dry_lines(*mixed) == v4
    assert [l for l in dry_lines(*mixed, family="ip6tables") if " -d " in l] == [
        "-A MESHLET_OUTPUT -d ::1/128 -j RETURN",
        "-A MESHLET_OUTPUT -d fd00::/8 -j RETURN",
        "-A MESHLET_OUTPUT -d 2001:db8::1 -j RETURN",
    ]
    assert [l for l in dry_lines(*mixed, "--ipv6", "drop", family="ip6tables", table="filter")
            if " -d " in l] == ["-A MESHLET_OUTPUT -d fd00::/8 -j RETURN",
                                "-A MESHLET_OUTPUT -d 2001:db8::1 -j RETURN"]
    p = ipt(*args, "--ipv6", "off")
    assert p.returncode == 0 and "ip6tables" not in p.stdout, p.stdout
    assert dry_lines(*args, "--ipv6", "off") == v4
    # the ip6tables twin of --iptables, unless --ip6tables says otherwise
    p = ipt(*args, "--iptables", "/usr/sbin/iptables-legacy")
    assert "/usr/sbin/ip6tables-legacy -w -t nat -N MESHLET_OUTPUT" in p.stdout
    p = ipt(*args, "--iptables", "iptables-legacy", "--ip6tables", "my-ip6")
    assert "my-ip6 -w -t nat -N MESHLET_OUTPUT" in p.stdout


def test_meshlet_iptables_dry_run_install_all_ports_and_remove():
    got = dry_lines("install", "--dry-run", "--proxy-uid", "1337", "--exclude-inbound-port", "15000",
                    "--iptables", "iptables-legacy")
    inbound = [line for line in got if line.startswith("-A MESHLET_INBOUND")]
    assert inbound == [
        "-A MESHLET_INBOUND -p tcp --dport 22 -j RETURN",
        "-A MESHLET_INBOUND -p tcp --dport 15000 -j RETURN",
        "-A MESHLET_INBOUND -p tcp --dport 15006 -j RETURN",
        "-A MESHLET_INBOUND -p tcp -j REDIRECT --to-ports 15006",
    ], "without --app-ports: everything but ssh, the inbound port and exclusions"
    assert "-A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in got, "default outbound port"
    p = ipt("install", "--dry-run", "--proxy-uid", "1337", "--iptables", "iptables-legacy")
    assert p.stdout.startswith("iptables-legacy -w -t nat ")
    nat_remove = [
        "-D OUTPUT -p tcp -j MESHLET_OUTPUT", "-D PREROUTING -p tcp -j MESHLET_INBOUND",
        "-F MESHLET_OUTPUT", "-X MESHLET_OUTPUT", "-F MESHLET_INBOUND", "-X MESHLET_INBOUND",
    ]
    assert dry_lines("remove", "--dry-run") == nat_remove
    # remove takes both families away, whatever --ipv6 install had
    assert dry_lines("remove", "--dry-run", family="ip6tables") == nat_remove
    assert dry_lines("remove", "--dry-run", family="ip6tables", table="filter") == [
        "-D OUTPUT -p tcp -j MESHLET_OUTPUT", "-D INPUT -p tcp -j MESHLET_INBOUND",
        "-F MESHLET_OUTPUT", "-X MESHLET_OUTPUT", "-F MESHLET_INBOUND", "-X MESHLET_INBOUND",
    ]


def test_meshlet_iptables_is_installed_by_meson():
    text = (REPO / "proxy" / "meson.build").read_text()
    assert re.search(r"install_data\(\s*'meshlet-iptables'.*install_dir:\s*get_option\('bindir'\)"
                     r".*install_mode:\s*'rwxr-xr-x'", text, re.S)


# ---------------------------------------------------------------- meshlet-iptables: for real, as root


def netns_skip_reason():
    if os.geteuid() != 0:
        return "not root: real iptables install/remove in a network namespace needs root"
    if not shutil.which("ip"):
        return "ip (iproute2) not found"
    name = f"mlchk{os.getpid() % 100000}"
    p = run(["ip", "netns", "add", name])
    if p.returncode != 0:
        return f"cannot create network namespaces here: {p.stderr.strip()}"
    run(["ip", "netns", "del", name])
    return None


NETNS_SKIP = netns_skip_reason()
BACKENDS = ["iptables-nft", "iptables-legacy"]


def backend_or_skip(backend):
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    if not shutil.which(backend):
        pytest.skip(f"{backend} not installed")


class Netns:
    def __init__(self):
        self.names = []

    def add(self):
        name = f"ml{os.getpid() % 10000}{uuid.uuid4().hex[:6]}"
        p = run(["ip", "netns", "add", name])
        assert p.returncode == 0, p.stderr
        self.names.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def close(self):
        for n in self.names:
            run(["ip", "netns", "del", n])
        left = run(["ip", "netns", "list"]).stdout
        for n in self.names:
            assert n not in left, f"network namespace {n} left behind"


@pytest.fixture
def netns():
    n = Netns()
    yield n
    n.close()


def nat_rules(ns, backend, table="nat"):
    p = run(["ip", "netns", "exec", ns, backend, "-w", "-t", table, "-S"])
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def ip6(backend):
    """iptables-nft -> ip6tables-nft"""
    return backend.replace("iptables", "ip6tables")


def all_rules(ns, backend):
    """nat and filter rules of both families (what install may touch)."""
    return {(b, t): nat_rules(ns, b, t) for b in (backend, ip6(backend)) for t in ("nat", "filter")}


def ns_ipt(ns, backend, *args):
    # TMPDIR that does not exist: the init container's root filesystem is
    # read-only, so the script must not need temporary files
    env = dict(os.environ, TMPDIR="/nonexistent/meshlet-iptables-tmp")
    return run(["ip", "netns", "exec", ns, IPTABLES, "--iptables", backend, *args], env=env)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meshlet_iptables_install_remove_in_a_netns(netns, backend):
    backend_or_skip(backend)
    ns = netns.add()
    before = nat_rules(ns, backend)
    before_all = all_rules(ns, backend)
    args = ["install", "--proxy-uid", "1337", "--outbound-port", "15001", "--inbound-port", "15006",
            "--app-ports", "8080", "--exclude-cidr", "10.96.0.0/12", "--exclude-port", "53"]
    p = ns_ipt(ns, backend, *args)
    assert p.returncode == 0, p.stderr
    assert "installed" in p.stdout
    after = nat_rules(ns, backend)
    for want in ("-N MESHLET_OUTPUT", "-N MESHLET_INBOUND",
                 "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
                 "-A PREROUTING -p tcp -j MESHLET_INBOUND",
                 "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                 "-A MESHLET_OUTPUT -o lo -j RETURN",
                 "-A MESHLET_OUTPUT -d 127.0.0.0/8 -j RETURN",
                 "-A MESHLET_OUTPUT -d 10.96.0.0/12 -j RETURN",
                 "-A MESHLET_OUTPUT -p tcp -m tcp --dport 53 -j RETURN",
                 "-A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                 "-A MESHLET_INBOUND -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15006"):
        assert want in after, f"{backend}: missing '{want}' in:\n" + "\n".join(after)
    out = [r for r in after if r.startswith("-A MESHLET_OUTPUT")]
    assert "--uid-owner" in out[0] and "REDIRECT" in out[-1], "the uid exemption first, REDIRECT last"
    # IPv6 (on in a new namespace): the same rules with ip6tables
    after6 = nat_rules(ns, ip6(backend))
    for want in ("-A OUTPUT -p tcp -j MESHLET_OUTPUT", "-A PREROUTING -p tcp -j MESHLET_INBOUND",
                 "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                 "-A MESHLET_OUTPUT -d ::1/128 -j RETURN",
                 "-A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                 "-A MESHLET_INBOUND -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15006"):
        assert want in after6, f"{ip6(backend)}: missing '{want}' in:\n" + "\n".join(after6)
    assert not [r for r in after6 if "10.96.0.0/12" in r]

    # idempotent: the same install changes nothing
    installed = all_rules(ns, backend)
    assert ns_ipt(ns, backend, *args).returncode == 0
    assert nat_rules(ns, backend) == after
    assert all_rules(ns, backend) == installed
    # --ipv6 drop replaces the ip6tables nat rules with filter rules, and back
    assert ns_ipt(ns, backend, *args, "--ipv6", "drop").returncode == 0
    assert not [r for r in nat_rules(ns, ip6(backend)) if "MESHLET" in r]
    assert "-A INPUT -p tcp -j MESHLET_INBOUND" in nat_rules(ns, ip6(backend), "filter")
    assert nat_rules(ns, backend) == after
    assert ns_ipt(ns, backend, *args, "--ipv6", "drop").returncode == 0       # idempotent too
    assert ns_ipt(ns, backend, *args).returncode == 0
    assert all_rules(ns, backend) == installed
    # another install replaces the rules; the jumps stay single
    p = ns_ipt(ns, backend, "install", "--proxy-uid", "1337", "--app-ports", "9090")
    assert p.returncode == 0, p.stderr
    again = nat_rules(ns, backend)
    assert again.count("-A OUTPUT -p tcp -j MESHLET_OUTPUT") == 1
    assert again.count("-A PREROUTING -p tcp -j MESHLET_INBOUND") == 1
    assert "-A MESHLET_INBOUND -p tcp -m tcp --dport 9090 -j REDIRECT --to-ports 15006" in again
    assert not [r for r in again if "8080" in r or "10.96.0.0/12" in r]
    # show prints our rules
    p = ns_ipt(ns, backend, "show")
    assert p.returncode == 0 and "MESHLET_OUTPUT" in p.stdout

    # remove leaves exactly what was there before; removing twice is fine
    p = ns_ipt(ns, backend, "remove")
    assert p.returncode == 0, p.stderr
    assert nat_rules(ns, backend) == before
    assert all_rules(ns, backend) == before_all
    assert ns_ipt(ns, backend, "remove").returncode == 0
    assert nat_rules(ns, backend) == before
    # drop mode's rules go with remove too
    assert ns_ipt(ns, backend, *args, "--ipv6", "drop").returncode == 0
    assert ns_ipt(ns, backend, "remove").returncode == 0
    assert all_rules(ns, backend) == before_all
    # a foreign rule in OUTPUT survives install + remove
    run(["ip", "netns", "exec", ns, backend, "-w", "-t", "nat", "-A", "OUTPUT", "-p", "udp",
         "--dport", "53", "-j", "RETURN"])
    mark = nat_rules(ns, backend)
    assert ns_ipt(ns, backend, *args).returncode == 0
    assert ns_ipt(ns, backend, "remove").returncode == 0
    assert nat_rules(ns, backend) == mark


@pytest.mark.parametrize("failing", ["iptables", "ip6tables"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_meshlet_iptables_failed_install_rolls_back(netns, backend, tmp_path, failing):
    """An iptables error half way (here: REDIRECT refused, for IPv4 or,
    after IPv4 is done, for IPv6) -> exit 1, and both families' tables are
    as they were."""
    backend_or_skip(backend)
    ns = netns.add()
    before = all_rules(ns, backend)
    for fam, real in (("iptables", backend), ("ip6tables", ip6(backend))):
        fake = tmp_path / f"failing-{fam}"
        fake.write_text("#!/bin/bash\n" + (
            "for a in \"$@\"; do [[ $a == REDIRECT ]] && { echo 'simulated: no REDIRECT' >&2; exit 4; }; done\n"
            if fam == failing else "") + f"exec {shutil.which(real)} \"$@\"\n")
        fake.chmod(0o755)
    p = run(["ip", "netns", "exec", ns, IPTABLES, "--iptables", tmp_path / "failing-iptables",
             "install", "--proxy-uid", "1337"])
    assert p.returncode == 1, p.stdout + p.stderr
    assert "simulated: no REDIRECT" in p.stderr and "removing what was added" in p.stderr
    assert all_rules(ns, backend) == before


SERVER = r"""
import socket, struct, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    try:
        raw = c.getsockopt(socket.SOL_IP, 80, 16)   # SO_ORIGINAL_DST
        port, ip = struct.unpack("!2xH4s8x", raw)
        orig = f"{socket.inet_ntoa(ip)}:{port}"
    except OSError:
        orig = "none"
    c.sendall(f"{sys.argv[3]} orig={orig}\n".encode()); c.close()
"""

CLIENT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print(s.recv(200).decode().strip())
except OSError as e:
    print("error", type(e).__name__)
"""


def debian_python():
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@pytest.mark.parametrize("backend", BACKENDS)
def test_meshlet_iptables_redirects_traffic(netns, backend, tmp_path):
    """Two namespaces on a veth pair; the rules in `pod`. The workload's
    outbound connection reaches the transparent port with its original
    destination intact, the proxy's uid goes out directly, inbound
    connections to the app port land on the inbound port, other ports are
    left alone, and after remove nothing is redirected."""
    backend_or_skip(backend)
    py = debian_python()
    pod, peer = netns.add(), netns.add()
    va, vb = f"mla{uuid.uuid4().hex[:8]}", f"mlb{uuid.uuid4().hex[:8]}"
    for argv in (["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
                 ["ip", "link", "set", va, "netns", pod], ["ip", "link", "set", vb, "netns", peer],
                 ["ip", "-n", pod, "addr", "add", "10.213.7.2/24", "dev", va],
                 ["ip", "-n", peer, "addr", "add", "10.213.7.1/24", "dev", vb],
                 ["ip", "-n", pod, "link", "set", va, "up"], ["ip", "-n", peer, "link", "set", vb, "up"]):
        p = run(argv)
        assert p.returncode == 0, f"{argv}: {p.stderr}"
    servers = []
    # uid 1337 runs the client too: the scripts go where it can read them
    scripts = Path(tempfile.mkdtemp(prefix="meshlet-ipt-"))
    os.chmod(scripts, 0o755)
    script = scripts / "server.py"
    script.write_text(SERVER)
    client = scripts / "client.py"
    client.write_text(CLIENT)
    for f in (script, client):
        os.chmod(f, 0o644)

    def serve(ns, host, port, tag):
        s = subprocess.Popen(["ip", "netns", "exec", ns, py, script, host, str(port), tag],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        servers.append(s)
        assert s.stdout.readline().strip() == "ready", s.stderr.read()

    def connect(ns, host, port, uid=None):
        argv = ["ip", "netns", "exec", ns]
        if uid is not None:
            argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        p = run(argv + [py, client, host, str(port)], timeout=20)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    try:
        serve(pod, "127.0.0.1", 15001, "transparent")
        serve(pod, "0.0.0.0", 15006, "inbound")
        serve(pod, "0.0.0.0", 9999, "app-9999")
        serve(peer, "0.0.0.0", 80, "peer-80")
        # before: nothing redirected (the tag says which server answered; SO_ORIGINAL_DST
        # only matters where a redirect happened)
        assert connect(pod, "10.213.7.1", 80).startswith("peer-80 ")

        p = ns_ipt(pod, backend, "install", "--proxy-uid", "1337", "--app-ports", "8080")
        assert p.returncode == 0, p.stderr
        # the workload's outbound -> transparent listener, original destination kept
        assert connect(pod, "10.213.7.1", 80) == "transparent orig=10.213.7.1:80"
        # the proxy's own connections leave untouched
        if shutil.which("setpriv"):
            assert connect(pod, "10.213.7.1", 80, uid=PROXY_UID).startswith("peer-80 ")
        # loopback is not intercepted
        assert connect(pod, "127.0.0.1", 9999) == "app-9999 orig=127.0.0.1:9999"
        # inbound to the app port -> the mTLS listener; other ports untouched
        assert connect(peer, "10.213.7.2", 8080) == "inbound orig=10.213.7.2:8080"
        assert connect(peer, "10.213.7.2", 9999) == "app-9999 orig=10.213.7.2:9999"

        assert ns_ipt(pod, backend, "remove").returncode == 0
        assert connect(pod, "10.213.7.1", 80).startswith("peer-80 ")
        assert connect(peer, "10.213.7.2", 8080) == "error ConnectionRefusedError"
    finally:
        for s in servers:
            s.kill()
            s.wait(5)
        shutil.rmtree(scripts, ignore_errors=True)
