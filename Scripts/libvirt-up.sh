#!/usr/bin/env bash
# Start libvirtd + virtlogd on a Debian 12 machine without systemd (CI, development hosts),
# with Baton's hook installed first (libvirtd only calls hooks that existed when it started).
#   Scripts/libvirt-up.sh HOOK_FILE      (HOOK_FILE is installed as /etc/libvirt/hooks/qemu)
# Needs root and: libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86.
# Restarts libvirtd if it runs, so the hook is picked up. Prints one line when ready.
set -euo pipefail
hook=${1:?usage: libvirt-up.sh HOOK_FILE}
command -v libvirtd >/dev/null || { echo "libvirtd not installed (apt-get install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86)" >&2; exit 2; }
# What libvirt-daemon-system would have set up: the QEMU driver resolves this user at start.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt /var/cache/libvirt /run/libvirt /etc/libvirt/hooks
[ -f /etc/libvirt/qemu.conf ] && grep -q '^security_driver = "none"' /etc/libvirt/qemu.conf || cat > /etc/libvirt/qemu.conf <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
CONF
install -m 0755 "$hook" /etc/libvirt/hooks/qemu
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive /run/libvirtd.pid; then
    kill -TERM "$(cat /run/libvirtd.pid)"
    for _ in $(seq 1 100); do alive /run/libvirtd.pid || break; sleep 0.1; done
fi
alive /run/virtlogd.pid || virtlogd -d
libvirtd -d
for _ in $(seq 1 300); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    alive /run/libvirtd.pid || { echo "libvirtd died: $(tail -3 /var/log/libvirt/libvirtd.log 2>/dev/null)" >&2; exit 1; }
    sleep 0.1
done
virsh -c qemu:///system version >/dev/null
echo "libvirtd ready (pid $(cat /run/libvirtd.pid)) with hook $hook"
