#!/bin/bash
# seat.sh: the user's seat end to end in the namespace lab, with real daemons, a real Xvnc
# desktop and a real TigerVNC viewer.
#
#   VSM_BIN_DIR=target/release tests/e2e/seat.sh
#
# Needs root, usable vsm binaries and the X tools of scripts/install-test-deps.sh; prints
# "skipped" and exits 0 only when not run as root. Screenshots (XWD files) are kept in
# $VSM_E2E_ARTIFACTS (default target/e2e-artifacts/seat).
#
# What it checks, in order:
#  1. On the client node, under Xvfb, `vsmconnect testuser@tlha` logs in through the VIP,
#     forwards the private desktop over ssh and opens it in TigerVNC's viewer: a screenshot of
#     the viewer shows the colour that the test user's ~/.vsm/xstartup paints (the session
#     script ran it inside the session, with the user's X cookie).
#  2. The agent sees the viewer: `tlctl session list --refresh` shows the session connected,
#     with a last connection time, and `vsmclient list` too.
#  3. Nobody else gets in: the desktop has no TCP port; another local user on the agent can
#     neither enter the session's directory, nor open its socket through ssh, nor open its X
#     display; the owner can (so the refusals are not an accident of the setup).
#  4. The primary's cable is pulled: `vsmconnect testuser@tlha` again shows the same desktop
#     (same session id, same colour) through the secondary.
#  5. Bad input: a user name with shell metacharacters, a missing viewer, a viewer that exits at
#     once, and a host key that differs: each one line with its own exit status.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

skip_unless_root
export VSM_LAB_DAEMONS=1
export VSM_BIN_DIR=${VSM_BIN_DIR:-$REPO/target/debug}
for tool in jq Xvfb xtigervncviewer xwd xwininfo xdpyinfo xauth xsetroot; do
    command -v "$tool" >/dev/null || fail "$tool is missing (scripts/install-test-deps.sh)"
done
trap on_exit EXIT

NET=${VSM_LAB_NET:-10.213.0}
ART=${VSM_E2E_ARTIFACTS:-$REPO/target/e2e-artifacts/seat}
TLCTL=$VSM_BIN_DIR/tlctl
XDISPLAY=:51
# What the test user's desktop paints; the viewer must show it.
COLOUR=1fa055
HOME1=$(getent passwd testuser | cut -d: -f6)
CREATED_VSM_DIR=0
CONNECT_N=0

test_cleanup() {
    # The test user's xstartup is ours; the rest of their home is not.
    if [ "$CREATED_VSM_DIR" = 1 ]; then rm -rf "${HOME1:?}/.vsm"; fi
}

TLCTL_TIMEOUT=5

