#!/bin/bash
# guide-as-published.sh: the vsm masters under keepalived configured exactly as the keepalived
# VIP guide publishes it (config/keepalived/published: state MASTER/BACKUP, priorities
# 101/100, no vrrp_script, no notify hook), so nothing keeps the primary from taking the
# resource IP back the moment its keepalived runs, ready or not.
#
#   VSM_BIN_DIR=target/release tests/e2e/guide-as-published.sh
#
# Needs root and usable vsm binaries (it FAILS without them); prints "skipped" and exits 0 only
# when not run as root.
#
# What it checks, in order:
#  1. testuser logs in through tlha (the primary) and gets a desktop.
#  2. The primary goes away (keepalived stopped, vsmserver killed): tlha moves to the
#     secondary; testuser gets the same desktop back, testuser2 gets a new one there.
#  3. The primary comes back (vsmserver, then keepalived at once) and preempts: the first
#     login of testuser2 through tlha right after the primary holds the address gets the
#     desktop created on the secondary (a reconnect), and both masters agree.
#  4. The primary is reinstalled (empty data directory) and comes back while its peer's
#     vsmserver is down: it takes tlha while it is not ready, and testuser's login through tlha
#     is refused (vsmclient exit status 75, JSON error "not_ready") instead of starting a new
#     desktop. Once the peer's vsmserver runs again the primary resynchronises and testuser
#     gets the original desktop back; no desktop was started behind anyone's back (a refresh
#     of the session list from the agents finds exactly the desktops the users were told of).
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

skip_unless_root
export VSM_LAB_DAEMONS=1
export VSM_LAB_PROFILE=published
# A start-up grace much longer than this test: a master that cannot reach its peer stays not
# ready for the whole of step 4.
export VSM_LAB_HA_KEYS="/HA/startup_grace=5m"
export VSM_BIN_DIR=${VSM_BIN_DIR:-$REPO/target/debug}
command -v jq >/dev/null || fail "jq is missing (scripts/install-test-deps.sh)"
trap on_exit EXIT

TLCTL=$VSM_BIN_DIR/tlctl

TLCTL_TIMEOUT=5
readiness() { ha_status "$1" | jq -r .readiness; }
field() { jq -r ".$2" <<<"$1"; }

login() { # USER: vsmclient connect --json through tlha; prints its JSON
    local out
    out=$(ssh_tlha "$1" vsmclient connect --json) || fail "login of $1 through tlha failed: $out"
    jq -e '.session_id | tostring | length > 0' <<<"$out" >/dev/null || fail "no session for $1: $out"
    printf '%s\n' "$out"
}

same_session() { # JSON1 JSON2 WHAT
    [ "$(field "$1" session_id)" = "$(field "$2" session_id)" ] ||
        fail "$3: got session $(field "$2" session_id), expected $(field "$1" session_id)"
    [ "$(field "$2" reconnected)" = true ] || fail "$3: not a reconnect: $2"
}

sessions_of() {
    tlctl_on "$1" session list --json "${@:2}" |
        jq -S 'map({id, user, agent, display, vnc_port}) | sort_by(.id)'
}
digest_of() { ha_status "$1" | jq -r '.db_digest // empty'; }
masters_agree() {
    local a b
    a=$(sessions_of tlha-primary) && b=$(sessions_of tlha-secondary) || return 1
    [ "$a" = "$b" ] && [ -n "$(digest_of tlha-primary)" ] && [ "$(digest_of tlha-primary)" = "$(digest_of tlha-secondary)" ]
}

primary_away() {
    lab stop-daemon tlha-primary keepalived >/dev/null
    lab kill-daemon tlha-primary vsmserver KILL >/dev/null
    wait_for 30 "VIP only on tlha-secondary" vip_on tlha-secondary
    wait_for 30 "ssh tlha answered by tlha-secondary" answered_by tlha-secondary
}

answers() { ha_status "$1" >/dev/null 2>&1; }

