#!/bin/bash
# run.sh: checks the Pacemaker resource agent config/pacemaker/vsmserver with ocf-tester and
# with the cases ocf-tester does not cover (not ready, hung, crashed, recycled pid, bad
# parameters), against the real vsmserver.
#
#   tests/ocf/run.sh [BIN_DIR]
#
# BIN_DIR (else VSM_BIN_DIR, else target/release or target/debug of this repository, the first
# with usable binaries) holds vsmserver, tlctl and tl-config. The daemon runs on a temporary
# configuration: standalone (HA off) for ocf-tester; with HA on and an unreachable peer for
# "running but not ready"; stopped with SIGSTOP for "hung". VSM_OCF_FAKE=1 drives the test
# doubles in tests/ocf/fake/ instead (no build needed); without usable binaries and without
# it the test fails.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
REPO=$(dirname "$(dirname "$HERE")")
AGENT=$REPO/config/pacemaker/vsmserver
BIN_DIR=${1:-${VSM_BIN_DIR:-}}
usable() { [ -x "$1/vsmserver" ] && [ -x "$1/tlctl" ] && "$1/tl-config" --help 2>&1 | grep -qi usage; }
if [ -z "$BIN_DIR" ]; then
    for d in "$REPO/target/release" "$REPO/target/debug"; do
        if usable "$d"; then BIN_DIR=$d; break; fi
    done
fi
export OCF_ROOT=${OCF_ROOT:-/usr/lib/ocf}
export OCF_RESOURCE_INSTANCE=vsmserver-test

if [ "$(id -u)" -ne 0 ]; then
    echo "skipped: not root (ocf-tester checks the agent as user nobody, which needs root)"
    exit 0
fi
for tool in ocf-tester xmllint; do
    command -v "$tool" >/dev/null || {
        echo "FAIL: ocf: $tool is missing (scripts/install-test-deps.sh)" >&2
        exit 1
    }
done

WORK=$(mktemp -d /run/vsm-ocf.XXXXXX)
# Replaced by the full cleanup once the agent may have started something.
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK"
CFG=$WORK/etc
mkdir -m 0700 "$CFG"
PIDFILE=$WORK/vsmserver.pid
LOGFILE=$WORK/vsmserver.log

# Plain daemon logs.
export NO_COLOR=1
if [ "${VSM_OCF_FAKE:-0}" = 1 ]; then
    mode=fake
    SERVER=$HERE/fake/vsmserver
    TLCTL=$HERE/fake/tlctl
elif [ -n "$BIN_DIR" ] && usable "$BIN_DIR"; then
    mode=real
    BIN_DIR=$(readlink -f "$BIN_DIR")
    SERVER=$BIN_DIR/vsmserver
    TLCTL=$BIN_DIR/tlctl
    # real_config DIR NAME HA...: a configuration of its own (socket, database, ports) in DIR.
    real_config() {
        local dir=$1 name=$2 port=$3
        shift 3
        [ -d "$dir" ] || mkdir -m 0700 "$dir"
        head -c 32 /dev/urandom >"$dir/cluster.key"
        head -c 32 /dev/urandom >"$dir/ha.key"
        chmod 0600 "$dir/cluster.key" "$dir/ha.key"
        "$BIN_DIR/tl-config" --config-dir "$dir" '/subclusters/default/agents=192.0.2.11' \
            "/vsmserver/socket_path=$WORK/$name.sock" "/vsmserver/data_dir=$WORK/$name-data" \
            "/vsmserver/listen_port=$port" "/HA/port=$((port + 1))" "$@" >/dev/null ||
            { echo "FAIL: ocf: tl-config could not write the test configuration" >&2; exit 1; }
    }
    real_config "$CFG" standalone 19000 /HA/enabled=0
else
    echo "FAIL: ocf: no usable vsm binaries (in '${BIN_DIR:-target/release or target/debug}'); build with cargo build --release, or set VSM_OCF_FAKE=1 for the test doubles" >&2
    exit 1
fi

failures=0
fail() {
    echo "FAIL: ocf: $*" >&2
    failures=$((failures + 1))
}

