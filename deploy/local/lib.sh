# shellcheck shell=bash
# deploy/local/lib.sh: the network-namespace topology of the local demo.
# Sourced by deploy/local/demo (and, through the demo's --setup-only and
# down entries, by tests/e2e). Bash only; needs root, iproute2, setpriv.
#
# Layout (every name starts with "ml-<id>", so nothing collides with what
# the machine already has, and two meshes can run side by side):
#
#   netns ml-<id>-net         the bridge "ml-br0" and one veth end per node
#   netns ml-<id>-<node>      one per node: "lo" and "ml-eth0" (the other
#                             veth end) with the node's IPv4 address and,
#                             where the kernel has IPv6, an IPv6 address
#                             from a unique local (ULA) prefix
#
# Nothing is added to the root namespace: no interface, address, route or
# iptables rule. Every namespace and process is written to a state file as
# soon as it exists, so ml_teardown can remove exactly what was created,
# even after a crash half way through.
#
# Functions set/read these globals:
#   ML_ID      unique id of this mesh (6 hex digits)
#   ML_STATE   the state file (one "kind value..." record per line)
#   ML_SUBNET  the /24 prefix used, e.g. 10.77.0 (addresses are $ML_SUBNET.N)
#   ML_SUBNET6 the IPv6 /64 used, e.g. fd6d:6c12:3456:: (addresses are
#              ${ML_SUBNET6}N); empty when the kernel has no IPv6

ML_STATE_DIR_ROOT=/run/meshlet-demo

# Picks a fresh id and the state file for it.
ml_new_id() {
    ML_ID=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
    local dir=$ML_STATE_DIR_ROOT
    ((EUID == 0)) || dir=${TMPDIR:-/tmp}/meshlet-demo-$EUID
    [[ -d $dir ]] || mkdir -m 0700 "$dir" || return 1
    ML_STATE=$dir/$ML_ID.state
    : >"$ML_STATE"
}

ml_record() { printf '%s\n' "$*" >>"$ML_STATE"; }

# ml_ns NODE: the namespace name of a node.
ml_ns() { printf 'ml-%s-%s' "$ML_ID" "$1"; }

# Picks a /24 that no address or route of the root namespace uses
# (the mesh's addresses exist only inside its namespaces, but a range the
# machine already uses would make the demo's output confusing).
ml_pick_subnet() {
    local used
    used=$( { ip -4 -o addr show; ip -4 route show table all; } 2>/dev/null)
    ML_SUBNET=$(ML_USED=$used /usr/bin/python3 - <<'EOF'
import ipaddress, os, re
used = []
for tok in re.findall(r'(?<![\w.])(\d+\.\d+\.\d+\.\d+(?:/\d+)?)', os.environ["ML_USED"]):
    try:
        n = ipaddress.ip_network(tok, strict=False)
    except ValueError:
        continue
    if n.prefixlen > 0:
        used.append(n)
cands = [f"10.77.{i}.0/24" for i in range(0, 256)] + [f"172.31.{i}.0/24" for i in range(77, 256)]
for c in cands:
    net = ipaddress.ip_network(c)
    if not any(net.overlaps(u) for u in used):
        print(c.rsplit(".", 1)[0])
        break
EOF
)
    [[ -n $ML_SUBNET ]] || return 1
    ml_record "subnet $ML_SUBNET"
    # IPv6: a unique local prefix (fd00::/8, never routed outside) whose
    # 40-bit global ID is "6d6c" ("ml") and the mesh's id.
    ML_SUBNET6=
    if [[ -d /proc/sys/net/ipv6 ]]; then
        ML_SUBNET6=fd6d:6c${ML_ID:0:2}:${ML_ID:2:4}::
        ml_record "subnet6 $ML_SUBNET6"
    fi
}

# Creates the bridge namespace with its bridge.
ml_net_create() {
    local br
    br=$(ml_ns net)
    ip netns add "$br" || return 1
    ml_record "ns $br"
    ip -n "$br" link set lo up &&
        ip -n "$br" link add ml-br0 type bridge &&
        ip -n "$br" link set ml-br0 up
}

# ml_node_add NODE HOST: a namespace for NODE with address $ML_SUBNET.HOST/24
# (and ${ML_SUBNET6}HOST/64) on a veth whose other end is plugged into the bridge.
ml_node_add() {
    local node=$1 host=$2 ns br
    ns=$(ml_ns "$node") br=$(ml_ns net)
    ip netns add "$ns" || return 1
    ml_record "ns $ns"
    if [[ -n ${ML_SUBNET6:-} ]]; then
        # IPv6 on in this namespace (the host may turn it off by default)
        ip netns exec "$ns" bash -c 'echo 0 >/proc/sys/net/ipv6/conf/default/disable_ipv6 &&
            echo 0 >/proc/sys/net/ipv6/conf/all/disable_ipv6' || return 1
    fi
    ip -n "$ns" link set lo up &&
        ip -n "$br" link add "ml-$node" type veth peer name ml-eth0 netns "$ns" &&
        ip -n "$br" link set "ml-$node" master ml-br0 &&
        ip -n "$br" link set "ml-$node" up &&
        ip -n "$ns" addr add "$ML_SUBNET.$host/24" dev ml-eth0 || return 1
    if [[ -n ${ML_SUBNET6:-} ]]; then
        # nodad: usable at once, no duplicate-address wait (the prefix is ours alone)
        ip -n "$ns" addr add "$ML_SUBNET6$host/64" dev ml-eth0 nodad || return 1
    fi
    ip -n "$ns" link set ml-eth0 up
}