primary_back() {
    lab start-daemon tlha-primary vsmserver >/dev/null
    # As at boot: the daemon answers (ready or not) by the time keepalived runs.
    wait_for 30 "vsmserver on tlha-primary answers" answers tlha-primary
    lab start-daemon tlha-primary keepalived >/dev/null
    # Preempted as soon as keepalived on the primary runs: nothing waits for vsm.
    wait_for 30 "tlha-primary holds the VIP again" vip_on tlha-primary
}

step "lab up with keepalived as the guide publishes it, daemons from $VSM_BIN_DIR"
lab_up
grep -q vrrp_script "$VSM_LAB_DIR/nodes/tlha-primary/keepalived.conf" && fail "the published file has no vrrp_script"
grep -q notify_ "$VSM_LAB_DIR/nodes/tlha-primary/keepalived.conf" && fail "the published file has no notify hook"
wait_for 60 "tlha-primary ready" is_ready tlha-primary
wait_for 60 "tlha-secondary ready" is_ready tlha-secondary

step "1. testuser gets a desktop through tlha"
s1=$(login testuser)
echo "    testuser:  $(jq -c . <<<"$s1")"
wait_for 10 "both masters hold it" masters_agree

step "2. the primary goes away: testuser gets the same desktop, testuser2 a new one, from the secondary"
primary_away
same_session "$s1" "$(login testuser)" "testuser through tlha-secondary"
s2=$(login testuser2)
echo "    testuser2: $(jq -c . <<<"$s2")"
[ "$(field "$s2" reconnected)" = false ] || fail "testuser2 had no desktop before: $s2"

step "3. the primary comes back and preempts at once: testuser2 gets the desktop made on the secondary"
primary_back
s2b=$(login testuser2)
same_session "$s2" "$s2b" "testuser2 right after the primary preempted"
answered_by tlha-primary || fail "tlha is not answered by tlha-primary after it preempted"
wait_for 30 "both masters agree" masters_agree

step "4. a reinstalled primary holds tlha before it has resynchronised: logins are refused"
primary_away
rm -rf "${VSM_LAB_DIR:?}/nodes/tlha-primary/lib-vsm/"*
lab kill-daemon tlha-secondary vsmserver KILL >/dev/null
primary_back
st=$(readiness tlha-primary)
[ "$st" = waiting_for_peer ] || fail "the reinstalled primary should wait for its peer, not be '$st'"
rc=0
out=$(ssh_tlha testuser vsmclient connect --json) || rc=$?
echo "    vsmclient exit status $rc: $out"
[ "$rc" = 75 ] || fail "login through a primary that is not ready: exit status $rc, expected 75: $out"
[ "$(field "$out" error)" = not_ready ] || fail "the JSON error is not not_ready: $out"
[ "$(field "$out" exit_status)" = 75 ] || fail "the JSON error does not carry the exit status: $out"
vip_on tlha-primary || fail "the primary lost the VIP during the refused login; the test proves nothing"
is_ready tlha-primary && fail "the primary became ready without its peer"
[ "$(sessions_of tlha-primary | jq length)" = 0 ] || fail "the reinstalled primary stored a session: $(sessions_of tlha-primary)"
warn=$(tlctl_on tlha-primary session list 2>&1 >/dev/null) || true
[[ $warn == *"may be out of date"* ]] || fail "a listing on a node that is not ready carries no warning: $warn"
tlctl_on tlha-primary ha check >/dev/null 2>&1 && fail "tlctl ha check passes on a node that is not ready"

lab start-daemon tlha-secondary vsmserver >/dev/null
wait_for 60 "tlha-primary resynchronised" is_ready tlha-primary
same_session "$s1" "$(login testuser)" "testuser through the resynchronised primary"
same_session "$s2" "$(login testuser2)" "testuser2 through the resynchronised primary"
# Every desktop on the agents is one a user was told about: a refresh from the agents on the
# primary finds exactly the two sessions.
want=$(jq -S -n --argjson a "$s1" --argjson b "$s2" '[$a.session_id, $b.session_id] | sort')
got=$(sessions_of tlha-primary --refresh | jq -S 'map(.id) | sort')
[ "$got" = "$want" ] || fail "sessions after a refresh from the agents: $got, expected $want"
wait_for 30 "both masters agree after the resync" masters_agree

step "down leaves nothing behind"
lab_down_checked
