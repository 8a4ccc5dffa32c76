#!/bin/bash
# ha-lab.sh: a private two-master vsm HA lab on one machine, built from network namespaces.
#
# Topology (all inside namespaces; nothing is connected to the host's network):
#
#   switch namespace with bridge br0
#     |-- tlha-primary    10.213.0.2   sshd, keepalived, vsmserver
#     |-- tlha-secondary  10.213.0.3   sshd, keepalived, vsmserver
#     |   (VIP "tlha"     10.213.0.4   held by the keepalived MASTER)
#     |-- agent1          10.213.0.11  sshd, vsmagent (private desktops: Xvnc on a Unix socket)
#     |-- agent2          10.213.0.12  sshd, vsmagent
#     `-- client          10.213.0.20  ssh client, probes
#
# Every node process runs under `ip netns exec` (per-node /etc/hosts, /etc/hostname,
# /etc/resolv.conf and, for masters and the client, /etc/ssh from /etc/netns/<ns>/) and
# `unshare --uts --mount` (own hostname, private /tmp and its own /etc/vsm, /var/lib/vsm,
# /var/lib/vsmagent, /run/vsm and /usr/local/bin bind-mounted from the lab directory).
#
# See docs/lab.md for the subcommands and environment variables.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SELF")")

LAB=${VSM_LAB_DIR:-/run/vsm-lab}
PREFIX=${VSM_LAB_PREFIX:-vsmlab-}
NET=${VSM_LAB_NET:-10.213.0}
BIN_DIR=${VSM_BIN_DIR:-$REPO/target/debug}
MANAGER=${VSM_LAB_MANAGER:-keepalived}
PROFILE_WANTED=${VSM_LAB_PROFILE:-}
DAEMONS_WANTED=${VSM_LAB_DAEMONS:-auto}
TIMEOUT=${VSM_LAB_TIMEOUT:-90}
KEEPALIVED_DIR=${VSM_KEEPALIVED_DIR:-$REPO/config/keepalived}
PACEMAKER_DIR=$REPO/config/pacemaker
HEARTBEAT_DIR=$REPO/config/heartbeat
# Children (the daemons' wrappers run this script again) must see the same settings.
export VSM_LAB_DIR=$LAB VSM_LAB_PREFIX=$PREFIX VSM_LAB_NET=$NET
# Plain logs (no ANSI colours) from the daemons, so they can be grepped.
export NO_COLOR=1

MASTERS=(tlha-primary tlha-secondary)
AGENTS=(agent1 agent2)
NODES=(tlha-primary tlha-secondary agent1 agent2 client)
VIP_NAME=tlha
VIP=$NET.4
USERS=(testuser testuser2 testuser3)
# More users for workloads with many users (the fault campaign): VSM_LAB_EXTRA_USERS.
read -r -a EXTRA_USERS <<<"${VSM_LAB_EXTRA_USERS:-}"
for u in "${EXTRA_USERS[@]}"; do
    [[ $u =~ ^[a-z_][a-z0-9_-]{0,30}$ ]] || { echo "ha-lab: error: VSM_LAB_EXTRA_USERS: '$u' is not a user name" >&2; exit 1; }
done
USERS+=("${EXTRA_USERS[@]}")
VSM_BINARIES=(vsmserver vsmagent vsmclient vsmconnect tlctl tl-config)
# Directories bind-mounted per node (host path -> lab subdirectory).
MOUNTS=(/etc/vsm:etc-vsm /var/lib/vsm:lib-vsm /var/lib/vsmagent:lib-vsmagent /run/vsm:run-vsm
    /run/vsmagent:run-vsmagent /run/vsm-watch:run-watch)

declare -A ADDR=(
    [tlha-primary]=$NET.2 [tlha-secondary]=$NET.3
    [agent1]=$NET.11 [agent2]=$NET.12 [client]=$NET.20
)
# Switch-side veth names (at most 15 characters).
declare -A PORT=(
    [tlha-primary]=vl-pri [tlha-secondary]=vl-sec
    [agent1]=vl-ag1 [agent2]=vl-ag2 [client]=vl-cli
)

say() { echo "ha-lab: $*"; }
warn() { echo "ha-lab: $*" >&2; }
die() {
    echo "ha-lab: error: $*" >&2
    exit 1
}

ns() { echo "${PREFIX}$1"; }
switch_ns() { echo "${PREFIX}switch"; }
node_dir() { echo "$LAB/nodes/$1"; }
is_master() { [ "$1" = tlha-primary ] || [ "$1" = tlha-secondary ]; }
is_agent() { [ "$1" = agent1 ] || [ "$1" = agent2 ]; }

known_node() {
    local n
    for n in "${NODES[@]}"; do [ "$n" = "$1" ] && return 0; done
    return 1
}

need_node() {
    known_node "$1" || die "unknown node '$1' (expected one of: ${NODES[*]})"
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, bridges and mounts need it)"
}

ns_exists() { [ -e "/run/netns/$1" ]; }

lab_namespaces() {
    local n
    for n in "${NODES[@]}"; do ns "$n"; done
    switch_ns
}

lab_is_up() { [ -f "$LAB/.vsm-lab" ] && ns_exists "$(ns tlha-primary)"; }

need_up() { lab_is_up || die "the lab is not up (run: $0 up)"; }

