#!/bin/bash
# failover.sh: end-to-end HA test of the real daemons in the namespace lab.
#
#   VSM_BIN_DIR=target/release tests/e2e/failover.sh
#
# Needs root and usable vsm binaries: without them it FAILS (it never skips for a missing
# binary); it prints "skipped" and exits 0 only when not run as root. VSM_LAB_PROFILE picks the
# keepalived profile (default fast).
#
# What it checks, in order:
#  1. Logins through the VIP name (ssh USER@tlha vsmclient connect --json, strict host-key
#     checking against the lab's known_hosts) give sessions on the agents whose VNC ports
#     answer RFB from the client node; both masters store them.
#  2. Pull the primary's cable: the VIP moves to the secondary, the same ssh command with the
#     same known_hosts reconnects testuser to the SAME session (id, agent, display), whose VNC
#     port still answers.
#  3. While the primary is away: testuser2 gets a new session, testuser3's session is ended.
#  4. Plug the cable back: the primary resynchronises and takes the VIP back only once ready
#     (a sampler polls `tlctl ha status --json` and the VIP holder all the time; the primary
#     must never hold the VIP while not ready, and must have been seen not ready first);
#     afterwards both masters hold exactly the sessions the secondary had (session lists and
#     db_digest).
#  5. kill -9 vsmserver on the active node while its keepalived keeps running: the health
#     check (tlctl ha check) moves the VIP, testuser gets the same session back; vsmserver
#     restarted, the primary resyncs and takes over again, both masters agree.
#  6. An agent refuses a connection from a host not in allowed_clients (the client node) and
#     logs the client's address.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

skip_unless_root
export VSM_LAB_DAEMONS=1
export VSM_BIN_DIR=${VSM_BIN_DIR:-$REPO/target/debug}
command -v jq >/dev/null || fail "jq is missing (scripts/install-test-deps.sh)"
trap on_exit EXIT

NET=${VSM_LAB_NET:-10.213.0}
CLIENT_ADDR=$NET.20
AGENT1_ADDR=$NET.11
AGENT_PORT=904
TLCTL=$VSM_BIN_DIR/tlctl
SAMPLER_PID=
SAMPLES=$VSM_LAB_DIR/failback-samples

stop_sampler() {
    if [ -n "$SAMPLER_PID" ]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=
    fi
}
# The sampler runs on the host; it must not outlive a failed test.
test_cleanup() { stop_sampler; }

# login USER: the user's login through the VIP; prints vsmclient's JSON.
login() {
    local out
    out=$(ssh_tlha "$1" vsmclient connect --json) || fail "login of $1 through tlha failed"
    jq -e 'type == "object" and (.session_id | tostring | length > 0) and .user == $u' \
        --arg u "$1" <<<"$out" >/dev/null || fail "vsmclient connect --json printed no session of $1: $out"
    printf '%s\n' "$out"
}

field() { jq -r ".$2" <<<"$1"; }

# check_vnc JSON: the session's desktop answers RFB from the client node: a private desktop
# through its user's ssh to the agent, one on a TCP port directly.
check_vnc() {
    local addr port sock
    addr=$(field "$1" agent_address)
    port=$(field "$1" vnc_port)
    sock=$(field "$1" vnc_socket)
    if [ "$sock" != null ]; then
        wait_for 30 "RFB banner from $sock on $addr" rfb_socket_answers "$(field "$1" user)" "$addr" "$sock"
        return
    fi
    [[ $port =~ ^[0-9]+$ ]] || fail "vnc_port is not a port number: $1"
    wait_for 30 "RFB banner from $addr:$port" rfb_answers "$addr" "$port"
}

TLCTL_TIMEOUT=3

# Sessions of a master, reduced to what must be identical on both, sorted by id. The status
# (connected or not) follows the viewers the agents see and is left out.
sessions_of() {
    tlctl_on "$1" session list --json |
        jq -S 'map({id, user, subcluster, agent, agent_address, display, vnc_port, created_ms})
               | sort_by(.id)'
}

has_session() { sessions_of "$1" | jq -e --arg id "$2" 'any(.[]; .id == $id)' >/dev/null; }
lacks_session() { ! has_session "$1" "$2"; }

digest_of() { ha_status "$1" | jq -r '.db_digest // empty'; }

