#!/usr/bin/env bash
# bench/run.sh: nodetunnel against OpenSSH (`ssh -N -D`), side by side, in
# one run; prints one `metric=... nodetunnel=... openssh=... ratio=...` line
# per metric and a markdown table.
#
#   bash bench/run.sh                 everything (metrics 1-9), full sizes
#   bash bench/run.sh --quick         small sizes, one repetition (a smoke test)
#   bash bench/run.sh --no-scale      skip metric 5 (idle sessions at scale)
#   bash bench/run.sh --write-docs    also rewrite the generated block of
#                                     docs/benchmarks.md with this run
#
# Environment: BENCH_REPS (3), BENCH_SESSIONS (4: sessions_per_node of the
# multi-session nodetunnel of metric 2), BENCH_SCALE ("1000 5000": node
# counts of metric 5), BENCH_SCALE_SSH_MAX (1000: the largest count also run
# with one `ssh -N` per node), BENCH_NO_BUILD=1 (use the binaries as built),
# BENCH_KEEP=1 (keep the work directory with all logs), BENCH_ONLY (a comma
# list of single,aggregate,latency,hol,echo,fairness,scale,small, or
# single_upload or single_download: run only these metrics), BENCH_ECHO_BULK (own-thread:
# where metric 7's bulk streams run in the load generator; or shared),
# BENCH_SMALL_STREAMS (10000) and BENCH_SMALL_NODES (100): metric 9's open
# streams and node addresses,
# BENCH_NT_SSH (extra lines for the [ssh] table of the nodetunnel
# instances of metrics 1-8, e.g. "window_size = 524288": to measure a knob),
# BENCH_NT1_SESSIONS (1: sessions_per_node of the nodetunnel of every row
# but the multi-session ones; more puts its streams on several SSH
# connections to the node),
# BENCH_PIN=1 (the proxies, nodetunnel and `ssh`, on CPU 0 and everything
# else of the run, the node's sshd, its servers and the load generator, on
# CPU 1: stands for a control plane with a CPU of its own; needs 2 CPUs),
# BENCH_PERF=FILE (record a perf profile of the single-session nodetunnel
# while metrics 1-4 run, into FILE; needs perf; BENCH_PERF_ARGS adds
# arguments to `perf record`, e.g. "-e page-faults").
#
# Needs root (network namespaces), OpenSSH (ssh, sshd), iproute2, cargo.
# Everything runs on loopback and in the testbed's network namespaces, each
# step is bounded in time, and every process and namespace it started is
# removed on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
TESTBED=$ROOT/tests/testbed/testbed.sh
NT=$ROOT/target/release/nodetunnel
BENCH=$HERE/target/release/nodetunnel-bench

QUICK=0
SCALE=1
WRITE_DOCS=0
for a in "$@"; do
    case $a in
    --quick) QUICK=1 ;;
    --no-scale) SCALE=0 ;;
    --write-docs) WRITE_DOCS=1 ;;
    -h | --help)
        sed -n '2,/^set -e/{/^set -e/!p}' "$0"
        exit 0
        ;;
    *)
        echo "run.sh: unknown argument $a (see --help)" >&2
        exit 2
        ;;
    esac
done
REPS=${BENCH_REPS:-3}
SESSIONS=${BENCH_SESSIONS:-4}
SCALE_COUNTS=${BENCH_SCALE:-1000 5000}
SCALE_SSH_MAX=${BENCH_SCALE_SSH_MAX:-1000}
ONLY=${BENCH_ONLY:-single,aggregate,latency,hol,echo,fairness,scale,small}
case ",$ONLY," in *,scale,*) ;; *) SCALE=0 ;; esac
SMALL=0
case ",$ONLY," in *,small,*) SMALL=1 ;; esac
SMALL_STREAMS=${BENCH_SMALL_STREAMS:-10000}
SMALL_NODES=${BENCH_SMALL_NODES:-100}
COMPARE_ONLY=$(echo "$ONLY" | tr ',' '\n' | { grep -Ev '^(scale|small)$' || true; } | paste -sd, -)
CIPHER=aes256-gcm@openssh.com
if [ $QUICK = 1 ]; then
    REPS=${BENCH_REPS:-1}
    SIZES=(--single-bytes $((64 << 20)) --aggregate-bytes-per-stream $((1 << 20)) --opens 200 --opens-secs 1 --hol-bytes $((32 << 20)) --echo-rounds 200 --fairness-secs 2)
    SCALE_COUNTS=${BENCH_SCALE:-100}
    SCALE_SSH_MAX=${BENCH_SCALE_SSH_MAX:-100}
    SMALL_STREAMS=${BENCH_SMALL_STREAMS:-1000}
    SMALL_NODES=${BENCH_SMALL_NODES:-20}
    SMALL_SIZES=(--echo-rounds 200 --settle-secs 3)
