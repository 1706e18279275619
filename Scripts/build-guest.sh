#!/usr/bin/env bash
# A small real Linux guest from Debian packages only: Debian 12's cloud kernel and a static
# busybox in an initramfs whose /init is Config/guest/init (no disk image is downloaded).
#   Scripts/build-guest.sh [DIR]      (default /var/lib/baton/guest) -> DIR/vmlinuz, DIR/initrd.gz
# Needs root for apt; idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-/var/lib/baton/guest}
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$dir"
if [ ! -s "$dir/vmlinuz" ]; then
    ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 && apt-get update -qq
    work=$(mktemp -d); chmod 0755 "$work"; trap 'rm -rf "$work"' EXIT
    # linux-image-cloud-amd64 is a metapackage: its one linux-image-* dependency is the kernel.
    kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [ -n "$kpkg" ] || { echo "build-guest: cannot resolve linux-image-cloud-amd64" >&2; exit 2; }
    (cd "$work" && apt-get download -qq "$kpkg" >/dev/null)
    dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
    cp "$work"/k/boot/vmlinuz-* "$dir/vmlinuz"
fi
command -v busybox >/dev/null && [ -x /bin/busybox ] || apt-get install -y -qq --no-install-recommends busybox-static cpio >/dev/null
bb=$(command -v busybox)
file "$bb" 2>/dev/null | grep -q 'dynamically' && { echo "build-guest: $bb is not static (install busybox-static)" >&2; exit 2; }
root=$(mktemp -d)
mkdir -p "$root"/{bin,proc,sys,dev,mnt,run}
cp "$bb" "$root/bin/busybox"
install -m 0755 "$here/Config/guest/init" "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9 > "$dir/initrd.gz.new")
mv "$dir/initrd.gz.new" "$dir/initrd.gz"
rm -rf "$root"
echo "guest: $dir/vmlinuz ($(stat -c %s "$dir/vmlinuz") bytes), $dir/initrd.gz ($(stat -c %s "$dir/initrd.gz") bytes)"
