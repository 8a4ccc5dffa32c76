#!/bin/bash
# cluster-configs.sh: the shipped Pacemaker/Corosync and Heartbeat material, without a lab.
#
#   tests/e2e/cluster-configs.sh
#
# - config/pacemaker/corosync.conf passes `corosync -t`, with two_node and knet;
# - the pcs commands of config/pacemaker/vsm-pcs.sh (the ones the lab runs), with its default
#   values, are exactly the ones docs/ha-setup.md shows, and a changed command is caught;
# - config/heartbeat: ha.cf and haresources have the promised settings, and the resource
#   script hands the active role over through tlctl (a stub records the calls).
# Needs corosync installed; prints "skipped" and exits 0 when not run as root.
set -euo pipefail

NAME=cluster-configs
HERE=$(dirname "$(readlink -f "$0")")
REPO=$(dirname "$(dirname "$HERE")")
PMK=$REPO/config/pacemaker
HB=$REPO/config/heartbeat
DOC=$REPO/docs/ha-setup.md

if [ "$(id -u)" -ne 0 ]; then
    echo "skipped: not root ($NAME runs with the other namespace tests)"
    exit 0
fi
failures=0
fail() {
    echo "FAIL: $NAME: $*" >&2
    failures=$((failures + 1))
}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- Corosync
command -v corosync >/dev/null || fail "corosync is missing (scripts/install-test-deps.sh)"
if command -v corosync >/dev/null; then
    # With the key in a file of its own (the shipped file uses /etc/corosync/authkey).
    corosync-keygen -k "$WORK/authkey" >/dev/null 2>&1 || fail "corosync-keygen failed"
    # corosync -t also wants this host in the node list: the primary becomes 127.0.0.1.
    sed -e "s#^\( *\)transport: knet\$#&\n\1keyfile: $WORK/authkey#" -e "s#ring0_addr: 10.0.0.2\$#ring0_addr: 127.0.0.1#" \
        "$PMK/corosync.conf" >"$WORK/corosync.conf"
    out=$(corosync -t -c "$WORK/corosync.conf" 2>&1) || fail "corosync -t rejects $PMK/corosync.conf: $out"
fi
for want in 'transport: knet' 'two_node: 1' 'provider: corosync_votequorum' 'token: 3000' \
    'name: tlha-primary' 'name: tlha-secondary'; do
    grep -qF -- "$want" "$PMK/corosync.conf" || fail "corosync.conf lacks '$want'"
done

# --- pcs commands: the script's, as run with its defaults, against the documentation's.
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexit 0\n' >"$WORK/bin/pcs"
chmod 0755 "$WORK/bin/pcs"
PATH=$WORK/bin:$PATH FENCING=none sh "$PMK/vsm-pcs.sh" | sed -n 's/^+ //p' >"$WORK/script.cmds"
[ "$(wc -l <"$WORK/script.cmds")" -ge 10 ] || fail "vsm-pcs.sh ran fewer pcs commands than expected"
# The documentation's console lines ("# pcs ..."), continuation lines joined, comments dropped.
doc_cmds() {
    sed -n '/^## 3\. Pacemaker/,/^## [0-9]/p' "$1" |
        awk '/^```/ { inblock = !inblock; next }
             inblock && /^# pcs / { line = substr($0, 3); cont = 1 }
             inblock && !/^# pcs / && cont { line = line " " $0 }
             inblock && cont { if (line !~ /\\$/) { print line; cont = 0 } else sub(/\\$/, "", line) }' |
        sed -e 's/  *# .*$//' -e 's/[[:space:]]\+/ /g' -e 's/ $//'
}
doc_cmds "$DOC" | grep -v '^pcs \(host\|cluster\|stonith\|status\|resource cleanup\|constraint remove\)' >"$WORK/doc.cmds"
if ! diff -u "$WORK/script.cmds" "$WORK/doc.cmds" >"$WORK/diff"; then
    fail "the pcs commands of docs/ha-setup.md (section 3) differ from config/pacemaker/vsm-pcs.sh: $(cat "$WORK/diff")"
fi
# Negative control: a changed value in the documentation is caught.
sed 's/failure-timeout=20s/failure-timeout=21s/' "$DOC" >"$WORK/bad.md"
doc_cmds "$WORK/bad.md" | grep -v '^pcs \(host\|cluster\|stonith\|status\|resource cleanup\|constraint remove\)' >"$WORK/bad.cmds"
if diff -q "$WORK/script.cmds" "$WORK/bad.cmds" >/dev/null; then
    fail "the comparison of documented and scripted pcs commands cannot catch a difference"
fi

# --- Heartbeat
for want in 'crm no' 'auto_failback on' 'node tlha-primary' 'node tlha-secondary' \
    'ucast eth0 10.0.0.2' 'ucast eth0 10.0.0.3' 'respawn root /usr/lib/vsm/vsm-hb-watch' 'deadtime 5'; do
    grep -qxF -- "$want" "$HB/ha.cf" || fail "ha.cf lacks the line '$want'"
done
res=$(grep -v '^#' "$HB/haresources" | grep .)
[ "$res" = "tlha-primary vsmserver IPaddr::10.0.0.4/24/eth0" ] ||
    fail "haresources should start vsmserver before the IP on tlha-primary: '$res'"
for s in "$HB/vsmserver" "$HB/vsm-hb-watch"; do
    sh -n "$s" || fail "$s: syntax error"
    [ -x "$s" ] || fail "$s is not executable"
done
# The resource script with a tlctl stub: ready at the second check.
cat >"$WORK/tlctl" <<EOF
#!/bin/sh
echo "\$*" >>"$WORK/calls"
case "\$1 \$2" in
    "ha check") n=\$(grep -c '^ha check' "$WORK/calls"); [ "\$n" -ge 2 ] ;;
    "ha status") echo '{"role": "active"}' ;;
    *) exit 0 ;;
esac
EOF
chmod 0755 "$WORK/tlctl"
: >"$WORK/calls"
TLCTL=$WORK/tlctl "$HB/vsmserver" start 2>/dev/null || fail "resource script start failed"
[ "$(cat "$WORK/calls")" = "$(printf 'ha check\nha check\nha notify MASTER')" ] ||
    fail "start should wait for ha check, then notify MASTER: $(tr '\n' ';' <"$WORK/calls")"
: >"$WORK/calls"
TLCTL=$WORK/tlctl "$HB/vsmserver" stop 2>/dev/null || fail "resource script stop failed"
[ "$(cat "$WORK/calls")" = "ha notify BACKUP" ] || fail "stop should notify BACKUP: $(cat "$WORK/calls")"
[ "$(TLCTL=$WORK/tlctl "$HB/vsmserver" status)" = running ] || fail "status of an active node is not 'running'"
if TLCTL=$WORK/tlctl "$HB/vsmserver" bogus 2>/dev/null; then fail "an unknown action succeeded"; fi

if [ "$failures" -gt 0 ]; then
    echo "FAIL: $NAME: $failures problem(s)" >&2
    exit 1
fi
echo "PASS: $NAME"
