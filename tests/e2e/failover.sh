#!/bin/bash
# failover.sh: end-to-end HA test of the real daemons in the namespace lab.
#
#   VSM_BIN_DIR=target/debug tests/e2e/failover.sh
#
# Needs root and usable vsm binaries: without them it FAILS (it never skips for a missing
# binary); it prints "skipped" and exits 0 only when not run as root.
#
# What it checks, in order:
#  1. Login through the VIP name (ssh testuser@tlha vsmclient connect --json, strict host key)
#     gives a session whose VNC port answers RFB from the client node.
#  2. Pull the primary's cable: the secondary answers on tlha with the same known_hosts, and
#     the same login reconnects to the SAME session (same id, agent, display).
#  3. While the primary is away: a second user gets a new session, the first session ends.
#  4. Plug the cable back: the primary takes the VIP back only while `tlctl ha status` says
#     ready; afterwards both masters list exactly the same sessions.
#  5. kill -9 of vsmserver on the active node (keepalived keeps running): the VIP moves, the
#     login still finds its session; vsmserver restarted, the primary takes over again and
#     both masters agree again.
#  6. An agent refuses a privileged connection from a host not in allowed_clients (the
#     client node) and logs it.
#
# Interface assumed from the daemons (see docs/lab.md):
#   vsmclient connect --json      -> {"session_id", "agent_address", "display", "vnc_port", ...}
#   tlctl ha status --json        -> {"ready": bool, ...}
#   tlctl session list --json     -> [{"session_id", "user", "agent", "display", "status", ...}]
#   tlctl session terminate --user=USER -y
#   vsmagent logs a line with "refused" and the peer address for a client not allowed.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

skip_unless_root
export VSM_LAB_DAEMONS=1
export VSM_BIN_DIR=${VSM_BIN_DIR:-$REPO/target/debug}
command -v jq >/dev/null || fail "jq is missing (scripts/install-test-deps.sh)"
trap on_exit EXIT

CLIENT_ADDR=10.213.0.20
AGENT_PORT=${VSM_AGENT_PORT:-904}

# login USER: the user's login through the VIP; prints vsmclient's JSON.
login() {
    local out
    out=$(ssh_tlha "$1" vsmclient connect --json) || fail "login of $1 through tlha failed"
    jq -e 'type == "object" and (.session_id | tostring | length > 0)' <<<"$out" >/dev/null ||
        fail "vsmclient connect --json printed no session: $out"
    printf '%s\n' "$out"
}

field() { jq -r ".$2" <<<"$1"; }

# check_vnc JSON: the session's VNC port answers RFB from the client node.
check_vnc() {
    local addr port
    addr=$(field "$1" agent_address)
    port=$(field "$1" vnc_port)
    [[ $port =~ ^[0-9]+$ ]] || fail "vnc_port is not a port number: $1"
    wait_for 30 "RFB banner from $addr:$port" rfb_answers "$addr" "$port"
}

tlctl_on() { # NODE ARGS...: tlctl as root on a master
    local node=$1
    shift
    lab exec "$node" tlctl "$@"
}

is_ready() { tlctl_on "$1" ha status --json 2>/dev/null | jq -e '.ready == true' >/dev/null; }

# Sessions of a master, reduced to what must be identical on both and sorted.
sessions_of() {
    tlctl_on "$1" session list --json |
        jq -S 'map({session_id, user, agent, agent_address, display, vnc_port, status, version})
               | sort_by(.session_id | tostring)'
}

has_session() { sessions_of "$1" | jq -e --arg id "$2" 'any(.[]; (.session_id | tostring) == $id)' >/dev/null; }
lacks_session() { ! has_session "$1" "$2"; }

masters_agree() {
    local a b
    a=$(sessions_of tlha-primary) || return 1
    b=$(sessions_of tlha-secondary) || return 1
    [ "$a" = "$b" ]
}

same_session() { # JSON1 JSON2 WHAT
    local f
    for f in session_id agent_address display; do
        [ "$(field "$1" "$f")" = "$(field "$2" "$f")" ] ||
            fail "$3: $f changed from $(field "$1" "$f") to $(field "$2" "$f")"
    done
}

