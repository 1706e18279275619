/* libvirt's public C API (Debian's libvirt-dev, pkg-config "libvirt"). Nothing else here. */
#ifndef CLIBVIRT_SHIM_H
#define CLIBVIRT_SHIM_H
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <stdlib.h>
#endif
