#!/bin/bash
# chaos.sh: the seeded fault campaign against the namespace lab (docs/reliability.md).
#
#   scripts/chaos.sh [--faults N] [--seed N] [--clients N] [--users N] [--keep-logs DIR]
#
# --seed defaults to VSM_CHAOS_SEED, else one drawn from the clock (printed either way).
# Builds nothing: uses the binaries in VSM_BIN_DIR (default target/release), including
# vsm-chaos. Needs root (network namespaces). Brings up its own lab (namespace prefix
# vsmtest-, /run/vsm-lab-test, the same as the end-to-end tests) with a cheap session command,
# more users and small data file systems, runs vsm-chaos against it, and takes the lab down.
# Holds /run/vsm-e2e.lock while the lab is up, unless VSM_E2E_LOCK_HELD=1 (tests/e2e.rs holds
# it already). Exit status: 0 no anomaly, 1 anomalies (or the lab failed), 2 bad usage.
set -euo pipefail

REPO=$(dirname "$(dirname "$(readlink -f "$0")")")
ARGS=("$@")
FAULTS=50
SEED=${VSM_CHAOS_SEED:-}
CLIENTS=4
NUSERS=12
OUT=
usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}
while [ $# -gt 0 ]; do
    case $1 in
        --faults) FAULTS=${2:?--faults needs a number}; shift 2 ;;
        --seed) SEED=${2:?--seed needs a number}; shift 2 ;;
        --clients) CLIENTS=${2:?--clients needs a number}; shift 2 ;;
        --users) NUSERS=${2:?--users needs a number}; shift 2 ;;
        --keep-logs) OUT=${2:?--keep-logs needs a directory}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "chaos.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
for v in "$FAULTS" "$CLIENTS" "$NUSERS" ${SEED:+"$SEED"}; do
    [[ $v =~ ^[0-9]+$ ]] || { echo "chaos.sh: '$v' is not a number" >&2; exit 2; }
done

# shellcheck source=tests/e2e/lib.sh
. "$REPO/tests/e2e/lib.sh"
skip_unless_root
if [ "${VSM_E2E_LOCK_HELD:-0}" != 1 ]; then
    echo "chaos.sh: waiting for /run/vsm-e2e.lock (one namespace lab per machine)"
    # -o: the daemons the lab starts do not inherit the lock.
    VSM_E2E_LOCK_HELD=1 exec flock -o /run/vsm-e2e.lock "$0" "${ARGS[@]}"
fi
export VSM_LAB_DAEMONS=1
export VSM_BIN_DIR=${VSM_BIN_DIR:-$REPO/target/release}
CHAOS=$VSM_BIN_DIR/vsm-chaos
[ -x "$CHAOS" ] || fail "$CHAOS is missing (cargo build --release --bin vsm-chaos)"
OUT=${OUT:-$REPO/target/chaos/run-$(date +%Y%m%dT%H%M%S)}

users=()
for i in $(seq 1 "$NUSERS"); do users+=("vsmchaos$i"); done
# A cheap desktop: a process that lives until it is ended, so hundreds of sessions cost nothing.
export VSM_LAB_SESSION_COMMAND="/bin/sleep infinity"
export VSM_LAB_EXTRA_USERS="${users[*]}"
export VSM_LAB_DATA_TMPFS=64M
MAX_SESSIONS=2
# Clock jumps need vsmserver under libfaketime (package libfaketime); without it they are skipped.
if [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ]; then
    export VSM_LAB_FAKETIME=1
else
    echo "chaos.sh: libfaketime is not installed: clock jumps will be skipped (scripts/install-test-deps.sh)"
fi
# ack replication, quick reconciliation so convergence is quick after the heal.
export VSM_LAB_HA_KEYS="/HA/sync=ack /vsmserver/max_sessions_per_user=$MAX_SESSIONS /vsmserver/reconcile_interval=5s"

keep_logs() {
    mkdir -p "$OUT/logs"
    cp -r "$VSM_LAB_DIR/nodes/." "$OUT/logs/" 2>/dev/null || true
    find "$OUT/logs" -type d \( -name 'lib-*' -o -name 'tmp' -o -name 'run*' -o -name 'etc-vsm' \) -prune -exec rm -rf {} + 2>/dev/null || true
}
test_cleanup() { :; }
trap on_exit EXIT

step "lab up ($VSM_BIN_DIR; users ${users[0]}..${users[-1]}; session command: $VSM_LAB_SESSION_COMMAND)"
lab_up
tlctl_ready() { "$VSM_BIN_DIR/tlctl" --timeout 3 --socket "$VSM_LAB_DIR/nodes/$1/run-vsm/vsmserver.sock" ha check >/dev/null 2>&1; }
wait_for 60 "tlha-primary ready" tlctl_ready tlha-primary
wait_for 60 "tlha-secondary ready" tlctl_ready tlha-secondary

step "campaign: $FAULTS faults${SEED:+, seed $SEED}"
rc=0
"$CHAOS" --lab-script "$REPO/scripts/ha-lab.sh" --faults "$FAULTS" ${SEED:+--seed "$SEED"} \
    --clients "$CLIENTS" --users "$(IFS=,; echo "${users[*]}")" --max-sessions "$MAX_SESSIONS" \
    --out "$OUT" || rc=$?
if [ "$rc" -ne 0 ]; then
    keep_logs
    fail "the campaign found anomalies or could not run (exit $rc); history, summary and logs in $OUT"
fi
step "no anomaly; history and summary in $OUT"
lab_down_checked