now_ms() {
    local t=$EPOCHREALTIME
    echo $((${t%.*} * 1000 + 10#${t#*.} / 1000))
}

# Poll CMD until it succeeds or SECONDS pass; returns 1 on timeout.
poll() {
    local seconds=$1
    shift
    local deadline=$(($(now_ms) + seconds * 1000))
    while :; do
        if "$@"; then return 0; fi
        [ "$(now_ms)" -lt "$deadline" ] || return 1
        sleep 0.05
    done
}

# ---------------------------------------------------------------------------------------
# Processes

# A pid is alive when it exists and is not a zombie.
pid_alive() {
    local pid=$1 stat
    [ -n "$pid" ] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

pidfile() { echo "$LAB/pids/$1.$2.pid"; }

tracked_pid() {
    local f
    # heartbeat daemonizes and re-executes itself after a partition: found by name.
    if [ "$2" = heartbeat ] && is_master "$1"; then
        ns_pids_named "$(ns "$1")" heartbeat | head -n 1 | grep .
        return
    fi
    # Pacemaker's OCF agent starts vsmserver, so the lab finds it by name inside the node.
    if [ "$2" = vsmserver ] && is_master "$1" && [ "$(lab_manager)" = pacemaker ]; then
        ns_pids_named "$(ns "$1")" vsmserver | head -n 1 | grep .
        return
    fi
    f=$(pidfile "$1" "$2")
    [ -s "$f" ] && cat "$f"
}

# The pid of daemon NAME on NODE if it is alive and still inside the node's namespace.
daemon_pid() {
    local pid
    pid=$(tracked_pid "$1" "$2") || return 1
    pid_alive "$pid" || return 1
    [ "$(ip netns identify "$pid" 2>/dev/null)" = "$(ns "$1")" ] || return 1
    echo "$pid"
}

# Run CMD inside NODE: its network namespace, its hostname and its private mounts.
node_exec() {
    local node=$1
    shift
    VSM_LAB_DIR=$LAB ip netns exec "$(ns "$node")" \
        unshare --uts --mount --propagation private "$SELF" _enter "$node" "$@"
}

# Internal: runs inside the new UTS and mount namespace, sets them up, then execs CMD.
cmd_enter() {
    local node=$1 m dir
    shift
    local nd
    nd=$(node_dir "$node")
    hostname "$node"
    if [ -d "$nd/sys" ]; then enter_cluster_dirs "$nd"; fi
    for m in "${MOUNTS[@]}"; do
        dir=${m%%:*}
        mount --bind "$nd/${m#*:}" "$dir"
    done
    if [ -d "$LAB/usr-local-bin" ]; then
        mount --bind "$LAB/usr-local-bin" /usr/local/bin
    fi
    if [ -d "$nd/sys" ]; then enter_cluster_binds "$nd"; fi
    # Compiled keymaps: the X server writes them under one name per keymap, so two Xvnc
    # starting at once on two nodes (separate machines in real life) would share and race on
    # the same file ("XKB: Failed to compile keymap"). Each node gets its own.
    if [ -d /var/lib/xkb ]; then
        mkdir -p "$nd/lib-xkb"
        mount --bind "$nd/lib-xkb" /var/lib/xkb
    fi
    # /tmp last: a bind whose source is below /tmp would not be found after it.
    mount --bind "$nd/tmp" /tmp
    if [ -n "${VSM_LAB_PIDFILE:-}" ]; then
        echo $$ >"$VSM_LAB_PIDFILE"
        unset VSM_LAB_PIDFILE
    fi
    exec "$@"
}

# Start CMD as daemon NAME on NODE in the background, detached, logging to the node's log
# directory; records its pid.
spawn() {
    local node=$1 name=$2
    shift 2
    local pf log pid
    pf=$(pidfile "$node" "$name")
    log=$(node_dir "$node")/log/$name.log
    if pid=$(daemon_pid "$node" "$name"); then
        die "$name is already running on $node (pid $pid)"
    fi
    rm -f "$pf"
    VSM_LAB_PIDFILE=$pf setsid "$SELF" _node_exec "$node" "$@" </dev/null >>"$log" 2>&1 &
    if ! poll 10 test -s "$pf"; then
        die "$name on $node did not start (see $log)"
    fi
}

# Internal: spawn's entry point; becomes the node process (keeps the pid spawn recorded).
cmd_node_exec_internal() {
    local node=$1
    shift
    exec ip netns exec "$(ns "$node")" \
        unshare --uts --mount --propagation private "$SELF" _enter "$node" "$@"
}

# Send SIGNAL to daemon NAME on NODE and, for TERM/KILL, wait until it is gone.
stop_daemon() {
    local node=$1 name=$2 sig=${3:-TERM} pid
    pid=$(daemon_pid "$node" "$name") || return 0
    kill -s "$sig" "$pid" 2>/dev/null || true
    case $sig in
        TERM | KILL | 9 | 15)
            if ! poll 10 eval "! pid_alive $pid"; then
                kill -s KILL "$pid" 2>/dev/null || true
                poll 5 eval "! pid_alive $pid" || warn "$name (pid $pid) on $node does not die"
            fi
            ;;
    esac
}

# Pids of processes inside a lab namespace whose command name is COMM.
ns_pids_named() {
    local n=$1 comm=$2 pid
    ns_exists "$n" || return 0
    for pid in $(ip netns pids "$n" 2>/dev/null); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] && pid_alive "$pid" && echo "$pid"
    done
    return 0
}

# ---------------------------------------------------------------------------------------
# vsm binaries

# Prints "daemons" when working vsm binaries are in BIN_DIR, else "network-only" and a reason
# on stderr.
detect_mode() {
    local b missing=()
    case $DAEMONS_WANTED in
        0 | no) echo network-only; warn "VSM_LAB_DAEMONS=0: not starting vsm daemons"; return ;;
        auto | 1 | yes) ;;
        *) die "VSM_LAB_DAEMONS must be auto, 1 or 0 (got '$DAEMONS_WANTED')" ;;
    esac
    for b in "${VSM_BINARIES[@]}"; do
        [ -x "$BIN_DIR/$b" ] || missing+=("$b")
    done
    if [ ${#missing[@]} -eq 0 ] && ! "$BIN_DIR/tl-config" --help 2>&1 | grep -qi usage; then
        missing=("(binaries are placeholders: 'tl-config --help' prints no usage)")
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$DAEMONS_WANTED" = auto ]; then
            warn "vsm binaries not usable in $BIN_DIR: missing ${missing[*]}"
            warn "starting only the network, sshd, keepalived (and Xvnc on demand); set VSM_BIN_DIR to target/debug or target/release after building"
            echo network-only
            return
        fi
        die "VSM_LAB_DAEMONS=$DAEMONS_WANTED but vsm binaries are not usable in $BIN_DIR: missing ${missing[*]}"
    fi
    echo daemons
}

lab_mode() { cat "$LAB/mode" 2>/dev/null || echo network-only; }

# tl-config run inside NODE (its /etc/vsm, its /etc/hosts), as an administrator would there.
tlconfig() {
    local node=$1
    shift
    node_exec "$node" /usr/local/bin/tl-config "$@" || die "tl-config failed on $node for: $*"
}

# ---------------------------------------------------------------------------------------
# Building the lab

write_etc_netns() {
    local node=$1 n d
    d=/etc/netns/$(ns "$node")
    mkdir -p "$d"
    {
        echo "127.0.0.1 localhost"
        for n in "${NODES[@]}"; do echo "${ADDR[$n]} $n"; done
        echo "$VIP $VIP_NAME"
    } >"$d/hosts"
    echo "$node" >"$d/hostname"
    {
        echo "# vsm lab: no DNS server; every name is in /etc/hosts"
        echo "options timeout:1 attempts:1"
    } >"$d/resolv.conf"
}

make_mountpoints() {
    local m dir
    : >"$LAB/created-mountpoints"
    for m in "${MOUNTS[@]}"; do
        dir=${m%%:*}
        if [ ! -d "$dir" ]; then
            mkdir -p "$dir"
            echo "$dir" >>"$LAB/created-mountpoints"
        fi
    done
    if [ ! -d /etc/netns ]; then
        mkdir -p /etc/netns
        echo /etc/netns >>"$LAB/created-mountpoints"
    fi
    if [ ! -d /run/sshd ]; then
        mkdir -m 0755 /run/sshd
        echo /run/sshd >>"$LAB/created-mountpoints"
    fi
    # Pacemaker finds the vsm OCF agent (provider "vsm") here; each master binds the lab's copy.
    if [ "$MANAGER" = pacemaker ] && [ ! -d /usr/lib/ocf/resource.d/vsm ]; then
        mkdir -p /usr/lib/ocf/resource.d/vsm
        echo /usr/lib/ocf/resource.d/vsm >>"$LAB/created-mountpoints"
    fi
}

make_node_dirs() {
    local node=$1 nd m
    nd=$(node_dir "$node")
    mkdir -p "$nd/run" "$nd/log"
    for m in "${MOUNTS[@]}"; do mkdir -p "$nd/${m#*:}"; done
    mkdir -p "$nd/tmp"
    chmod 1777 "$nd/tmp"
    # A master's data directory on a small file system of its own, so it can be filled.
    if is_master "$node" && [ -n "${VSM_LAB_DATA_TMPFS:-}" ]; then
        [[ $VSM_LAB_DATA_TMPFS =~ ^[0-9]+[kKmM]$ ]] || die "VSM_LAB_DATA_TMPFS must be a size like 64M (got '$VSM_LAB_DATA_TMPFS')"
        mount -t tmpfs -o "size=$VSM_LAB_DATA_TMPFS,mode=0755" "vsmlab-data-$node" "$nd/lib-vsm"
        echo "$nd/lib-vsm" >>"$LAB/mounts"
    fi
    # Readable like a packaged /etc/vsm (users' vsmclient reads it); the keys in it are 0600.
}

build_network() {
    local sw node n
    sw=$(switch_ns)
    ip netns add "$sw"
    ip netns exec "$sw" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$sw" link set lo up
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    for node in "${NODES[@]}"; do
        n=$(ns "$node")
        ip netns add "$n"
        ip netns exec "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        ip -n "$n" link set lo up
        # Create the pair inside the switch and move the node end straight into the node, so
        # the host's own network namespace never sees either end.
        ip -n "$sw" link add "${PORT[$node]}" type veth peer name eth0 netns "$n"
        ip -n "$sw" link set "${PORT[$node]}" master br0 up
        ip netns exec "$n" sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1
        ip -n "$n" addr add "${ADDR[$node]}/24" dev eth0
        ip -n "$n" link set eth0 up
    done
}

setup_users() {
    local u
    for u in "${USERS[@]}"; do
        if ! id "$u" >/dev/null 2>&1; then
            useradd -m -s /bin/bash "$u"
            say "created user $u"
        fi
        # useradd leaves the password locked ("!"), and with UsePAM no sshd refuses key
        # logins to locked accounts; "*" means no password but not locked.
        usermod -p '*' "$u"
    done
}

setup_ssh() {
    local pri sec node d u
    mkdir -p "$LAB/ssh/authorized_keys" "$LAB/client"
    chmod 0755 "$LAB/ssh" "$LAB/ssh/authorized_keys"
    ssh-keygen -q -t ed25519 -N '' -C "vsm-lab-client" -f "$LAB/client/id_ed25519"
    for u in "${USERS[@]}"; do
        cp "$LAB/client/id_ed25519.pub" "$LAB/ssh/authorized_keys/$u"
        chmod 0644 "$LAB/ssh/authorized_keys/$u"
    done

    pri=/etc/netns/$(ns tlha-primary)/ssh
    sec=/etc/netns/$(ns tlha-secondary)/ssh
    mkdir -p "$pri" "$sec"
    ssh-keygen -q -t ed25519 -N '' -C "root@tlha-primary" -f "$pri/ssh_host_ed25519_key"
    # Step 2 of the HA setup: both masters present the same host key, so a client that
    # knows "tlha" keeps trusting it after the VIP moves.
    cp -p "$pri/ssh_host_ed25519_key" "$pri/ssh_host_ed25519_key.pub" "$sec/"
    for node in "${AGENTS[@]}"; do
        # Agents have host keys of their own; users reach their desktops' sockets through them.
        d=/etc/netns/$(ns "$node")/ssh
        mkdir -p "$d"
        ssh-keygen -q -t ed25519 -N '' -C "root@$node" -f "$d/ssh_host_ed25519_key"
    done
    for node in "${MASTERS[@]}" "${AGENTS[@]}"; do
        d=/etc/netns/$(ns "$node")/ssh
        cat >"$d/sshd_config" <<EOF
# sshd for the vsm lab node $node
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile $(node_dir "$node")/run/sshd.pid
UsePAM no
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile $LAB/ssh/authorized_keys/%u
UseDNS no
LogLevel VERBOSE
# Names the node in the SSH banner, so probes can tell the masters apart cheaply.
VersionAddendum $node
# Desktops are reached with stream-local forwarding (ssh -L local:/run/vsmagent/...).
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
EOF
    done

    d=/etc/netns/$(ns client)/ssh
    mkdir -p "$d"
    {
        printf '%s ' "$VIP_NAME,$VIP,tlha-primary,${ADDR[tlha-primary]},tlha-secondary,${ADDR[tlha-secondary]}"
        cut -d' ' -f1,2 "$pri/ssh_host_ed25519_key.pub"
        for node in "${AGENTS[@]}"; do
            printf '%s ' "$node,${ADDR[$node]}"
            cut -d' ' -f1,2 "/etc/netns/$(ns "$node")/ssh/ssh_host_ed25519_key.pub"
        done
    } >"$LAB/client/known_hosts"
    cat >"$d/ssh_config" <<EOF
# ssh client of the vsm lab node "client"
Host *
    IdentityFile $LAB/client/id_ed25519
    UserKnownHostsFile $LAB/client/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 3
    LogLevel ERROR
EOF
}

write_helpers() {
    mkdir -p "$LAB/bin"
    chmod 0755 "$LAB/bin"
    # keepalived health check while the vsm daemons are absent: the local sshd must live.
    cat >"$LAB/bin/check-sshd" <<EOF
#!/bin/sh
pid=\$(cat "$LAB/nodes/\$(uname -n)/run/sshd.pid" 2>/dev/null) || exit 1
# A killed sshd waiting to be reaped (a zombie) counts as dead.
state=\$(sed -n 's/^State:[[:space:]]*\\([A-Z]\\).*/\\1/p' "/proc/\$pid/status" 2>/dev/null)
[ -n "\$state" ] && [ "\$state" != Z ]
EOF
    # keepalived notify hook: records the transition, then hands it to tlctl when present.
    cat >"$LAB/bin/notify" <<EOF
#!/bin/sh
echo "\$(date +%s.%N) \$(uname -n) \$1" >>"$LAB/nodes/\$(uname -n)/log/notify.log"
if [ -x /usr/local/bin/tlctl ]; then
    exec /usr/local/bin/tlctl ha notify "\$1"
fi
EOF
    chmod 0755 "$LAB/bin/check-sshd" "$LAB/bin/notify"
}

link_binaries() {
    local b
    mkdir -p "$LAB/usr-local-bin"
    chmod 0755 "$LAB/usr-local-bin"
    for b in "${VSM_BINARIES[@]}"; do
        ln -sf "$(readlink -f "$BIN_DIR/$b")" "$LAB/usr-local-bin/$b"
    done
    # The session script, where every user can run it (the checkout may be private).
    install -m 0755 "$REPO/data/vsm-session" "$LAB/usr-local-bin/vsm-session"
}

configure_vsm() {
    local node
    head -c 32 /dev/urandom >"$LAB/ha.key"
    head -c 32 /dev/urandom >"$LAB/cluster.key"
    chmod 0600 "$LAB/ha.key" "$LAB/cluster.key"
    for node in "${MASTERS[@]}"; do
        install -m 0600 "$LAB/ha.key" "$LAB/cluster.key" "$(node_dir "$node")/etc-vsm/"
        # Agents first: with HA on, the built-in default subcluster (127.0.0.1) is refused.
        tlconfig "$node" '/subclusters/default/agents=agent1 agent2'
        tlconfig "$node" /HA/secret_file=/etc/vsm/ha.key /vsm/secret_file=/etc/vsm/cluster.key
        tlconfig "$node" /HA/enabled=1 '/HA/nodes=tlha-primary tlha-secondary'
        if [ "$MANAGER" = pacemaker ]; then
            # Pacemaker runs its alert agent (tlctl ha notify) as the user hacluster.
            tlconfig "$node" /vsmserver/admin_group=haclient
        fi
        if [ -n "${VSM_LAB_HA_KEYS:-}" ]; then
            # shellcheck disable=SC2086  # space-separated assignments
            tlconfig "$node" $VSM_LAB_HA_KEYS
        fi
    done
    for node in "${AGENTS[@]}"; do
        install -m 0600 "$LAB/cluster.key" "$(node_dir "$node")/etc-vsm/"
        tlconfig "$node" '/vsmagent/allowed_clients=tlha-primary tlha-secondary'
        tlconfig "$node" /vsmagent/master_hostname=tlha
        tlconfig "$node" /vsm/secret_file=/etc/vsm/cluster.key
        # The default private desktop, with the session script of this checkout, unless a
        # workload asks for a cheaper command.
        local desktop='/usr/local/bin/vsm-session Xvnc :{display} -rfbunixpath {socket} -rfbunixmode 0600 -rfbport -1 -nolisten tcp -SecurityTypes None -geometry {geometry} -desktop {user}'
        tlconfig "$node" "/vsmagent/session_command=${VSM_LAB_SESSION_COMMAND:-$desktop}"
    done
    # The PAM service of the sessions, as the package installs it.
    if [ ! -e /etc/pam.d/vsm ]; then
        install -m 0644 "$REPO/data/pam.d/vsm" /etc/pam.d/vsm
        echo /etc/pam.d/vsm >>"$LAB/created-files"
    fi
}

# Render the shipped keepalived configuration of PROFILE for NODE with the lab's addresses
# and hooks.
render_keepalived() {
    local node=$1 profile=$2 src out check notify
    src=$KEEPALIVED_DIR/$profile/keepalived-${node#tlha-}.conf
    [ -f "$src" ] || die "no keepalived configuration $src (profiles: guide, fast, subsecond, published)"
    out=$(node_dir "$node")/keepalived.conf
    if [ "$(lab_mode)" = daemons ]; then
        check=/usr/local/bin/tlctl\ ha\ check
    else
        check=$LAB/bin/check-sshd
    fi
    notify=$LAB/bin/notify
    # The published guide's file names the interface ens192; the lab's is eth0.
    sed -e "s#10\.0\.0\.4/24#$VIP/24#" -e 's#^\([[:space:]]*interface\) ens192$#\1 eth0#' \
        -e "s#\"/usr/bin/tlctl ha check\"#\"$check\"#" \
        -e "s#\"/usr/bin/tlctl ha notify \([A-Z]*\)\"#\"$notify \1\"#" \
        "$src" >"$out"
    if grep -q -e 10.0.0.4 -e /usr/bin/tlctl "$out" || ! grep -q "$VIP/24" "$out" ||
        ! grep -qE '^[[:space:]]*interface eth0$' "$out"; then
        die "could not render $src: its VIP or tlctl lines do not have the expected form"
    fi
}

# keepalived's track file (/run/vsm-watch/vsmserver.track in config/keepalived/fast and subsecond):
# kept by `tlctl ha watch` when the vsm daemons run, else held at 0 (healthy) by the lab.
start_watch() {
    local node=$1
    if [ "$(lab_mode)" = daemons ]; then
        spawn "$node" hawatch /usr/local/bin/tlctl ha watch --track-file /run/vsm-watch/vsmserver.track
    else
        echo 0 >"$(node_dir "$node")/run-watch/vsmserver.track"
    fi
}

start_keepalived() {
    local node=$1 profile=$2 nd
    nd=$(node_dir "$node")
    # A keepalived killed with SIGKILL leaves processes until PID 1 reaps them; a new one
    # refuses to start while they or their pid files exist.
    poll 10 eval "[ -z \"\$(ns_pids_named $(ns "$node") keepalived)\" ]" ||
        die "old keepalived processes on $node do not go away"
    rm -f "$nd"/run/keepalived*.pid
    render_keepalived "$node" "$profile"
    spawn "$node" keepalived keepalived -P -n -l -D -G -f "$nd/keepalived.conf" \
        -p "$nd/run/keepalived.pid" -r "$nd/run/keepalived-vrrp.pid" \
        -c "$nd/run/keepalived-checkers.pid" -b "$nd/run/keepalived-bfd.pid"
}

# ---------------------------------------------------------------------------------------
# HA managers: keepalived (default), Pacemaker/Corosync or Heartbeat moves the VIP.

lab_manager() { cat "$LAB/manager" 2>/dev/null || echo keepalived; }

default_profile() {
    case $1 in
        keepalived) echo fast ;;
        pacemaker | heartbeat) echo tuned ;;
        *) die "unknown HA manager '$1' (expected keepalived, pacemaker or heartbeat)" ;;
    esac
}

