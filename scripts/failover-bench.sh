#!/bin/bash
# failover-bench.sh: how long the resource IP is away, as a user logging in sees it.
#
#   scripts/failover-bench.sh [-n RUNS] [-p "guide fast"] [-t "cable keepalived-stop ..."]
#
# Builds the HA lab (scripts/ha-lab.sh) once per keepalived profile and measures, RUNS times
# per trigger, the time from the trigger on tlha-primary to the first `ssh testuser@tlha
# uname -n` from the client that is answered by tlha-secondary ("failover"), then from the
# restoring action to the first answer by tlha-primary again ("failback").
#
# Triggers:
#   cable            pull the primary's cable; restore: plug it back
#   keepalived-stop  stop keepalived with TERM (it hands over); restore: start it
#   keepalived-kill  SIGKILL keepalived (a crash); restore: start it once the old one is gone
#   health           the primary's health check fails: SIGKILL vsmserver when the lab runs
#                    the vsm daemons, else SIGKILL sshd (the lab's stand-in check);
#                    restore: start it again
#
# "TCP" is the first SSH banner from the other master (the VIP has moved, ~20 ms resolution);
# "ssh" the first completed login, so it adds one SSH handshake.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
LAB_SH=$HERE/ha-lab.sh
export VSM_LAB_PREFIX=${VSM_LAB_PREFIX:-vsmbench-}
export VSM_LAB_DIR=${VSM_LAB_DIR:-/run/vsm-lab-bench}

RUNS=5
PROFILES="guide fast"
TRIGGERS="cable keepalived-stop keepalived-kill health"
PROBE_LIMIT=30 # seconds a single probe may wait for its answer

usage() {
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while getopts "n:p:t:h" opt; do
    case $opt in
        n) RUNS=$OPTARG ;;
        p) PROFILES=$OPTARG ;;
        t) TRIGGERS=$OPTARG ;;
        h) usage 0 ;;
        *) usage 2 >&2 ;;
    esac
done
case $RUNS in "" | *[!0-9]* | 0) echo "failover-bench: -n needs a positive number" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "failover-bench: must run as root" >&2; exit 1; }

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

# The probe, run inside the client node. Phase 1, cheap: every 20 ms a TCP connection to
# tlha:22 (1 s limit) reads the SSH banner, which names the answering master (the lab sets
# sshd's VersionAddendum), until WANT answers. Phase 2: ssh testuser@tlha uname -n until it
# is answered by WANT. Prints the clock of both moments. A tight loop of full ssh attempts
# instead would load this 2-CPU machine enough to slow the very handshakes it measures.
# shellcheck disable=SC2016
PROBE='
want=$1 ready=$2 limit=$3
res=$(mktemp)
: >"$ready"
end=$((SECONDS + limit))
while [ ! -s "$res" ] && [ "$SECONDS" -lt "$end" ]; do
    timeout 1 bash -c '"'"'exec 3<>/dev/tcp/tlha/22 && read -r -t 1 b <&3 &&
        [[ "$b" == *" $1"* ]] && echo "$EPOCHREALTIME" >>"$2"'"'"' _ "$want" "$res" 2>/dev/null &
    sleep 0.02
done
tcp=$(sort -n "$res" | head -n 1)
rm -f "$res"
[ -n "$tcp" ] || exit 1
while [ "$SECONDS" -lt "$end" ]; do
    a=$(ssh -o ConnectTimeout=1 testuser@tlha uname -n 2>/dev/null) &&
        [ "$a" = "$want" ] && { echo "$tcp $EPOCHREALTIME"; exit 0; }
done
exit 1
'

ms_between() { # START END (EPOCHREALTIME values) -> whole milliseconds
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%d\n", (b - a) * 1000 + 0.5 }'
}

