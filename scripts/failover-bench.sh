#!/bin/bash
# failover-bench.sh: how long a user is without a master after a failure, with the real vsm
# daemons in the HA lab (scripts/ha-lab.sh).
#
#   scripts/failover-bench.sh [-n RUNS] [-p "guide fast ..."] [-t "cable vsmserver-kill"] [-b BIN_DIR]
#
# Profiles (default: all of them):
#   guide, fast, subsecond  the keepalived profiles of config/keepalived/ with vsm's default
#                           HA timers
#   fast-tuned              fast with the masters' peer link timers shortened ($TUNED_KEYS)
#   subsecond-tuned         subsecond with its matching timers ($SUBSECOND_KEYS)
#   published               the keepalived guide's file as published (config/keepalived/published):
#                           no health check, so vsmserver-kill cannot move the VIP and is skipped
#   pacemaker-guide         Pacemaker/Corosync (config/pacemaker), corosync token 3000 ms
#   pacemaker-tuned         the same with token 1000 ms
#   heartbeat-guide         Heartbeat 3 (config/heartbeat): keepalive 1 s, deadtime 5 s
#   heartbeat-tuned         keepalive 250 ms, deadtime 1 s
# For each profile it builds the lab once, logs testuser in
# through tlha (one session), then RUNS times per trigger: fails tlha-primary, and measures the time from the
# trigger to the first `ssh testuser@tlha vsmclient connect --json` (strict host-key checking,
# the lab's known_hosts) that returns the SAME session ("reconnect"), served by
# tlha-secondary; then restores the primary and measures the same until tlha-primary serves
# again ("failback").
#
# Triggers:
#   cable            pull the primary's cable; restore: plug it back
#   vsmserver-kill   kill -9 vsmserver on the primary, keepalived keeps running (its health
#                    check, tlctl ha check, moves the VIP); restore: start vsmserver again
#   keepalived-stop  stop keepalived with TERM (it hands over); restore: start it
#   keepalived-kill  SIGKILL keepalived (a crash); restore: start it once the old one is gone
# (the keepalived triggers apply to the keepalived profiles only). Under Pacemaker, vsmserver is
# restored by clearing its failure (pcs resource cleanup; Pacemaker starts it).
#
# The load average (1 min) is printed at the start and end of each profile: this machine may
# be shared, and the figures mean little when it was busy.
#
# The probe runs in the client node: until the new master answers, it opens a TCP connection
# to tlha:22 every 20 ms and reads the SSH banner, which names the answering master (the lab
# sets sshd's VersionAddendum): that is when the VIP has moved ("VIP"). Then it runs the full
# login until it returns the session. A tight loop of full logins instead would load this
# machine enough to slow the very handshakes it measures. "login" is one ssh login with
# vsmclient connect in the steady state, measured before the runs, for reference.
#
# BIN_DIR (or VSM_BIN_DIR) holds the vsm binaries, default target/release.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
REPO=$(dirname "$HERE")
LAB_SH=$HERE/ha-lab.sh
export VSM_LAB_PREFIX=${VSM_LAB_PREFIX:-vsmbench-}
export VSM_LAB_DIR=${VSM_LAB_DIR:-/run/vsm-lab-bench}
export VSM_BIN_DIR=${VSM_BIN_DIR:-$REPO/target/release}
export VSM_LAB_DAEMONS=1

RUNS=5
PROFILES="guide fast fast-tuned subsecond subsecond-tuned published pacemaker-guide pacemaker-tuned heartbeat-guide heartbeat-tuned"
# vsm settings of the fast-tuned profile: a vanished peer is noticed in 0.5 s, and a write
# waits at most 0.3 s for its acknowledgement.
TUNED_KEYS="/HA/heartbeat_interval=100ms /HA/peer_timeout=500ms /HA/sync_timeout=300ms"
SUBSECOND_KEYS="/HA/heartbeat_interval=50ms /HA/peer_timeout=300ms /HA/sync_timeout=300ms"
TRIGGERS="cable vsmserver-kill"
PROBE_LIMIT=60 # seconds a single measurement may take (Heartbeat heals slowly)

usage() {
    sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while getopts "n:p:t:b:h" opt; do
    case $opt in
        n) RUNS=$OPTARG ;;
        p) PROFILES=$OPTARG ;;
        t) TRIGGERS=$OPTARG ;;
        b) VSM_BIN_DIR=$(readlink -f "$OPTARG") ;;
        h) usage 0 ;;
        *) usage 2 >&2 ;;
    esac
done
case $RUNS in "" | *[!0-9]* | 0) echo "failover-bench: -n needs a positive number" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "failover-bench: must run as root" >&2; exit 1; }
command -v jq >/dev/null || { echo "failover-bench: jq is missing (scripts/install-test-deps.sh)" >&2; exit 1; }

