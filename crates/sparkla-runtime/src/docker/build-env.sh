#!/usr/bin/env bash
# Build Sparkla's default Docker environment image without any registry:
# a Debian root filesystem from mmdebstrap (pinned suite and package list),
# `docker import`ed and tagged. Prints the image ID and the layer digest (the sha256 of
# the root filesystem tarball, reproducible with SOURCE_DATE_EPOCH and the same mirror).
#
# Usage: build-docker-env.sh [--force] [--tag TAG]
# Environment:
#   SPARKLA_ENV_TAG        image tag (default sparkla/env:bookworm)
#   SPARKLA_DEBIAN_MIRROR  Debian mirror URL (default: the one in /etc/apt/sources.list*,
#                          else http://deb.debian.org/debian). Point it at a
#                          snapshot.debian.org URL for bit-for-bit rebuilds.
#   SPARKLA_CACHE_DIR      cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/sparkla)
#   SOURCE_DATE_EPOCH      timestamp of every file in the image (default fixed below)
#
# Caching: the recipe (suite, mirror, package list, the mmdebstrap and import commands) is hashed. If an
# image with that recipe hash (label org.sparkla.recipe) exists under the tag, nothing is
# done. Otherwise a cached root filesystem tarball with that hash is imported if present,
# else one is built (and downloaded .debs are kept in the cache for the next recipe).
# The output is also recorded in $SPARKLA_CACHE_DIR/env/<tag>.json.
set -euo pipefail

TAG="${SPARKLA_ENV_TAG:-sparkla/env:bookworm}"
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    --tag) TAG="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

# ---- the recipe (pinned) ---------------------------------------------------------------
SUITE=bookworm
VARIANT=minbase
PACKAGES="bash,ca-certificates,procps,python3,python3-numpy,python3-pandas,python3-matplotlib,nodejs"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1735689600}" # 2025-01-01T00:00:00Z
UID_GID=1000

find_mirror() {
  local f uri
  # deb822 .sources files: the URIs line of a stanza whose Suites include the suite
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '
      /^[[:space:]]*$/ { if (u != "" && s ~ ("(^| )" suite "( |$)")) { print u; exit } u=""; s=""; next }
      /^URIs:/ { u=$2 } /^Suites:/ { $1=""; s=$0 }
      END { if (u != "" && s ~ ("(^| )" suite "( |$)")) print u }' "$f" | grep -v -- '-security' | head -n1)
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  # one-line format
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '$1=="deb" { for (i=2;i<=NF;i++) if ($i !~ /^\[/ && $i ~ /:\/\//) { if ($(i+1)==suite) print $i; break } }' "$f" | head -n1)
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  echo "http://deb.debian.org/debian"
}
MIRROR="${SPARKLA_DEBIAN_MIRROR:-$(find_mirror)}"

CACHE="${SPARKLA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sparkla}/env"
mkdir -p "$CACHE/debs"
# The root filesystem (into the tar file "$1") and the image: both are part of the recipe hash.
build_rootfs() {
  mmdebstrap --mode="$MODE" --format=tar --variant="$VARIANT" --include="$PACKAGES" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in '$CACHE/debs' /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives '$CACHE/debs'" \
    --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/etc/resolv.conf "$1"/etc/hostname' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    --customize-hook="chroot \"\$1\" groupadd -g $UID_GID sparkla" \
    --customize-hook="chroot \"\$1\" useradd -u $UID_GID -g $UID_GID -d /home/sparkla -s /bin/bash sparkla" \
    --customize-hook='mkdir -p "$1"/home/sparkla "$1"/.sparkla && chown 1000:1000 "$1"/home/sparkla' \
    --customize-hook='rm -f "$1"/var/log/*.log "$1"/var/cache/ldconfig/aux-cache "$1"/var/log/apt/*' \
    "$SUITE" "$1" "$MIRROR"
}
import_image() {
  docker import \
    --change "LABEL org.sparkla.recipe=$RECIPE_HASH" \
    --change "LABEL org.sparkla.suite=$SUITE" \
    --change "LABEL org.sparkla.rootfs-sha256=$tar_sha" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV HOME=/home/sparkla' \
    --change 'USER 1000:1000' \
    --change 'WORKDIR /home/sparkla' \
    --change 'CMD ["/bin/bash"]' \
    "$TARBALL" "$TAG"
}

