#!/usr/bin/env bash
# Both QEMUs on one host, from Debian's own archive:
#   - Debian 12's QEMU 7.2 as the system QEMU (/usr/bin/qemu-system-x86_64), with libvirtd;
#   - QEMU 10.0 from the bookworm-backports suite, unpacked (not installed) into PREFIX, with
#     its own firmware and module directory, so a 10.0 binary never loads 7.2's modules.
#   Scripts/install-qemu.sh [PREFIX]        (default /opt/baton/qemu-10.0; needs root)
# The backports source uses the same archive URI as the machine's existing bookworm entry, read
# from apt's own configuration: no host name is written here. Idempotent; prints the versions.
set -euo pipefail
prefix=${1:-/opt/baton/qemu-10.0}
export DEBIAN_FRONTEND=noninteractive

# apt on a machine that has never run `apt-get update` knows no packages at all.
lists_empty() { ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; }
lists_empty && apt-get update -qq

need=()
for p in qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev busybox-static cpio; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
[ ${#need[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

if [ ! -x "$prefix/usr/bin/qemu-system-x86_64" ]; then
    # The archive that serves bookworm itself (not -security, not -updates), as apt sees it.
    uri=$(apt-get indextargets --format '$(SITE) $(RELEASE)' 'Identifier: Packages' 2>/dev/null \
          | awk '$2 == "bookworm" { print $1; exit }')
    [ -n "$uri" ] || { echo "install-qemu: no bookworm entry in apt's sources; cannot derive the backports archive" >&2; exit 2; }
    list=/etc/apt/sources.list.d/baton-backports.list
    # Backports is NotAutomatic: nothing is installed from it unless asked for by suite.
    echo "deb $uri bookworm-backports main" > "$list"
    apt-get update -qq
    work=$(mktemp -d)
    chmod 0755 "$work"   # apt downloads as _apt where it can
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -qq qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
        qemu-system-data/bookworm-backports seabios/bookworm-backports >/dev/null)
    ver=$(dpkg-deb -f "$work"/qemu-system-x86_*.deb Version)
    case "$ver" in *:10.*) ;; *) echo "install-qemu: bookworm-backports serves qemu $ver, not 10.x" >&2; exit 2;; esac
    mkdir -p "$prefix"
    for f in "$work"/*.deb; do dpkg-deb -x "$f" "$prefix"; done
    # QEMU looks for a "qemu-bundle" directory next to its executable before its compiled-in
    # /usr paths: that is how the unpacked 10.0 finds its own modules, firmware and data.
    ln -sfn "$prefix" "$prefix/usr/bin/qemu-bundle"
    mkdir -p "$prefix/usr/lib/ipxe"
    ln -sfn /usr/lib/ipxe/qemu "$prefix/usr/lib/ipxe/qemu"
fi
echo "system QEMU: $(/usr/bin/qemu-system-x86_64 --version | head -1)"
echo "QEMU in $prefix: $("$prefix/usr/bin/qemu-system-x86_64" --version | head -1)"