# masters_agree [EXPECTED]: both masters list the same sessions (and EXPECTED, if given), and
# their database digests are equal.
masters_agree() {
    local a b da db
    a=$(sessions_of tlha-primary) || return 1
    b=$(sessions_of tlha-secondary) || return 1
    [ "$a" = "$b" ] || return 1
    [ $# -eq 0 ] || [ "$a" = "$1" ] || return 1
    da=$(digest_of tlha-primary) || return 1
    db=$(digest_of tlha-secondary) || return 1
    [ -n "$da" ] && [ "$da" = "$db" ]
}

same_session() { # JSON1 JSON2 WHAT
    local f
    for f in session_id agent agent_address display vnc_port; do
        [ "$(field "$1" "$f")" = "$(field "$2" "$f")" ] ||
            fail "$3: $f changed from $(field "$1" "$f") to $(field "$2" "$f")"
    done
    [ "$(field "$2" reconnected)" = true ] || fail "$3: vsmclient did not report a reconnect: $2"
}

# The failback sampler: as often as it can, the primary's readiness (tlctl ha status --json),
# whether it holds the VIP, and its readiness again. One line per sample:
#   EPOCHREALTIME READY_BEFORE VIP READY_AFTER     (1/0; "x" when the daemon did not answer)
start_sampler() {
    local sock=$VSM_LAB_DIR/nodes/tlha-primary/run-vsm/vsmserver.sock
    local nsp=${VSM_LAB_PREFIX}tlha-primary vip=$NET.4
    : >"$SAMPLES"
    (
        ready() {
            local s
            s=$("$TLCTL" --timeout 1 --socket "$sock" ha status --json 2>/dev/null) || { echo x; return; }
            case $s in *'"ready": true'*) echo 1 ;; *'"ready": false'*) echo 0 ;; *) echo x ;; esac
        }
        while :; do
            r1=$(ready)
            if ip -n "$nsp" -4 -o addr show dev eth0 2>/dev/null | grep -q " $vip/"; then v=1; else v=0; fi
            r2=$(ready)
            echo "$EPOCHREALTIME $r1 $v $r2"
        done
    ) >>"$SAMPLES" 2>/dev/null &
    SAMPLER_PID=$!
}

# watch_failback WHAT SEEN: after the primary came back (cable or restart), wait until it holds the
# VIP and is ready, keep sampling for 2 s more, then check every sample: whenever it held the
# VIP it was ready just before and just after. SEEN: regular expression of the state the
# primary must have been seen in at least once before (0 not ready, x not answering).
watch_failback() {
    local what=$1 seen=$2 n bad notready
    primary_serves() { vip_on tlha-primary && is_ready tlha-primary; }
    wait_for 60 "tlha-primary holds the VIP again ($what)" primary_serves
    local until=$(($(now_ms) + 2000))
    while [ "$(now_ms)" -lt "$until" ]; do sleep 0.1; done
    stop_sampler
    n=$(wc -l <"$SAMPLES")
    [ "$n" -ge 20 ] || fail "$what: only $n samples of the primary's state; cannot judge the failback"
    bad=$(awk '$3 == 1 && ($2 != 1 || $4 != 1)' "$SAMPLES" | head -n 5)
    [ -z "$bad" ] || fail "$what: tlha-primary held the VIP while not ready (time ready vip ready): $bad"
    # The sampler must have seen the primary unable to serve first (0: not ready; x: not
    # answering, for a restart), or the check above proves nothing.
    notready=$(awk -v s="$seen" '$2 ~ s || $4 ~ s' "$SAMPLES" | wc -l)
    [ "$notready" -gt 0 ] ||
        fail "$what: the primary was never seen not ready after it came back; the check proves nothing"
    echo "    $what: $n samples (about $((n * 1000 / ($(awk 'NR==1{a=$1} END{printf "%d", ($1-a)*1000}' "$SAMPLES") + 1)))/s), $notready not ready, never the VIP while not ready"
}

step "lab up with the vsm daemons from $VSM_BIN_DIR"
lab_up
wait_for 60 "tlha-primary ready" is_ready tlha-primary
wait_for 60 "tlha-secondary ready" is_ready tlha-secondary
[ "$(ssh_tlha testuser uname -n)" = tlha-primary ] || fail "tlha is not served by tlha-primary"

step "1. testuser and testuser3 log in through tlha and get sessions with working VNC ports"
s1=$(login testuser)
echo "    testuser:  $(jq -c . <<<"$s1")"
id1=$(field "$s1" session_id)
[ "$(field "$s1" reconnected)" = false ] || fail "the first login of testuser was a reconnect: $s1"
check_vnc "$s1"
s3=$(login testuser3)
echo "    testuser3: $(jq -c . <<<"$s3")"
id3=$(field "$s3" session_id)
check_vnc "$s3"
wait_for 10 "both sessions on both masters" masters_agree

step "2. pull the primary's cable: the VIP moves, testuser gets the same session back"
lab pull-cable tlha-primary >/dev/null
wait_for 30 "VIP only on tlha-secondary" vip_on tlha-secondary
wait_for 30 "ssh tlha answered by tlha-secondary" answered_by tlha-secondary
s1b=$(login testuser)
same_session "$s1" "$s1b" "reconnect through tlha-secondary"
check_vnc "$s1b"