# measure WANT ACTION...: "TCP SSH" ms from ACTION to the first TCP answer (SSH banner) and
# to the first completed ssh login answered by WANT.
measure() {
    local want=$1
    shift
    local ready out t0 t1 t2
    ready=$VSM_LAB_DIR/probe-ready
    rm -f "$ready"
    out=$(mktemp)
    lab exec client bash -c "$PROBE" probe "$want" "$ready" "$PROBE_LIMIT" >"$out" &
    local probe=$!
    for _ in $(seq 100); do [ -e "$ready" ] && break; sleep 0.02; done
    [ -e "$ready" ] || die "the probe did not start"
    t0=$EPOCHREALTIME
    "$@" >/dev/null
    wait "$probe" || true
    read -r t1 t2 <"$out" || true
    rm -f "$out"
    [ -n "${t2:-}" ] || die "no ssh answer from $want within ${PROBE_LIMIT}s after: $*"
    echo "$(ms_between "$t0" "$t1") $(ms_between "$t0" "$t2")"
}

steady() {
    lab wait-vip tlha-primary 60 >/dev/null
    lab wait-ssh tlha-primary 60 >/dev/null
}

trigger_cmds() { # TRIGGER -> sets FAIL and RESTORE (arrays)
    case $1 in
        cable)
            FAIL=(lab pull-cable tlha-primary)
            RESTORE=(lab plug-cable tlha-primary) ;;
        keepalived-stop)
            FAIL=(lab stop-daemon tlha-primary keepalived)
            RESTORE=(lab start-daemon tlha-primary keepalived) ;;
        keepalived-kill)
            FAIL=(lab kill-daemon tlha-primary keepalived KILL)
            RESTORE=(lab start-daemon tlha-primary keepalived) ;;
        health)
            if [ "$MODE" = daemons ]; then
                FAIL=(lab kill-daemon tlha-primary vsmserver KILL)
                RESTORE=(lab start-daemon tlha-primary vsmserver)
            else
                FAIL=(lab kill-daemon tlha-primary sshd KILL)
                RESTORE=(lab start-daemon tlha-primary sshd)
            fi ;;
        *) die "unknown trigger '$1' (cable, keepalived-stop, keepalived-kill, health)" ;;
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

SUMMARY=()
for profile in $PROFILES; do
    case $profile in guide | fast) ;; *) die "unknown profile '$profile' (guide, fast)" ;; esac
    say "profile $profile: building the lab"
    lab down >/dev/null 2>&1 || true
    LAB_UP=1
    VSM_LAB_PROFILE=$profile lab up >/dev/null
    MODE=$(cat "$VSM_LAB_DIR/mode")
    for trigger in $TRIGGERS; do
        trigger_cmds "$trigger"
        over=() back=() over_tcp=() back_tcp=()
        for run in $(seq "$RUNS"); do
            steady
            read -r ot o <<<"$(measure tlha-secondary "${FAIL[@]}")"
            read -r bt b <<<"$(measure tlha-primary "${RESTORE[@]}")"
            over+=("$o") over_tcp+=("$ot") back+=("$b") back_tcp+=("$bt")
            say "$profile $trigger run $run: failover ${o} ms (TCP ${ot}), failback ${b} ms (TCP ${bt})"
        done
        read -r om omin omax <<<"$(stats "${over[@]}")"
        read -r otm _ _ <<<"$(stats "${over_tcp[@]}")"
        read -r bm bmin bmax <<<"$(stats "${back[@]}")"
        read -r btm _ _ <<<"$(stats "${back_tcp[@]}")"
        SUMMARY+=("| $profile | $trigger | $om | $omin–$omax | $otm | $bm | $bmin–$bmax | $btm | ${over[*]} |")
    done
    lab down >/dev/null
    LAB_UP=0
done

echo
echo "Failover seen by ssh to tlha (ms; $RUNS runs each; lab mode: ${MODE:-?}; $(nproc) CPUs)"
echo
echo "| profile | trigger | failover: ssh median | ssh min–max | TCP median | failback: ssh median | ssh min–max | TCP median | failover ssh runs |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${SUMMARY[@]}"
