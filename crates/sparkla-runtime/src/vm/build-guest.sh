#!/usr/bin/env bash
# Build Sparkla's microVM guest image, shared by the Firecracker and QEMU runtimes:
#   OUT/rootfs.ext4  the environment (Debian bookworm minbase with bash, python3, nodejs,
#                    procps) with the static agent at /sbin/sparkla-agent and the guest init
#                    at /sbin/sparkla-init, made with `mkfs.ext4 -d` (no mount, no loop device)
#   OUT/vmlinuz      Debian's linux-image-cloud-amd64 kernel (for QEMU -M microvm)
#   OUT/modules/     the few kernel modules the QEMU guest needs (virtio-mmio, virtio-blk,
#                    virtio-console) and OUT/sparkla-guest-init (stripped), packed into
#                    OUT/initrd.img by the caller (`sparkla guest build`,
#                    sparkla_runtime::vm::guest::build)
#   OUT/guest.json   what was built (recipe hash, kernel version, sizes, times)
#
# Usage: build-guest.sh --agent PATH --init PATH [--out DIR] [--env-dir DIR] [--force]
#   --env-dir DIR   use this environment directory instead of building one with mmdebstrap
# Environment:
#   SPARKLA_DEBIAN_MIRROR  Debian mirror URL (default: from /etc/apt/sources.list*, else deb.debian.org)
#   SPARKLA_CACHE_DIR      cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/sparkla)
#   SOURCE_DATE_EPOCH      timestamp of every file in the image (default fixed below)
# Needs root (mkfs.ext4 -d copies owners from the directory), mmdebstrap, e2fsprogs, apt-get.
set -euo pipefail

AGENT="" INIT="" OUT="" ENV_DIR="" FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --agent) AGENT="$2"; shift ;;
    --init) INIT="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --env-dir) ENV_DIR="$2"; shift ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$AGENT" ] && [ -f "$AGENT" ] || { echo "error: --agent PATH (the static sparkla-agent) is required" >&2; exit 2; }
[ -n "$INIT" ] && [ -f "$INIT" ] || { echo "error: --init PATH (the static sparkla-guest-init) is required" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "error: building the guest image needs root (mkfs.ext4 -d keeps file owners)" >&2; exit 1; }

# ---- the recipe (pinned) ---------------------------------------------------------------
SUITE=bookworm
VARIANT=minbase
PACKAGES="bash,procps,python3,nodejs"
KERNEL_PACKAGE=linux-image-cloud-amd64
MODULES="virtio_ring virtio virtio_mmio virtio_blk virtio_console"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1735689600}" # 2025-01-01T00:00:00Z
UID_GID=1000

find_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '
      /^[[:space:]]*$/ { if (u != "" && s ~ ("(^| )" suite "( |$)")) { print u; exit } u=""; s=""; next }
      /^URIs:/ { u=$2 } /^Suites:/ { $1=""; s=$0 }
      END { if (u != "" && s ~ ("(^| )" suite "( |$)")) print u }' "$f" | grep -v -- '-security' | head -n1)
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '$1=="deb" { for (i=2;i<=NF;i++) if ($i !~ /^\[/ && $i ~ /:\/\//) { if ($(i+1)==suite) print $i; break } }' "$f" | head -n1)
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  echo "http://deb.debian.org/debian"
}
MIRROR="${SPARKLA_DEBIAN_MIRROR:-$(find_mirror)}"
CACHE="${SPARKLA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sparkla}"
OUT="${OUT:-$CACHE/guest}"
# .debs are shared with the Docker environment build
mkdir -p "$CACHE/env/debs" "$CACHE/guest-cache" "$OUT"

build_env() {
  mmdebstrap --mode=root --format=directory --variant="$VARIANT" --include="$PACKAGES" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in '$CACHE/env/debs' /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives '$CACHE/env/debs'" \
    --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/etc/resolv.conf' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    --customize-hook="chroot \"\$1\" groupadd -g $UID_GID sparkla" \
    --customize-hook="chroot \"\$1\" useradd -u $UID_GID -g $UID_GID -d /home/sparkla -s /bin/bash sparkla" \
    --customize-hook='mkdir -p "$1"/home/sparkla && chown 1000:1000 "$1"/home/sparkla' \
    --customize-hook='echo sparkla > "$1"/etc/hostname' \
    --customize-hook='rm -f "$1"/var/log/*.log "$1"/var/cache/ldconfig/aux-cache "$1"/var/log/apt/*' \
    "$SUITE" "$1" "$MIRROR"
}

ENV_HASH=$( { declare -f build_env; echo "$SUITE $VARIANT $PACKAGES $MIRROR $UID_GID"; } | sha256sum | cut -c1-16)
AGENT_SHA=$(sha256sum "$AGENT" | cut -c1-16)
INIT_SHA=$(sha256sum "$INIT" | cut -c1-16)
start=$(date +%s)

# ---- 1. the environment directory (cached by recipe) -------------------------------------
if [ -n "$ENV_DIR" ]; then
  [ -d "$ENV_DIR" ] || { echo "error: --env-dir $ENV_DIR is not a directory" >&2; exit 2; }
  ENV_HASH="dir-$(echo "$ENV_DIR" | sha256sum | cut -c1-8)"