lab() { "$LAB_SH" "$@"; }
say() { echo "failover-bench: $*" >&2; }
die() {
    echo "failover-bench: error: $*" >&2
    exit 1
}

LAB_UP=0
cleanup() {
    if [ "$LAB_UP" = 1 ]; then lab down >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SSH_OPTS=(-o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$VSM_LAB_DIR/client/known_hosts"
    -o BatchMode=yes -o ConnectTimeout=1 -o ServerAliveInterval=1 -o ServerAliveCountMax=2)

# The probe, run inside the client node: see the header. Arguments: the master that must
# answer, the session id, a file to create once the probe runs, the time limit, ssh options.
# Prints the clock of the first banner from WANT and of the first login that returned SESSION.
# shellcheck disable=SC2016
PROBE='
want=$1 session=$2 ready=$3 limit=$4
shift 4
res=$(mktemp)
: >"$ready"
end=$((SECONDS + limit))
while [ ! -s "$res" ] && [ "$SECONDS" -lt "$end" ]; do
    timeout 1 bash -c '"'"'exec 3<>/dev/tcp/tlha/22 && read -r -t 1 b <&3 &&
        [[ "$b" == *" $1"* ]] && echo "$EPOCHREALTIME" >>"$2"'"'"' _ "$want" "$res" 2>/dev/null &
    sleep 0.02
done
vip=$(sort -n "$res" | head -n 1)
rm -f "$res"
[ -n "$vip" ] || exit 1
while [ "$SECONDS" -lt "$end" ]; do
    start=$EPOCHREALTIME
    out=$(timeout 10 ssh "$@" testuser@tlha vsmclient connect --json 2>>"$ready.attempts")
    rc=$?
    echo "attempt $start $EPOCHREALTIME rc=$rc" >>"$ready.attempts"
    [ "$rc" = 0 ] && [ "$(jq -r .session_id <<<"$out" 2>/dev/null)" = "$session" ] &&
        { echo "$vip $EPOCHREALTIME"; exit 0; }
done
exit 1
'

ms_between() { # START END (EPOCHREALTIME values) -> whole milliseconds
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%d\n", (b - a) * 1000 + 0.5 }'
}

# measure WANT ACTION...: "VIP RECONNECT" ms from ACTION to the first banner from WANT and to
# the first login that returned the session.
measure() {
    local want=$1
    shift
    local ready out t0 t1 t2
    ready=$VSM_LAB_DIR/probe-ready
    rm -f "$ready" "$ready.attempts"
    out=$(mktemp)
    lab exec client bash -c "$PROBE" probe "$want" "$SESSION" "$ready" "$PROBE_LIMIT" "${SSH_OPTS[@]}" >"$out" &
    local probe=$!
    for _ in $(seq 250); do [ -e "$ready" ] && break; sleep 0.02; done
    [ -e "$ready" ] || die "the probe did not start"
    t0=$EPOCHREALTIME
    "$@" >/dev/null
    wait "$probe" || true
    read -r t1 t2 <"$out" || true
    rm -f "$out"
    [ -n "${t2:-}" ] || die "no reconnect to session $SESSION served by $want within ${PROBE_LIMIT}s after: $*"
    # Failed login attempts (rare) are worth seeing: they explain outliers.
    if [ "${VSM_BENCH_VERBOSE:-0}" = 1 ] || [ "$(grep -c '^attempt ' "$ready.attempts")" -gt 1 ]; then
        say "login attempts after the VIP moved (start end rc, stderr):"
        sed 's/^/    /' "$ready.attempts" >&2
    fi
    echo "$(ms_between "$t0" "$t1") $(ms_between "$t0" "$t2")"
}

tlctl_on() { # NODE ARGS...
    local node=$1
    shift
    "$VSM_BIN_DIR/tlctl" --timeout 3 --socket "$VSM_LAB_DIR/nodes/$node/run-vsm/vsmserver.sock" "$@"
}
ready_on() { tlctl_on "$1" ha check >/dev/null 2>&1; }

# Both masters ready, the VIP and ssh on the primary, both with the session: a clean start.
steady() {
    lab wait-vip tlha-primary 60 >/dev/null
    lab wait-ssh tlha-primary 60 >/dev/null
    for _ in $(seq 600); do
        ready_on tlha-primary && ready_on tlha-secondary && break
        sleep 0.1
    done
    ready_on tlha-secondary || die "tlha-secondary is not ready"
    # The returning primary is ready; give keepalived's health check on the secondary one
    # interval to settle, so a run never starts while it still reports an old state.
    sleep 1.2
}

trigger_cmds() { # TRIGGER -> sets FAIL and RESTORE (arrays)
    case $1 in
        cable)
            FAIL=(lab pull-cable tlha-primary)
            RESTORE=(lab plug-cable tlha-primary) ;;
        vsmserver-kill)
            FAIL=(lab kill-daemon tlha-primary vsmserver KILL)
            RESTORE=(lab start-daemon tlha-primary vsmserver) ;;
        keepalived-stop)
            FAIL=(lab stop-daemon tlha-primary keepalived)
            RESTORE=(lab start-daemon tlha-primary keepalived) ;;
        keepalived-kill)
            FAIL=(lab kill-daemon tlha-primary keepalived KILL)
            RESTORE=(lab start-daemon tlha-primary keepalived) ;;
        *) die "unknown trigger '$1' (cable, vsmserver-kill, keepalived-stop, keepalived-kill)" ;;
    esac
}

