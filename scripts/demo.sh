#!/usr/bin/env bash
# The main job, for now: build a VHD chain, check it, export a delta stream, apply it, verify.
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
exec .venv/bin/xencr demo "$@"
