#!/usr/bin/env bash
# testbed.sh: a multi-node "cluster" on one machine, built from network
# namespaces, with a real OpenSSH sshd on port 22 of every node.
#
#   testbed.sh up DIR            build a bed; DIR holds all its state
#   testbed.sh down DIR          tear it down (idempotent)
#   testbed.sh stop-node DIR I   kill -9 node I's sshd (listener and sessions)
#   testbed.sh start-node DIR I  start node I's sshd again (same key, same port)
#   testbed.sh link-down DIR I   set node I's link down on the bridge (blackhole)
#   testbed.sh link-up DIR I     undo link-down
#   testbed.sh gc                remove beds (and their DIRs) left by crashed runs
#   testbed.sh purge             remove every bed of this script, owned or not, and
#                                its owner directory: for CI before the tests, when
#                                no test can be running
#
# Environment for `up`:
#   NT_PREFIX           namespace prefix, ^nt[a-z0-9]{1,20}$ (default nt$$)
#   NT_NODES            number of nodes, 1..200 (default 3)
#   NT_AUTHORIZED_KEY   public key line authorized for root on every node (required)
#   NT_OWNER_PID        the long-lived process that owns the bed; `gc` removes the
#                       bed once it is gone (default: the caller, $PPID)
#   NT_READY_TIMEOUT    seconds to wait for each sshd (default 20)
#   NT_SSHD             sshd binary (default /usr/sbin/sshd)
# Environment for every command:
#   NT_OWNER_DIR        where beds record their owners (default
#                       /run/nodetunnel-testbed; created on first `up`, so it
#                       is missing on a fresh machine and after a reboot)
#
# Layout (nothing is added to the root namespace but the namespace files):
#   PREFIX-fab  bridge br0; ports v-cp, v-n1..v-nN (veth peers of each eth0)
#   PREFIX-cp   eth0 10.240.0.1/24, only the connected route
#   PREFIX-nI   eth0 10.240.0.(10+I)/24; lo: pod IP 10.244.I.10/32 and the
#               service IP 10.96.0.10/32; sshd on 10.240.0.(10+I):22
# cp and the nodes have permanent neighbour entries for each other, so a link
# that is down is a pure blackhole (no ARP failure, no ICMP).
#
# `up` writes DIR/testbed.env (KEY='VALUE' lines, values never contain a
# quote) and DIR/known_hosts (`10.240.0.11 ssh-ed25519 AAAA...` lines).
set -Eeuo pipefail

SSHD=${NT_SSHD:-/usr/sbin/sshd}
OWNER_DIR=${NT_OWNER_DIR:-/run/nodetunnel-testbed}
NETNS_DIR=/var/run/netns
CP_IP=10.240.0.1
NODE_NET=10.240.0.0/24
SERVICE_IP=10.96.0.10
SELF=$$

die() {
    echo "testbed.sh: error: $*" >&2
    exit 1
}
note() { echo "testbed.sh: $*" >&2; }

# Any command that fails outside a condition ends the script (set -e); say
# which one, where, and with what status, so that a failure is never silent.
# (The command's own stderr has already gone to ours.)
on_err() {
    local rc=$1 line=$2 cmd=$3
    echo "testbed.sh: error: command failed with exit status $rc at line $line: $cmd" >&2
}
trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR

require_root() {
    [ "$(id -u)" -eq 0 ] ||
        die "must run as root (it creates network namespaces and runs sshd); run the tests as root, as CI does"
}

require_tools() {
    [ -x "$SSHD" ] || die "OpenSSH sshd not found at $SSHD: apt-get install openssh-server (bash .ci/run does this)"
    command -v ssh-keygen >/dev/null || die "ssh-keygen not found: apt-get install openssh-client"
    command -v ip >/dev/null || die "ip not found: apt-get install iproute2"
    command -v pgrep >/dev/null || die "pgrep not found: apt-get install procps"
}

node_ip() { echo "10.240.0.$((10 + $1))"; }

# A process is alive if it exists and is not a zombie.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# Start time (clock ticks since boot) of a pid, to tell a pid from a reused one.
start_time() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo "${20}"
}

