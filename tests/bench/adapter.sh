#!/usr/bin/env bash
# tests/bench/adapter.sh: a meshlet-proxy pair in static mode for the peer
# benchmark (../shared/bench/run; its README.md has the adapter contract).
#
#   ../shared/bench/run --candidate meshlet=tests/bench/adapter.sh \
#       --only direct,haproxy,nginx,stunnel,meshlet --require-identity
#
# Reads the pair from the environment (OUT_LISTEN, OUT_UPSTREAM, IN_LISTEN,
# IN_BACKEND, CA_PEM, OUT_/IN_CERT_PEM, OUT_/IN_KEY_PEM, OUT_/IN_SPIFFE_ID,
# WORKDIR, PIDFILE), writes both configs and policies under WORKDIR, starts
# both proxies in the background, writes their PIDs to PIDFILE and exits 0.
#
# The binary: $MESHLET_PROXY, else the first of build-release/, build/ in
# the repository. Benchmark an optimised build without sanitizers:
#   meson setup build-release --buildtype=release -Dtests=disabled
#   ninja -C build-release
# (Other build-*/ directories are used as a last resort, with a warning:
# an ASan build is several times slower.)
#
# Hints honoured: WORKERS (workers), TLS_GROUPS (tls.groups), MAX_CONNS
# (max_connections), OUT_ADMIN_LISTEN / IN_ADMIN_LISTEN (admin.listen),
# VERSIONFILE. MESHLET_PROTOCOL=tcp|http picks the listeners' protocol
# (default tcp). MESHLET_ACCESS_LOG=1 turns the access log on.
set -euo pipefail

: "${OUT_LISTEN:?}" "${OUT_UPSTREAM:?}" "${IN_LISTEN:?}" "${IN_BACKEND:?}"
: "${CA_PEM:?}" "${OUT_CERT_PEM:?}" "${OUT_KEY_PEM:?}" "${IN_CERT_PEM:?}" "${IN_KEY_PEM:?}"
: "${OUT_SPIFFE_ID:?}" "${IN_SPIFFE_ID:?}" "${WORKDIR:?}" "${PIDFILE:?}"

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$HERE/../.." && pwd)

die() { printf 'meshlet adapter: %s\n' "$*" >&2; exit 1; }

# ---- the binary ----------------------------------------------------------------
find_proxy() {
    local d b
    if [[ -n ${MESHLET_PROXY:-} ]]; then
        [[ -x $MESHLET_PROXY ]] || die "MESHLET_PROXY=$MESHLET_PROXY is not executable"
        echo "$MESHLET_PROXY"
        return
    fi
    for d in build-release build; do
        b=$ROOT/$d/proxy/meshlet-proxy
        [[ -x $b ]] && { echo "$b"; return; }
    done
    for b in "$ROOT"/build-*/proxy/meshlet-proxy; do
        if [[ -x $b ]]; then
            echo "meshlet adapter: WARNING: no build-release/; using $b (may be a debug or sanitizer build)" >&2
            echo "$b"
            return
        fi
    done
    die "no meshlet-proxy binary: build one with
    meson setup build-release --buildtype=release -Dtests=disabled && ninja -C build-release
or set MESHLET_PROXY=/path/to/meshlet-proxy"
}
BIN=$(find_proxy)
if grep -q -a __asan_init "$BIN" 2>/dev/null; then
    echo "meshlet adapter: WARNING: $BIN is built with AddressSanitizer; numbers will be slow" >&2
fi

