#!/usr/bin/env bash
# Build the default Docker environment image (sparkla/env:bookworm). See the script it runs.
exec "$(dirname "$0")/../crates/sparkla-runtime/src/docker/build-env.sh" "$@"