else
  ENV_DIR="$CACHE/guest-cache/env-$SUITE-$ENV_HASH"
  if [ "$FORCE" = 1 ] || [ ! -f "$ENV_DIR/.sparkla-complete" ]; then
    command -v mmdebstrap >/dev/null || { echo "error: mmdebstrap not found (apt-get install mmdebstrap)" >&2; exit 1; }
    echo "building the $SUITE guest environment from $MIRROR (recipe $ENV_HASH) ..."
    rm -rf "$ENV_DIR" "$ENV_DIR.tmp"
    build_env "$ENV_DIR.tmp"
    touch "$ENV_DIR.tmp/.sparkla-complete"
    mv "$ENV_DIR.tmp" "$ENV_DIR"
    for old in "$CACHE"/guest-cache/env-"$SUITE"-*; do
      [ "$old" = "$ENV_DIR" ] || rm -rf "$old"
    done
  fi
fi
env_done=$(date +%s)

# ---- 2. the kernel (Debian's cloud kernel, extracted, never installed on the host) ------
KVER_PKG=$(apt-cache depends "$KERNEL_PACKAGE" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$KVER_PKG" ] || { echo "error: apt-cache knows no $KERNEL_PACKAGE (run apt-get update)" >&2; exit 1; }
KDIR="$CACHE/guest-cache/$KVER_PKG"
if [ ! -f "$KDIR/.sparkla-complete" ]; then
  echo "fetching $KVER_PKG ..."
  rm -rf "$KDIR" && mkdir -p "$KDIR/deb"
  (cd "$KDIR/deb" && apt-get download "$KVER_PKG" >/dev/null 2>&1 || apt-get download "$KVER_PKG")
  dpkg-deb -x "$KDIR"/deb/*.deb "$KDIR/x"
  rm -rf "$KDIR/deb"
  touch "$KDIR/.sparkla-complete"
fi
KVER=$(ls "$KDIR/x/lib/modules" | head -n1)
rm -rf "$OUT/modules" && mkdir -p "$OUT/modules"
for m in $MODULES; do
  f=$(find "$KDIR/x/lib/modules/$KVER/kernel" -name "$m.ko" | head -n1)
  [ -n "$f" ] || { echo "error: module $m.ko not in $KVER_PKG" >&2; exit 1; }
  cp "$f" "$OUT/modules/$m.ko"
done
printf '%s\n' $MODULES > "$OUT/modules/order"
cp "$KDIR/x/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
cp "$KDIR/x/boot/config-$KVER" "$OUT/kernel.config"
kernel_done=$(date +%s)

# ---- 3. rootfs.ext4: agent + init into the environment, mkfs.ext4 -d ----------------------
STAMP="$ENV_HASH $AGENT_SHA $INIT_SHA $KVER_PKG $(sha256sum "$0" | cut -c1-16)"
if [ "$FORCE" = 0 ] && [ -f "$OUT/rootfs.ext4" ] && [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "up to date: $OUT (env $ENV_HASH, agent $AGENT_SHA, init $INIT_SHA, $KVER_PKG)"
  exit 0
fi
install -D -m 0755 "$AGENT" "$ENV_DIR/sbin/sparkla-agent"
install -D -m 0755 "$INIT" "$ENV_DIR/sbin/sparkla-init"
# debug builds carry megabytes of debug info the guest never reads (and TCG loads slowly)
if command -v strip >/dev/null; then
  strip --strip-debug "$ENV_DIR/sbin/sparkla-agent" "$ENV_DIR/sbin/sparkla-init"
fi
cp "$ENV_DIR/sbin/sparkla-init" "$OUT/sparkla-guest-init"
mkdir -p "$ENV_DIR/home/sparkla" "$ENV_DIR/tmp" "$ENV_DIR/proc" "$ENV_DIR/sys" "$ENV_DIR/dev"
find "$ENV_DIR" -newermt "@$SOURCE_DATE_EPOCH" -print0 2>/dev/null | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH" 2>/dev/null || true
used_kib=$(du -sk --exclude=.sparkla-complete "$ENV_DIR" | cut -f1)
size_mib=$(( used_kib * 12 / 10 / 1024 + 64 ))
rm -f "$OUT/rootfs.ext4.tmp"
E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" mkfs.ext4 -q -F -L sparkla-root \
  -U 6c2a9f3e-5b1d-4c7e-9a1f-2b3c4d5e6f70 -E hash_seed=6c2a9f3e-5b1d-4c7e-9a1f-2b3c4d5e6f70 \
  -O ^has_journal -m 0 -d "$ENV_DIR" "$OUT/rootfs.ext4.tmp" "${size_mib}M"
mv "$OUT/rootfs.ext4.tmp" "$OUT/rootfs.ext4"
echo "$STAMP" > "$OUT/.stamp"
end=$(date +%s)
cat > "$OUT/guest.json" <<JSON
{"suite":"$SUITE","packages":"$PACKAGES","mirror":"$MIRROR","env_recipe":"$ENV_HASH","agent_sha256":"$AGENT_SHA","init_sha256":"$INIT_SHA","kernel_package":"$KVER_PKG","kernel_version":"$KVER","modules":"$MODULES","rootfs_mib":$size_mib,"env_seconds":$((env_done-start)),"kernel_seconds":$((kernel_done-env_done)),"mkfs_seconds":$((end-kernel_done))}
JSON
echo "built the guest image in $OUT"
echo "  rootfs.ext4  ${size_mib} MiB ($SUITE $PACKAGES, agent $AGENT_SHA, init $INIT_SHA)"
echo "  vmlinuz      $KVER ($KVER_PKG)"
echo "  time         env $((env_done-start))s, kernel $((kernel_done-env_done))s, mkfs $((end-kernel_done))s"