agent() { # ACTION [NAME=VALUE...]: run the agent with the test parameters; prints nothing
    local action=$1
    shift
    env OCF_RESKEY_binary="$SERVER" OCF_RESKEY_tlctl="$TLCTL" OCF_RESKEY_config_dir="$CFG" \
        OCF_RESKEY_pidfile="$PIDFILE" OCF_RESKEY_logfile="$LOGFILE" \
        OCF_RESKEY_CRM_meta_interval=10000 OCF_RESKEY_CRM_meta_timeout=20000 "$@" \
        "$AGENT" "$action" >/dev/null 2>&1
}

expect() { # RC ACTION [NAME=VALUE...]
    local want=$1 rc=0
    shift
    agent "$@" || rc=$?
    [ "$rc" = "$want" ] || fail "'$*' returned $rc, expected $want"
}

cleanup() {
    agent stop || true
    if [ -d "$WORK/etc-not-ready" ]; then
        agent stop OCF_RESKEY_config_dir="$WORK/etc-not-ready" OCF_RESKEY_pidfile="$WORK/not-ready.pid" || true
    fi
    # A test double the agent lost track of (only after a failed check) goes too.
    if [ -s "$CFG/fake-server.pid" ]; then
        kill "$(cat "$CFG/fake-server.pid")" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "==> ocf: agent $AGENT with $mode binaries ($SERVER)"

echo "==> ocf: ocf-tester"
if ! ocf-tester -n "$OCF_RESOURCE_INSTANCE" -o binary="$SERVER" -o tlctl="$TLCTL" \
    -o config_dir="$CFG" -o pidfile="$PIDFILE" -o logfile="$LOGFILE" "$AGENT"; then
    fail "ocf-tester reported errors"
fi

echo "==> ocf: meta-data is valid against ra-api-1.dtd"
"$AGENT" meta-data | (cd /usr/share/resource-agents && xmllint --noout --valid -) ||
    fail "meta-data does not validate"

echo "==> ocf: bad parameters"
expect 5 validate-all OCF_RESKEY_binary=/nonexistent/vsmserver
expect 5 validate-all OCF_RESKEY_tlctl=/nonexistent/tlctl
expect 6 validate-all OCF_RESKEY_config_dir="$WORK/missing"
expect 6 validate-all OCF_RESKEY_pidfile=relative.pid
expect 6 validate-all OCF_RESKEY_check_timeout=soon
expect 5 monitor OCF_RESKEY_binary=/nonexistent/vsmserver
expect 7 monitor OCF_RESKEY_binary=/nonexistent/vsmserver OCF_RESKEY_CRM_meta_interval=0
expect 3 promote

echo "==> ocf: crash: a killed daemon is reported as not running, stop cleans up"
expect 0 start
pid=$(cat "$PIDFILE")
kill -KILL "$pid"
wait_gone() {
    for _ in $(seq 50); do
        [ "$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" != Z ] ||
            return 0
        [ -d "/proc/$1" ] || return 0
        sleep 0.1
    done
    return 1
}
wait_gone "$pid" || fail "killed daemon $pid does not go away"
expect 7 monitor
expect 0 stop
[ ! -e "$PIDFILE" ] || fail "stop left the stale pid file"

echo "==> ocf: a recycled pid in the pid file is not ours"
sleep 30 &
other=$!
echo "$other" >"$PIDFILE"
expect 7 monitor
expect 0 stop
kill -0 "$other" 2>/dev/null || fail "stop killed an unrelated process that reused the pid"
kill "$other"
wait "$other" 2>/dev/null || true

if [ "$mode" = fake ]; then
    echo "==> ocf: running but not ready: monitor 1, start fails in time, stop works"
    touch "$CFG/fake-never-ready"
    expect 1 start OCF_RESKEY_CRM_meta_timeout=5000
    expect 1 monitor
    expect 0 monitor OCF_RESKEY_ready_attribute=vsm-ready
    expect 0 stop
    expect 7 monitor
    rm -f "$CFG/fake-never-ready"

    echo "==> ocf: hung daemon: monitor 1 after check_timeout, 0 again when it answers"
    expect 0 start
    touch "$CFG/fake-hang"
    expect 1 monitor OCF_RESKEY_check_timeout=1
    expect 1 monitor OCF_RESKEY_check_timeout=1 OCF_RESKEY_ready_attribute=vsm-ready
    rm -f "$CFG/fake-hang"
    expect 0 monitor
    expect 0 stop
else
    echo "==> ocf: running but not ready (HA on, peer unreachable): monitor 1 (0 with ready_attribute), start fails in time, stop works"
    NR_CFG=$WORK/etc-not-ready
    # A peer that never answers and a start-up grace longer than the test: never ready.
    real_config "$NR_CFG" not-ready 19010 /HA/enabled=1 '/HA/nodes=ocf-self ocf-peer' \
        /HA/local_node=ocf-self /HA/startup_grace=1h
    nr=(OCF_RESKEY_config_dir="$NR_CFG" OCF_RESKEY_pidfile="$WORK/not-ready.pid"
        OCF_RESKEY_options="--peer-addr 127.0.0.1:19019")
    expect 1 start OCF_RESKEY_CRM_meta_timeout=5000 "${nr[@]}"
    expect 1 monitor "${nr[@]}"
    # With ready_attribute, answering but not ready is healthy for Pacemaker (the readiness
    # goes to the node attribute instead; outside a cluster attrd_updater fails, which the
    # agent only logs).
    expect 0 monitor "${nr[@]}" OCF_RESKEY_ready_attribute=vsm-ready
    "$TLCTL" --config-dir "$NR_CFG" ha check >/dev/null 2>&1 && fail "tlctl ha check says ready with an unreachable peer"
    expect 0 stop "${nr[@]}"
    expect 7 monitor "${nr[@]}"

    echo "==> ocf: hung daemon (SIGSTOP): monitor 1 after check_timeout, 0 again when it runs on"
    expect 0 start
    pid=$(cat "$PIDFILE")
    kill -STOP "$pid"
    expect 1 monitor OCF_RESKEY_check_timeout=1
    expect 1 monitor OCF_RESKEY_check_timeout=1 OCF_RESKEY_ready_attribute=vsm-ready
    kill -CONT "$pid"
    expect 0 monitor
    expect 0 stop
    proc_gone() { ! kill -0 "$1" 2>/dev/null || wait_gone "$1"; }
    proc_gone "$pid" || fail "stop left vsmserver $pid running"
fi

echo "==> ocf: alert agent vsm-alert turns IP start/stop on this node into tlctl ha notify"
ALERT=$REPO/config/pacemaker/vsm-alert
printf '#!/bin/sh\necho "$*" >>"%s/notified"\n' "$WORK" >"$WORK/tlctl-record"
chmod 0755 "$WORK/tlctl-record"
alert() { # TASK RSC NODE RC: run the alert agent for one resource event
    env -i PATH="$PATH" tlctl="$WORK/tlctl-record" vip_resource=tlha-ip CRM_alert_kind=resource \
        CRM_alert_task="$1" CRM_alert_rsc="$2" CRM_alert_node="$3" CRM_alert_rc="$4" \
        CRM_alert_target_rc=0 "$ALERT" || fail "vsm-alert exited non-zero for $*"
}
here=$(uname -n)
alert start tlha-ip "$here" 0
alert monitor tlha-ip "$here" 0
alert start other-rsc "$here" 0
alert start tlha-ip other-node 0
alert start tlha-ip "$here" 1
alert stop tlha-ip "$here" 0
got=$(tr '\n' ';' <"$WORK/notified" 2>/dev/null || true)
[ "$got" = "ha notify MASTER;ha notify BACKUP;" ] ||
    fail "vsm-alert made the calls '$got', expected 'ha notify MASTER;ha notify BACKUP;'"

if [ "$failures" -gt 0 ]; then
    echo "FAIL: ocf: $failures problem(s)" >&2
    exit 1
fi
echo "PASS: ocf ($mode binaries)"
