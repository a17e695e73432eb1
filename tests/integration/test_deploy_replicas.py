"""The three-replica deployment files: deploy/compose/replicas (three etcd
members, three control replicas) and deploy/kubernetes/replicas (an etcd
StatefulSet and a control Deployment), checked against the real binaries:
every meshlet-control and etcd flag exists, the store URLs name the etcd
members as they are addressed, the KEK path is where it is put.
"""

import re
import subprocess
from pathlib import Path

import pytest

from helpers import REPO
from test_deploy_files import arg_value, check_control_args, load_all

yaml = pytest.importorskip("yaml", reason="python3-yaml is not installed (tests/run installs it)")

COMPOSE = REPO / "deploy" / "compose" / "replicas" / "compose.yaml"
K8S = REPO / "deploy" / "kubernetes" / "replicas"
ETCD = "/usr/bin/etcd"


def etcd_flags():
    p = subprocess.run([ETCD, "--help"], capture_output=True, text=True, timeout=30)
    return set(re.findall(r"(--[a-z0-9-]+)", p.stdout + p.stderr))


def check_etcd_args(args, where):
    known = etcd_flags()
    assert args[0] == "etcd", f"{where}: runs {args[0]}"
    for a in args[1:]:
        assert a.split("=", 1)[0] in known, f"{where}: etcd has no option {a}"


def flag(args, name):
    """--name=value of etcd's style."""
    return next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), None)


def store_endpoints(args):
    store = arg_value(args, "--store")
    assert store and store.startswith("etcd:"), store
    return store[len("etcd:"):].split(",")


def test_compose_replicas():
    doc = load_all(COMPOSE)[0]
    svcs = doc["services"]
    etcds = {n: s for n, s in svcs.items() if n.startswith("etcd-")}
    controls = {n: s for n, s in svcs.items() if n.startswith("control-")}
    assert len(etcds) == 3 and len(controls) == 3
    cluster = None
    for name, s in etcds.items():
        args = s["command"]
        check_etcd_args(args, f"compose {name}")
        assert flag(args, "--name") == name
        assert flag(args, "--advertise-client-urls") == f"http://{name}:2379"
        cluster = cluster or flag(args, "--initial-cluster")
        assert flag(args, "--initial-cluster") == cluster
        assert f"{name}=http://{name}:2380" in cluster
    kek_cmd = svcs["kek"]["command"][0]
    kek_path = re.search(r"init-kek (\S+)", kek_cmd).group(1)
    kek_mount = next(v.split(":")[1] for v in svcs["kek"]["volumes"] if v.startswith("kek:"))
    for name, s in controls.items():
        args = s["command"]
        check_control_args(args, f"compose {name}")
        assert store_endpoints(args) == [f"http://{e}:2379" for e in sorted(etcds)]
        assert arg_value(args, "--san") == name
        # the KEK file the kek service made, through the replica's own mount
        mount = next(v for v in s["volumes"] if v.startswith("kek:"))
        _, at, mode = mount.split(":")
        assert mode == "ro"
        assert arg_value(args, "--kek-file") == at + kek_path[len(kek_mount):]
        assert s["depends_on"]["kek"]["condition"] == "service_completed_successfully"


def test_kubernetes_replicas():
    kust = load_all(K8S / "kustomization.yaml")[0]
    objs = []
    for r in kust["resources"]:
        assert (K8S / r).is_file(), r
        objs += load_all(K8S / r)
    sts = next(o for o in objs if o["kind"] == "StatefulSet")
    dep = next(o for o in objs if o["kind"] == "Deployment")
    svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] ==
               sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    ns = sts["metadata"]["namespace"]
    n = sts["spec"]["replicas"]
    assert n == 3 and dep["spec"]["replicas"] == 3
    etcd = sts["spec"]["template"]["spec"]["containers"][0]
    check_etcd_args(etcd["command"], "etcd StatefulSet")
    members = [f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}.{ns}.svc"
               for i in range(n)]
    cluster = flag(etcd["command"], "--initial-cluster")
    for i, m in enumerate(members):
        assert f"{sts['metadata']['name']}-{i}=http://{m}:2380" in cluster
    spec = dep["spec"]["template"]["spec"]
    ctl = spec["containers"][0]
    check_control_args(ctl["args"], "control Deployment")
    assert store_endpoints(ctl["args"]) == [f"http://{m}:2379" for m in members]
    kek = arg_value(ctl["args"], "--kek-file")
    init = spec["initContainers"][0]
    assert init["command"][-1].endswith(kek), init["command"]
    run_mount = next(m for m in ctl["volumeMounts"] if kek.startswith(m["mountPath"] + "/"))
    assert any(m["name"] == run_mount["name"] for m in init["volumeMounts"])
    secret = next(v for v in spec["volumes"] if "secret" in v)
    assert secret["secret"]["secretName"] == "meshlet-kek"
    # 0600 after the copy: control refuses a KEK others may read
    assert "-m 0600" in init["command"][-1]