else
    SIZES=()
    SMALL_SIZES=()
fi
# The command as run, with the knobs that change what is measured.
COMMAND="bash bench/run.sh $*"
for v in BENCH_REPS BENCH_SESSIONS BENCH_SCALE BENCH_SCALE_SSH_MAX BENCH_ONLY BENCH_ECHO_BULK BENCH_SMALL_STREAMS BENCH_SMALL_NODES BENCH_NT_SSH BENCH_NT1_SESSIONS BENCH_PIN NODETUNNEL_WORKER_THREADS; do
    [ -z "${!v:-}" ] || COMMAND="$v=${!v} $COMMAND"
done

note() { echo "[run.sh] $*" >&2; }
die() {
    echo "[run.sh] error: $*" >&2
    exit 1
}

[ $WRITE_DOCS = 0 ] || [ -z "${BENCH_ONLY:-}" ] || die "--write-docs needs every metric: unset BENCH_ONLY"
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, sshd on port 22 of the node)"
for t in ssh ssh-keygen ip getconf cargo timeout; do
    command -v $t >/dev/null || die "$t not found (apt-get install openssh-client openssh-server iproute2)"
done
[ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd not found: apt-get install openssh-server"
grep -qw aes /proc/cpuinfo || note "warning: no AES-NI: nodetunnel would prefer chacha20-poly1305, while ssh is told aes256-gcm"

# --- build -------------------------------------------------------------------
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    note "building nodetunnel (release)"
    (cd "$ROOT" && timeout 3600 cargo build --release --quiet) || die "cargo build --release failed"
    note "building nodetunnel-bench (release, with the farm)"
    (cd "$HERE" && timeout 3600 cargo build --release --quiet --features farm) || die "building bench/ failed"
fi
[ -x "$NT" ] || die "$NT missing"
[ -x "$BENCH" ] || die "$BENCH missing"

# --- work directory, clean-up ------------------------------------------------
WORK=$(mktemp -d /tmp/ntbench.XXXXXX)
BED=$WORK/bed
PIDS=()
SMALL_SSHD_PID=
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    [ -z "$SMALL_SSHD_PID" ] || kill_tree "$SMALL_SSHD_PID"
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    if [ -f "$BED/prefix" ]; then
        bash "$TESTBED" down "$BED" || note "testbed down failed"
    fi
    if [ "${BENCH_KEEP:-0}" = 1 ] || [ $rc -ne 0 ]; then
        note "logs kept in $WORK"
    else
        rm -rf -- "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Start a background process and remember its pid (ip netns exec execs the
# command, so $! is the process itself).
spawn() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
}

# The pids of a process's descendants.
descendants() {
    local c
    for c in $(pgrep -P "$1" 2>/dev/null || true); do
        echo "$c"
        descendants "$c"
    done
}

# Stop a process and every descendant (sshd's per-session processes), by pid.
kill_tree() {
    local p all
    all="$(descendants "$1") $1"
    for p in $all; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in $all; do kill -KILL "$p" 2>/dev/null || true; done
}

stop_pid() {
    local p=$1 i
    kill -TERM "$p" 2>/dev/null || return 0
    for i in $(seq 1 100); do
        kill -0 "$p" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null || true
}

ssh-keygen -q -t ed25519 -N '' -C nodetunnel-bench -f "$WORK/id_ed25519"

# --- testbed: one node, servers on it -----------------------------------------
note "testbed up (1 node)"
NT_PREFIX=ntb$$ NT_NODES=1 NT_OWNER_PID=$$ NT_AUTHORIZED_KEY="$(cat "$WORK/id_ed25519.pub")" \
    bash "$TESTBED" up "$BED" >"$WORK/testbed.log" 2>&1 || die "testbed up failed: $(tail -5 "$WORK/testbed.log")"