# Watch the primary return: it must never hold the VIP while reporting not ready. Samples the
# VIP first, then readiness, so a sample can only err towards "ready".
watch_failback() {
    local deadline=$(($(now_ms) + 60000)) holder
    while :; do
        holder=$(lab vip-holder 2>/dev/null || true)
        if [ "$holder" = tlha-primary ]; then
            is_ready tlha-primary ||
                fail "tlha-primary holds the VIP while tlctl ha status says it is not ready"
            return 0
        fi
        [ "$(now_ms)" -lt "$deadline" ] || fail "tlha-primary did not take the VIP back within 60s"
        sleep 0.1
    done
}

step "lab up with the vsm daemons from $VSM_BIN_DIR"
lab_up
wait_for 60 "tlha-primary ready" is_ready tlha-primary
wait_for 60 "tlha-secondary ready" is_ready tlha-secondary
[ "$(ssh_tlha testuser uname -n)" = tlha-primary ] || fail "tlha is not served by tlha-primary"

step "1. testuser logs in through tlha and gets a session with a working VNC port"
s1=$(login testuser)
echo "    session: $s1"
id1=$(field "$s1" session_id)
check_vnc "$s1"
wait_for 10 "session $id1 replicated to tlha-secondary" has_session tlha-secondary "$id1"

step "2. pull the primary's cable: the secondary serves tlha, the same session comes back"
lab pull-cable tlha-primary >/dev/null
wait_for 30 "ssh tlha answered by tlha-secondary" answered_by tlha-secondary
wait_for 30 "VIP only on tlha-secondary" vip_on tlha-secondary
s1b=$(login testuser)
same_session "$s1" "$s1b" "reconnect through tlha-secondary"
check_vnc "$s1b"

step "3. while the primary is away: testuser2 gets a new session, testuser's session ends"
s2=$(login testuser2)
id2=$(field "$s2" session_id)
[ "$id2" != "$id1" ] || fail "testuser2 got testuser's session $id1"
check_vnc "$s2"
tlctl_on tlha-secondary session terminate --user=testuser -y >/dev/null ||
    fail "tlctl session terminate --user=testuser -y failed on tlha-secondary"
wait_for 30 "session $id1 gone on tlha-secondary" lacks_session tlha-secondary "$id1"
has_session tlha-secondary "$id2" || fail "session $id2 missing on tlha-secondary"

step "4. plug the cable back: the primary resyncs and takes the VIP only when ready"
lab plug-cable tlha-primary >/dev/null
watch_failback
wait_for 30 "ssh tlha answered by tlha-primary" answered_by tlha-primary
wait_for 30 "both masters list the same sessions" masters_agree
lacks_session tlha-primary "$id1" || fail "session $id1, ended during the failover, is back on tlha-primary"
has_session tlha-primary "$id2" || fail "session $id2, created during the failover, is missing on tlha-primary"
s2b=$(login testuser2)
same_session "$s2" "$s2b" "reconnect through the returned primary"

step "5. kill -9 vsmserver on the active node: the VIP moves, logins still find their session"
lab kill-daemon tlha-primary vsmserver KILL >/dev/null
wait_for 30 "ssh tlha answered by tlha-secondary after vsmserver died" answered_by tlha-secondary
wait_for 30 "VIP only on tlha-secondary after vsmserver died" vip_on tlha-secondary
s2c=$(login testuser2)
same_session "$s2" "$s2c" "reconnect after vsmserver died on the active node"
lab start-daemon tlha-primary vsmserver >/dev/null
watch_failback
wait_for 30 "ssh tlha answered by tlha-primary after the restart" answered_by tlha-primary
wait_for 30 "both masters list the same sessions after the restart" masters_agree

step "6. an agent refuses privileged calls from a host not in allowed_clients"
# shellcheck disable=SC2016  # expanded by the inner bash
lab exec client timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "hello\n" >&3 && sleep 1' \
    _ 10.213.0.11 "$AGENT_PORT" >/dev/null 2>&1 || true
agent_refused() { grep -i 'refused' "$VSM_LAB_DIR/nodes/agent1/log/vsmagent.log" | grep -q "$CLIENT_ADDR"; }
wait_for 10 "agent1 logs that it refused $CLIENT_ADDR" agent_refused

step "down leaves nothing behind"
lab_down_checked
