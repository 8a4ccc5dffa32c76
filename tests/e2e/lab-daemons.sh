#!/bin/bash
# lab-daemons.sh: the lab's plumbing for the vsm daemons, driven by the test doubles in
# tests/e2e/fake-bin (they only keep a pid, answer `tlctl ha check` while the fake server
# lives, and record notify calls).
#
# Checks: the configuration is written with tl-config as in docs/ha-setup.md and the keys are
# shared; vsmclient is on the PATH of an SSH login through tlha; keepalived's notify hooks reach
# tlctl; kill -9 of vsmserver on the active node moves the VIP (health check through
# `tlctl ha check`) and a restart brings it back; down leaves nothing behind.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

skip_unless_root
command -v jq >/dev/null || fail "jq is missing (scripts/install-test-deps.sh)"
export VSM_LAB_DAEMONS=1
export VSM_BIN_DIR=$E2E_DIR/fake-bin
trap on_exit EXIT

nodes=$VSM_LAB_DIR/nodes
conf_has() { grep -qxF -- "$2" "$nodes/$1/etc-vsm/fake.conf" || fail "$1: tl-config never set '$2'"; }
notified() { [ "$(tail -n 1 "$nodes/$1/run-vsm/notified" 2>/dev/null)" = "$2" ]; }
served_by() { [ "$(ssh_tlha testuser vsmclient connect --json 2>/dev/null | jq -r .served_by)" = "$1" ]; }

step "lab up with the daemon test doubles"
lab_up
[ "$(cat "$VSM_LAB_DIR/mode")" = daemons ] || fail "the lab did not start in daemon mode"

step "configuration written with tl-config, keys shared"
for m in tlha-primary tlha-secondary; do
    conf_has "$m" /HA/enabled=1
    conf_has "$m" '/HA/nodes=tlha-primary tlha-secondary'
    conf_has "$m" '/subclusters/default/agents=agent1 agent2'
    [ "$(stat -c %a "$nodes/$m/etc-vsm/ha.key")" = 600 ] || fail "$m: ha.key is not mode 600"
    [ "$(stat -c %s "$nodes/$m/etc-vsm/ha.key")" = 32 ] || fail "$m: ha.key is not 32 bytes"
done
cmp -s "$nodes/tlha-primary/etc-vsm/ha.key" "$nodes/tlha-secondary/etc-vsm/ha.key" ||
    fail "the masters have different ha.key files"
for a in agent1 agent2; do
    conf_has "$a" '/vsmagent/allowed_clients=tlha-primary tlha-secondary'
    conf_has "$a" /vsmagent/master_hostname=tlha
    cmp -s "$nodes/tlha-primary/etc-vsm/cluster.key" "$nodes/$a/etc-vsm/cluster.key" ||
        fail "$a has another cluster.key than the masters"
done
[ ! -e "$nodes/agent1/etc-vsm/ha.key" ] || fail "agents must not get the masters' ha.key"

step "vsmclient runs through ssh testuser@tlha on the active master"
wait_for 10 "vsmclient served by tlha-primary" served_by tlha-primary

step "keepalived's notify hooks reach tlctl"
wait_for 10 "tlha-primary notified MASTER" notified tlha-primary MASTER
wait_for 10 "tlha-secondary notified BACKUP" notified tlha-secondary BACKUP

step "kill -9 vsmserver on the active master: the VIP moves"
lab kill-daemon tlha-primary vsmserver KILL >/dev/null
wait_for 20 "ssh tlha answered by tlha-secondary" answered_by tlha-secondary
wait_for 20 "VIP only on tlha-secondary" vip_on tlha-secondary
wait_for 10 "vsmclient served by tlha-secondary" served_by tlha-secondary
wait_for 10 "tlha-primary notified FAULT" notified tlha-primary FAULT
wait_for 10 "tlha-secondary notified MASTER" notified tlha-secondary MASTER

step "vsmserver restarted: the primary takes the VIP back"
lab start-daemon tlha-primary vsmserver >/dev/null
wait_for 20 "VIP only on tlha-primary" vip_on tlha-primary
wait_for 20 "ssh tlha answered by tlha-primary" answered_by tlha-primary
wait_for 10 "tlha-primary notified MASTER again" notified tlha-primary MASTER

step "down leaves nothing behind"
lab_down_checked