# shellcheck disable=SC1091
. "$BED/testbed.env"
CP=$NT_CP_NS
NODE_NS=$NT_NODE_1_NS
NODE_IP=$NT_NODE_1_IP
# Many short connections end in TIME_WAIT on the side that closes first
# (the client towards the proxy, sshd towards the echo server): let connect()
# reuse them after 1 s, as tcp_tw_reuse=2 (the default) already does on
# loopback only, and widen the ephemeral port range, in these two namespaces
# only. Without this the 64-client open test runs out of ports (about 470
# opens/s whatever the proxy) and sshd's connects fail.
for ns in "$CP" "$NODE_NS"; do
    ip netns exec "$ns" sysctl -q -w net.ipv4.tcp_tw_reuse=1 "net.ipv4.ip_local_port_range=10000 65535" ||
        die "cannot set the TCP sysctls in $ns"
done
# BENCH_PIN=1: every 0.2 s, each process of the two namespaces (all
# threads; sshd's children as it forks them) goes to its CPU: the load
# generator (in the control plane's namespace, told apart by its binary) and
# everything in the node's namespace to CPU 1, the rest of the control
# plane's (nodetunnel, ssh) to CPU 0.
if [ "${BENCH_PIN:-0}" = 1 ]; then
    command -v taskset >/dev/null || die "BENCH_PIN=1 needs taskset (util-linux)"
    [ "$(nproc)" -ge 2 ] || die "BENCH_PIN=1 needs 2 CPUs, this machine has $(nproc)"
    pin_loop() {
        local pid cpu
        while sleep 0.2; do
            for pid in $(ip netns pids "$CP" 2>/dev/null); do
                cpu=0
                [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" != "$BENCH" ] || cpu=1
                taskset -a -c -p "$cpu" "$pid" >/dev/null 2>&1 || true
            done
            for pid in $(ip netns pids "$NODE_NS" 2>/dev/null); do
                taskset -a -c -p 1 "$pid" >/dev/null 2>&1 || true
            done
        done
    }
    pin_loop &
    PIDS+=($!)
    note "BENCH_PIN=1: proxies on CPU 0, the node and the load generator on CPU 1"
fi
SINK=$NODE_IP:9001
SOURCE=$NODE_IP:9002
ECHO=$NODE_IP:9003
# Uploads through the gRPC front door end here: its protocol has no
# half-close, so the client cannot send EOF to the plain sink and then read
# the count.
COUNTED_SINK=$NODE_IP:9005

spawn "$WORK/serve.log" ip netns exec "$NODE_NS" "$BENCH" serve --sink "$SINK" --counted-sink "$COUNTED_SINK" \
    --source "$SOURCE" --echo "$ECHO" --lifetime-secs 7200

SSH_OPTS=(-F /dev/null -i "$WORK/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=yes
    -o "UserKnownHostsFile=$NT_KNOWN_HOSTS" -o GlobalKnownHostsFile=/dev/null
    -o "Ciphers=$CIPHER" -o Compression=no -o ServerAliveInterval=15 -o ServerAliveCountMax=3
    -o ExitOnForwardFailure=yes -o ConnectTimeout=10)

# The cipher OpenSSH negotiates with these options (a separate, verbose,
# one-shot connection: the benchmarked `ssh -D` runs without -v).
SSH_CIPHER=$(ip netns exec "$CP" timeout 30 ssh -v "${SSH_OPTS[@]}" "root@$NODE_IP" true 2>&1 |
    sed -n 's/.*kex: server->client cipher: \([^ ]*\).*/\1/p' | head -1)
[ -n "$SSH_CIPHER" ] || die "could not connect with ssh to $NODE_IP to check the cipher"

# --- nodetunnel (two instances) and ssh -D, in the control-plane namespace ---
write_config() { # name sessions_per_node socks5_port [more [proxy] lines]
    cat >"$WORK/$1.toml" <<EOF
[ssh]
user = "root"
identity = "$WORK/id_ed25519"
known_hosts = "$NT_KNOWN_HOSTS"
host_key_policy = "strict"
sessions_per_node = $2
${BENCH_NT_SSH:-}

[admin]
listen = ""

[proxy]
uds = "$WORK/$1.sock"
socks5 = "127.0.0.1:$3"
${4:-}

[[nodes]]
name = "node-1"
addresses = ["$NODE_IP"]
EOF
}
write_config nt1 "${BENCH_NT1_SESSIONS:-1}" 1080 "grpc_uds = \"$WORK/nt1-grpc.sock\""
write_config ntm "$SESSIONS" 1082
spawn "$WORK/nt1.log" ip netns exec "$CP" env -u RUST_LOG "$NT" --log-format json \
    --log-level "info,russh::client::kex=debug" serve --config "$WORK/nt1.toml"
NT1_PID=$LAST_PID
spawn "$WORK/ntm.log" ip netns exec "$CP" env -u RUST_LOG "$NT" --log-format json \
    --log-level "info,russh::client::kex=debug" serve --config "$WORK/ntm.toml"
NTM_PID=$LAST_PID
spawn "$WORK/ssh-D.log" ip netns exec "$CP" ssh -N -D 127.0.0.1:1081 "${SSH_OPTS[@]}" "root@$NODE_IP"
SSH_PID=$LAST_PID

for proxy in socks5://127.0.0.1:1080 "http+unix://$WORK/nt1.sock" "grpc+unix://$WORK/nt1-grpc.sock" socks5://127.0.0.1:1082 socks5://127.0.0.1:1081; do
    ip netns exec "$CP" timeout 60 "$BENCH" wait --proxy "$proxy" --echo "$ECHO" --timeout-secs 40 ||
        die "$proxy never carried an echo; logs in $WORK"
done
# `ip netns exec` and `env` exec: the pids are nodetunnel's and ssh's own.
[ "$(cat /proc/$NT1_PID/comm)" = nodetunnel ] || die "pid $NT1_PID is $(cat /proc/$NT1_PID/comm), not nodetunnel"
[ "$(cat /proc/$SSH_PID/comm)" = ssh ] || die "pid $SSH_PID is $(cat /proc/$SSH_PID/comm), not ssh"
NT_CIPHER=$(grep -o 'cipher: "[^"]*"' "$WORK/nt1.log" | head -1 | sed 's/cipher: "\(.*\)"/\1/' || true)
[ -n "$NT_CIPHER" ] || NT_CIPHER=$(grep -m1 'negotiated algorithms' "$WORK/nt1.log" | grep -oE 'aes256-gcm@openssh.com|chacha20-poly1305@openssh.com|aes256-ctr|aes128-ctr' | head -1 || true)
[ -n "$NT_CIPHER" ] || NT_CIPHER="(not logged)"
note "ciphers: nodetunnel $NT_CIPHER, ssh $SSH_CIPHER"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
RESULTS=$WORK/results.tsv
: >"$RESULTS"

# --- metrics 1-4, 6-8 -----------------------------------------------------
PERF_PID=
if [ -n "${BENCH_PERF:-}" ] && [ -n "$COMPARE_ONLY" ]; then
    command -v perf >/dev/null || die "BENCH_PERF needs perf (apt-get install linux-perf)"
    # shellcheck disable=SC2086 # BENCH_PERF_ARGS is a list of words
    perf record -g ${BENCH_PERF_ARGS:-} -o "$BENCH_PERF" -p "$NT1_PID" >"$WORK/perf.log" 2>&1 &
    PERF_PID=$!
fi
[ -z "$COMPARE_ONLY" ] || note "metrics 1-4, 6-8 (reps=$REPS, only $COMPARE_ONLY)"
[ -z "$COMPARE_ONLY" ] || ip netns exec "$CP" timeout 3600 "$BENCH" compare \
    --nt-socks5 socks5://127.0.0.1:1080 \
    --nt-http "http+unix://$WORK/nt1.sock" --nt-grpc "grpc+unix://$WORK/nt1-grpc.sock" --nt-pid "$NT1_PID" \
    --counted-sink "$COUNTED_SINK" \
    --nt-multi-socks5 socks5://127.0.0.1:1082 --nt-multi-pid "$NTM_PID" --nt-multi-sessions "$SESSIONS" \
    --ssh-socks5 socks5://127.0.0.1:1081 --ssh-pid "$SSH_PID" \
    --sink "$SINK" --source "$SOURCE" --echo "$ECHO" \
    --echo-bulk "${BENCH_ECHO_BULK:-own-thread}" \
    --reps "$REPS" --clk-tck "$(getconf CLK_TCK)" --results "$RESULTS" --only "$COMPARE_ONLY" "${SIZES[@]}" \
    2> >(tee "$WORK/compare.log" >&2) || die "compare failed; logs in $WORK"

if [ -n "$PERF_PID" ]; then
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    note "perf profile in $BENCH_PERF"
fi
stop_pid "$NT1_PID"
stop_pid "$NTM_PID"
stop_pid "$SSH_PID"

# --- metric 5: idle sessions at scale -------------------------------------------
FARM_NOTE=""
if [ $SCALE = 1 ] && [ -n "$SCALE_COUNTS" ]; then
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    ssh-keygen -q -t ed25519 -N '' -C farm -f "$WORK/farm_host_key"
    spawn "$WORK/farm.log" ip netns exec "$CP" "$BENCH" farm --listen 0.0.0.0:2222 \
        --host-key "$WORK/farm_host_key" --authorized-key "$WORK/id_ed25519.pub" --lifetime-secs 3600 --threads 1
    FARM_PID=$LAST_PID
    sleep 0.5
    kill -0 "$FARM_PID" 2>/dev/null || die "the farm did not start: $(cat "$WORK/farm.log")"
    FARM_NOTE="one russh server (nodetunnel-bench farm, one thread) on port 2222 of every 127.100.x.y address, in the control-plane namespace"
    kv() { sed -n "s/^$1=//p" "$2"; }
    # Baseline: the same process with one node.
    ip netns exec "$CP" "$BENCH" scale-config --nodes 1 --out "$WORK/scale-1.toml" \
        --known-hosts "$WORK/scale-1.known_hosts" --identity "$WORK/id_ed25519" --host-key-pub "$WORK/farm_host_key.pub"
    ip netns exec "$CP" timeout 300 "$BENCH" scale-nt --nodetunnel "$NT" --config "$WORK/scale-1.toml" --nodes 1 \
        --log "$WORK/scale-nt-1.log" --clk-tck "$(getconf CLK_TCK)" >"$WORK/scale-nt-1.out" || die "scale baseline failed"
    BASE_RSS=$(kv rss_kib "$WORK/scale-nt-1.out")
    for n in $SCALE_COUNTS; do
        note "metric 5: $n idle sessions"
        ip netns exec "$CP" "$BENCH" scale-config --nodes "$n" --out "$WORK/scale-$n.toml" \
            --known-hosts "$WORK/scale-$n.known_hosts" --identity "$WORK/id_ed25519" --host-key-pub "$WORK/farm_host_key.pub"
        ip netns exec "$CP" timeout 600 "$BENCH" scale-nt --nodetunnel "$NT" --config "$WORK/scale-$n.toml" --nodes "$n" \
            --timeout-secs 300 --log "$WORK/scale-nt-$n.log" --clk-tck "$(getconf CLK_TCK)" >"$WORK/scale-nt-$n.out" ||
            die "scale $n (nodetunnel) failed; logs in $WORK"
        cat "$WORK/scale-nt-$n.out" >&2
        nt_s=$(kv established_s "$WORK/scale-nt-$n.out")
        nt_rss=$(kv rss_kib "$WORK/scale-nt-$n.out")
        nt_per=$(awk -v a="$nt_rss" -v b="$BASE_RSS" -v n="$n" 'BEGIN{printf "%.1f", (a-b)/n}')
        ssh_s=NaN ssh_per=NaN ssh_raw="not run (BENCH_SCALE_SSH_MAX=$SCALE_SSH_MAX)"
        if [ "$n" -le "$SCALE_SSH_MAX" ]; then
            ip netns exec "$CP" timeout 900 "$BENCH" scale-ssh --nodes "$n" --identity "$WORK/id_ed25519" \
                --known-hosts "$WORK/scale-$n.known_hosts" --cipher "$CIPHER" --run-id "$$-$n" \
                --concurrency 32 --timeout-secs 600 >"$WORK/scale-ssh-$n.out" 2>"$WORK/scale-ssh-$n.err" ||
                die "scale $n (ssh) failed: $(tail -3 "$WORK/scale-ssh-$n.err")"
            cat "$WORK/scale-ssh-$n.out" >&2
            ssh_s=$(kv established_s "$WORK/scale-ssh-$n.out")
            ssh_per=$(awk -v a="$(kv pss_kib_sum "$WORK/scale-ssh-$n.out")" -v n="$n" 'BEGIN{printf "%.1f", a/n}')
            ssh_rss=$(awk -v a="$(kv rss_kib_sum "$WORK/scale-ssh-$n.out")" -v n="$n" 'BEGIN{printf "%.1f", a/n}')
            ssh_raw="ssh: PSS per process (shown), RSS per process $ssh_rss KiB"
        fi
        goal_t="-"
        [ "$n" -ge 5000 ] && goal_t="nt<60"
        printf 'idle_sessions_%s_establish_s\ts\t%s\t%s\t%s\tnodetunnel max_handshakes_in_flight=32, ssh: 32 `ssh -f -N` started at once\n' \
            "$n" "$nt_s" "$ssh_s" "$goal_t" >>"$RESULTS"
        printf 'idle_sessions_%s_KiB_per_session\tKiB\t%s\t%s\tnt<=64\tnt: (RSS with %s sessions %s KiB - RSS with 1 session %s KiB) / %s; %s\n' \
            "$n" "$nt_per" "$ssh_per" "$n" "$nt_rss" "$BASE_RSS" "$n" "$ssh_raw" >>"$RESULTS"
    done
    stop_pid "$FARM_PID"
fi
# --- metric 9: many small streams across many nodes -----------------------------
# One node namespace stands for SMALL_NODES nodes: it gets SMALL_NODES more
# addresses (10.240.0.101...), a second sshd (node 1's host key) listens on
# port 2222 of all of them (one wildcard socket: sshd takes at most 16
# ListenAddress sockets; it forks a process per session anyway), and an echo
# server on port 9004 of all of them. nodetunnel's inventory lists each
# address as a node (one session each); OpenSSH gets one `ssh -N -D` per
# address.
SMALL_NOTE=""
if [ $SMALL = 1 ]; then
    [ "$SMALL_NODES" -ge 1 ] && [ "$SMALL_NODES" -le 150 ] || die "BENCH_SMALL_NODES=$SMALL_NODES: 1 to 150"
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    # The proxy, the echo server and the load generator each hold one
    # descriptor per stream, and nodetunnel one more per node.
    [ "$(ulimit -n)" -ge $((SMALL_STREAMS + SMALL_NODES + 1000)) ] ||
        die "metric 9: $SMALL_STREAMS streams need more than the $(ulimit -n) descriptors allowed (ulimit -Hn $(ulimit -Hn)): lower BENCH_SMALL_STREAMS"
    note "metric 9: $SMALL_STREAMS small streams over $SMALL_NODES nodes"
    SMALL_ADDRS=()
    SMALL_TARGETS=()
    sed -e '/^ListenAddress/d' -e '/^PidFile/d' "$BED/n1/sshd_config" >"$WORK/small-sshd_config"
    printf 'ListenAddress 0.0.0.0:2222\nPidFile %s\n' "$WORK/small-sshd.pid" >>"$WORK/small-sshd_config"
    : >"$WORK/small_known_hosts"
    HOSTKEY=$(awk '{print $1, $2}' "$BED/n1/ssh_host_ed25519_key.pub")
    for k in $(seq 1 "$SMALL_NODES"); do
        a=10.240.0.$((100 + k))
        SMALL_ADDRS+=("$a")
        SMALL_TARGETS+=("$a:9004")
        ip -n "$NODE_NS" addr add "$a/32" dev eth0
        echo "[$a]:2222 $HOSTKEY" >>"$WORK/small_known_hosts"
    done
    ip netns exec "$NODE_NS" /usr/sbin/sshd -f "$WORK/small-sshd_config" -E "$WORK/small-sshd.log" ||
        die "metric 9: the second sshd did not start: $(tail -5 "$WORK/small-sshd.log")"
    for _ in $(seq 1 50); do
        [ -s "$WORK/small-sshd.pid" ] && break
        sleep 0.1
    done
    SMALL_SSHD_PID=$(cat "$WORK/small-sshd.pid") || die "metric 9: no pid file from the second sshd"
    spawn "$WORK/small-serve.log" ip netns exec "$NODE_NS" "$BENCH" serve --echo 0.0.0.0:9004 --lifetime-secs 3600
    TARGETS=$(
        IFS=,
        echo "${SMALL_TARGETS[*]}"
    )

    # nodetunnel: one process, one session per node.
    {
        printf '[ssh]\nuser = "root"\nidentity = "%s"\nknown_hosts = "%s"\nhost_key_policy = "strict"\nport = 2222\nsessions_per_node = 1\n' \
            "$WORK/id_ed25519" "$WORK/small_known_hosts"
        printf '\n[admin]\nlisten = ""\n\n[proxy]\nsocks5 = "127.0.0.1:1090"\nmax_connections = %s\n' $((SMALL_STREAMS + 1000))
        for k in $(seq 1 "$SMALL_NODES"); do
            printf '\n[[nodes]]\nname = "small-%s"\naddresses = ["%s"]\n' "$k" "${SMALL_ADDRS[$((k - 1))]}"
        done
    } >"$WORK/small.toml"
    spawn "$WORK/small-nt.log" ip netns exec "$CP" env -u RUST_LOG "$NT" --log-format json --log-level info \
        serve --config "$WORK/small.toml"
    SMALL_NT_PID=$LAST_PID
    ip netns exec "$CP" timeout 1200 "$BENCH" small --proxies socks5://127.0.0.1:1090 --targets "$TARGETS" \
        --streams "$SMALL_STREAMS" --mem-pids "$SMALL_NT_PID" --mem rss "${SMALL_SIZES[@]}" \
        >"$WORK/small-nt.out" 2> >(tee "$WORK/small-nt.err" >&2) ||
        die "metric 9 (nodetunnel) failed: $(tail -3 "$WORK/small-nt.err")"
    stop_pid "$SMALL_NT_PID"
    cat "$WORK/small-nt.out" >&2

    # OpenSSH: one `ssh -N -D` per node, listening below the ephemeral port
    # range (10000-65535 here), which the streams above may still hold.
    SMALL_SSH_OPTS=("${SSH_OPTS[@]}")
    for i in "${!SMALL_SSH_OPTS[@]}"; do
        [ "${SMALL_SSH_OPTS[$i]}" != "UserKnownHostsFile=$NT_KNOWN_HOSTS" ] ||
            SMALL_SSH_OPTS[i]="UserKnownHostsFile=$WORK/small_known_hosts"
    done
    SMALL_SSH_PIDS=()
    SMALL_PROXIES=()
    for k in $(seq 1 "$SMALL_NODES"); do
        spawn "$WORK/small-ssh-$k.log" ip netns exec "$CP" ssh -N -D "127.0.0.1:$((2000 + k))" -p 2222 "${SMALL_SSH_OPTS[@]}" \
            "root@${SMALL_ADDRS[$((k - 1))]}"
        SMALL_SSH_PIDS+=("$LAST_PID")
        SMALL_PROXIES+=("socks5://127.0.0.1:$((2000 + k))")
    done
    ip netns exec "$CP" timeout 1200 "$BENCH" small --proxies "$(
        IFS=,
        echo "${SMALL_PROXIES[*]}"
    )" --targets "$TARGETS" --streams "$SMALL_STREAMS" --mem-pids "$(
        IFS=,
        echo "${SMALL_SSH_PIDS[*]}"
    )" --mem pss "${SMALL_SIZES[@]}" >"$WORK/small-ssh.out" 2> >(tee "$WORK/small-ssh.err" >&2) ||
        die "metric 9 (ssh) failed: $(tail -3 "$WORK/small-ssh.err")"
    for p in "${SMALL_SSH_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${SMALL_SSH_PIDS[@]}"; do stop_pid "$p"; done
    cat "$WORK/small-ssh.out" >&2
    kill_tree "$SMALL_SSHD_PID"
    SMALL_SSHD_PID=

    kv() { sed -n "s/^$1=//p" "$2"; }
    if [ $((SMALL_STREAMS % 1000)) = 0 ]; then sname=small$((SMALL_STREAMS / 1000))k; else sname=small$SMALL_STREAMS; fi
    NTO=$WORK/small-nt.out
    SSHO=$WORK/small-ssh.out
    printf '%s_KiB_per_stream\tKiB\t%s\t%s\t-\tnt: (RSS %s KiB with the streams open - %s KiB before) / %s; ssh: PSS sum of %s `ssh -N -D` (%s KiB - %s KiB) / %s\n' \
        "$sname" "$(kv kib_per_stream "$NTO")" "$(kv kib_per_stream "$SSHO")" \
        "$(kv mem_after_kib "$NTO")" "$(kv mem_before_kib "$NTO")" "$SMALL_STREAMS" \
        "$SMALL_NODES" "$(kv mem_after_kib "$SSHO")" "$(kv mem_before_kib "$SSHO")" "$SMALL_STREAMS" >>"$RESULTS"
    printf '%s_echo_p99_us\tus\t%s\t%s\tratio<=1.0\techo p50 nt %s / ssh %s us (%s / %s echoes); small messages echoed per second nt %s / ssh %s of %s offered, their p99 nt %s / ssh %s us; all opened in nt %s / ssh %s s\n' \
        "$sname" "$(kv echo_p99_us "$NTO")" "$(kv echo_p99_us "$SSHO")" \
        "$(kv echo_p50_us "$NTO")" "$(kv echo_p50_us "$SSHO")" "$(kv echo_rounds "$NTO")" "$(kv echo_rounds "$SSHO")" \
        "$(kv small_msgs_per_s "$NTO")" "$(kv small_msgs_per_s "$SSHO")" "$(kv small_msgs_offered_per_s "$NTO")" \
        "$(kv small_msg_p99_us "$NTO")" "$(kv small_msg_p99_us "$SSHO")" \
        "$(kv opened_s "$NTO")" "$(kv opened_s "$SSHO")" >>"$RESULTS"
    SMALL_NOTE="$SMALL_STREAMS streams over $SMALL_NODES node addresses of one node namespace (one sshd listening on port 2222 of all), 16 bytes echoed every second on each; nodetunnel one process (sessions_per_node = 1), OpenSSH one \`ssh -N -D\` per node"
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report --------------------------------------------------------------------
"$BENCH" report --results "$RESULTS" --markdown "$WORK/table.md" | tee "$WORK/lines.txt"

CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
MEM=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)
RUSSH=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/vendor/russh/Cargo.toml" | head -1)
{
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') with \`$COMMAND\`."
    echo
    echo "- Machine: $CPU_MODEL, $(nproc) cores, $MEM, Linux $(uname -r); load average $LOAD_START at the start, $LOAD_END at the end."
    echo "- nodetunnel $("$NT" --version 2>/dev/null | awk '{print $2}') (release build, russh $RUSSH vendored), $(rustc --version | awk '{print $1" "$2}')."
    echo "- OpenSSH: $(ssh -V 2>&1) as client (\`ssh -N -D\`) and as the node's sshd."
    echo "- Cipher: nodetunnel negotiated $NT_CIPHER, ssh $SSH_CIPHER."
    echo "- Repetitions: $REPS (medians shown; systems take turns within a repetition)."
    echo "- nodetunnel: sessions_per_node = 1 except the \`aggregate*_MBps\` rows without \`.spn1\` (sessions_per_node = $SESSIONS)."
    [ -n "$FARM_NOTE" ] && echo "- Idle-session farm: $FARM_NOTE."
    [ -n "$SMALL_NOTE" ] && echo "- Many small streams: $SMALL_NOTE."
    echo
    cat "$WORK/table.md"
} >"$WORK/report.md"
mkdir -p "$HERE/results"
cp "$WORK/report.md" "$HERE/results/latest.md"
cp "$RESULTS" "$HERE/results/latest.tsv"
cp "$WORK/lines.txt" "$HERE/results/latest.txt"
echo
cat "$WORK/report.md"

if [ $WRITE_DOCS = 1 ]; then
    DOC=$ROOT/docs/benchmarks.md
    grep -q '^<!-- bench:begin -->$' "$DOC" && grep -q '^<!-- bench:end -->$' "$DOC" ||
        die "$DOC has no <!-- bench:begin --> / <!-- bench:end --> markers"
    awk -v f="$WORK/report.md" '
        /^<!-- bench:begin -->$/ { print; while ((getline l < f) > 0) print l; skip = 1; next }
        /^<!-- bench:end -->$/ { skip = 0 }
        !skip { print }' "$DOC" >"$WORK/benchmarks.md"
    cp "$WORK/benchmarks.md" "$DOC"
    note "updated $DOC"
fi
