# shellcheck shell=bash
# Shared helpers of the end-to-end HA tests; sourced, not run.
# The tests use their own namespace prefix and lab directory so a lab that a developer has
# up (scripts/ha-lab.sh with the defaults) is left alone.

E2E_DIR=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
REPO=$(dirname "$(dirname "$E2E_DIR")")
LAB_SH=$REPO/scripts/ha-lab.sh
export VSM_LAB_PREFIX=${VSM_LAB_PREFIX:-vsmtest-}
export VSM_LAB_DIR=${VSM_LAB_DIR:-/run/vsm-lab-test}
KNOWN_HOSTS=$VSM_LAB_DIR/client/known_hosts
TEST_NAME=$(basename "$0" .sh)
LAB_IS_UP=0
# Interrupted or stopped: exit non-zero, so the EXIT trap cleans up and reports a failure.
trap 'exit 130' INT
trap 'exit 143' TERM

lab() { "$LAB_SH" "$@"; }

step() { echo "==> $TEST_NAME: $*"; }

fail() {
    echo "FAIL: $TEST_NAME: $*" >&2
    exit 1
}

skip_unless_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "skipped: not root ($TEST_NAME needs network namespaces)"
        exit 0
    fi
}

now_ms() {
    local t=$EPOCHREALTIME
    echo $((${t%.*} * 1000 + 10#${t#*.} / 1000))
}

# wait_for SECONDS DESCRIPTION CMD [ARG...]: poll CMD until it succeeds, fail after SECONDS.
wait_for() {
    local seconds=$1 desc=$2
    shift 2
    local deadline=$(($(now_ms) + seconds * 1000))
    until "$@"; do
        if [ "$(now_ms)" -ge "$deadline" ]; then
            fail "timed out after ${seconds}s waiting for: $desc"
        fi
        sleep 0.1
    done
}

# ssh_tlha USER CMD...: the user's login path: ssh to the VIP name from the client node with
# strict host-key checking against the lab's known_hosts.
ssh_tlha() {
    local user=$1
    shift
    # A connection caught by the VIP moving can hang in the middle of its handshake, where
    # ssh has no timeout of its own: give up after 20 s, like a user would.
    lab exec client timeout 20 ssh -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$KNOWN_HOSTS" \
        -o BatchMode=yes -o ConnectTimeout=2 -o ServerAliveInterval=2 -o ServerAliveCountMax=2 \
        "$user@tlha" "$@"
}

answered_by() { [ "$(ssh_tlha testuser uname -n 2>/dev/null)" = "$1" ]; }

# tlctl on a master, through its socket in the lab directory (fast enough to sample often);
# the caller sets TLCTL (the binary) and may set TLCTL_TIMEOUT (seconds).
tlctl_on() {
    local node=$1
    shift
    "$TLCTL" --timeout "${TLCTL_TIMEOUT:-3}" --socket "$VSM_LAB_DIR/nodes/$node/run-vsm/vsmserver.sock" "$@"
}
ha_status() { tlctl_on "$1" ha status --json; }
is_ready() { ha_status "$1" 2>/dev/null | jq -e '.ready == true' >/dev/null; }

vip_on() { [ "$(lab vip-holder 2>/dev/null)" = "$1" ]; }

# rfb_banner HOST PORT: the first line a VNC server sends, read from the client node.
rfb_banner() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    lab exec client timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2" && read -r -t 2 banner <&3 &&
        printf "%s\n" "${banner%$'"'"'\r'"'"'}"' _ "$1" "$2" 2>/dev/null
}

rfb_answers() { [ "$(rfb_banner "$1" "$2")" = "RFB 003.008" ]; }

# rfb_socket_banner USER AGENT SOCKET: the first line the private desktop SOCKET on AGENT sends
# to USER, read on the client node through USER's ssh to the agent with stream-local
# forwarding (as vsmconnect does), to a loopback port of the client node.
rfb_socket_banner() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    lab exec client timeout 15 bash -c '
        ssh -N -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$4" -o BatchMode=yes \
            -o ConnectTimeout=2 -o ExitOnForwardFailure=yes -L "127.0.0.1:15999:$3" "$1@$2" &
        p=$!
        for _ in $(seq 100); do
            if exec 3<>/dev/tcp/127.0.0.1/15999; then break; fi
            kill -0 "$p" || break
            sleep 0.1
        done 2>/dev/null
        banner=
        read -r -t 3 banner <&3 2>/dev/null
        kill "$p" 2>/dev/null
        wait "$p" 2>/dev/null
        printf "%s\n" "${banner%$'"'"'\r'"'"'}"' _ "$1" "$2" "$3" "$KNOWN_HOSTS" 2>/dev/null
}

rfb_socket_answers() { [ "$(rfb_socket_banner "$1" "$2" "$3")" = "RFB 003.008" ]; }

lab_up() {
    lab down >/dev/null 2>&1 || true
    LAB_IS_UP=1
    lab up
}

# lab_down_checked: take the lab down and verify it left nothing behind.
lab_down_checked() {
    local pids=() n pid left=()
    for n in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        case $n in
            "$VSM_LAB_PREFIX"*)
                local more=()
                read -r -d '' -a more < <(ip netns pids "$n" 2>/dev/null) || true
                pids+=("${more[@]}")
                ;;
        esac
    done
    lab down
    LAB_IS_UP=0
    if ip netns list 2>/dev/null | grep -q "^$VSM_LAB_PREFIX"; then
        fail "namespaces left after down: $(ip netns list | grep "^$VSM_LAB_PREFIX" | tr '\n' ' ')"
    fi
    if compgen -G "/etc/netns/$VSM_LAB_PREFIX*" >/dev/null; then
        fail "/etc/netns entries left after down: $(echo /etc/netns/"$VSM_LAB_PREFIX"*)"
    fi
    [ ! -e "$VSM_LAB_DIR" ] || fail "lab directory $VSM_LAB_DIR left after down"
    for pid in "${pids[@]}"; do
        local stat
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        [ "${stat%% *}" = Z ] || left+=("$pid($(cat "/proc/$pid/comm" 2>/dev/null))")
    done
    [ ${#left[@]} -eq 0 ] || fail "processes left after down: ${left[*]}"
}

on_exit() {
    local rc=$?
    trap - EXIT
    # A test's own background helpers go first.
    if declare -F test_cleanup >/dev/null; then test_cleanup || true; fi
    if [ "$LAB_IS_UP" = 1 ]; then
        if [ "$rc" -ne 0 ]; then
            echo "---- $TEST_NAME failed (rc $rc); lab state and logs:" >&2
            lab status >&2 || true
            lab logs >&2 || true
        fi
        lab_down_checked || rc=1
    fi
    if [ "$rc" -eq 0 ]; then
        echo "PASS: $TEST_NAME"
    fi
    exit "$rc"
}