stats() { # values... -> "median min max"
    printf '%s\n' "$@" | sort -n | awk '
        { v[NR] = $1 }
        END {
            if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%d %d %d\n", m, v[1], v[NR]
        }'
}

# One login in the steady state (ms), for the breakdown.
login_ms() {
    local t0 t1
    t0=$EPOCHREALTIME
    lab exec client timeout 10 ssh "${SSH_OPTS[@]}" testuser@tlha vsmclient connect --json >/dev/null
    t1=$EPOCHREALTIME
    ms_between "$t0" "$t1"
}

load1() { cut -d' ' -f1 /proc/loadavg; }

SUMMARY=()
for profile in $PROFILES; do
    keys= manager=keepalived
    case $profile in
        guide | fast | subsecond | published) kprofile=$profile ;;
        fast-tuned) kprofile=fast keys=$TUNED_KEYS ;;
        subsecond-tuned) kprofile=subsecond keys=$SUBSECOND_KEYS ;;
        pacemaker-guide | pacemaker-tuned | heartbeat-guide | heartbeat-tuned)
            manager=${profile%-*} kprofile=${profile#*-} ;;
        *) die "unknown profile '$profile' (see -h)" ;;
    esac
    load_start=$(load1)
    say "profile $profile: building the $manager lab with the daemons from $VSM_BIN_DIR${keys:+ and $keys} (load $load_start)"
    lab down >/dev/null 2>&1 || true
    LAB_UP=1
    VSM_LAB_MANAGER=$manager VSM_LAB_PROFILE=$kprofile VSM_LAB_HA_KEYS=$keys lab up >/dev/null
    steady
    SESSION=$(lab exec client timeout 20 ssh "${SSH_OPTS[@]}" testuser@tlha vsmclient connect --json | jq -r .session_id)
    if [ -z "$SESSION" ] || [ "$SESSION" = null ]; then die "testuser got no session"; fi
    logins=()
    for _ in 1 2 3 4 5; do logins+=("$(login_ms)"); done
    read -r LOGIN _ _ <<<"$(stats "${logins[@]}")"
    say "profile $profile: session $SESSION; one login takes $LOGIN ms (median of 5)"
    for trigger in $TRIGGERS; do
        if [ "$kprofile" = published ] && [ "$trigger" = vsmserver-kill ]; then
            say "profile $profile: $trigger skipped: without a health check the VIP stays with a dead vsmserver"
            SUMMARY+=("| $profile | $trigger | never: the VIP stays | | | | $LOGIN | | | | |")
            continue
        fi
        case $manager:$trigger in
            keepalived:* | *:cable | *:vsmserver-kill) ;;
            *) say "profile $profile: trigger $trigger applies to keepalived only; skipped"; continue ;;
        esac
        trigger_cmds "$trigger"
        over=() back=() over_vip=() back_vip=()
        for run in $(seq "$RUNS"); do
            steady
            read -r ov o <<<"$(measure tlha-secondary "${FAIL[@]}")"
            read -r bv b <<<"$(measure tlha-primary "${RESTORE[@]}")"
            over+=("$o") over_vip+=("$ov") back+=("$b") back_vip+=("$bv")
            say "$profile $trigger run $run: reconnect ${o} ms (VIP moved ${ov}), failback ${b} ms (VIP ${bv})"
        done
        read -r om omin omax <<<"$(stats "${over[@]}")"
        read -r ovm _ _ <<<"$(stats "${over_vip[@]}")"
        read -r bm _ _ <<<"$(stats "${back[@]}")"
        read -r bvm _ _ <<<"$(stats "${back_vip[@]}")"
        SUMMARY+=("| $profile | $trigger | $om | $omin | $omax | $ovm | $LOGIN | $bm | $bvm | ${over[*]} | $load_start-$(load1) |")
    done
    lab down >/dev/null
    LAB_UP=0
done

echo
echo "Failover: trigger on tlha-primary to the first \`ssh testuser@tlha vsmclient connect --json\`"
echo "that returns the same session (ms; $RUNS runs each; $(nproc) CPUs)"
echo
echo "| profile | trigger | reconnect median | min | max | VIP moved (median) | one login | failback: reconnect median | failback: VIP moved | reconnect, every run | load avg (1 min) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${SUMMARY[@]}"
