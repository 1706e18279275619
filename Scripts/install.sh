#!/usr/bin/env bash
# Installs Baton on this host: the two binaries, man pages and shell completions generated from
# the argument parser, the libvirt hook, the systemd unit and the configuration file.
#
#   bash Scripts/install.sh [--prefix /usr/local] [--destdir DIR] [--no-build]
#
# --destdir stages everything under DIR (a package build, a test) instead of the live system.
# Never overwrites what an operator owns: an existing /etc/baton/baton.toml stays (the example
# is installed beside it as baton.toml.example), and an existing libvirt qemu hook that is not
# Baton's stays (Baton's is installed as qemu.baton, with a note on how to chain it).
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
destdir=""
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --destdir) destdir="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument '$1' (--prefix DIR, --destdir DIR, --no-build)" >&2; exit 64 ;;
    esac
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be absolute, not '$prefix'" >&2; exit 64 ;; esac

if [ "$build" = 1 ]; then
    swift build -c release
fi
bin=.build/release
for b in baton batonvmm; do
    [ -x "$bin/$b" ] || { echo "install.sh: $bin/$b is missing (run without --no-build)" >&2; exit 1; }
done

# Man pages: swift-argument-parser's generate-manual plugin, one page per subcommand.
man_out=$(mktemp -d)
trap 'rm -rf "$man_out" "$man_out.log"' EXIT
if ! swift package --allow-writing-to-package-directory generate-manual --multi-page --configuration release -o "$man_out" >"$man_out.log" 2>&1; then
    cat "$man_out.log" >&2
    echo "install.sh: generating the man pages failed" >&2
    exit 1
fi

root="$destdir"
install -d -m 0755 "$root$prefix/bin" "$root$prefix/share/man/man1" \
    "$root$prefix/share/bash-completion/completions" "$root$prefix/share/zsh/site-functions" \
    "$root$prefix/share/fish/vendor_completions.d" "$root/etc/libvirt/hooks" "$root/etc/systemd/system"
install -d -m 0700 "$root/etc/baton"
install -m 0755 "$bin/baton" "$bin/batonvmm" "$root$prefix/bin/"
install -m 0644 "$man_out"/*.1 "$root$prefix/share/man/man1/"
"$bin/baton" --generate-completion-script bash > "$root$prefix/share/bash-completion/completions/baton"
"$bin/baton" --generate-completion-script zsh > "$root$prefix/share/zsh/site-functions/_baton"
"$bin/baton" --generate-completion-script fish > "$root$prefix/share/fish/vendor_completions.d/baton.fish"

# The hook and the unit name the installed binary.
hook=$(mktemp)
sed "s|/usr/local/bin/baton|$prefix/bin/baton|" Config/libvirt/hooks/qemu > "$hook"
if [ -e "$root/etc/libvirt/hooks/qemu" ] && ! grep -q 'hook qemu "\$@"' "$root/etc/libvirt/hooks/qemu"; then
    install -m 0755 "$hook" "$root/etc/libvirt/hooks/qemu.baton"
    echo "install.sh: /etc/libvirt/hooks/qemu exists and is not Baton's: installed Baton's as qemu.baton; call it from yours (\"$prefix/bin/baton hook qemu \\\"\$@\\\"\")" >&2
else
    install -m 0755 "$hook" "$root/etc/libvirt/hooks/qemu"
fi
rm -f "$hook"
sed "s|/usr/local/bin/baton|$prefix/bin/baton|" Config/systemd/baton.service > "$root/etc/systemd/system/baton.service"
chmod 0644 "$root/etc/systemd/system/baton.service"
if [ -e "$root/etc/baton/baton.toml" ]; then
    install -m 0600 Config/baton.example.toml "$root/etc/baton/baton.toml.example"
else
    install -m 0600 Config/baton.example.toml "$root/etc/baton/baton.toml"
fi

echo "installed into ${destdir:-/}: $prefix/bin/{baton,batonvmm}, $(ls "$man_out" | wc -l) man pages, bash/zsh/fish completions, /etc/libvirt/hooks/qemu, /etc/systemd/system/baton.service, /etc/baton/baton.toml"
echo "next: restart libvirtd (it reads hooks at start); with systemd: systemctl daemon-reload && systemctl enable --now baton"
