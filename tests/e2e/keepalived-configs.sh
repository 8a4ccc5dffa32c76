#!/bin/bash
# keepalived-configs.sh: the shipped keepalived configurations (config/keepalived/{guide,fast,subsecond})
# parse with `keepalived -t`, have the properties docs/ha-setup.md promises, and a known-bad
# variant is rejected (so the check can fail).
#
# keepalived -t checks that the interface exists and that track scripts are executable and
# safe, so each file is tested inside a throw-away network namespace that has an `eth0`, with
# /usr/bin/tlctl replaced by a stub when the real one is not installed.
set -euo pipefail

HERE=$(dirname "$(readlink -f "$0")")
REPO=$(dirname "$(dirname "$HERE")")
KDIR=${VSM_KEEPALIVED_DIR:-$REPO/config/keepalived}
NAME=keepalived-configs

if [ "$(id -u)" -ne 0 ]; then
    echo "skipped: not root ($NAME needs a network namespace)"
    exit 0
fi
command -v keepalived >/dev/null || { echo "FAIL: $NAME: keepalived is not installed (scripts/install-test-deps.sh)" >&2; exit 1; }

NS=vsmkt-$$
WORK=$(mktemp -d /run/vsm-kt.XXXXXX)
cleanup() {
    ip netns delete "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
failures=0
fail() {
    echo "FAIL: $NAME: $*" >&2
    failures=$((failures + 1))
}

chmod 0755 "$WORK"
printf '#!/bin/sh\nexit 0\n' >"$WORK/tlctl"
chmod 0755 "$WORK/tlctl"
ip netns add "$NS"
ip -n "$NS" link add eth0 type veth peer name eth1

# config_test FILE: keepalived -t on FILE with the tlctl stub; prints keepalived's output.
config_test() {
    sed "s#/usr/bin/tlctl#$WORK/tlctl#g" "$1" >"$WORK/test.conf"
    ip netns exec "$NS" keepalived -t -f "$WORK/test.conf" 2>&1
}

for profile in guide fast subsecond; do
    for node in primary secondary; do
        f=$KDIR/$profile/keepalived-$node.conf
        [ -f "$f" ] || { fail "missing $f"; continue; }
        if out=$(config_test "$f"); then
            [ -z "$out" ] || fail "$f: keepalived -t passed with warnings: $out"
        else
            fail "$f: keepalived -t failed: $out"
        fi
        for want in 'script_user root' 'enable_script_security' 'vrrp_script chk_vsmserver' \
            'script "/usr/bin/tlctl ha check"' 'interval 1' 'rise 2' 'init_fail' \
            'interface eth0' '10.0.0.4/24' 'virtual_router_id 51' 'chk_vsmserver' \
            'notify_master "/usr/bin/tlctl ha notify MASTER"' \
            'notify_backup "/usr/bin/tlctl ha notify BACKUP"' \
            'notify_fault "/usr/bin/tlctl ha notify FAULT"' "router_id tlha-$node"; do
            grep -qF -- "$want" "$f" || fail "$f: lacks '$want'"
        done
        if [ "$node" = primary ]; then
            grep -qE '^\s*priority 101$' "$f" || fail "$f: primary priority is not 101"
            grep -qE '^\s*state MASTER$' "$f" || fail "$f: primary state is not MASTER"
        else
            grep -qE '^\s*priority 100$' "$f" || fail "$f: secondary priority is not 100"
            grep -qE '^\s*state BACKUP$' "$f" || fail "$f: secondary state is not BACKUP"
        fi
        if [ "$profile" = guide ]; then
            grep -qE '^\s*advert_int 1$' "$f" || fail "$f: guide profile needs advert_int 1"
            grep -qE '^\s*auth_type PASS$' "$f" || fail "$f: guide profile needs auth_type PASS"
            grep -qE '^\s*fall 2$' "$f" || fail "$f: guide profile needs fall 2"
            ! grep -q vrrp_version "$f" || fail "$f: guide profile is VRRPv2 (no vrrp_version)"
        else
            advert=0.1
            [ "$profile" = fast ] || advert=0.05
            grep -qE '^\s*vrrp_version 3$' "$f" || fail "$f: $profile profile needs vrrp_version 3"
            grep -qE "^\s*advert_int ${advert//./\\.}\$" "$f" || fail "$f: $profile profile needs advert_int $advert"
            grep -qE '^\s*fall 1$' "$f" || fail "$f: $profile profile needs fall 1"
            # A crashed vsmserver is noticed through the watcher's track file, not the next check.
            for want in 'vrrp_track_file vsmserver_alive' 'file "/run/vsm-watch/vsmserver.track"' 'init_file 1' \
                'track_file {'; do
                grep -qF -- "$want" "$f" || fail "$f: lacks '$want'"
            done
            ! grep -qE '^\s*authentication \{' "$f" || fail "$f: VRRPv3 takes no authentication block"
        fi
    done
    # The two nodes' files differ only in comments, router_id, state and priority.
    d=$(diff <(grep -v '^!' "$KDIR/$profile/keepalived-primary.conf") \
        <(grep -v '^!' "$KDIR/$profile/keepalived-secondary.conf") |
        grep '^[<>]' | grep -vE '^[<>]\s*(router_id|state|priority) ' || true)
    [ -z "$d" ] || fail "$profile: primary and secondary differ beyond router_id/state/priority: $d"
done

# The guide's file as published (no health check, no notify hook) parses once its interface is
# the namespace's; the lab and tests/e2e/guide-as-published.sh run it that way.
for node in primary secondary; do
    f=$KDIR/published/keepalived-$node.conf
    [ -f "$f" ] || { fail "missing $f"; continue; }
    sed 's/^\(\s*interface\) ens192$/\1 eth0/' "$f" >"$WORK/published.conf"
    if ! out=$(config_test "$WORK/published.conf"); then
        fail "$f: keepalived -t failed: $out"
    fi
    ! grep -qE 'vrrp_script|track_script|notify_' "$f" || fail "$f: the published file has no health check or notify hook"
done

# Negative control: VRRPv3 with an authentication block must be rejected.
sed 's/^\(\s*\)advert_int 0.1$/\1advert_int 0.1\n\1authentication {\n\1    auth_type PASS\n\1    auth_pass 1111\n\1}/' \
    "$KDIR/fast/keepalived-primary.conf" >"$WORK/bad.conf"
grep -q auth_type "$WORK/bad.conf" || fail "could not build the negative control"
if out=$(config_test "$WORK/bad.conf") && [ -z "$out" ]; then
    fail "keepalived -t accepted VRRPv3 with authentication; the config test cannot catch errors"
fi

if [ "$failures" -gt 0 ]; then
    echo "FAIL: $NAME: $failures problem(s)" >&2
    exit 1
fi
echo "PASS: $NAME"