# xwd_pixel FILE X Y: the colour of pixel (X, Y) of an XWD screenshot (TrueColor, 24 or 32
# bits per pixel) as rrggbb.
xwd_pixel() {
    local f=$1 x=$2 y=$3 h
    read -r -a h < <(od -An -v -t u1 -N 100 "$f" | tr -s ' \n' ' ')
    field32() { local i=$(($1 * 4)); echo $(((h[i] << 24) | (h[i + 1] << 16) | (h[i + 2] << 8) | h[i + 3])); }
    local header_size byte_order bpp bpl ncolors width height rmask gmask bmask
    header_size=$(field32 0) width=$(field32 4) height=$(field32 5) byte_order=$(field32 7)
    bpp=$(field32 11) bpl=$(field32 12) rmask=$(field32 14) gmask=$(field32 15) bmask=$(field32 16)
    ncolors=$(field32 19)
    if [ "$bpp" -ne 32 ] && [ "$bpp" -ne 24 ]; then
        echo "xwd_pixel: $bpp bits per pixel is not supported" >&2
        return 1
    fi
    if [ "$x" -ge "$width" ] || [ "$y" -ge "$height" ]; then
        echo "xwd_pixel: ($x, $y) is outside ${width}x$height" >&2
        return 1
    fi
    local off=$((header_size + ncolors * 12 + y * bpl + x * bpp / 8)) b v=0 i
    read -r -a b < <(od -An -v -t u1 -j "$off" -N $((bpp / 8)) "$f")
    if [ "$byte_order" -eq 0 ]; then
        for ((i = ${#b[@]} - 1; i >= 0; i--)); do v=$(((v << 8) | b[i])); done
    else
        for ((i = 0; i < ${#b[@]}; i++)); do v=$(((v << 8) | b[i])); done
    fi
    channel() {
        local m=$1 c=$((v & $1))
        while [ "$m" -gt 0 ] && [ $((m & 1)) -eq 0 ]; do m=$((m >> 1)) c=$((c >> 1)); done
        echo "$c"
    }
    printf '%02x%02x%02x\n' "$(channel "$rmask")" "$(channel "$gmask")" "$(channel "$bmask")"
}

# viewer_geometry: "X Y W H" of the TigerVNC viewer's window on the client's Xvfb.
viewer_geometry() {
    local info
    info=$(lab exec client env DISPLAY=$XDISPLAY xwininfo -root -tree 2>/dev/null |
        grep -E '"[^"]*TigerVNC"' | head -n 1) || return 1
    [ -n "$info" ] || return 1
    # ... "testuser@... - TigerVNC": ("..." "...")  800x600+0+0  +0+0
    local geo abs
    geo=$(grep -oE '[0-9]+x[0-9]+\+-?[0-9]+\+-?[0-9]+' <<<"$info" | head -n 1)
    abs=$(grep -oE '\+-?[0-9]+\+-?[0-9]+$' <<<"$info")
    local w=${geo%%x*} rest=${geo#*x}
    local hgt=${rest%%+*}
    abs=${abs#+}
    echo "${abs%%+*} ${abs#*+} $w $hgt"
}

# screenshot NAME: an XWD of the client's screen into the artefacts; prints its path.
screenshot() {
    local f=$ART/$1.xwd
    lab exec client env DISPLAY=$XDISPLAY xwd -root -silent >"$f" 2>/dev/null || return 1
    echo "$f"
}

# viewer_shows NAME: the viewer's window is up and its centre and four inner points have the
# desktop's colour in a fresh screenshot NAME.
viewer_shows() {
    local g x y w hgt f px dx dy
    g=$(viewer_geometry) || return 1
    read -r x y w hgt <<<"$g"
    [ "$w" -ge 100 ] && [ "$hgt" -ge 100 ] || return 1
    f=$(screenshot "$1") || return 1
    for dx in 2 4; do
        for dy in 2 4; do
            px=$(xwd_pixel "$f" $((x + w * (dx - 1) / 5)) $((y + hgt * (dy - 1) / 5))) || return 1
            [ "$px" = "$COLOUR" ] || return 1
        done
    done
}

# connect NAME ARGS...: start vsmconnect on the client node (as its user would, with the
# Xvfb display) as tracked process NAME.
connect() {
    local name=$1
    shift
    lab spawn client "$name" env DISPLAY=$XDISPLAY /usr/local/bin/vsmconnect -v "$@" >/dev/null
}

connect_log() { cat "$VSM_LAB_DIR/nodes/client/log/$1.log" 2>/dev/null; }

# The session id vsmconnect NAME reported.
connected_session() {
    connect_log "$1" | sed -n 's/^vsmconnect: \(reconnecting to\|created\) session \([0-9a-f]*\) .*/\2/p' | tail -n 1
}

# vsmconnect_fails STATUS WHAT ARGS...: a foreground vsmconnect on the client exits with
# STATUS and says one line.
vsmconnect_fails() {
    local want=$1 what=$2 out rc=0
    shift 2
    out=$(lab exec client env DISPLAY=$XDISPLAY timeout 60 /usr/local/bin/vsmconnect "$@" 2>&1) || rc=$?
    [ "$rc" = "$want" ] || fail "$what: vsmconnect exited with $rc, expected $want: $out"
    [ "$(grep -c '^vsmconnect: ' <<<"$out")" -ge 1 ] || fail "$what: no vsmconnect error line: $out"
    echo "    $what: exit $rc: $(grep '^vsmconnect: ' <<<"$out" | tail -n 1)"
}

# testuser_session [NODE]: testuser's session as NODE (default tlha-primary) lists it after
# asking the agents.
testuser_session() {
    tlctl_on "${1:-tlha-primary}" session list --refresh --user testuser --json 2>/dev/null | jq -c '.[0] // empty'
}

mkdir -p "$ART"
rm -f "$ART"/*.xwd

step "lab up with the vsm daemons from $VSM_BIN_DIR"
lab_up
wait_for 60 "tlha-primary ready" is_ready tlha-primary
wait_for 60 "tlha-secondary ready" is_ready tlha-secondary

step "the test user's desktop paints #$COLOUR (~/.vsm/xstartup)"
if [ ! -e "$HOME1/.vsm" ]; then CREATED_VSM_DIR=1; fi
install -d -o testuser -g "$(id -gn testuser)" -m 0755 "$HOME1/.vsm"
cat >"$HOME1/.vsm/xstartup" <<EOF
#!/bin/sh
# Written by tests/e2e/seat.sh: paint the desktop, then stay until the session ends.
xsetroot -solid "#$COLOUR"
exec sleep 100000
EOF
chown testuser "$HOME1/.vsm/xstartup"
chmod 0755 "$HOME1/.vsm/xstartup"

step "Xvfb on the client node"
lab spawn client xvfb Xvfb "$XDISPLAY" -screen 0 1024x768x24 -nolisten tcp >/dev/null
wait_for 20 "Xvfb $XDISPLAY on the client" lab exec client test -S "/tmp/.X11-unix/X${XDISPLAY#:}"

step "1. vsmconnect testuser@tlha opens the desktop in a TigerVNC viewer"
connect seat1 --geometry 800x600 testuser@tlha
wait_for 60 "the viewer on the client shows the desktop's colour" viewer_shows seat1-desktop
sid=$(connected_session seat1)
[ -n "$sid" ] || fail "vsmconnect did not name the session: $(connect_log seat1)"
echo "    session $sid; viewer window $(viewer_geometry); screenshot $ART/seat1-desktop.xwd"
s=$(testuser_session)
[ "$(jq -r .id <<<"$s")" = "$sid" ] || fail "tlctl lists another session for testuser: $s"
sock=$(jq -r '.command as $c | ($c | index("-rfbunixpath")) as $i | $c[$i + 1]' <<<"$s")
agent=$(jq -r .agent_address <<<"$s")
display=$(jq -r .display <<<"$s")
[ "$(jq -r .vnc_port <<<"$s")" = 0 ] || fail "a private desktop must have no VNC port: $s"
case $agent in "$NET.11") anode=agent1 ;; "$NET.12") anode=agent2 ;; *) fail "unknown agent address $agent" ;; esac
echo "    desktop socket $sock on $anode"

step "2. the agent reports the viewer: connected in tlctl and vsmclient"
connected() { [ "$(testuser_session | jq -r .status)" = running ]; }
wait_for 30 "tlctl session list --refresh shows testuser's session connected" connected
tlctl_on tlha-primary session list --refresh --user testuser | sed 's/^/    /'
# grep reads all of it (no -q): quitting at the first match can break the pipe of a writer
# still printing, which pipefail turns into a failure.
tlctl_on tlha-primary session list --user testuser | grep -E ' connected +[0-9]' >/dev/null ||
    fail "tlctl session list does not show 'connected': $(tlctl_on tlha-primary session list --user testuser)"
ssh_tlha testuser vsmclient list | grep ' connected ' >/dev/null ||
    fail "vsmclient list does not show 'connected': $(ssh_tlha testuser vsmclient list)"
[ "$(testuser_session | jq -r .last_connect_ms)" -gt 0 ] || fail "no last connection time"

step "3. nobody else gets in"
# No TCP port: a network peer has nothing to connect to.
if lab exec "$anode" ss -Hltnp | grep -q Xvnc; then
    fail "Xvnc listens on TCP on $anode: $(lab exec "$anode" ss -Hltnp | grep Xvnc)"
fi
if rfb_answers "$agent" $((5900 + display)); then fail "a network peer got an RFB banner on $agent:$((5900 + display))"; fi
# The owner reaches the socket through ssh; another user of the agent does not.
wait_for 20 "testuser reads the RFB banner through ssh -W" rfb_socket_answers testuser "$agent" "$sock"
if rfb_socket_answers testuser2 "$agent" "$sock"; then fail "testuser2 opened testuser's desktop through ssh"; fi
if lab exec "$anode" runuser -u testuser2 -- ls "$(dirname "$sock")" >/dev/null 2>&1; then
    fail "testuser2 can list testuser's session directory $(dirname "$sock")"
fi
lab exec "$anode" stat -c '%U %a %n' "$(dirname "$sock")" "$sock" | sed 's/^/    /'
# The X display is for the owner's cookie only.
if lab exec "$anode" runuser -u testuser2 -- env DISPLAY=":$display" xdpyinfo >/dev/null 2>&1; then
    fail "testuser2 opened X display :$display on $anode"
fi
lab exec "$anode" runuser -u testuser -- env DISPLAY=":$display" XAUTHORITY="$(dirname "$sock")/Xauthority" \
    xdpyinfo >/dev/null 2>&1 || fail "testuser cannot open their own X display (the refusal above proves nothing)"

step "4. pull the primary's cable: vsmconnect again shows the same desktop"
lab stop-daemon client seat1 >/dev/null
lab pull-cable tlha-primary >/dev/null
wait_for 30 "VIP only on tlha-secondary" vip_on tlha-secondary
wait_for 30 "ssh tlha answered by tlha-secondary" answered_by tlha-secondary
no_viewer() { ! viewer_geometry >/dev/null; }
wait_for 20 "the first viewer closed" no_viewer
connect seat2 testuser@tlha
wait_for 60 "the viewer shows the desktop again after the failover" viewer_shows seat2-after-failover
sid2=$(connected_session seat2)
[ "$sid2" = "$sid" ] || fail "after the failover vsmconnect reached session '$sid2', expected $sid: $(connect_log seat2)"
connect_log seat2 | grep -q "reconnecting to session $sid" || fail "vsmconnect did not reconnect: $(connect_log seat2)"
echo "    same session $sid through tlha-secondary; screenshot $ART/seat2-after-failover.xwd"
lab stop-daemon client seat2 >/dev/null

step "5. bad input: one line each, its own exit status"
vsmconnect_fails 2 "user name with shell metacharacters" 'test;user@tlha'
vsmconnect_fails 2 "host that reads as an option" 'testuser@-oProxyCommand=true'
vsmconnect_fails 8 "viewer missing" --viewer /nonexistent/vncviewer testuser@tlha
vsmconnect_fails 12 "viewer that exits at once" --viewer /bin/false testuser@tlha
other=$VSM_LAB_DIR/other
mkdir -p "$other"
ssh-keygen -q -t ed25519 -N '' -f "$other/key"
echo "tlha,$NET.4 $(cut -d' ' -f1,2 "$other/key.pub")" >"$other/known_hosts"
vsmconnect_fails 4 "host key changed" -o UserKnownHostsFile="$other/known_hosts" testuser@tlha
sid3=$(testuser_session tlha-secondary | jq -r .id)
[ "$sid3" = "$sid" ] || fail "bad input changed testuser's session: $sid3, expected $sid"

step "down leaves nothing behind"
lab_down_checked
ls -l "$ART" | sed 's/^/    /'