# ---- parameters ------------------------------------------------------------------
td=${IN_SPIFFE_ID#spiffe://}
td=${td%%/*}                                  # bench.local
client=${OUT_SPIFFE_ID##*/}                   # client
server=${IN_SPIFFE_ID##*/}                    # server
proto=${MESHLET_PROTOCOL:-tcp}
[[ $proto == tcp || $proto == http ]] || die "MESHLET_PROTOCOL must be tcp or http, not '$proto'"
workers=${WORKERS:-1}
groups=${TLS_GROUPS:-X25519}
maxconn=${MAX_CONNS:-10000}
out_admin=${OUT_ADMIN_LISTEN:-127.0.0.1:18004}
in_admin=${IN_ADMIN_LISTEN:-127.0.0.1:18005}
# The reference peers write no per-connection log (stunnel runs with
# debug = err), so meshlet's access log is off too, to keep CPU per request
# comparable. MESHLET_ACCESS_LOG=1 turns it on (lines go to $WORKDIR/*.log).
access_log=false
[[ ${MESHLET_ACCESS_LOG:-0} == 1 ]] && access_log=true

# JSON string literal of $1.
js() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

common() { # SERVICE STATE_DIR POLICY CERT KEY ADMIN
    cat <<EOF
  "service": $(js "$1"),
  "trust_domain": $(js "$td"),
  "state_dir": $(js "$2"),
  "policy_file": $(js "$3"),
  "tls": {"cert": $(js "$4"), "key": $(js "$5"), "bundle": $(js "$CA_PEM"),
          "groups": $(js "$groups")},
  "admin": {"listen": $(js "$6")},
  "workers": $workers,
  "max_connections": $maxconn,
  "timeouts": {"handshake_seconds": 10, "connect_seconds": 5,
               "idle_seconds": 300, "drain_seconds": 5},
  "log": {"level": "info", "access_log": $access_log}
EOF
}

# The inbound admits the outbound's identity only; the outbound has no
# inbound listener, so its policy admits nobody.
cat >"$WORKDIR/in-policy.json" <<EOF
{"service": $(js "$server"), "default": "deny",
 "rules": [{"name": "bench-client", "action": "allow", "from": [$(js "$OUT_SPIFFE_ID")]}]}
EOF
cat >"$WORKDIR/out-policy.json" <<EOF
{"service": $(js "$client"), "default": "deny", "rules": []}
EOF

# Outbound: plaintext on OUT_LISTEN, mutual TLS to OUT_UPSTREAM, which must
# present spiffe://<td>/svc/<server> (IN_SPIFFE_ID).
cat >"$WORKDIR/out.json" <<EOF
{
$(common "$client" "$WORKDIR/out" "$WORKDIR/out-policy.json" "$OUT_CERT_PEM" "$OUT_KEY_PEM" "$out_admin"),
  "outbound": [{"listen": $(js "$OUT_LISTEN"), "service": $(js "$server"),
                "protocol": $(js "$proto"), "endpoints": [$(js "$OUT_UPSTREAM")]}]
}
EOF
# Inbound: mutual TLS on IN_LISTEN (client certificate required, verified
# against CA_PEM, SPIFFE ID checked by the policy), plaintext to IN_BACKEND.
cat >"$WORKDIR/in.json" <<EOF
{
$(common "$server" "$WORKDIR/in" "$WORKDIR/in-policy.json" "$IN_CERT_PEM" "$IN_KEY_PEM" "$in_admin"),
  "inbound": [{"listen": $(js "$IN_LISTEN"), "forward": $(js "$IN_BACKEND"),
               "protocol": $(js "$proto")}]
}
EOF

for side in out in; do
    mkdir -p "$WORKDIR/$side"
    "$BIN" -c "$WORKDIR/$side.json" --check-config >/dev/null 2>"$WORKDIR/$side.check" ||
        die "$side.json is refused: $(cat "$WORKDIR/$side.check")"
done

for side in out in; do
    "$BIN" -c "$WORKDIR/$side.json" </dev/null >"$WORKDIR/$side.log" 2>&1 &
    echo "$!" >>"$PIDFILE"
done

# Wait (bounded) for both admin listeners to report ready; a proxy that
# exits during start-up fails the adapter with its log.
ready() { # ADMIN_ADDR
    if command -v curl >/dev/null; then
        curl -fsS -o /dev/null --max-time 1 "http://$1/ready" 2>/dev/null
    else
        (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
    fi
}
mapfile -t pids <"$PIDFILE"
for ((i = 0; i < 200; i++)); do
    all=1
    for p in "${pids[@]}"; do
        kill -0 "$p" 2>/dev/null || die "meshlet-proxy (pid $p) exited during start-up:
$(tail -n 20 "$WORKDIR"/out.log "$WORKDIR"/in.log)"
    done
    ready "$out_admin" && ready "$in_admin" || all=0
    ((all)) && break
    sleep 0.1
done

if [[ -n ${VERSIONFILE:-} ]]; then
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$ROOT" status --porcelain -- lib proxy include 2>/dev/null | head -n 1)
    echo "$("$BIN" --version 2>/dev/null | head -n 1) (git $rev${dirty:+ +changes}, ${BIN#"$ROOT"/}, access log $access_log)" \
        >"$VERSIONFILE"
fi
