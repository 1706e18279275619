#!/usr/bin/env bash
# Start the ch-enabled virtchd built by Scripts/build-libvirt-ch.sh beside (never instead of)
# the system's libvirt: its own run directory /run/libvirt-ch, its own socket.
#   Scripts/virtchd-up.sh BATONVMM [DIR]
# libvirt probes `cloud-hypervisor --version` on the daemon's PATH, so a `cloud-hypervisor`
# name for batonvmm goes first on it. Prints the connection URI when ready.
set -euo pipefail
batonvmm=${1:?usage: virtchd-up.sh BATONVMM [DIR]}
dir=${2:-/var/tmp/baton-libvirt-ch}
virtchd="$dir/build/src/virtchd"
[ -x "$virtchd" ] || { echo "virtchd not built: run Scripts/build-libvirt-ch.sh $dir" >&2; exit 2; }
# The build was configured with its own localstatedir and runstatedir: nothing shared with Debian's libvirt.
mkdir -p /run/libvirt-ch "$dir/bin" /var/tmp/libvirt-ch-state/log/libvirt /var/tmp/libvirt-ch-state/lib/libvirt /var/tmp/libvirt-ch-state/cache/libvirt
ln -sfn "$batonvmm" "$dir/bin/cloud-hypervisor"
socket=/run/libvirt-ch/libvirt/virtchd-sock
uri="ch:///system?socket=$socket"
if [ -f /run/libvirt-ch/virtchd.pid ] && kill -0 "$(cat /run/libvirt-ch/virtchd.pid)" 2>/dev/null; then
    kill -TERM "$(cat /run/libvirt-ch/virtchd.pid)"; sleep 1
fi
PATH="$dir/bin:$PATH" "$virtchd" -d
version=""
for _ in $(seq 1 200); do
    version=$("$dir/build/tools/virsh" -c "$uri" version 2>/dev/null || true)
    case "$version" in *"Running hypervisor: CH"*) break ;; esac
    sleep 0.05
done
case "$version" in *"Running hypervisor: CH"*) ;; *) echo "virtchd did not come up: $version" >&2; exit 1 ;; esac
echo "$uri"
