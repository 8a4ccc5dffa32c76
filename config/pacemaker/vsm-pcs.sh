#!/bin/sh
# vsm-pcs.sh: the Pacemaker resources and constraints of a vsm master pair, as pcs commands.
# Run once, on one master, after both nodes are online in `pcs status`. docs/ha-setup.md
# (section 3) shows these commands with its example values; the namespace lab runs this file.
#
#   VIP=10.0.0.4 CIDR=24 NIC=eth0 PRIMARY=tlha-primary sh vsm-pcs.sh
#
# Variables (defaults are the examples of docs/ha-setup.md):
#   VIP, CIDR, NIC      the resource IP, its prefix length and the interface that carries it
#   PRIMARY             the node that should hold the resource IP when both are healthy
#   VSMSERVER, TLCTL    paths of the binaries (the OCF agent's binary and tlctl parameters)
#   AGENT_LOG           the OCF agent's logfile parameter
#   ALERT               the installed path of config/pacemaker/vsm-alert
#   MONITOR             the vsmserver monitor interval (seconds); FAILURE_TIMEOUT likewise
#   FENCING             "none" sets stonith-enabled=false (a lab without fencing devices);
#                       anything else leaves fencing on for the stonith resources you create
set -eu

VIP=${VIP:-10.0.0.4}
CIDR=${CIDR:-24}
NIC=${NIC:-eth0}
PRIMARY=${PRIMARY:-tlha-primary}
VSMSERVER=${VSMSERVER:-/usr/sbin/vsmserver}
TLCTL=${TLCTL:-/usr/bin/tlctl}
AGENT_LOG=${AGENT_LOG:-/var/log/vsmserver.log}
ALERT=${ALERT:-/usr/lib/vsm/vsm-alert}
MONITOR=${MONITOR:-1}
FAILURE_TIMEOUT=${FAILURE_TIMEOUT:-20}
FENCING=${FENCING:-site}

x() {
    echo "+ $*"
    "$@"
}

# --- pcs commands (docs/ha-setup.md, section 3) ---
if [ "$FENCING" = none ]; then
    x pcs property set stonith-enabled=false
fi
# The alert first: it must see the resource IP's first start (tlctl ha notify MASTER).
x pcs alert create id=vsm path="$ALERT" options vip_resource=tlha-ip tlctl="$TLCTL"
x pcs resource create vsmserver ocf:vsm:vsmserver binary="$VSMSERVER" tlctl="$TLCTL" logfile="$AGENT_LOG" \
    ready_attribute=vsm-ready op monitor interval="${MONITOR}s" timeout=20s op start timeout=90s op stop timeout=60s \
    meta migration-threshold=1 failure-timeout="${FAILURE_TIMEOUT}s" clone interleave=true
x pcs resource create "$NIC-link" ocf:heartbeat:ethmonitor interface="$NIC" link_status_only=true \
    repeat_count=1 repeat_interval=1 op monitor interval=1s timeout=10s clone
# Created stopped, and started once its constraints are in place.
x pcs resource create tlha-ip ocf:heartbeat:IPaddr2 ip="$VIP" cidr_netmask="$CIDR" nic="$NIC" \
    op monitor interval=10s --disabled
x pcs constraint colocation add tlha-ip with vsmserver-clone INFINITY
x pcs constraint order start vsmserver-clone then start tlha-ip symmetrical=false
x pcs constraint location tlha-ip rule score=-INFINITY not_defined vsm-ready or vsm-ready ne 1
x pcs constraint location tlha-ip rule score=-INFINITY not_defined "ethmonitor-$NIC" or "ethmonitor-$NIC" ne 1
x pcs constraint location tlha-ip prefers "$PRIMARY=100"
x pcs resource enable tlha-ip
# --- end of pcs commands ---