# check_profile MANAGER PROFILE: prints PROFILE if MANAGER has it.
check_profile() {
    local want
    case $1 in
        keepalived) want="guide fast subsecond published" ;;
        pacemaker | heartbeat) want="guide tuned" ;;
        *) die "unknown HA manager '$1' (expected keepalived, pacemaker or heartbeat)" ;;
    esac
    case " $want " in
        *" $2 "*) echo "$2" ;;
        *) die "the $1 profiles are: $want (got '$2')" ;;
    esac
}

manager_tools() {
    case $1 in
        keepalived) echo keepalived ;;
        pacemaker) echo corosync corosync-keygen pacemakerd crm_mon pcs ;;
        heartbeat) echo "$HEARTBEAT_BIN" ifconfig ;;
    esac
}

HEARTBEAT_BIN=/usr/libexec/heartbeat/heartbeat

# Directories a cluster manager keeps per node (its configuration, state, identity and shared
# memory), private to each master as copies seeded from the host's. /run is handled apart.
cluster_dirs() {
    case $1 in
        pacemaker) echo /etc/corosync /var/lib/corosync /var/lib/pacemaker /var/log/pacemaker /dev/shm ;;
        heartbeat) echo /etc/ha.d /var/lib/heartbeat /dev/shm ;;
    esac
}

