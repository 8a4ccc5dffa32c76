#!/bin/bash
# lab-smoke.sh: everything of the HA lab that does not need the vsm daemons.
#
# Builds the lab (scripts/ha-lab.sh) without vsm daemons and checks: ssh to the VIP name with
# strict host-key checking reaches the primary; a wrong host key is refused; both masters
# present the same key; Xvnc runs on both agents with the same display and answers RFB from
# the client; the VIP moves to the secondary when the primary's cable is pulled, when its
# health check fails (sshd stands in for vsmserver) and when its keepalived is killed, and
# comes back each time; both keepalived profiles; down leaves nothing behind.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

skip_unless_root
# The smoke test checks the lab itself; the failover test covers the daemons.
export VSM_LAB_DAEMONS=0
trap on_exit EXIT

vip_includes() { [[ " $(lab vip-holder 2>/dev/null) " == *" $1 "* ]]; }

# failover_and_back TRIGGER RESTORE SECONDS [stale]: the secondary answers ssh on the VIP
# name (same known_hosts) after TRIGGER, the primary again after RESTORE, each within
# SECONDS. "stale": the dead node may keep the VIP on its interface until RESTORE (a crashed
# keepalived cannot remove it).
failover_and_back() {
    local trigger=$1 restore=$2 secs=$3 stale=${4:-}
    step "failover: $trigger"
    eval "$trigger" >/dev/null
    wait_for "$secs" "ssh tlha answered by tlha-secondary after: $trigger" answered_by tlha-secondary
    if [ "$stale" = stale ]; then
        wait_for "$secs" "VIP on tlha-secondary after: $trigger" vip_includes tlha-secondary
    else
        wait_for "$secs" "VIP only on tlha-secondary after: $trigger" vip_on tlha-secondary
    fi
    step "failback: $restore"
    eval "$restore" >/dev/null
    wait_for "$secs" "VIP only on tlha-primary after: $restore" vip_on tlha-primary
    wait_for "$secs" "ssh tlha answered by tlha-primary after: $restore" answered_by tlha-primary
}

step "lab up (fast profile)"
VSM_LAB_PROFILE=fast lab_up

step "ssh testuser@tlha with strict host-key checking reaches tlha-primary"
got=$(ssh_tlha testuser uname -n) || fail "ssh testuser@tlha failed"
[ "$got" = tlha-primary ] || fail "ssh testuser@tlha answered by '$got', expected tlha-primary"
[ "$(lab vip-holder)" = tlha-primary ] || fail "vip-holder says '$(lab vip-holder)'"

step "the second test user logs in too"
got=$(ssh_tlha testuser2 id -un) || fail "ssh testuser2@tlha failed"
[ "$got" = testuser2 ] || fail "ssh testuser2@tlha ran as '$got'"

step "both masters present the same host key"
got=$(lab exec client ssh -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$KNOWN_HOSTS" \
    testuser@tlha-secondary uname -n) || fail "ssh to tlha-secondary with the shared key failed"
[ "$got" = tlha-secondary ] || fail "ssh tlha-secondary answered by '$got'"

step "a client that knows another key for tlha is refused"
other=$VSM_LAB_DIR/other
mkdir -p "$other"
ssh-keygen -q -t ed25519 -N '' -f "$other/key"
echo "tlha,10.213.0.4 $(cut -d' ' -f1,2 "$other/key.pub")" >"$other/known_hosts"
if out=$(lab exec client ssh -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$other/known_hosts" \
    testuser@tlha uname -n 2>&1); then
    fail "ssh accepted a host key that differs from known_hosts (answer: $out)"
fi
case $out in
    *"REMOTE HOST IDENTIFICATION HAS CHANGED"* | *"Host key verification failed"*) ;;
    *) fail "ssh failed for another reason than the host key: $out" ;;
esac

step "Xvnc :10 on both agents (private /tmp each) answers RFB from the client"
for agent in agent1 agent2; do
    lab spawn "$agent" xvnc Xvnc :10 -SecurityTypes None -localhost no -geometry 800x600 >/dev/null
done
wait_for 20 "RFB banner from agent1:5910" rfb_answers 10.213.0.11 5910
wait_for 20 "RFB banner from agent2:5910" rfb_answers 10.213.0.12 5910

failover_and_back "lab pull-cable tlha-primary" "lab plug-cable tlha-primary" 20
failover_and_back "lab stop-daemon tlha-primary sshd" "lab start-daemon tlha-primary sshd" 20
failover_and_back "lab kill-daemon tlha-primary keepalived KILL" \
    "lab start-daemon tlha-primary keepalived" 20 stale

step "guide profile (VRRPv2, 1 s adverts, PASS authentication)"
lab set-profile guide >/dev/null
grep -q 'advert_int 1$' "$VSM_LAB_DIR/nodes/tlha-primary/keepalived.conf" ||
    fail "set-profile guide did not render the guide configuration"
wait_for 30 "ssh tlha answered by tlha-primary (guide profile)" answered_by tlha-primary
failover_and_back "lab pull-cable tlha-primary" "lab plug-cable tlha-primary" 30

step "down leaves no namespaces, /etc/netns entries, lab files or processes"
lab_down_checked