descendants() {
    local p
    for p in $(pgrep -P "$1" 2>/dev/null || true); do
        echo "$p"
        descendants "$p"
    done
}

# kill -9 a process and all its descendants: freeze the tree first (so no
# process forks a child we would miss), then kill every process in it.
kill_tree() {
    local root=$1 all p changed seen
    [[ $root =~ ^[0-9]+$ ]] || return 0
    [ "$root" != "$SELF" ] || return 0
    alive "$root" || return 0
    kill -STOP "$root" 2>/dev/null || return 0
    all=$root
    seen=" $root "
    changed=1
    while [ $changed = 1 ]; do
        changed=0
        for p in $(descendants "$root"); do
            case $seen in *" $p "*) continue ;; esac
            kill -STOP "$p" 2>/dev/null || true
            seen="$seen$p "
            all="$all $p"
            changed=1
        done
    done
    # shellcheck disable=SC2086
    kill -KILL $all 2>/dev/null || true
    wait_dead $all
}

# Wait (bounded) until every pid given is gone or a zombie.
wait_dead() {
    local deadline=$((SECONDS + 10)) p left
    while :; do
        left=
        for p in "$@"; do alive "$p" && left="$left $p"; done
        [ -z "$left" ] && return 0
        [ $SECONDS -lt $deadline ] || die "processes still alive 10s after kill -9:$left"
        sleep 0.02
    done
}

list_ns() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$1-(fab|cp|n[0-9]+)\$" || true
}

load_dir() {
    DIR=$1
    [ -f "$DIR/prefix" ] || die "$DIR holds no testbed (no $DIR/prefix)"
    PREFIX=$(cat "$DIR/prefix")
    NODES=$(cat "$DIR/nodes")
    FAB=$PREFIX-fab
    CP=$PREFIX-cp
}

check_index() {
    [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$NODES" ] ||
        die "node index must be 1..$NODES, got '$1'"
}

# Does sshd answer with an SSH banner on ADDR:22, tried from inside NS?
probe_ssh() {
    local ns=$1 addr=$2
    timeout 5 ip netns exec "$ns" bash -c \
        "exec 3<>/dev/tcp/$addr/22 && IFS= read -r -t 3 line <&3 && [[ \$line == SSH-2.0-* ]]" \
        >/dev/null 2>&1
}

start_sshd() {
    local i=$1 nd=$DIR/n$1 ns=$PREFIX-n$1
    if [ -f "$nd/sshd.pid" ] && alive "$(cat "$nd/sshd.pid")"; then
        die "sshd of node-$i is already running (pid $(cat "$nd/sshd.pid"))"
    fi
    rm -f "$nd/sshd.pid"
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
    # sshd daemonizes; its pid lands in $nd/sshd.pid.
    ip netns exec "$ns" "$SSHD" -f "$nd/sshd_config" -E "$nd/sshd.log" ||
        die "sshd of node-$i failed to start; its log $nd/sshd.log says: $(tail -n 20 "$nd/sshd.log" 2>/dev/null)"
}

wait_sshd() {
    local i=$1 nd=$DIR/n$1 ns=$PREFIX-n$1 ip timeout deadline
    ip=$(node_ip "$i")
    timeout=${NT_READY_TIMEOUT:-20}
    deadline=$((SECONDS + timeout))
    until [ -s "$nd/sshd.pid" ] && probe_ssh "$ns" "$ip"; do
        [ $SECONDS -lt $deadline ] ||
            die "sshd of node-$i did not accept connections on $ip:22 within ${timeout}s; $nd/sshd.log says: $(tail -n 20 "$nd/sshd.log" 2>/dev/null)"
        sleep 0.05
    done
}

stop_sshd() {
    local i=$1 nd=$DIR/n$1 ns=$PREFIX-n$1 p
    if [ -f "$nd/sshd.pid" ]; then
        kill_tree "$(cat "$nd/sshd.pid")"
        rm -f "$nd/sshd.pid"
    fi
    # Sessions whose parent died before we got to them.
    if [ -e "$NETNS_DIR/$ns" ]; then
        for p in $(ip netns pids "$ns" 2>/dev/null || true); do
            [ "$(cat "/proc/$p/comm" 2>/dev/null)" = sshd ] && kill_tree "$p"
        done
    fi
    return 0
}

mac_of() {
    ip -n "$1" -o link show "$2" | grep -oE 'link/ether [0-9a-f:]+' | awk '{print $2}'
}

# Connect a veth: PORT end on the bridge in the fabric, eth0 end in NS.
attach() {
    local port=$1 ns=$2 addr=$3
    ip -n "$FAB" link add "$port" type veth peer name eth0 netns "$ns"
    ip -n "$FAB" link set "$port" master br0
    ip -n "$FAB" link set "$port" up
    ip -n "$ns" addr add "$addr" dev eth0
    ip -n "$ns" link set eth0 up
}

new_ns() {
    ip netns add "$1"
    ip netns exec "$1" sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 \
        net.ipv6.conf.default.disable_ipv6=1 >/dev/null 2>&1 || true
    ip -n "$1" link set lo up
}

write_owner() {
    local owner=$1
    alive "$owner" || die "NT_OWNER_PID $owner is not a live process"
    mkdir -p "$OWNER_DIR"
    echo "$owner $(start_time "$owner") $DIR" >"$OWNER_DIR/$PREFIX"
}

owner_alive() {
    local f=$OWNER_DIR/$1 pid st dir
    [ -f "$f" ] || return 1
    read -r pid st dir <"$f" || return 1
    alive "$pid" && [ "$(start_time "$pid")" = "$st" ]
}

on_up_exit() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        note "up failed (exit $rc); tearing the bed down"
        (down_prefix "$PREFIX" "$DIR") || note "teardown after failed up failed too"
    fi
    exit $rc
}