RECIPE_HASH=$( { declare -f build_rootfs import_image; echo "$SUITE $VARIANT $PACKAGES $MIRROR $SOURCE_DATE_EPOCH $UID_GID"; } | sha256sum | cut -c1-16)
TARBALL="$CACHE/docker-$SUITE-$RECIPE_HASH.tar"
RECORD="$CACHE/$(echo "$TAG" | tr '/:' '__').json"

command -v docker >/dev/null || { echo "error: docker CLI not found" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "error: Docker engine not reachable (DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock})" >&2; exit 1; }

existing=$(docker image inspect --format '{{index .Config.Labels "org.sparkla.recipe"}}' "$TAG" 2>/dev/null || true)
if [ "$FORCE" = 0 ] && [ "$existing" = "$RECIPE_HASH" ]; then
  id=$(docker image inspect --format '{{.Id}}' "$TAG")
  layer=$(docker image inspect --format '{{index .RootFS.Layers 0}}' "$TAG")
  echo "up to date: $TAG (recipe $RECIPE_HASH) image $id layer $layer"
  exit 0
fi

start=$(date +%s)
if [ "$FORCE" = 1 ] || [ ! -s "$TARBALL" ]; then
  command -v mmdebstrap >/dev/null || { echo "error: mmdebstrap not found (apt-get install mmdebstrap)" >&2; exit 1; }
  echo "building $SUITE root filesystem from $MIRROR (recipe $RECIPE_HASH) ..."
  MODE=root; [ "$(id -u)" = 0 ] || MODE=unshare
  tmp="$TARBALL.tmp.$$"
  trap 'rm -rf "$tmp"' EXIT
  build_rootfs "$tmp"
  mv "$tmp" "$TARBALL"
  trap - EXIT
fi
built=$(date +%s)
tar_sha=$(sha256sum "$TARBALL" | cut -d' ' -f1)
# Keep only this recipe's tarball in the cache.
for old in "$CACHE"/docker-"$SUITE"-*.tar; do
  [ "$old" = "$TARBALL" ] || rm -f "$old"
done
previous=$(docker image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)

id=$(import_image)
end=$(date +%s)
# Remove the image this tag pointed to before, if it was ours and nothing else uses it.
if [ -n "$previous" ] && [ "$previous" != "$id" ] && \
   [ -n "$(docker image inspect --format '{{index .Config.Labels "org.sparkla.recipe"}}' "$previous" 2>/dev/null)" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
size=$(docker image inspect --format '{{.Size}}' "$TAG")
layer=$(docker image inspect --format '{{index .RootFS.Layers 0}}' "$TAG")
cat > "$RECORD" <<JSON
{"tag":"$TAG","image_id":"$id","recipe":"$RECIPE_HASH","suite":"$SUITE","mirror":"$MIRROR","packages":"$PACKAGES","rootfs_sha256":"$tar_sha","layer":"$layer","source_date_epoch":$SOURCE_DATE_EPOCH,"size":$size,"build_seconds":$((built-start)),"import_seconds":$((end-built))}
JSON
echo "built $TAG"
echo "  image id:      $id (changes with every import: it covers the creation time)"
echo "  layer digest:  $layer (reproducible: the rootfs tarball's sha256)"
echo "  recipe:        $RECIPE_HASH ($SUITE, $PACKAGES from $MIRROR)"
echo "  time:          rootfs $((built-start))s, import $((end-built))s"
echo "  recorded in:   $RECORD"
