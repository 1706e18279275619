#!/usr/bin/env bash
# promtool (the Prometheus project's linter for metrics text) from Debian's own `prometheus`
# package, unpacked, not installed (installing it would start a Prometheus server):
#   Scripts/install-promtool.sh [DIR]      (default /opt/baton/bin; needs root for apt)
# The metrics test runs `promtool check metrics` on `baton serve`'s /metrics when it is there.
set -euo pipefail
dir=${1:-/opt/baton/bin}
[ -x "$dir/promtool" ] && { "$dir/promtool" --version 2>&1 | head -1; exit 0; }
export DEBIAN_FRONTEND=noninteractive
ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || apt-get update -qq
work=$(mktemp -d)
chmod 0755 "$work"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq prometheus >/dev/null)
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
mkdir -p "$dir"
install -m 0755 "$work/root/usr/bin/promtool" "$dir/promtool"
"$dir/promtool" --version 2>&1 | head -1