cmd_up() {
    [ $# -eq 1 ] || die "usage: testbed.sh up DIR"
    require_root
    require_tools
    PREFIX=${NT_PREFIX:-nt$$}
    NODES=${NT_NODES:-3}
    local key=${NT_AUTHORIZED_KEY:-} owner=${NT_OWNER_PID:-$PPID} i ns nd ip hk cpmac mac env kh
    [[ $PREFIX =~ ^nt[a-z0-9]{1,20}$ ]] || die "NT_PREFIX must match ^nt[a-z0-9]{1,20}\$, got '$PREFIX'"
    [[ $NODES =~ ^[0-9]+$ ]] && [ "$NODES" -ge 1 ] && [ "$NODES" -le 200 ] ||
        die "NT_NODES must be 1..200, got '$NODES'"
    [[ $key =~ ^(ssh-|ecdsa-|sk-)[a-z0-9@.-]+\ [A-Za-z0-9+/=]+ ]] ||
        die "NT_AUTHORIZED_KEY must be a public key line (ssh-ed25519 AAAA...), got '$key'"
    [[ $key != *"'"* && $key != *$'\n'* ]] || die "NT_AUTHORIZED_KEY must be one line without quotes"
    mkdir -p "$1"
    DIR=$(cd "$1" && pwd)
    [[ $DIR != *"'"* && $DIR != *" "* ]] || die "DIR must not contain quotes or spaces: $DIR"
    [ ! -e "$DIR/prefix" ] || die "$DIR already holds a testbed ($(cat "$DIR/prefix")); run down first"
    [ -z "$(list_ns "$PREFIX")" ] || die "namespaces with prefix $PREFIX already exist: $(list_ns "$PREFIX" | xargs)"
    FAB=$PREFIX-fab
    CP=$PREFIX-cp

    # Ownership first, so that gc never takes a bed that is being built.
    write_owner "$owner"
    echo "$PREFIX" >"$DIR/prefix"
    echo "$NODES" >"$DIR/nodes"
    trap on_up_exit EXIT

    new_ns "$FAB"
    ip -n "$FAB" link add br0 type bridge
    ip -n "$FAB" link set br0 up
    new_ns "$CP"
    attach v-cp "$CP" "$CP_IP/24"
    cpmac=$(mac_of "$CP" eth0)
    for i in $(seq 1 "$NODES"); do
        ns=$PREFIX-n$i
        ip=$(node_ip "$i")
        new_ns "$ns"
        attach "v-n$i" "$ns" "$ip/24"
        ip -n "$ns" addr add "10.244.$i.10/32" dev lo
        ip -n "$ns" addr add "$SERVICE_IP/32" dev lo
        mac=$(mac_of "$ns" eth0)
        ip -n "$CP" neigh replace "$ip" lladdr "$mac" dev eth0 nud permanent
        ip -n "$ns" neigh replace "$CP_IP" lladdr "$cpmac" dev eth0 nud permanent
    done

    for i in $(seq 1 "$NODES"); do
        nd=$DIR/n$i
        mkdir -p "$nd"
        ssh-keygen -q -t ed25519 -N '' -C "node-$i" -f "$nd/ssh_host_ed25519_key"
        printf '%s\n' "$key" >"$nd/authorized_keys"
        cat >"$nd/sshd_config" <<EOF
# node-$i of testbed $PREFIX
ListenAddress $(node_ip "$i"):22
AddressFamily inet
HostKey $nd/ssh_host_ed25519_key
PidFile $nd/sshd.pid
AuthorizedKeysFile $nd/authorized_keys
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
AllowStreamLocalForwarding no
GatewayPorts no
X11Forwarding no
PermitTunnel no
UseDNS no
PrintMotd no
LogLevel VERBOSE
MaxStartups 1000:30:2000
MaxSessions 10000
MaxAuthTries 6
LoginGraceTime 30
ClientAliveInterval 0
EOF
        start_sshd "$i"
    done
    for i in $(seq 1 "$NODES"); do wait_sshd "$i"; done
    # Every node must be reachable from the control plane.
    for i in $(seq 1 "$NODES"); do
        probe_ssh "$CP" "$(node_ip "$i")" || die "node-$i ($(node_ip "$i"):22) not reachable from $CP"
    done

    kh=$DIR/known_hosts
    env=$DIR/testbed.env
    : >"$kh.tmp"
    {
        echo "NT_PREFIX='$PREFIX'"
        echo "NT_DIR='$DIR'"
        echo "NT_NODES='$NODES'"
        echo "NT_FABRIC_NS='$FAB'"
        echo "NT_CP_NS='$CP'"
        echo "NT_CP_IP='$CP_IP'"
        echo "NT_NODE_NET='$NODE_NET'"
        echo "NT_SERVICE_IP='$SERVICE_IP'"
        echo "NT_SSH_USER='root'"
        echo "NT_SSH_PORT='22'"
        echo "NT_KNOWN_HOSTS='$kh'"
        echo "NT_NODE_NAMES='$(for i in $(seq 1 "$NODES"); do printf 'node-%s ' "$i"; done | sed 's/ $//')'"
        for i in $(seq 1 "$NODES"); do
            nd=$DIR/n$i
            hk=$(awk '{print $1" "$2}' "$nd/ssh_host_ed25519_key.pub")
            echo "$(node_ip "$i") $hk" >>"$kh.tmp"
            echo "NT_NODE_${i}_NAME='node-$i'"
            echo "NT_NODE_${i}_NS='$PREFIX-n$i'"
            echo "NT_NODE_${i}_IP='$(node_ip "$i")'"
            echo "NT_NODE_${i}_POD_CIDR='10.244.$i.0/24'"
            echo "NT_NODE_${i}_POD_IP='10.244.$i.10'"
            echo "NT_NODE_${i}_HOST_KEY='$hk'"
            echo "NT_NODE_${i}_VETH='v-n$i'"
            echo "NT_NODE_${i}_SSHD_LOG='$nd/sshd.log'"
            echo "NT_NODE_${i}_SSHD_PID_FILE='$nd/sshd.pid'"
            echo "NT_NODE_${i}_AUTHORIZED_KEYS='$nd/authorized_keys'"
        done
    } >"$env.tmp"
    mv "$kh.tmp" "$kh"
    mv "$env.tmp" "$env"
    trap - EXIT
    note "up: $NODES node(s), prefix $PREFIX, state in $DIR"
}

# Tear down every namespace of PREFIX and everything running in it.
down_prefix() {
    local prefix=$1 dir=${2:-} pf ns p pids deadline
    if [ -n "$dir" ] && [ -d "$dir" ]; then
        for pf in "$dir"/n*/sshd.pid; do
            [ -f "$pf" ] && kill_tree "$(cat "$pf")"
            rm -f "$pf"
        done
    fi
    deadline=$((SECONDS + 10))
    while :; do
        pids=
        for ns in $(list_ns "$prefix"); do
            for p in $(ip netns pids "$ns" 2>/dev/null || true); do
                [ "$p" = "$SELF" ] || pids="$pids $p"
            done
        done
        [ -z "$pids" ] && break
        [ $SECONDS -lt $deadline ] || die "processes still running in $prefix namespaces:$pids"
        for p in $pids; do kill_tree "$p"; done
    done
    for ns in $(list_ns "$prefix"); do
        ip netns del "$ns" 2>/dev/null || [ ! -e "$NETNS_DIR/$ns" ] || die "cannot delete namespace $ns"
    done
    [ -z "$(list_ns "$prefix")" ] || die "namespaces of $prefix still exist: $(list_ns "$prefix" | xargs)"
    rm -f "$OWNER_DIR/$prefix"
}

cmd_down() {
    [ $# -eq 1 ] || die "usage: testbed.sh down DIR"
    require_root
    if [ ! -f "$1/prefix" ]; then
        note "down: $1 holds no testbed; nothing to do"
        return 0
    fi
    load_dir "$1"
    down_prefix "$PREFIX" "$DIR"
}

# Every bed this script ever made on this machine, owned or not: the prefixes
# of its namespaces and of its owner files.
all_prefixes() {
    {
        ip netns list 2>/dev/null | awk '{print $1}' |
            sed -nE 's/^(nt[a-z0-9]+)-(fab|cp|n[0-9]+)$/\1/p'
        if [ -d "$OWNER_DIR" ]; then ls "$OWNER_DIR"; fi
    } | sort -u
}

# Remove bed PREFIX, saying "WHY PREFIX" first: its namespaces and
# everything in them, its owner file, and its state dir if that is really
# this bed's.
remove_bed() {
    local prefix=$1 why=$2 dir= f pid st
    f=$OWNER_DIR/$prefix
    if [ -f "$f" ]; then read -r pid st dir <"$f" || true; fi
    note "$why $prefix"
    down_prefix "$prefix" "$dir"
    if [ -n "$dir" ] && [ -f "$dir/prefix" ] && [ "$(cat "$dir/prefix")" = "$prefix" ]; then
        rm -rf -- "$dir"
    fi
}

cmd_gc() {
    [ $# -eq 0 ] || die "usage: testbed.sh gc"
    require_root
    local prefix
    for prefix in $(all_prefixes); do
        [[ $prefix =~ ^nt[a-z0-9]+$ ]] || continue
        owner_alive "$prefix" || remove_bed "$prefix" "gc: removing leftover testbed"
    done
}

cmd_purge() {
    [ $# -eq 0 ] || die "usage: testbed.sh purge"
    require_root
    local prefix
    for prefix in $(all_prefixes); do
        [[ $prefix =~ ^nt[a-z0-9]+$ ]] || continue
        remove_bed "$prefix" "purge: removing testbed"
    done
    rm -rf -- "$OWNER_DIR"
    note "purge: no testbed left; $OWNER_DIR removed"
}

node_cmd() {
    local cmd=$1
    shift
    [ $# -eq 2 ] || die "usage: testbed.sh $cmd DIR I"
    require_root
    load_dir "$1"
    check_index "$2"
    case $cmd in
    stop-node) stop_sshd "$2" ;;
    start-node)
        start_sshd "$2"
        wait_sshd "$2"
        ;;
    link-down) ip -n "$FAB" link set "v-n$2" down ;;
    link-up) ip -n "$FAB" link set "v-n$2" up ;;
    esac
}

main() {
    [ $# -ge 1 ] || die "usage: testbed.sh up|down|gc|purge|stop-node|start-node|link-down|link-up ..."
    local cmd=$1
    shift
    case $cmd in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    gc) cmd_gc "$@" ;;
    purge) cmd_purge "$@" ;;
    stop-node | start-node | link-down | link-up) node_cmd "$cmd" "$@" ;;
    *) die "unknown command '$cmd'" ;;
    esac
}

main "$@"