# Seeds NODE's private copies (<node>/sys/PATH) of the manager's directories and of /run.
make_cluster_dirs() {
    local node=$1 nd d sys
    nd=$(node_dir "$node")
    sys=$nd/sys
    mkdir -p "$sys/run"
    chmod 0755 "$sys" "$sys/run"
    for d in $(cluster_dirs "$MANAGER"); do
        mkdir -p "$sys$(dirname "$d")"
        if [ -d "$d" ]; then cp -a "$d" "$sys$d"; else mkdir -p "$sys$d"; fi
    done
    chmod 1777 "$sys/dev/shm"
    # A private /run: pid files and state of corosync, pacemaker, heartbeat and the resource
    # agents are per node. Keep what the lab's daemons need from the host's.
    for d in crm heartbeat lock resource-agents user sshd; do
        if [ -d "/run/$d" ]; then cp -a "/run/$d" "$sys/run/"; fi
    done
    if [ "$MANAGER" = pacemaker ]; then
        install -d -m 0750 -o hacluster -g haclient "$sys/run/pacemaker"
    fi
    for d in "${MOUNTS[@]}"; do
        case ${d%%:*} in /run/*) mkdir -p "$sys${d%%:*}" ;; esac
    done
    # The lab directory stays reachable at its path when it lives below /run.
    case $LAB in /run/*) mkdir -p "$sys$LAB" ;; esac
}

# Internal (cmd_enter, first): a private /run for a cluster master.
enter_cluster_dirs() {
    local nd=$1
    case $LAB in /run/*) mount --bind "$LAB" "$nd/sys$LAB" ;; esac
    mount --rbind "$nd/sys/run" /run
}

# Internal (cmd_enter, after the lab's own mounts, before /tmp): the manager's directories.
enter_cluster_binds() {
    local nd=$1 d
    for d in $(cluster_dirs "$(lab_manager)"); do
        mount --bind "$nd/sys$d" "$d"
    done
    if [ -d "$LAB/ocf-vsm" ] && [ -d /usr/lib/ocf/resource.d/vsm ]; then
        mount --bind "$LAB/ocf-vsm" /usr/lib/ocf/resource.d/vsm
    fi
}

# ----- Pacemaker and Corosync

# Corosync token timeout (ms) of each Pacemaker profile.
corosync_token() {
    case $1 in
        guide) echo 3000 ;;
        tuned) echo "${VSM_LAB_COROSYNC_TOKEN:-1000}" ;;
    esac
}

# corosync.conf for the lab from the shipped file: the lab's addresses and the profile's token.
render_corosync() {
    local profile=$1 out=$2 src=$PACEMAKER_DIR/corosync.conf
    sed -e "s/ring0_addr: 10\.0\.0\.2\$/ring0_addr: ${ADDR[tlha-primary]}/" \
        -e "s/ring0_addr: 10\.0\.0\.3\$/ring0_addr: ${ADDR[tlha-secondary]}/" \
        -e "s/^\( *token:\) [0-9]*\$/\1 $(corosync_token "$profile")/" \
        -e 's/^\( *to_syslog:\) yes$/\1 no/' "$src" >"$out"
    if grep -q '10\.0\.0\.' "$out" || ! grep -q "token: $(corosync_token "$profile")\$" "$out"; then
        die "could not render $src: its addresses or token do not have the expected form"
    fi
}

pacemaker_online() { # both nodes online in the primary's view
    node_exec tlha-primary crm_mon -1 2>/dev/null | grep -q 'Online: \[ tlha-primary tlha-secondary \]'
}

start_pacemaker_cluster() {
    local profile=$1 node nd
    [ "$(lab_mode)" = daemons ] || die "the Pacemaker lab needs the vsm daemons (the OCF agent runs vsmserver)"
    corosync-keygen -k "$LAB/corosync-authkey" >/dev/null 2>&1 || die "corosync-keygen failed"
    mkdir -p "$LAB/ocf-vsm"
    chmod 0755 "$LAB/ocf-vsm"
    install -m 0755 "$PACEMAKER_DIR/vsmserver" "$LAB/ocf-vsm/vsmserver"
    install -m 0755 "$PACEMAKER_DIR/vsm-alert" "$LAB/bin/vsm-alert"
    for node in "${MASTERS[@]}"; do
        nd=$(node_dir "$node")
        render_corosync "$profile" "$nd/sys/etc/corosync/corosync.conf"
        install -m 0400 "$LAB/corosync-authkey" "$nd/sys/etc/corosync/authkey"
        spawn "$node" corosync corosync -f
    done
    for node in "${MASTERS[@]}"; do
        spawn "$node" pacemakerd env PCMK_logfile="$(node_dir "$node")/log/pacemaker.log" pacemakerd
    done
    # The first DC election waits for dc-deadtime (20 s).
    poll "$TIMEOUT" pacemaker_online || die "Pacemaker did not see both masters online within ${TIMEOUT}s"
    node_exec tlha-primary env VIP="$VIP" CIDR=24 NIC=eth0 PRIMARY=tlha-primary \
        VSMSERVER=/usr/local/bin/vsmserver TLCTL=/usr/local/bin/tlctl AGENT_LOG=/run/vsm/vsmserver.log \
        ALERT="$LAB/bin/vsm-alert" FENCING=none sh "$PACEMAKER_DIR/vsm-pcs.sh" >>"$LAB/pcs.log" 2>&1 ||
        die "configuring the Pacemaker resources failed (see $LAB/pcs.log)"
    for node in "${MASTERS[@]}"; do
        ln -sf ../run-vsm/vsmserver.log "$(node_dir "$node")/log/vsmserver.log"
    done
}

# ----- Heartbeat 3 (legacy, haresources mode)

# ha.cf timing of each Heartbeat profile.
heartbeat_timing() {
    case $1 in
        guide) echo "keepalive 1|warntime 3|deadtime 5" ;;
        tuned) echo "keepalive 250ms|warntime 750ms|deadtime 1" ;;
    esac
}

start_heartbeat_cluster() {
    local profile=$1 node nd hd timing
    [ "$(lab_mode)" = daemons ] || die "the Heartbeat lab needs the vsm daemons"
    install -m 0755 "$HEARTBEAT_DIR/vsm-hb-watch" "$LAB/bin/vsm-hb-watch"
    printf 'auth 1\n1 sha1 %s\n' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$LAB/authkeys"
    IFS='|' read -r -a timing <<<"$(heartbeat_timing "$profile")"
    for node in "${MASTERS[@]}"; do
        nd=$(node_dir "$node")
        hd=$nd/sys/etc/ha.d
        install -m 0600 "$LAB/authkeys" "$hd/authkeys"
        sed -e "s#^logfacility .*#logfile $nd/log/heartbeat.log#" \
            -e "s#^ucast eth0 10\.0\.0\.2\$#ucast eth0 ${ADDR[tlha-primary]}#" \
            -e "s#^ucast eth0 10\.0\.0\.3\$#ucast eth0 ${ADDR[tlha-secondary]}#" \
            -e "s#^keepalive .*#${timing[0]}#" -e "s#^warntime .*#${timing[1]}#" \
            -e "s#^deadtime .*#${timing[2]}#" -e "s#^initdead .*#initdead 10#" \
            -e "s#^respawn root /usr/lib/vsm/vsm-hb-watch\$#respawn root $LAB/bin/vsm-hb-watch#" \
            "$HEARTBEAT_DIR/ha.cf" >"$hd/ha.cf"
        sed -e "s#IPaddr::10\.0\.0\.4/24/eth0#IPaddr::$VIP/24/eth0#" "$HEARTBEAT_DIR/haresources" >"$hd/haresources"
        if grep -q '10\.0\.0\.' "$hd/ha.cf" "$hd/haresources" || ! grep -q "respawn root $LAB/" "$hd/ha.cf"; then
            die "could not render the Heartbeat files of $HEARTBEAT_DIR for the lab"
        fi
        install -m 0755 "$HEARTBEAT_DIR/vsmserver" "$hd/resource.d/vsmserver"
    done
    for node in "${MASTERS[@]}"; do
        # heartbeat daemonizes: the lab finds it by name (tracked_pid); this file only lists it.
        ln -sf "$(node_dir "$node")/sys/run/heartbeat.pid" "$(pidfile "$node" heartbeat)"
        # The init script gets past policy-rc.d.
        node_exec "$node" /etc/init.d/heartbeat start >>"$(node_dir "$node")/log/heartbeat-init.log" 2>&1 ||
            die "heartbeat did not start on $node (see $(node_dir "$node")/log/)"
    done
}

tcp_open() { # NODE ADDRESS PORT: can NODE open a TCP connection to ADDRESS:PORT?
    ip netns exec "$(ns "$1")" timeout 2 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null
}

start_sshd() {
    local node=$1
    spawn "$node" sshd /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config
    poll 10 tcp_open "$node" "${ADDR[$node]}" 22 || die "sshd on $node does not answer on port 22"
}

FAKETIME_LIB=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1

# The environment vsmserver starts with: with VSM_LAB_FAKETIME=1, libfaketime moves its wall
# clock (never its monotonic clock) by the offset in <node>/faketime (e.g. "+30s", "-2m",
# "+0"), read again every second, so a clock jump is one write to that file.
server_env() {
    if [ -e "$LAB/faketime-on" ]; then
        echo env "LD_PRELOAD=$FAKETIME_LIB" "FAKETIME_TIMESTAMP_FILE=$(node_dir "$1")/faketime" \
            FAKETIME_CACHE_DURATION=1 FAKETIME_DONT_FAKE_MONOTONIC=1
    fi
}

start_daemon_named() {
    local node=$1 name=$2
    case $name in
        sshd) start_sshd "$node" ;;
        keepalived) is_master "$node" || die "keepalived runs on the masters only"
            start_keepalived "$node" "$(cat "$LAB/profile")" ;;
        hawatch) is_master "$node" || die "hawatch runs on the masters only"
            start_watch "$node" ;;
        vsmserver) is_master "$node" || die "vsmserver runs on the masters only"
            [ "$(lab_mode)" = daemons ] || die "the lab runs without vsm daemons"
            if [ "$(lab_manager)" = pacemaker ]; then
                # Pacemaker starts it again once the failure that banned it here is cleared.
                node_exec "$node" pcs resource cleanup vsmserver node="$node" >/dev/null ||
                    die "pcs resource cleanup vsmserver failed on $node"
            else
                # shellcheck disable=SC2046  # the words of server_env are separate arguments
                spawn "$node" vsmserver $(server_env "$node") /usr/local/bin/vsmserver
            fi ;;
        vsmagent) is_agent "$node" || die "vsmagent runs on the agents only"
            [ "$(lab_mode)" = daemons ] || die "the lab runs without vsm daemons"
            spawn "$node" vsmagent /usr/local/bin/vsmagent ;;
        *) die "unknown daemon '$name' (expected sshd, keepalived, hawatch, vsmserver or vsmagent)" ;;
    esac
}

vip_holders() {
    local node out=()
    for node in "${MASTERS[@]}"; do
        if ns_exists "$(ns "$node")" &&
            ip -n "$(ns "$node")" -4 -o addr show dev eth0 2>/dev/null | grep -q " $VIP/"; then
            out+=("$node")
        fi
    done
    echo "${out[*]}"
}

ssh_answer() { # prints `uname -n` of the master answering ssh on the VIP, from the client
    ip netns exec "$(ns client)" timeout 10 ssh -o ConnectTimeout=2 "testuser@$VIP_NAME" uname -n 2>/dev/null
}

vip_is() { [ "$(vip_holders)" = "$1" ]; }
ssh_is() { [ "$(ssh_answer)" = "$1" ]; }

cmd_up() {
    need_root
    local node mode profile
    while [ $# -gt 0 ]; do
        case $1 in
            --manager) [ $# -ge 2 ] || die "--manager needs a value"; MANAGER=$2; shift 2 ;;
            --manager=*) MANAGER=${1#--manager=}; shift ;;
            *) die "unknown option to up: '$1' (expected --manager keepalived|pacemaker|heartbeat)" ;;
        esac
    done
    profile=$(check_profile "$MANAGER" "${PROFILE_WANTED:-$(default_profile "$MANAGER")}")
    case $LAB in
        /tmp | /tmp/*) die "VSM_LAB_DIR must not be under /tmp: every node gets a private /tmp" ;;
        /*) ;;
        *) die "VSM_LAB_DIR must be an absolute path (got '$LAB')" ;;
    esac
    for node in $(lab_namespaces); do
        if ns_exists "$node" || [ -e "/etc/netns/$node" ]; then
            die "leftovers of a lab exist ($node); run: $0 down"
        fi
    done
    [ ! -e "$LAB" ] || die "$LAB exists; run: $0 down"
    for node in ip unshare /usr/sbin/sshd ssh ssh-keygen Xvnc useradd $(manager_tools "$MANAGER"); do
        command -v "$node" >/dev/null || die "$node is missing; run scripts/install-test-deps.sh"
    done

    mode=$(detect_mode)
    trap 'warn "up failed; what was built stays for inspection; remove it with: $0 down"' EXIT
    mkdir -p "$LAB/pids" "$LAB/nodes"
    chmod 0755 "$LAB"
    touch "$LAB/.vsm-lab"
    echo "$mode" >"$LAB/mode"
    echo "$profile" >"$LAB/profile"
    echo "$MANAGER" >"$LAB/manager"
    say "building the lab in $LAB (namespaces ${PREFIX}*, subnet $NET.0/24, $MANAGER profile $profile, $mode)"

    make_mountpoints
    for node in "${NODES[@]}"; do
        make_node_dirs "$node"
        write_etc_netns "$node"
    done
    build_network
    setup_users
    setup_ssh
    write_helpers
    if [ "$mode" = daemons ]; then
        link_binaries
        if [ "${VSM_LAB_FAKETIME:-0}" = 1 ]; then
            [ -e "$FAKETIME_LIB" ] || die "VSM_LAB_FAKETIME=1 needs $FAKETIME_LIB (package libfaketime; scripts/install-test-deps.sh)"
            touch "$LAB/faketime-on"
            for node in "${MASTERS[@]}"; do echo "+0" >"$(node_dir "$node")/faketime"; done
        fi
        configure_vsm
    fi

    if [ "$MANAGER" != keepalived ]; then
        for node in "${MASTERS[@]}"; do make_cluster_dirs "$node"; done
    fi
    for node in "${MASTERS[@]}" "${AGENTS[@]}"; do start_sshd "$node"; done
    if [ "$mode" = daemons ]; then
        # Under Pacemaker, the cluster starts vsmserver (the OCF agent); otherwise the lab does.
        if [ "$MANAGER" != pacemaker ]; then
            for node in "${MASTERS[@]}"; do start_daemon_named "$node" vsmserver; done
        fi
        for node in "${AGENTS[@]}"; do start_daemon_named "$node" vsmagent; done
    fi
    case $MANAGER in
        keepalived)
            for node in "${MASTERS[@]}"; do start_watch "$node"; done
            for node in "${MASTERS[@]}"; do start_keepalived "$node" "$profile"; done
            ;;
        pacemaker) start_pacemaker_cluster "$profile" ;;
        heartbeat) start_heartbeat_cluster "$profile" ;;
    esac

    if ! poll "$TIMEOUT" vip_is tlha-primary; then
        die "the VIP did not come up on tlha-primary within ${TIMEOUT}s (holders: '$(vip_holders)'; see $LAB/nodes/*/log/)"
    fi
    if ! poll "$TIMEOUT" ssh_is tlha-primary; then
        die "ssh to $VIP_NAME from the client does not reach tlha-primary (see $LAB/nodes/*/log/sshd.log)"
    fi
    trap - EXIT
    say "up: VIP $VIP ($VIP_NAME) on tlha-primary; try: $0 exec client ssh testuser@$VIP_NAME uname -n"
}

