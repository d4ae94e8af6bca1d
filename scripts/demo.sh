#!/usr/bin/env bash
# The main job: replicate two VMs between two simulated pools (full, then delta) and verify.
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
exec .venv/bin/xencr demo "$@"