step "3. while the primary is away: testuser2 gets a new session, testuser3's session ends"
s2=$(login testuser2)
echo "    testuser2: $(jq -c . <<<"$s2")"
id2=$(field "$s2" session_id)
if [ "$id2" = "$id1" ] || [ "$id2" = "$id3" ]; then fail "testuser2 got an existing session: $s2"; fi
check_vnc "$s2"
tlctl_on tlha-secondary session terminate --user testuser3 -y >/dev/null ||
    fail "tlctl session terminate --user testuser3 -y failed on tlha-secondary"
wait_for 30 "session $id3 gone on tlha-secondary" lacks_session tlha-secondary "$id3"
has_session tlha-secondary "$id2" || fail "session $id2 missing on tlha-secondary"
has_session tlha-primary "$id3" || fail "the cut-off primary should still list $id3"
lacks_session tlha-primary "$id2" || fail "the cut-off primary cannot know $id2 yet"
want=$(sessions_of tlha-secondary)
[ "$(jq length <<<"$want")" = 2 ] || fail "tlha-secondary should hold 2 sessions: $want"

step "4. plug the cable back: the primary resyncs and takes the VIP only when ready"
start_sampler
lab plug-cable tlha-primary >/dev/null
watch_failback "cable plugged back" "^0$"
wait_for 30 "ssh tlha answered by tlha-primary" answered_by tlha-primary
wait_for 30 "both masters hold exactly the secondary's sessions, same db_digest" masters_agree "$want"
ha_status tlha-primary | jq -e '.link == "streaming" and .config_digest_match == true' >/dev/null ||
    fail "tlha-primary is not streaming with its peer: $(ha_status tlha-primary)"
s2b=$(login testuser2)
same_session "$s2" "$s2b" "testuser2 through the returned primary"
s1c=$(login testuser)
same_session "$s1" "$s1c" "testuser through the returned primary"

step "5. kill -9 vsmserver on the active node (keepalived keeps running): the VIP moves"
lab kill-daemon tlha-primary vsmserver KILL >/dev/null
wait_for 30 "VIP only on tlha-secondary after vsmserver died" vip_on tlha-secondary
wait_for 30 "ssh tlha answered by tlha-secondary after vsmserver died" answered_by tlha-secondary
case ${VSM_LAB_MANAGER:-keepalived} in
    # heartbeat daemonizes; ask it through its own API.
    heartbeat) lab exec tlha-primary cl_status hbstatus >/dev/null 2>&1 || fail "heartbeat on tlha-primary is not running" ;;
    *)
        manager_daemon=$(case ${VSM_LAB_MANAGER:-keepalived} in pacemaker) echo pacemakerd ;; *) echo keepalived ;; esac)
        lab status | grep -E '^tlha-primary ' | grep -qE " $manager_daemon=[0-9]+" ||
            fail "$manager_daemon on tlha-primary is not running"
        ;;
esac
s1d=$(login testuser)
same_session "$s1" "$s1d" "reconnect after vsmserver died on the active node"
check_vnc "$s1d"
want=$(sessions_of tlha-secondary)
start_sampler
lab start-daemon tlha-primary vsmserver >/dev/null
watch_failback "vsmserver restarted" "^[0x]$"
wait_for 30 "ssh tlha answered by tlha-primary after the restart" answered_by tlha-primary
wait_for 30 "both masters agree after the restart" masters_agree "$want"

step "6. an agent refuses a caller that is not in allowed_clients and logs its address"
# shellcheck disable=SC2016  # expanded by the inner bash
lab exec client timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "hello\n" >&3 && read -r -t 2 _ <&3' \
    _ "$AGENT1_ADDR" "$AGENT_PORT" >/dev/null 2>&1 || true
# The agent's refusals, without colour codes should the log have them.
refusals() {
    sed 's/\x1b\[[0-9;]*m//g' "$VSM_LAB_DIR/nodes/agent1/log/vsmagent.log" |
        grep -F 'refused connection from a caller not in allowed_clients' || true
}
agent_refused() { refusals | grep -qE "peer=$CLIENT_ADDR( |\$)"; }
wait_for 10 "agent1 logs that it refused $CLIENT_ADDR" agent_refused
refusals | tail -n 1 | sed 's/^/    /'
if refusals | grep -qE "peer=$NET\.(2|3|4)( |\$)"; then
    fail "agent1 refused a master or the VIP: $(refusals | grep -E "peer=$NET\.(2|3|4)( |\$)")"
fi

step "down leaves nothing behind"
lab_down_checked