# Kill PIDS with TERM, then KILL what remains; wait until they are gone (zombies count as gone).
kill_pids() {
    local pid
    [ $# -gt 0 ] || return 0
    kill -s TERM "$@" 2>/dev/null || true
    left() {
        local p
        for p in "$@"; do pid_alive "$p" && return 1; done
        return 0
    }
    if ! poll 5 left "$@"; then
        for pid in "$@"; do
            if pid_alive "$pid"; then kill -s KILL "$pid" 2>/dev/null || true; fi
        done
        poll 5 left "$@" || warn "some processes do not die: $*"
    fi
}

# Is a lab with another prefix up (its primary's namespace exists)?
other_lab_up() {
    local f
    for f in /run/netns/*-tlha-primary; do
        [ -e "$f" ] || continue
        [ "$(basename "$f")" = "$(ns tlha-primary)" ] || return 0
    done
    return 1
}

cmd_down() {
    need_root
    local n f pid pids=() d
    # Tracked daemons first (only while they are still inside a lab namespace).
    if [ -d "$LAB/pids" ]; then
        for f in "$LAB"/pids/*.pid; do
            [ -e "$f" ] || continue
            pid=$(cat "$f" 2>/dev/null) || continue
            case $(ip netns identify "$pid" 2>/dev/null) in
                "$PREFIX"*) pid_alive "$pid" && pids+=("$pid") ;;
            esac
        done
    fi
    kill_pids "${pids[@]}"
    # Then everything else still running in a lab namespace (sessions, probes, shells).
    for n in $(lab_namespaces); do
        ns_exists "$n" || continue
        pids=()
        for pid in $(ip netns pids "$n" 2>/dev/null); do
            pid_alive "$pid" && pids+=("$pid")
        done
        kill_pids "${pids[@]}"
    done
    # File systems mounted in the lab directory (VSM_LAB_DATA_TMPFS).
    if [ -f "$LAB/mounts" ]; then
        while read -r d; do
            if [ -n "$d" ] && mountpoint -q "$d"; then umount "$d" || umount -l "$d" || warn "could not unmount $d"; fi
        done <"$LAB/mounts"
    fi
    for n in $(lab_namespaces); do
        if ns_exists "$n"; then
            ip netns delete "$n" || warn "could not delete namespace $n"
        fi
        if [ -d "/etc/netns/$n" ]; then rm -rf "/etc/netns/$n"; fi
    done
    # Files this lab installed on the host go too, unless another lab still uses them.
    if [ -f "$LAB/created-files" ] && ! other_lab_up; then
        while read -r f; do
            if [ -n "$f" ]; then rm -f "$f"; fi
        done <"$LAB/created-files"
    fi
    # Mount points this lab created on the host go too, unless another lab still uses them.
    if [ -f "$LAB/created-mountpoints" ] && ! other_lab_up; then
        while read -r d; do
            if [ -n "$d" ]; then rmdir "$d" 2>/dev/null || true; fi
        done <"$LAB/created-mountpoints"
    fi
    if [ -d "$LAB" ]; then
        if [ -f "$LAB/.vsm-lab" ]; then
            if [ "${VSM_LAB_KEEP:-0}" = 1 ]; then
                say "keeping $LAB (VSM_LAB_KEEP=1)"
                rm -f "$LAB/.vsm-lab"
            else
                rm -rf "$LAB"
            fi
        else
            warn "$LAB has no lab marker; not deleting it"
        fi
    fi
    say "down: no lab namespaces left"
}

cmd_status() {
    local node n name pid mode
    if ! lab_is_up; then
        say "down"
        for n in $(lab_namespaces); do ns_exists "$n" && warn "leftover namespace $n (run down)"; done
        return 0
    fi
    mode=$(lab_mode)
    echo "lab:      $LAB ($mode, $(lab_manager) profile $(cat "$LAB/profile"))"
    echo "VIP:      $VIP ($VIP_NAME) held by: $(vip_holders)"
    for node in "${NODES[@]}"; do
        n=$(ns "$node")
        if ! ns_exists "$n"; then
            printf '%-15s %s\n' "$node" "namespace missing"
            continue
        fi
        local link procs=""
        link=$(ip -n "$n" -o link show dev eth0 2>/dev/null | grep -q 'state UP' && echo up || echo down)
        for name in sshd keepalived hawatch corosync pacemakerd heartbeat vsmserver vsmagent xvnc; do
            [ -e "$(pidfile "$node" "$name")" ] || continue
            if pid=$(daemon_pid "$node" "$name"); then
                procs+=" $name=$pid"
            else
                procs+=" $name=dead"
            fi
        done
        printf '%-15s %-13s cable %-4s%s\n' "$node" "${ADDR[$node]}" "$link" "$procs"
    done
}

cmd_cable() {
    local action=$1 node=${2:-}
    need_root
    need_up
    [ -n "$node" ] || die "usage: $0 $action-cable NODE"
    need_node "$node"
    if [ "$action" = pull ]; then
        ip -n "$(ns "$node")" link set eth0 down
        say "cable of $node pulled"
    else
        ip -n "$(ns "$node")" link set eth0 up
        say "cable of $node plugged"
    fi
}

cmd_vip_holder() {
    need_up
    local h
    h=$(vip_holders)
    echo "${h:-none}"
    case $h in
        "" | *" "*) return 1 ;;
    esac
}

cmd_exec() {
    need_root
    need_up
    [ $# -ge 2 ] || die "usage: $0 exec NODE CMD [ARG...]"
    need_node "$1"
    node_exec "$@"
}

cmd_kill_daemon() {
    need_root
    need_up
    [ $# -ge 2 ] || die "usage: $0 kill-daemon NODE NAME [SIGNAL]  (SIGNAL defaults to KILL)"
    need_node "$1"
    local node=$1 name=$2 sig=${3:-KILL} pid pids
    pid=$(daemon_pid "$node" "$name") || die "$name is not running on $node"
    pids=$pid
    if [ "$name" = keepalived ]; then
        # keepalived is a parent and a VRRP child; a crash takes both (a VRRP child that
        # outlives its parent hands the VIP over cleanly, which is no crash).
        pids=$(ns_pids_named "$(ns "$node")" keepalived | tr '\n' ' ')
    fi
    # shellcheck disable=SC2086
    kill -s "$sig" $pids
    say "sent SIG${sig#SIG} to $name (pids ${pids% }) on $node"
}

cmd_start_daemon() {
    need_root
    need_up
    [ $# -eq 2 ] || die "usage: $0 start-daemon NODE NAME"
    need_node "$1"
    start_daemon_named "$1" "$2"
    say "started $2 on $1"
}

cmd_stop_daemon() {
    need_root
    need_up
    [ $# -eq 2 ] || die "usage: $0 stop-daemon NODE NAME"
    need_node "$1"
    stop_daemon "$1" "$2" TERM
    say "stopped $2 on $1"
}

cmd_spawn() {
    need_root
    need_up
    [ $# -ge 3 ] || die "usage: $0 spawn NODE NAME CMD [ARG...]"
    need_node "$1"
    spawn "$@"
    say "started $2 on $1 (pid $(tracked_pid "$1" "$2"))"
}

cmd_set_profile() {
    need_root
    need_up
    local profile=${1:-} node
    [ "$(lab_manager)" = keepalived ] || die "set-profile switches keepalived profiles; this lab runs $(lab_manager)"
    case $profile in guide | fast | subsecond | published) ;; *) die "usage: $0 set-profile guide|fast|subsecond|published" ;; esac
    for node in "${MASTERS[@]}"; do stop_daemon "$node" keepalived TERM; done
    echo "$profile" >"$LAB/profile"
    for node in "${MASTERS[@]}"; do start_keepalived "$node" "$profile"; done
    poll "$TIMEOUT" vip_is tlha-primary ||
        die "the VIP did not come back to tlha-primary with profile $profile (holders: '$(vip_holders)')"
    say "keepalived profile $profile active; VIP on tlha-primary"
}

cmd_wait_vip() {
    need_up
    local node=${1:-} secs=${2:-30}
    [ -n "$node" ] || die "usage: $0 wait-vip NODE [SECONDS]"
    need_node "$node"
    poll "$secs" vip_is "$node" || die "VIP not on $node after ${secs}s (holders: '$(vip_holders)')"
}

cmd_wait_ssh() {
    need_up
    local node=${1:-} secs=${2:-30}
    [ -n "$node" ] || die "usage: $0 wait-ssh NODE [SECONDS]"
    need_node "$node"
    poll "$secs" ssh_is "$node" || die "ssh $VIP_NAME is not answered by $node after ${secs}s (last: '$(ssh_answer)')"
}

cmd_logs() {
    local lines=${VSM_LAB_LOG_LINES:-40} f
    if [ ! -d "$LAB/nodes" ]; then
        say "no logs: no lab directory $LAB"
        return 0
    fi
    local pattern=("$LAB"/nodes/*/log/*.log)
    if [ -n "${1:-}" ]; then pattern=("$LAB/nodes/$1"/log/*.log); fi
    for f in "${pattern[@]}"; do
        [ -e "$f" ] || continue
        echo "===== ${f#"$LAB"/nodes/} (last $lines lines)"
        tail -n "$lines" "$f"
    done
}

usage() {
    cat <<EOF
usage: $0 COMMAND [ARGS]

  up [--manager M]          build the lab and start sshd, the HA manager M (keepalived,
                            pacemaker or heartbeat; default VSM_LAB_MANAGER or keepalived)
                            and the vsm daemons when usable binaries are in VSM_BIN_DIR;
                            waits for the VIP
  down                      stop everything the lab started, remove its namespaces, files
  status                    nodes, processes, cables, VIP holder
  pull-cable NODE           take the node's eth0 down
  plug-cable NODE           bring it up again
  vip-holder                print the master(s) holding the VIP ("none"); exit 1 unless one
  exec NODE CMD [ARG...]    run a command inside a node (hostname, /etc, mounts)
  spawn NODE NAME CMD...    start a tracked background process inside a node
  kill-daemon NODE NAME [SIG]  signal a tracked daemon (default KILL)
  start-daemon NODE NAME    (re)start sshd, keepalived, hawatch, vsmserver or vsmagent
                            (under Pacemaker, vsmserver: clear its failure, Pacemaker starts it)
  stop-daemon NODE NAME     stop a tracked daemon with TERM and wait
  set-profile PROFILE       restart both keepalived instances with another profile
                            (guide, fast, subsecond, published)
  wait-vip NODE [SECONDS]   wait until exactly NODE holds the VIP
  wait-ssh NODE [SECONDS]   wait until ssh to tlha from the client is answered by NODE
  logs [NODE]               tail the lab's logs

Nodes: ${NODES[*]}
Environment: VSM_LAB_DIR ($LAB), VSM_BIN_DIR ($BIN_DIR), VSM_LAB_MANAGER ($MANAGER),
  VSM_LAB_PROFILE (keepalived: guide, fast, subsecond, default fast; pacemaker and heartbeat:
  guide, tuned, default tuned),
  VSM_LAB_DAEMONS (auto|1|0), VSM_LAB_NET ($NET), VSM_LAB_PREFIX ($PREFIX), VSM_LAB_TIMEOUT,
  VSM_LAB_KEEP=1 (down keeps the lab directory and its logs),
  VSM_LAB_HA_KEYS (extra tl-config assignments for both masters, e.g. "/HA/peer_timeout=1s"),
  VSM_LAB_SESSION_COMMAND (the agents' /vsmagent/session_command instead of the private desktop),
  VSM_LAB_EXTRA_USERS (more users to create besides testuser..testuser3),
  VSM_LAB_DATA_TMPFS (e.g. 64M: each master's /var/lib/vsm on a tmpfs of that size),
  VSM_LAB_FAKETIME=1 (vsmserver under libfaketime: write an offset like +30s to
  \$VSM_LAB_DIR/nodes/MASTER/faketime to move that master's wall clock)
EOF
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down ;;
        status) cmd_status ;;
        pull-cable) cmd_cable pull "$@" ;;
        plug-cable) cmd_cable plug "$@" ;;
        vip-holder) cmd_vip_holder ;;
        exec) cmd_exec "$@" ;;
        spawn) cmd_spawn "$@" ;;
        kill-daemon) cmd_kill_daemon "$@" ;;
        start-daemon) cmd_start_daemon "$@" ;;
        stop-daemon) cmd_stop_daemon "$@" ;;
        set-profile) cmd_set_profile "$@" ;;
        wait-vip) cmd_wait_vip "$@" ;;
        wait-ssh) cmd_wait_ssh "$@" ;;
        logs) cmd_logs "$@" ;;
        _enter) cmd_enter "$@" ;;
        _node_exec) cmd_node_exec_internal "$@" ;;
        -h | --help | help) usage ;;
        "") usage >&2; exit 2 ;;
        *) warn "unknown command '$cmd'"; usage >&2; exit 2 ;;
    esac
}

main "$@"
