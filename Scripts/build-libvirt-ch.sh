#!/usr/bin/env bash
# Build libvirt's Cloud Hypervisor ("ch") driver, virtchd and virsh from Debian's own libvirt
# source package, into a directory of their own (Debian 12 ships libvirt without the ch driver:
# debian/rules passes -Ddriver_ch=disabled). Nothing is installed system-wide; Debian's libvirt
# stays as it is.   Scripts/build-libvirt-ch.sh [DIR]     (default /var/tmp/baton-libvirt-ch)
# Result: DIR/build/src/virtchd, DIR/build/tools/virsh. Needs root (apt). ~2 min on 2 cores.
set -euo pipefail
dir=${1:-/var/tmp/baton-libvirt-ch}
if [ -x "$dir/build/src/virtchd" ] && [ -x "$dir/build/tools/virsh" ]; then
    echo "libvirt-ch already built in $dir"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# The build needs these; the ch driver itself hard-requires libvirtd, YAJL and libcurl.
apt-get install -y -qq --no-install-recommends meson ninja-build libglib2.0-dev libyajl-dev libcurl4-gnutls-dev \
    xsltproc libxml2-utils python3-docutils libxml2-dev libgnutls28-dev libtirpc-dev pkg-config gcc dpkg-dev >/dev/null
mkdir -p "$dir"
cd "$dir"
if [ ! -d libvirt-9.0.0 ]; then
    # A deb-src entry for the same Debian archive, only while fetching the source.
    src=/etc/apt/sources.list.d/baton-deb-src.sources
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$src"
    apt-get update -qq
    apt-get source -qq libvirt >/dev/null
    rm -f "$src"
    apt-get update -qq
    mv libvirt-9.0.0* libvirt-9.0.0 2>/dev/null || true
fi
cd "$dir"/libvirt-9.0.0
if [ ! -d build ]; then
    meson setup build --prefix=/opt/libvirt-ch --localstatedir=/var/tmp/libvirt-ch-state -Drunstatedir=/run/libvirt-ch \
      -Ddriver_ch=enabled -Ddriver_libvirtd=enabled -Ddriver_remote=enabled \
      -Ddriver_qemu=disabled -Ddriver_lxc=disabled -Ddriver_libxl=disabled -Ddriver_vbox=disabled -Ddriver_esx=disabled \
      -Ddriver_hyperv=disabled -Ddriver_openvz=disabled -Ddriver_vmware=disabled -Ddriver_vz=disabled -Ddriver_bhyve=disabled \
      -Ddriver_test=disabled -Ddriver_network=disabled -Ddriver_interface=disabled -Ddriver_secrets=disabled \
      -Dstorage_dir=disabled -Dstorage_fs=disabled -Dstorage_disk=disabled -Dstorage_gluster=disabled -Dstorage_iscsi=disabled \
      -Dstorage_iscsi_direct=disabled -Dstorage_lvm=disabled -Dstorage_mpath=disabled -Dstorage_rbd=disabled -Dstorage_scsi=disabled \
      -Dstorage_vstorage=disabled -Dstorage_zfs=disabled \
      -Ddocs=disabled -Dtests=disabled -Dnls=disabled -Dapparmor=disabled -Dselinux=disabled -Dpolkit=disabled -Dinit_script=none >/dev/null
fi
ninja -C build -j"$(nproc)" src/virtchd src/libvirt_driver_ch.so tools/virsh >/dev/null
ln -sfn "$dir/libvirt-9.0.0/build" "$dir/build"
echo "libvirt-ch built: $dir/build/src/virtchd, $dir/build/tools/virsh"
