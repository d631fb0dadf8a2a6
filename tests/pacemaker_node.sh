#!/bin/sh
# One cluster node for tests/pacemaker_test.cc, run as
#   ip netns exec NS unshare -m -u --propagation private sh pacemaker_node.sh DIR NAME AGENT FENCE
# (a network, mount and UTS namespace of its own; no systemd here, so the daemons are started
# directly). DIR holds the node's private state; DIR/../corosync.conf and DIR/../authkey are the
# cluster's. Mounted over the host's: /run, /dev/shm, Pacemaker's and Corosync's state, logs and
# config, the OCF agents (with ocf/romulus added) and /media (the node's Romulus configs, disks,
# sockets and logs, at the same path on every node, as the clone's parameters need).
# The fence agent FENCE appears as /usr/sbin/fence_netns: pacemaker-fenced runs agents only from
# there, and the host's /usr/sbin is not the test's to write. A read-only overlay (the node's
# sbin directory above the host's /usr/sbin) adds it for this mount namespace alone; a bind
# mount of one file would need a placeholder file in the host's /usr/sbin.
# Each start is a power-on: /run starts empty, as a tmpfs does after a reboot.
# Prints "anchor PID": a process that lives as long as the node, for nsenter.
set -e
DIR=$1
NAME=$2
AGENT=$3
FENCE=$4
hostname "$NAME"
rm -rf "$DIR/run"
for d in run sbin shm lib-pcmk lib-coro log-pcmk log-coro etc-coro media ocf; do mkdir -p "$DIR/$d"; done
mkdir -p "$DIR/lib-pcmk/cib" "$DIR/lib-pcmk/pengine" "$DIR/lib-pcmk/blackbox" \
  "$DIR/lib-pcmk/cores" "$DIR/log-pcmk/bundles"
chown -R hacluster:haclient "$DIR/lib-pcmk" "$DIR/log-pcmk"
chmod 750 "$DIR/lib-pcmk"/*
chmod 770 "$DIR/log-pcmk"
cp "$DIR/../corosync.conf" "$DIR/../authkey" "$DIR/etc-coro/"
chmod 400 "$DIR/etc-coro/authkey"
cp -a /usr/lib/ocf/resource.d/. "$DIR/ocf/"
mkdir -p "$DIR/ocf/romulus"
cp "$AGENT" "$DIR/ocf/romulus/romulus"
chmod 755 "$DIR/ocf/romulus/romulus"
cp "$FENCE" "$DIR/sbin/fence_netns"
chmod 755 "$DIR/sbin/fence_netns"
mount --bind "$DIR/run" /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind "$DIR/lib-pcmk" /var/lib/pacemaker
mount --bind "$DIR/lib-coro" /var/lib/corosync
mount --bind "$DIR/log-pcmk" /var/log/pacemaker
mount --bind "$DIR/log-coro" /var/log/corosync
mount --bind "$DIR/etc-coro" /etc/corosync
mount --bind "$DIR/ocf" /usr/lib/ocf/resource.d
mount --bind "$DIR/media" /media
mount -t overlay overlay -o "lowerdir=$DIR/sbin:/usr/sbin" /usr/sbin
setsid sleep infinity </dev/null >/dev/null 2>&1 &
echo "anchor $!"
export PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none
setsid corosync -f </dev/null >/var/log/corosync/stdout.log 2>&1 &
# corosync answers its tool once it runs; pacemakerd needs it (bounded: 10 s).
i=0
while ! corosync-cfgtool -s >/dev/null 2>&1; do
  i=$((i + 1))
  [ $i -gt 100 ] && { echo "corosync did not come up" >&2; exit 1; }
  sleep 0.1
done
setsid pacemakerd </dev/null >/var/log/pacemaker/stdout.log 2>&1 &
echo "pacemakerd $!"