# ml_in NODE CMD...: runs CMD inside NODE's namespace.
ml_in() {
    local ns
    ns=$(ml_ns "$1")
    shift
    ip netns exec "$ns" "$@"
}

# ml_as UID CMD...: runs CMD as UID (no supplementary groups).
ml_as() {
    local uid=$1
    shift
    setpriv --reuid="$uid" --regid="$uid" --clear-groups -- "$@"
}

# The start time of PID (clock ticks since boot): together with the PID it
# identifies a process, so a recycled PID is never signalled.
ml_starttime() {
    local line f
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    read -r -a f <<<"${line##*) }"    # f[0] is field 3 (state), f[19] field 22
    printf '%s\n' "${f[19]}"
}

# ml_spawn NAME LOGDIR CMD...: starts CMD in the background, detached from
# the terminal, stdout in LOGDIR/NAME.out and stderr in LOGDIR/NAME.err;
# records it and sets ML_PID.
ml_spawn() {
    local name=$1 logdir=$2 st saved
    shift 2
    # Signals wait until the process is on record: a trap that tears down
    # between the fork and the record would miss it.
    saved=$(trap -p INT TERM HUP)
    ML_SIGNALLED=
    trap 'ML_SIGNALLED=TERM' INT TERM HUP
    # (in a script, background jobs are not process-group leaders, so setsid
    # makes a new session without forking: $! stays the process's PID)
    setsid "$@" </dev/null >"$logdir/$name.out" 2>"$logdir/$name.err" &
    ML_PID=$!
    st=$(ml_starttime "$ML_PID") || st=0
    ml_record "pid $ML_PID $st $name"
    trap - INT TERM HUP
    eval "$saved"
    [[ -z $ML_SIGNALLED ]] || kill -TERM $$
}

# ml_alive PID: the process is still running (and not a zombie).
ml_alive() {
    local line
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    line=${line##*) }
    [[ ${line:0:1} != Z ]]
}

# ml_teardown STATEFILE: stops the processes, removes the iptables rules and
# namespaces and the work directory that STATEFILE records, then the file.
# Prints one line per kind of thing removed (to stdout) unless QUIET=1.
ml_teardown() {
    local state=$1 kind a b pids=() nss=() dirs=() ipts=() p st n
    [[ -f $state ]] || return 0
    while read -r kind a b _; do
        case $kind in
            pid) pids+=("$a:$b") ;;
            ns) nss+=("$a") ;;
            dir) dirs+=("$a") ;;
            iptables) ipts+=("$a") ;;
        esac
    done <"$state"

    # processes: TERM, wait up to 5 s, then KILL; only if the start time matches
    local live=()
    for p in "${pids[@]}"; do
        st=$(ml_starttime "${p%%:*}") || continue
        [[ ${p#*:} == 0 || $st == "${p#*:}" ]] || continue
        kill -TERM "${p%%:*}" 2>/dev/null && live+=("${p%%:*}")
    done
    for p in "${live[@]}"; do
        for ((n = 0; n < 50; n++)); do ml_alive "$p" || break; sleep 0.1; done
        ml_alive "$p" && kill -KILL "$p" 2>/dev/null
    done
    for p in "${live[@]}"; do
        for ((n = 0; n < 20; n++)); do ml_alive "$p" || break; sleep 0.05; done
    done

    # iptables rules (they would go with the namespace, but remove them the
    # way an operator would, with the helper that installed them)
    for n in "${ipts[@]}"; do
        if [[ -e /run/netns/$n ]]; then
            ip netns exec "$n" "${ML_IPTABLES_HELPER:-meshlet-iptables}" remove >/dev/null 2>&1 || true
        fi
    done
    # anything still running in our namespaces (a process started as the
    # demo was interrupted) is ours too: a namespace lives as long as they do
    local i left=()
    for n in "${nss[@]}"; do
        [[ $n == ml-* && -e /run/netns/$n ]] || continue
        for p in $(ip netns pids "$n" 2>/dev/null); do
            kill -KILL "$p" 2>/dev/null && left+=("$p")
        done
    done
    for p in "${left[@]}"; do
        for ((i = 0; i < 20; i++)); do ml_alive "$p" || break; sleep 0.05; done
    done
    # namespaces, nodes first and the bridge's last (their veths and the bridge go with them)
    for ((i = ${#nss[@]} - 1; i >= 0; i--)); do
        [[ ${nss[i]} == ml-* && -e /run/netns/${nss[i]} ]] && ip netns del "${nss[i]}" 2>/dev/null
    done
    # (MESHLET_DEMO_KEEP_DIR=1 leaves the work directory, logs included, to
    # whoever asked: tests/e2e reads the sidecars' stderr after they exit)
    if [[ ${MESHLET_DEMO_KEEP_DIR:-0} != 1 ]]; then
        for n in "${dirs[@]}"; do
            [[ $n == /tmp/meshlet-demo.* || $n == "${TMPDIR:-/tmp}"/meshlet-demo.* ]] && rm -rf -- "$n"
        done
    else
        dirs=()
    fi
    if [[ ${QUIET:-0} != 1 ]]; then
        local what="stopped ${#live[@]} processes"
        ((${#ipts[@]})) && what+=", removed the iptables rules of ${#ipts[@]} namespaces"
        ((${#nss[@]})) && what+=", deleted ${#nss[@]} namespaces (with their veths and the bridge)"
        ((${#dirs[@]})) && what+=", removed ${dirs[*]}"
        printf '%s\n' "$what"
    fi
    rm -f -- "$state"
}
