#!/bin/bash
# Install what the HA lab (scripts/ha-lab.sh), the end-to-end tests (tests/e2e/) and the
# OCF agent test (tests/ocf/) need on a fresh Debian 12 machine. Run as root.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

packages=(
    iproute2                    # ip netns, veth, bridge
    util-linux                  # unshare, mount
    procps                      # ps, pgrep for diagnostics
    psmisc                      # fuser, killall (diagnostics only; the lab kills by pid)
    passwd                      # useradd, usermod
    keepalived                  # VRRP for the resource IP
    openssh-server              # sshd on both masters
    openssh-client              # ssh, ssh-keygen on the client node
    tigervnc-standalone-server  # Xvnc on the agents
    xfonts-base                 # fonts Xvnc needs to start
    resource-agents             # ocf-tester, ocf-shellfuncs, IPaddr2
    libxml2-utils               # xmllint, checks the OCF agent's meta-data
    jq                          # parses the JSON of vsmclient and tlctl in tests/e2e
    tigervnc-viewer             # the viewer vsmconnect starts (tests/e2e/seat.sh)
    xvfb                        # the client node's screen
    x11-apps                    # xwd: screenshots of the viewer
    x11-utils                   # xwininfo, xdpyinfo
    xauth                       # X cookies of the session script (data/vsm-session)
    x11-xserver-utils           # xsetroot: the test desktop's colour
    dpkg-dev                    # dpkg-shlibdeps, which cargo-deb uses for Depends (tests/package.rs)
    binutils                    # strip, for cargo deb --strip
    systemd                     # systemd-analyze verify of the installed units (tests/package.rs)
    lintian                     # checks the Debian package (tests/package.rs)
    pacemaker                   # Pacemaker/Corosync lab (ha-lab.sh up --manager pacemaker)
    corosync
    pcs                         # the pcs commands of docs/ha-setup.md (config/pacemaker/vsm-pcs.sh)
    crmsh                       # crm, for diagnostics
    iputils-arping              # ocf:heartbeat:ethmonitor refuses to run without arping
    heartbeat                   # Heartbeat 3 lab (ha-lab.sh up --manager heartbeat)
    net-tools                   # ifconfig, used by Heartbeat's IPaddr
    faketime                    # libfaketime: clock jumps of a master in the fault campaign (scripts/chaos.sh)
)

apt-get update
# The lab starts every daemon itself (in network namespaces); none of them may start on this
# machine. Without systemd as PID 1 (CI), invoke-rc.d would start corosync, pacemaker, pcsd and
# keepalived from their postinst scripts unless /usr/sbin/policy-rc.d denies it (exit 101), so
# one is put in place for the install if the machine has none. With it, the postinst scripts
# only create users (hacluster, haclient) and directories.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# installed by scripts/install-test-deps.sh for the duration of the install\nexit 101\n' \
        >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y --no-install-recommends "${packages[@]}"

# cargo-deb builds the Debian package in tests/package.rs. Not packaged by Debian 12; building
# it takes about two minutes on two cores, once per machine.
if ! cargo deb --version >/dev/null 2>&1; then
    cargo install cargo-deb --locked --version 3.8.0
fi

missing=0
for tool in ip unshare keepalived /usr/sbin/sshd ssh ssh-keygen Xvnc ocf-tester xmllint jq useradd \
    xtigervncviewer Xvfb xwd xwininfo xdpyinfo xauth xsetroot \
    corosync corosync-keygen pacemakerd crm_mon pcs arping /usr/libexec/heartbeat/heartbeat ifconfig cl_status; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-test-deps: $tool still missing after install" >&2
        missing=1
    fi
done
exit "$missing"
