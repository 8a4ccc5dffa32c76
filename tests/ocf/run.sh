#!/bin/bash
# run.sh: checks the Pacemaker resource agent config/pacemaker/vsmserver with ocf-tester and
# with the cases ocf-tester does not cover (not ready, hung, crashed, recycled pid, bad
# parameters).
#
#   tests/ocf/run.sh [BIN_DIR]
#
# BIN_DIR (or VSM_BIN_DIR) holds vsmserver, tlctl and tl-config. Without it, or while those
# binaries are placeholders, the agent drives the test doubles in tests/ocf/fake/. With real
# binaries the daemon runs standalone (HA off) on a temporary configuration; that mode assumes
# `vsmserver --config-dir DIR` and `tlctl --config-dir DIR ha check`.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
REPO=$(dirname "$(dirname "$HERE")")
AGENT=$REPO/config/pacemaker/vsmserver
BIN_DIR=${1:-${VSM_BIN_DIR:-}}
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
chmod 0755 "$WORK"
CFG=$WORK/etc
mkdir -m 0700 "$CFG"
PIDFILE=$WORK/vsmserver.pid
LOGFILE=$WORK/vsmserver.log

mode=fake
if [ -n "$BIN_DIR" ] && [ -x "$BIN_DIR/vsmserver" ] && [ -x "$BIN_DIR/tlctl" ] &&
    "$BIN_DIR/tl-config" --help 2>&1 | grep -qi usage; then
    mode=real
    BIN_DIR=$(readlink -f "$BIN_DIR")
    SERVER=$BIN_DIR/vsmserver
    TLCTL=$BIN_DIR/tlctl
    "$BIN_DIR/tl-config" --config-dir "$CFG" /HA/enabled=0 \
        "/vsmserver/socket_path=$WORK/vsmserver.sock" "/vsmserver/data_dir=$WORK/data" \
        /vsmserver/listen_port=19000
else
    [ -z "$BIN_DIR" ] || echo "note: no usable vsm binaries in $BIN_DIR; using the test doubles"
    SERVER=$HERE/fake/vsmserver
    TLCTL=$HERE/fake/tlctl
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
    expect 0 stop
    expect 7 monitor
    rm -f "$CFG/fake-never-ready"

    echo "==> ocf: hung daemon: monitor 1 after check_timeout, 0 again when it answers"
    expect 0 start
    touch "$CFG/fake-hang"
    expect 1 monitor OCF_RESKEY_check_timeout=1
    rm -f "$CFG/fake-hang"
    expect 0 monitor
    expect 0 stop
else
    echo "==> ocf: not-ready and hung cases need the test doubles; run without BIN_DIR for them"
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
